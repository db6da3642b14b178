"""A real sanlock daemon per simulated host, for tests.

The packaged daemon cannot start on the test machines (it must raise
RLIMIT_MEMLOCK, and the hard limit cannot be raised here: ENVIRONMENT.md),
so it runs with the LD_PRELOAD shim of ``contrib/sanlock/`` and
``-w 0 -l 0`` (no watchdog, no mlockall).  One daemon holds one host id per
lockspace and its socket path is fixed (``/run/sanlock/sanlock.sock``), so
each simulated host runs its own daemon in its own mount namespace with a
private tmpfs on ``/run/sanlock`` (:class:`tests.cluster.namespaces.HostNamespace`);
whatever runs in that namespace (python3-sanlock, a vdsm-lsm daemon) talks
to that host's sanlock.

Timing (sanlock 3.8.5's rules, io_timeout = T seconds, as used by the
lockspace's ``add_lockspace``/``write_lockspace``):

- ``add_lockspace`` of a free host id: about 2T + 1 s (3 s with T=1);
- a host id last held by a *different* owner name, or a paxos lease whose
  owner stopped renewing: 8T + 60 s after its last renewal (the 60 s is
  sanlock's fixed watchdog fire timeout, not configurable in 3.8.5) --
  68 s with T=1.  A restarted daemon with the same ``-e`` host name takes
  its own host id back at once ("fast reacquire"), and a paxos lease held by
  an older generation of a host id is free at once.

The daemon runs as root (``-U root -G root``) by default: the test daemons
create their lease files as root with mode 0644, which the packaged
``sanlock`` user could not write.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from typing import Any

from tests.cluster import namespaces

TOP = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BUILD_SHIM = os.path.join(TOP, "contrib", "sanlock", "build-shim")
SHIM_SOURCE = os.path.join(TOP, "contrib", "sanlock", "setrlimit_shim.c")

# The io_timeout of the tests' lockspaces (seconds; sanlock's default is 10).
IO_TIMEOUT = 1
LEASE_CLIENT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "lease_client.py")
START_TIMEOUT = 30.0
STOP_TIMEOUT = 30.0
SANLOCK_DIR = "/run/sanlock"


def build_shim(out_dir: str) -> str:
    """Compile the setrlimit shim into out_dir; its path."""
    out = os.path.join(out_dir, "setrlimit_shim.so")
    subprocess.run([BUILD_SHIM, out], check=True, timeout=120, capture_output=True)
    return out


def running_daemons() -> list[str]:
    """Like ``pgrep -a sanlock``: "pid command" of every sanlock process on
    the machine, zombies left out (the helper of a killed daemon is an orphan
    that PID 1 reaps a moment later)."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or not _comm(int(name)).startswith("sanlock"):
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
            with open(f"/proc/{name}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except (OSError, IndexError):
            continue
        if state != "Z":
            found.append(f"{name} {cmdline}")
    return found


class SanlockDaemon:
    """``sanlock daemon -D`` inside ns, logging to log_path.

    host_name is the daemon's ``-e``: the owner name written in its delta
    leases; keep it per simulated host so that a restarted daemon of that
    host gets its host ids back without waiting.
    """

    def __init__(
        self,
        ns: namespaces.HostNamespace,
        shim: str,
        log_path: str,
        host_name: str,
        as_root: bool = True,
    ) -> None:
        self.ns = ns
        self.shim = shim
        self.log_path = log_path
        self.host_name = host_name
        self.as_root = as_root
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise RuntimeError(f"sanlock of {self.ns.name} is not running")
        return self.proc.pid

    def argv(self) -> list[str]:
        argv = ["env", f"LD_PRELOAD={self.shim}", "sanlock", "daemon", "-D",
                "-w", "0", "-l", "0", "-L", "-1", "-S", "-1", "-e", self.host_name]
        if self.as_root:
            argv += ["-U", "root", "-G", "root"]
        return argv

    def start(self) -> SanlockDaemon:
        with open(self.log_path, "ab") as log:
            self.proc = self.ns.popen(self.argv(), stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"sanlock of {self.ns.name} exited rc={self.proc.returncode}:\n{self.log()}"
                )
            if self.client("gets", check=False).returncode == 0:
                return self
            time.sleep(0.1)
        raise RuntimeError(f"sanlock of {self.ns.name} not ready in {START_TIMEOUT}s:\n"
                           f"{self.log()}")

    def client(self, *args: str, check: bool = True,
               timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """``sanlock client ARGS`` against this daemon."""
        return self.ns.run(["sanlock", "client", *args], check=check, timeout=timeout)

    def status(self) -> str:
        return self.client("status").stdout

    def host_status(self, lockspace: str) -> str:
        return self.client("host_status", "-s", lockspace, "-D").stdout

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal the daemon (SIGKILL: a crashed sanlock) and wait for it and
        its helper process to be gone."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)
        self.proc.wait(STOP_TIMEOUT)
        self._wait_helpers_gone()
        self.proc = None

    def stop(self) -> None:
        """Shut down (forced: its lockspaces are left, registered processes
        killed) and wait; kill -9 if it does not go."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.client("shutdown", "-f", "1", "-w", "1", check=False, timeout=STOP_TIMEOUT)
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._wait_helpers_gone()
        self.proc = None

    def _wait_helpers_gone(self) -> None:
        # The daemon forks a "sanlock-helper" that exits when the daemon does.
        deadline = time.monotonic() + STOP_TIMEOUT
        while time.monotonic() < deadline:
            if not [p for p in self.ns.pids() if _comm(p).startswith("sanlock")]:
                return
            time.sleep(0.05)
        for pid in self.ns.pids():
            if _comm(pid).startswith("sanlock"):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def log(self) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


class SanlockError(Exception):
    """A python3-sanlock call failed inside a host: e.errno is sanlock's
    (e.g. -243 SANLK_ACQUIRE_IDLIVE: "held by another host", -22, 17)."""

    def __init__(self, op: str, errno: int | None, message: str) -> None:
        self.op, self.errno, self.message = op, errno, message
        super().__init__(f"{op}: errno={errno}: {message}")


class LeaseClient:
    """A process inside ns making python3-sanlock calls (lease_client.py).

    It registers with the host's sanlock once: the paxos leases it acquires
    are held by that process until released or until :meth:`close` (or a
    kill) ends it.  ``call(op, **args)`` returns the result; it raises
    :class:`SanlockError` on failure.  ``last_seconds`` is the time the last
    call took inside (add_lockspace, acquire ...).
    """

    def __init__(self, ns: namespaces.HostNamespace, log_path: str) -> None:
        self.ns = ns
        with open(log_path, "ab") as log:
            self.proc: subprocess.Popen[str] = ns.popen(
                [sys.executable, LEASE_CLIENT], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                stderr=log, text=True,
            )
        self.last_seconds = 0.0

    @property
    def pid(self) -> int:
        return self.proc.pid

    def call(self, op: str, **args: Any) -> Any:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps({"op": op, "args": args}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise SanlockError(op, None, f"lease client exited rc={self.proc.poll()}")
        answer = json.loads(line)
        self.last_seconds = answer["seconds"]
        if not answer["ok"]:
            raise SanlockError(op, answer["errno"], answer["error"])
        return answer["result"]

    def close(self) -> None:
        """End the process (its leases are released by sanlock)."""
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


class SanlockHost:
    """A simulated host with only a sanlock daemon: a namespace with a
    private /run/sanlock and the daemon in it (no vdsm-lsm daemon)."""

    def __init__(self, name: str, workdir: str, shim: str) -> None:
        self.name = name
        self.workdir = workdir
        os.makedirs(workdir, exist_ok=True)
        self.ns = namespaces.HostNamespace(name, os.path.join(workdir, "namespace.log"),
                                           tmpfs=[SANLOCK_DIR])
        self.daemon = SanlockDaemon(self.ns, shim, os.path.join(workdir, "sanlock.log"), name)
        self._clients: list[LeaseClient] = []

    def start(self) -> SanlockHost:
        self.ns.start()
        try:
            self.daemon.start()
        except BaseException:
            self.ns.stop()
            raise
        return self

    def lease_client(self) -> LeaseClient:
        """A new python3-sanlock client process on this host."""
        c = LeaseClient(self.ns, os.path.join(self.workdir, f"client{len(self._clients)}.log"))
        self._clients.append(c)
        return c

    def stop(self) -> None:
        for c in self._clients:
            c.close()
        self._clients.clear()
        try:
            self.daemon.stop()
        finally:
            self.ns.stop()
