"""Processes of the fault matrix: a qemu-img that holds one call, and /proc readings.

:class:`QemuImgHold` is the ``qemu-img`` first on a FaultSite daemon's PATH
(tests/faults/site.py): it runs the real qemu-img unless a test asked it to
hold one call, so "during the clone" or "during syncData" is a known point.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import time

WAIT = 120.0
POLL = 0.05


class QemuImgHold:
    """A ``qemu-img`` shim for the daemon's PATH that can hold one call.

    ``hold(verb, vol_id)``: the next ``qemu-img <verb>`` whose arguments name
    vol_id writes its pid to a file and waits (forever) instead of running;
    its command line still reads ``qemu-img ... <verb> ... <paths>``, so a
    restarted daemon's start-up sees it as the orphaned qemu-img of its
    previous life (storage/leftovers.py ``stop_orphans``).  Every other call
    runs the real qemu-img.
    """

    SCRIPT = """#!/bin/bash
gate={gate}
if [ -s "$gate" ]; then
    read -r verb vol < "$gate"
    if [ "$1" = "$verb" ]; then
        for arg in "$@"; do
            case "$arg" in
            *"$vol"*)
                rm -f "$gate"
                echo $$ > {reached}.tmp && mv {reached}.tmp {reached}
                exec -a qemu-img /bin/bash -c 'read -r -t 3600 <> "$0"' {fifo} "$@" ;;
            esac
        done
    fi
fi
exec {real} "$@"
"""

    def __init__(self, workdir: str) -> None:
        real = shutil.which("qemu-img")
        assert real, "qemu-img is not installed"
        self.bindir = os.path.join(workdir, "bin")
        os.makedirs(self.bindir, exist_ok=True)
        self.gate = os.path.join(workdir, "hold-gate")
        self.reached = os.path.join(workdir, "hold-reached")
        fifo = os.path.join(workdir, "hold.fifo")
        if not os.path.exists(fifo):
            os.mkfifo(fifo)
        script = os.path.join(self.bindir, "qemu-img")
        with open(script, "w") as f:
            f.write(self.SCRIPT.format(gate=shlex.quote(self.gate),
                                       reached=shlex.quote(self.reached),
                                       fifo=shlex.quote(fifo), real=shlex.quote(real)))
        os.chmod(script, 0o755)
        self.pids: list[int] = []

    @property
    def path_env(self) -> dict[str, str]:
        return {"PATH": f"{self.bindir}:{os.environ.get('PATH', '/usr/bin:/bin')}"}

    def hold(self, verb: str, vol_id: str) -> None:
        """Hold the next ``qemu-img verb`` naming vol_id (one call only)."""
        if os.path.exists(self.reached):
            os.unlink(self.reached)
        with open(self.gate, "w") as f:
            f.write(f"{verb} {vol_id}\n")

    def wait_held(self, timeout: float = WAIT) -> int:
        """The held process's pid, once the call came."""
        deadline = time.monotonic() + timeout
        while not os.path.exists(self.reached):
            assert time.monotonic() < deadline, "the held qemu-img call never came"
            time.sleep(POLL)
        with open(self.reached) as f:
            pid = int(f.read())
        self.pids.append(pid)
        return pid

    def cancel(self) -> None:
        """No call is held from now on (the gate is gone)."""
        if os.path.exists(self.gate):
            os.unlink(self.gate)

    def alive(self) -> list[int]:
        return [pid for pid in self.pids if process_alive(pid)]

    def end(self) -> None:
        """Cancel the gate and kill what is still held (by pid)."""
        self.cancel()
        for pid in self.alive():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def process_alive(pid: int) -> bool:
    """Whether pid runs (a zombie does not)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rfind(b")") + 2:].split()[:1] != [b"Z"]


def processes() -> list[tuple[int, list[str]]]:
    result = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                argv = [os.fsdecode(a) for a in f.read().split(b"\0") if a]
        except OSError:
            continue
        if argv:
            result.append((int(name), argv))
    return result
