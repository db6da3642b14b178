"""Private mount namespaces: the "machine" of one simulated host.

A :class:`HostNamespace` is a long-lived holder process started with
``unshare --mount --propagation private``; before it reports ready it mounts
the host's private directories (a tmpfs on ``/run/sanlock``, bind mounts of
private copies of the libvirt directories ...).  Commands run *inside* it
with ``nsenter --mount --target <holder pid>`` (:meth:`HostNamespace.command`,
:meth:`run`, :meth:`popen`): they see the host's private directories and the
rest of the machine's file system as usual (the storage under /var/tmp,
/dev, the project's tree).

Nothing outlives the namespace: the holder reads its stdin, a pipe whose
other end only the test process holds; on EOF (``stop()``, or the test
process dying, even by SIGKILL) or SIGTERM it ends every process left in
its mount namespace (SIGTERM, then SIGKILL) and exits, and the private
mounts go away with the namespace.

This file is also the holder program itself (run as a script, stdlib only).
"""

from __future__ import annotations

import argparse
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

READY_TIMEOUT = 30.0
STOP_GRACE = 5.0
STOP_TIMEOUT = 30.0


def mount_ns(pid: int | str) -> str | None:
    """The mount namespace of a process (``mnt:[inode]``), None if it is gone."""
    try:
        return os.readlink(f"/proc/{pid}/ns/mnt")
    except OSError:
        return None


def pids_in(ns: str, exclude: Sequence[int] = ()) -> list[int]:
    """Processes (not zombies) whose mount namespace is ns."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) in exclude:
            continue
        if mount_ns(name) == ns:
            found.append(int(name))
    return found


class HostNamespace:
    """A mount namespace with private mounts, and the processes run in it.

    tmpfs: directories that get a fresh private tmpfs (created first if
    missing: the empty directory stays on the machine, the tmpfs does not).
    binds: (source, target) pairs bind-mounted inside.
    """

    def __init__(
        self,
        name: str,
        log_path: str,
        tmpfs: Sequence[str] = (),
        binds: Sequence[tuple[str, str]] = (),
    ) -> None:
        self.name = name
        self.log_path = log_path
        self.tmpfs = list(tmpfs)
        self.binds = list(binds)
        self.holder: subprocess.Popen[bytes] | None = None
        self.ns: str | None = None
        self._procs: list[subprocess.Popen[Any]] = []

    @property
    def pid(self) -> int:
        """The holder's pid: nsenter's --target."""
        if self.holder is None:
            raise RuntimeError(f"namespace {self.name} is not running")
        return self.holder.pid

    def start(self) -> HostNamespace:
        argv = ["unshare", "--mount", "--propagation", "private", "--",
                sys.executable, os.path.abspath(__file__)]
        for path in self.tmpfs:
            argv += ["--tmpfs", path]
        for src, dst in self.binds:
            argv += ["--bind", src, dst]
        with open(self.log_path, "ab") as log:
            self.holder = subprocess.Popen(
                argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log,
                start_new_session=True,
            )
        assert self.holder.stdout is not None
        ready, _, _ = select.select([self.holder.stdout], [], [], READY_TIMEOUT)
        line = self.holder.stdout.readline() if ready else b""
        if not line.startswith(b"ready"):
            self.stop()
            raise RuntimeError(f"namespace {self.name} did not start:\n{self.log()}")
        self.ns = mount_ns(self.holder.pid)
        if self.ns is None or self.ns == mount_ns("self"):
            self.stop()
            raise RuntimeError(f"namespace {self.name}: holder is not in a new mount namespace")
        return self

    def command(self, argv: Sequence[str], cwd: str | None = None) -> list[str]:
        """argv run inside the namespace (nsenter execs it: same pid)."""
        return ["nsenter", "--mount", f"--target={self.pid}", f"--wd={cwd or os.getcwd()}",
                "--", *argv]

    def run(self, argv: Sequence[str], timeout: float = 60.0, check: bool = True,
            cwd: str | None = None, **kw: Any) -> subprocess.CompletedProcess[str]:
        """Run argv inside and wait; text output captured unless told otherwise."""
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        res = subprocess.run(self.command(argv, cwd), timeout=timeout, **kw)
        if check and res.returncode != 0:
            raise RuntimeError(
                f"{self.name}: {list(argv)} failed rc={res.returncode}\n"
                f"stdout: {res.stdout}\nstderr: {res.stderr}"
            )
        return res

    def popen(self, argv: Sequence[str], cwd: str | None = None,
              **kw: Any) -> subprocess.Popen[Any]:
        """Start argv inside; ended (at the latest) when the namespace stops.

        Returns once the process is inside (nsenter has entered and exec'd:
        the pid is argv's own) or has exited.
        """
        kw.setdefault("start_new_session", True)
        proc = subprocess.Popen(self.command(argv, cwd), **kw)
        self._procs.append(proc)
        deadline = time.monotonic() + READY_TIMEOUT
        while proc.poll() is None and time.monotonic() < deadline:
            if mount_ns(proc.pid) == self.ns:
                break
            time.sleep(0.005)
        return proc

    def pids(self) -> list[int]:
        """Processes running inside (the holder not counted)."""
        if self.ns is None:
            return []
        return pids_in(self.ns, exclude=[self.pid])

    def log(self) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def stop(self) -> None:
        """End everything inside and the holder; wait until all are gone."""
        holder = self.holder
        if holder is None:
            return
        if holder.stdin is not None:
            try:
                holder.stdin.close()  # EOF: the holder ends what is inside
            except OSError:
                pass
        try:
            holder.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            holder.kill()
            holder.wait()
        if holder.stdout is not None:
            holder.stdout.close()
        for proc in self._procs:
            try:
                proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._procs.clear()
        left = pids_in(self.ns) if self.ns else []
        for pid in left:  # only if the holder itself was killed
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.holder = None


# The holder program (stdlib only; runs as root inside the new namespace).


def _end_everything_inside(grace: float) -> None:
    own = mount_ns("self")
    assert own is not None
    me = os.getpid()
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, STOP_TIMEOUT)):
        pids = pids_in(own, exclude=[me])
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while pids_in(own, exclude=[me]) and time.monotonic() < deadline:
            # Our own children (rare: nsenter'ed processes are the test's) are reaped here.
            try:
                while os.waitpid(-1, os.WNOHANG)[0]:
                    pass
            except ChildProcessError:
                pass
            time.sleep(0.05)
        if not pids_in(own, exclude=[me]):
            return
        print(f"nsholder: still running after {sig.name}: {pids_in(own, exclude=[me])}",
              file=sys.stderr)


def _mount(argv: list[str]) -> None:
    subprocess.run(["mount", *argv], check=True, timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description="mount namespace holder for tests")
    parser.add_argument("--tmpfs", action="append", default=[])
    parser.add_argument("--bind", action="append", default=[], nargs=2, metavar=("SRC", "DST"))
    args = parser.parse_args()
    stopping = False

    def on_term(signo: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # ^C of pytest: it stops us itself
    for path in args.tmpfs:
        os.makedirs(path, exist_ok=True)
        _mount(["-t", "tmpfs", "-o", "mode=0755,size=64m", "tmpfs", path])
    for src, dst in args.bind:
        os.makedirs(dst, exist_ok=True)
        _mount(["--bind", src, dst])
    print(f"nsholder: pid {os.getpid()} mounts ready", file=sys.stderr, flush=True)
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    while not stopping:
        try:
            ready, _, _ = select.select([sys.stdin], [], [], 1.0)
        except InterruptedError:
            continue
        if ready and not os.read(sys.stdin.fileno(), 4096):
            break
    _end_everything_inside(STOP_GRACE)
    print("nsholder: done", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
