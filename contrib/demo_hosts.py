"""The demo's hosts and what it watches on them while the disk moves.

:class:`Host` is one vdsm-lsm daemon that contrib/demo started (its unix
socket and its log file).  :class:`ExtensionWatch` follows the logs while
move-disk runs and prints one line per extension as it happens: host 2 (the
VM's host) logs ``Extended vm=... which=replica|source`` once the SPM's
answer is in, and host 1 (the SPM) logs ``Mailbox reply ... extend=`` for
the lvextend it ran (storage/mailbox_spm.py, virt/thinp.py).
:class:`PauseWatch` polls VM.getStats for pauses.
"""

from __future__ import annotations

import dataclasses
import re
import threading
import time
from typing import Any

from vdsm_lsm import client

MiB = 1024**2
BLANK = "00000000-0000-0000-0000-000000000000"
TASK_TIMEOUT = 300.0
FIELD = re.compile(r"(\w+)=(\S+)")


class Host:
    """One simulated host: a vdsm-lsm daemon on its own unix socket."""

    def __init__(self, name: str, host_id: int, socket_path: str, log_path: str) -> None:
        self.name = name
        self.host_id = host_id
        self.socket_path = socket_path
        self.log_path = log_path

    def call(self, method: str, timeout: float = 120.0, **params: Any) -> Any:
        rpc = client.Client(socket_path=self.socket_path, timeout=timeout)
        try:
            return rpc.call(method, **params)
        finally:
            rpc.close()

    def wait_task(self, task_id: str, what: str) -> None:
        deadline = time.monotonic() + TASK_TIMEOUT
        while True:
            status = self.call("Task.getStatus", taskID=task_id)
            if status["taskState"] == "finished":
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name}: {what} not finished: {status}")
            time.sleep(0.1)
        self.call("Task.clear", taskID=task_id)
        if status["taskResult"] != "success":
            raise RuntimeError(f"{self.name}: {what} failed: {status}")

    def log_lines(self, marker: str) -> list[dict[str, str]]:
        """The key=value fields of this host's log lines holding marker."""
        try:
            with open(self.log_path, errors="replace") as f:
                text = f.read()
        except OSError:
            return []
        return [dict(FIELD.findall(line), _time=line[:23]) for line in text.splitlines()
                if marker in line]


@dataclasses.dataclass
class Extension:
    which: str  # replica or source
    domain: str  # "file" / "block" (which domain the volume is on)
    old: int
    new: int
    latency: float  # seen by the VM's host: request to refreshed (s)
    spm_extend: float  # host 1's lvextend (s), -1 if not found


class ExtensionWatch:
    """Prints every extension of vol's drive on the VM's host as it happens."""

    def __init__(self, vm_host: Host, spm: Host, vm_id: str, names: dict[str, str]) -> None:
        self.vm_host = vm_host
        self.spm = spm
        self.vm_id = vm_id
        self.names = names  # sd id -> "file domain" / "block domain"
        self.found: list[Extension] = []
        self._seen = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="extensions", daemon=True)

    def start(self) -> ExtensionWatch:
        self._seen = len(self._lines())
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._poll()  # the last ones

    def _lines(self) -> list[dict[str, str]]:
        return [d for d in self.vm_host.log_lines("Extended vm=")
                if d.get("vm") == self.vm_id]

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            self._poll()

    def _poll(self) -> None:
        lines = self._lines()
        for d in lines[self._seen:]:
            self._report(d)
        self._seen = max(self._seen, len(lines))

    def _spm_extend(self, d: dict[str, str]) -> float:
        for r in reversed(self.spm.log_lines("Mailbox reply")):
            if (r.get("vol"), r.get("sd"), r.get("requested")) == (
                    d.get("vol"), d.get("sd"), d.get("requested")):
                return float(r.get("extend", "-1"))
        return -1.0

    def _report(self, d: dict[str, str]) -> None:
        ext = Extension(which=d.get("which", "?"), domain=self.names.get(d.get("sd", ""), "?"),
                        old=int(d.get("old", 0)), new=int(d.get("new", 0)),
                        latency=float(d.get("elapsed", "0")), spm_extend=self._spm_extend(d))
        self.found.append(ext)
        spm = f", SPM lvextend {ext.spm_extend:.2f}s" if ext.spm_extend >= 0 else ""
        late = (f"{ext.latency:.2f}s via host 1's mailbox{spm}" if "elapsed" in d
                else "before the mirror starts")
        print(f"   extension {len(self.found):>2}: {ext.which:<7} ({ext.domain}) "
              f"{ext.old // MiB:>4} -> {ext.new // MiB:>4} MiB  {late}", flush=True)


class PauseWatch:
    """Counts the VM's pauses (VM.getStats status / pauseCode) while it runs."""

    def __init__(self, host: Host, vm_id: str) -> None:
        self.host = host
        self.vm_id = vm_id
        self.pauses: list[str] = []  # pauseCode of each pause
        self.paused_for: list[float] = []  # seconds, of each pause that ended
        self._paused = False
        self._since = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pauses", daemon=True)

    def start(self) -> PauseWatch:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(0.25):
            try:
                stats = self.host.call("VM.getStats", timeout=10, vmID=self.vm_id)
            except (client.ClientError, OSError):
                continue
            stats = stats[0] if isinstance(stats, list) else stats
            paused = stats.get("status") == "Paused"
            if paused and not self._paused:
                code = stats.get("pauseCode", "?")
                self.pauses.append(code)
                self._since = time.monotonic()
                print(f"   the VM paused ({code})", flush=True)
            elif self._paused and not paused:
                self.paused_for.append(time.monotonic() - self._since)
                print(f"   the VM runs again after ~{self.paused_for[-1]:.1f} s "
                      "(VM.getStats polled every 0.25 s)", flush=True)
            self._paused = paused


def short(ident: str) -> str:
    return ident[:8]


def wait_for(predicate: Any, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.1)
