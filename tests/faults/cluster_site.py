"""A fault site whose daemon has a libvirtd of its own, for tests that restart libvirtd.

:class:`PrivateLibvirtSite` is :class:`tests.faults.site.FaultSite` (a file
and a thin block domain, one daemon, SPM here) whose daemon runs in a mount
namespace of its own with private libvirt directories and its own virtlogd
and libvirtd (tests/cluster/namespaces.py, tests/cluster/libvirtd.py), as a
simulated host of tests/cluster does: libvirtd can be stopped and started
again (:meth:`PrivateLibvirtSite.stop_libvirtd`, :meth:`start_libvirtd`)
without touching the machine's libvirtd, which other tests use.  What the
site reads from libvirt behind the daemon's back (the live XML, block jobs,
the domains left) it reads from the private libvirtd.

Also here, for any fault test: :func:`wait_mirror` (until the drive's
mirror runs), :func:`qemu_pid` (the QEMU process of a VM, from /proc) and
:class:`LogWatch` (waits for lines a daemon logs from a point on).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from typing import Any

import libvirt

from contrib import guest
from tests.cluster import hosts, libvirtd, namespaces
from tests.faults import processes
from tests.faults import site as site_mod
from tests.virt import conftest as virt_conftest
from virt import connection

STOP_TIMEOUT = 60.0
START_TIMEOUT = 60.0
WAIT = 120.0


class PrivateLibvirtSite(site_mod.FaultSite):
    """A FaultSite over a libvirtd of its own (see the module's doc)."""

    def __init__(self, workdir: str, guest_files: guest.Artifacts, **options: Any) -> None:
        super().__init__(workdir, guest_files, **options)
        # Outside workdir: the namespace binds it until it is stopped, after
        # FaultSite.close removed workdir.
        self.libvirt_root = tempfile.mkdtemp(prefix="lsmtest-faults-libvirt-", dir="/var/tmp")
        self.ns: namespaces.HostNamespace | None = None
        self.libvirt: libvirtd.Libvirtd | None = None

    @classmethod
    def make(cls, guest_files: guest.Artifacts, **options: Any) -> PrivateLibvirtSite:
        """FaultSite.create, typed: a started site (close() ends it)."""
        made = cls.create(guest_files, **options)
        assert isinstance(made, PrivateLibvirtSite)
        return made

    def start(self) -> None:
        dirs = libvirtd.private_dirs(self.libvirt_root)
        self.ns = namespaces.HostNamespace(
            "faults-host", os.path.join(self.libvirt_root, "namespace.log"), binds=dirs.binds()
        ).start()
        self.libvirt = libvirtd.Libvirtd(self.ns, dirs).start()
        plain = self.daemon
        self.daemon = hosts.HostDaemon(plain.workdir, plain.config, self.ns)
        self.daemon.extra_env.update(plain.extra_env)
        super().start()

    # libvirtd, restarted

    @property
    def uri(self) -> str:
        assert self.libvirt is not None
        return self.libvirt.uri

    def stop_libvirtd(self) -> None:
        """SIGTERM the private libvirtd and wait for it (QEMU and virtlogd live on)."""
        assert self.libvirt is not None and self.libvirt.libvirtd is not None
        proc = self.libvirt.libvirtd
        proc.send_signal(signal.SIGTERM)
        proc.wait(STOP_TIMEOUT)

    def start_libvirtd(self) -> None:
        """Start libvirtd again in the same namespace, over the same directories."""
        assert self.libvirt is not None and self.ns is not None
        with open(os.path.join(self.libvirt_root, "libvirtd.log"), "ab") as log:
            proc: subprocess.Popen[bytes] = self.ns.popen(
                ["libvirtd", "-p", "/run/libvirt/libvirtd.pid"], stdout=log,
                stderr=subprocess.STDOUT)
        self.libvirt.libvirtd = proc
        deadline = time.monotonic() + START_TIMEOUT
        while not self._answers():
            assert proc.poll() is None, f"libvirtd exited:\n{self.libvirt.log()[-3000:]}"
            assert time.monotonic() < deadline, "libvirtd does not answer after its restart"
            time.sleep(0.1)

    def _answers(self) -> bool:
        res = subprocess.run(["virsh", "-c", self.uri, "version"], capture_output=True,
                             timeout=30)
        return res.returncode == 0

    # libvirt behind the daemon's back: the private libvirtd

    def libvirt_connection(self) -> libvirt.virConnect:
        connection.start_event_loop()
        return libvirt.open(self.uri)

    def domain(self, vm: virt_conftest.GuestVM) -> tuple[libvirt.virConnect, libvirt.virDomain]:
        conn = self.libvirt_connection()
        return conn, conn.lookupByUUIDString(vm.vm_id)

    def destroy_vms(self) -> None:
        super().destroy_vms()  # through libvirt_connection(): the private libvirtd
        # libvirtd gives QEMU a mount namespace of its own: the namespace's
        # stop would not end a QEMU that libvirtd could not destroy.
        for vm_id in self.vms:
            for pid in qemu_pids(vm_id):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)

    def close(self) -> None:
        try:
            if self.libvirt is not None and (self.libvirt.libvirtd is None
                                             or self.libvirt.libvirtd.poll() is not None):
                with contextlib.suppress(Exception):
                    self.start_libvirtd()  # a test stopped it: the clean-up needs it
            super().close()
        finally:
            if self.libvirt is not None:
                self.libvirt.stop()
            if self.ns is not None:
                self.ns.stop()
            shutil.rmtree(self.libvirt_root, ignore_errors=True)


def wait_mirror(site: site_mod.FaultSite, vm: virt_conftest.GuestVM,
                timeout: float = WAIT) -> None:
    """Until the drive's mirror runs: VM.getStats shows it (copying or ready)
    and libvirt has its block job.  The replica shows in VM.getStats as soon
    as diskReplicateStart prepared it, before the job starts (a thin
    replica is extended first): a fault injected then hits the start."""
    deadline = time.monotonic() + timeout
    while "replicate" not in site.disk(vm) or not site.block_job(vm):
        assert time.monotonic() < deadline, "the mirror never started"
        time.sleep(0.05)


def qemu_pids(vm_id: str) -> list[int]:
    """The pids of QEMU processes running vm_id (their -uuid argument)."""
    return [pid for pid, argv in processes.processes()
            if os.path.basename(argv[0]).startswith("qemu-system") and vm_id in argv]


def qemu_pid(vm_id: str) -> int:
    """The pid of the QEMU process running vm_id."""
    pids = qemu_pids(vm_id)
    assert len(pids) == 1, f"QEMU processes of {vm_id}: {pids}"
    return pids[0]


class LogWatch:
    """Lines of a log file written after the watch began (a daemon's log)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.offset = os.path.getsize(path) if os.path.exists(path) else 0

    def text(self) -> str:
        with open(self.path, errors="replace") as f:
            f.seek(self.offset)
            return f.read()

    def count(self, pattern: str) -> int:
        return len(re.findall(pattern, self.text()))

    def wait(self, pattern: str, count: int = 1, timeout: float = WAIT) -> str:
        """Until pattern (a regular expression) matched count times; the text."""
        return self.wait_any({pattern: count}, timeout)

    def wait_any(self, patterns: dict[str, int], timeout: float = WAIT) -> str:
        """Until one of the patterns matched as many times as it says; the text."""
        deadline = time.monotonic() + timeout
        while True:
            text = self.text()
            if any(len(re.findall(p, text)) >= n for p, n in patterns.items()):
                return text
            assert time.monotonic() < deadline, f"never logged any of {patterns}:\n" \
                f"{self.summary()}"
            time.sleep(0.05)

    def summary(self, lines: int = 80) -> str:
        """The last requests, warnings and errors logged (no tracebacks)."""
        picked = [line for line in self.text().splitlines()
                  if re.search(r"Request method|WARNING|ERROR| INFO ", line)]
        return "\n".join(picked[-lines:])
