"""A second libvirtd on the machine: the libvirtd of a simulated host.

It runs in the host's mount namespace (:mod:`tests.cluster.namespaces`)
with private directories bind-mounted over ``/run/libvirt``,
``/var/lib/libvirt``, ``/var/log/libvirt`` and a copy of ``/etc/libvirt``
(its configuration files; no domain definitions), so its sockets, pid files,
domain state and logs never meet those of the machine's libvirtd, which is
not touched.  virtlogd and libvirtd run in the foreground as children of
the test (``-p`` pid files in the private run dir), so they are stopped by
pid, never by name.

From outside, connect with :attr:`Libvirtd.uri`
(``qemu+unix:///system?socket=<private run dir>/libvirt-sock``); from
inside the namespace (the host's vdsm-lsm daemon) ``qemu:///system``.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import time
from collections.abc import Callable

from tests.cluster import namespaces

START_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0
ETC = "/etc/libvirt"
INSIDE_URI = "qemu:///system"


@dataclasses.dataclass(frozen=True)
class PrivateDirs:
    """The host's libvirt directories on the machine's file system."""

    root: str

    @property
    def run(self) -> str:
        return os.path.join(self.root, "run")

    @property
    def lib(self) -> str:
        return os.path.join(self.root, "lib")

    @property
    def log(self) -> str:
        return os.path.join(self.root, "log")

    @property
    def etc(self) -> str:
        return os.path.join(self.root, "etc")

    @property
    def socket(self) -> str:
        return os.path.join(self.run, "libvirt-sock")

    @property
    def uri(self) -> str:
        return f"qemu+unix:///system?socket={self.socket}"

    def binds(self) -> list[tuple[str, str]]:
        """(private dir, where it is mounted inside the namespace)."""
        return [
            (self.run, "/run/libvirt"),
            (self.lib, "/var/lib/libvirt"),
            (self.log, "/var/log/libvirt"),
            (self.etc, ETC),
        ]


def private_dirs(root: str) -> PrivateDirs:
    """Make the private directories; /etc/libvirt's files are copied (its
    subdirectories, which hold definitions, are made empty)."""
    dirs = PrivateDirs(root)
    for path in (dirs.run, dirs.lib, os.path.join(dirs.log, "qemu"), dirs.etc):
        os.makedirs(path, exist_ok=True)
    if os.path.isdir(ETC):
        for name in os.listdir(ETC):
            src = os.path.join(ETC, name)
            dst = os.path.join(dirs.etc, name)
            if os.path.isdir(src) and not os.path.islink(src):
                os.makedirs(dst, exist_ok=True)
                shutil.copymode(src, dst)
            elif os.path.isfile(src):
                shutil.copy2(src, dst)
    return dirs


class Libvirtd:
    """virtlogd + libvirtd inside ns, over the private dirs bound there."""

    def __init__(self, ns: namespaces.HostNamespace, dirs: PrivateDirs) -> None:
        self.ns = ns
        self.dirs = dirs
        self.virtlogd: subprocess.Popen[bytes] | None = None
        self.libvirtd: subprocess.Popen[bytes] | None = None

    @property
    def uri(self) -> str:
        """The URI to reach this libvirtd from outside its namespace."""
        return self.dirs.uri

    @property
    def inside_uri(self) -> str:
        return INSIDE_URI

    def start(self) -> Libvirtd:
        self.virtlogd = self._popen(["virtlogd", "-p", "/run/libvirt/virtlogd.pid"],
                                    "virtlogd.log")
        self._wait(lambda: os.path.exists(os.path.join(self.dirs.run, "virtlogd-sock")),
                   self.virtlogd, "virtlogd")
        self.libvirtd = self._popen(["libvirtd", "-p", "/run/libvirt/libvirtd.pid"],
                                    "libvirtd.log")
        self._wait(self._answers, self.libvirtd, "libvirtd")
        return self

    def _popen(self, argv: list[str], log_name: str) -> subprocess.Popen[bytes]:
        with open(os.path.join(self.dirs.root, log_name), "ab") as log:
            proc: subprocess.Popen[bytes] = self.ns.popen(
                argv, stdout=log, stderr=subprocess.STDOUT
            )
        return proc

    def _answers(self) -> bool:
        if not os.path.exists(self.dirs.socket):
            return False
        res = subprocess.run(["virsh", "-c", self.uri, "version"], capture_output=True,
                             timeout=30)
        return res.returncode == 0

    def _wait(self, ready: Callable[[], bool], proc: subprocess.Popen[bytes], what: str) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{self.ns.name}: {what} exited rc={proc.returncode}:\n"
                                   f"{self.log(what)}")
            if ready():
                return
            time.sleep(0.1)
        raise RuntimeError(f"{self.ns.name}: {what} not ready in {START_TIMEOUT}s:\n"
                           f"{self.log(what)}")

    def log(self, what: str = "libvirtd") -> str:
        try:
            with open(os.path.join(self.dirs.root, f"{what}.log"), errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def destroy_domains(self) -> None:
        """Destroy every running domain of this libvirtd (best effort)."""
        res = subprocess.run(["virsh", "-c", self.uri, "list", "--name"],
                             capture_output=True, text=True, timeout=60)
        for name in res.stdout.split():
            subprocess.run(["virsh", "-c", self.uri, "destroy", name],
                           capture_output=True, timeout=60)

    def stop(self) -> None:
        """Its domains destroyed, libvirtd then virtlogd terminated (by pid)."""
        if self.libvirtd is not None and self.libvirtd.poll() is None:
            try:
                self.destroy_domains()
            except (OSError, subprocess.SubprocessError):
                pass
        for proc in (self.libvirtd, self.virtlogd):
            if proc is None or proc.poll() is not None:
                continue
            proc.terminate()
            try:
                proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.libvirtd = self.virtlogd = None
