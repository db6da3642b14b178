"""A running VM as the daemon sees it: identity, drives, status, pause code.

The VM object never keeps a ``virDomain``: libvirt objects die with their
connection, and the connection is re-opened when libvirtd restarts. Each
operation looks the domain up by UUID through :meth:`VM.call`.

Two locks: ``lock`` serializes operations on the VM (snapshot, cont, destroy,
replication) and may be held across libvirt calls; status and pause code are
guarded by a private lock that event handlers (event loop thread) take only
briefly, so an operation in progress never stalls event delivery.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import libvirt

from virt import connection, errors, metadata, notify
from virt import drive as drive_mod

log = logging.getLogger("virt.vm")

T = TypeVar("T")

UP = "Up"
PAUSED = "Paused"
DOWN = "Down"

NOERR = "NOERR"
ENOSPC = "ENOSPC"
EIO = "EIO"
EOTHER = "EOTHER"


def pause_code_of(reason: str) -> str:
    """Pause code of an IO_ERROR_REASON reason ("enospc", "eio", ...)."""
    return {"enospc": ENOSPC, "eio": EIO}.get(reason.lower(), EOTHER)


class VM:
    def __init__(
        self,
        vm_id: str,
        name: str,
        drives: list[drive_mod.Drive],
        conn: connection.Connection,
        status: str = DOWN,
        pause_code: str = NOERR,
    ) -> None:
        self.id = vm_id
        self.name = name
        self.drives = drives
        self._conn = conn
        self.lock = threading.RLock()
        self._state_lock = threading.Lock()
        self._status = status
        self._pause_code = pause_code
        # Told of every change of status or pause code (virt/notify.py).
        self.notifier: notify.Notifier = notify.NOBODY

    def __repr__(self) -> str:
        return f"<VM {self.id} {self.name} {self._status}>"

    # Status (events and operations)

    @property
    def status(self) -> str:
        with self._state_lock:
            return self._status

    @property
    def pause_code(self) -> str:
        with self._state_lock:
            return self._pause_code

    def set_status(self, status: str, pause_code: str | None = None) -> None:
        """Set the status; pause code NOERR unless given (kept if Paused without one)."""
        with self._state_lock:
            old, old_code = self._status, self._pause_code
            self._status = status
            if pause_code is not None:
                self._pause_code = pause_code
            elif status != PAUSED:
                self._pause_code = NOERR
            code = self._pause_code
        if old != status:
            log.info("VM status vm=%s status=%s pause_code=%s was=%s", self.id, status, code, old)
        if (old, old_code) != (status, code):
            notify.safely(self.notifier.vm_status, self.id, status, code)

    def refresh_state(self) -> None:
        """Read status and pause code from libvirt (after a restart or a reconnect)."""
        try:
            state, reason = self.call(lambda dom: dom.state(0))
        except libvirt.libvirtError as e:
            if e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                self.set_status(DOWN)
                return
            raise
        if state in (libvirt.VIR_DOMAIN_PAUSED, libvirt.VIR_DOMAIN_PMSUSPENDED):
            code = NOERR
            if state == libvirt.VIR_DOMAIN_PAUSED and reason == libvirt.VIR_DOMAIN_PAUSED_IOERROR:
                code = self._read_pause_code()
            self.set_status(PAUSED, code)
        elif state in (
            libvirt.VIR_DOMAIN_SHUTOFF,
            libvirt.VIR_DOMAIN_CRASHED,
            libvirt.VIR_DOMAIN_NOSTATE,
        ):
            self.set_status(DOWN)
        else:
            self.set_status(UP)

    def _read_pause_code(self) -> str:
        # As VDSM: libvirt only tells "no space" from "some other error".
        disk_errors = self.call(lambda dom: dom.diskErrors())
        for dev, err in disk_errors.items():
            if err == libvirt.VIR_DOMAIN_DISK_ERROR_NO_SPACE:
                log.warning("VM paused, disk out of space vm=%s disk=%s", self.id, dev)
                return ENOSPC
            if err == libvirt.VIR_DOMAIN_DISK_ERROR_UNSPEC:
                log.warning("VM paused on I/O error vm=%s disk=%s", self.id, dev)
                return EOTHER
        return EOTHER

    # libvirt access

    def call(self, fn: Callable[[libvirt.virDomain], T], retry: bool = True) -> T:
        """fn(domain) on the live connection (see Connection.call for retry)."""
        return self._conn.call(lambda c: fn(c.lookupByUUIDString(self.id)), retry=retry)

    def persist(self) -> None:
        """Write the drives into the domain's metadata (for recovery after a restart)."""
        self.call(lambda dom: metadata.write(dom, self.drives))

    # Drives

    def drive(self, name: str) -> drive_mod.Drive | None:
        for d in self.drives:
            if d.name == name:
                return d
        return None

    def drive_by_alias(self, alias: str) -> drive_mod.Drive | None:
        for d in self.drives:
            if d.alias == alias:
                return d
        return None

    def drive_by_path(self, path: str) -> drive_mod.Drive | None:
        for d in self.drives:
            if any(v.path == path for v in d.chain):
                return d
            if d.replica is not None and any(v.path == path for v in d.replica.chain):
                return d
        return None

    def find_drive(
        self, domain_id: str, image_id: str, volume_id: str | None = None
    ) -> drive_mod.Drive | None:
        """The drive running image_id of domain_id (on leaf volume_id if given)."""
        for d in self.drives:
            if d.domain_id != domain_id or d.image_id != image_id:
                continue
            if volume_id is None or d.volume_id == volume_id:
                return d
        return None

    # Operations

    def cont(self) -> None:
        with self.lock:
            if self.status == DOWN:
                raise errors.OperationError("VM is down", op="cont", vm_id=self.id)
            try:
                self.call(lambda dom: dom.resume())
            except libvirt.libvirtError as e:
                raise errors.OperationError(str(e), op="cont", vm_id=self.id) from e
            log.info("Resumed vm=%s", self.id)
            self.set_status(UP)

    def destroy_domain(self) -> None:
        """Stop QEMU now; a domain already gone is fine."""
        with self.lock:
            try:
                self.call(lambda dom: dom.destroy())
            except libvirt.libvirtError as e:
                if e.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                    raise errors.OperationError(str(e), op="destroy", vm_id=self.id) from e
                log.info("Domain already gone vm=%s", self.id)
            self.set_status(DOWN)

    def stats(self) -> dict[str, Any]:
        disks = {}
        dom = None
        if self.status != DOWN:
            try:
                dom = self._conn.lookup(self.id)
            except libvirt.libvirtError as e:
                if e.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                    raise
                self.set_status(DOWN)
        for d in self.drives:
            if dom is not None:
                self._update_drive(dom, d)
            info = d.stats()
            if d.replica is not None:
                info["replicate"] = self._replica_stats(dom, d)
            disks[d.name] = info
        return {
            "vmId": self.id,
            "vmName": self.name,
            "status": self.status,
            "pauseCode": self.pause_code,
            "disks": disks,
        }

    def _update_drive(self, dom: libvirt.virDomain, d: drive_mod.Drive) -> None:
        try:
            capacity, allocation, physical = dom.blockInfo(d.name)
        except libvirt.libvirtError as e:
            log.warning("blockInfo failed vm=%s drive=%s error=%s", self.id, d.name, e)
            return
        d.update_sizes(capacity, allocation, physical)

    def _replica_stats(self, dom: libvirt.virDomain | None, d: drive_mod.Drive) -> dict[str, Any]:
        r = d.replica
        assert r is not None
        cur = end = 0
        if dom is not None:
            try:
                job = dom.blockJobInfo(d.name, 0)
            except libvirt.libvirtError as e:
                log.warning("blockJobInfo failed vm=%s drive=%s error=%s", self.id, d.name, e)
                job = {}
            cur, end = job.get("cur", 0), job.get("end", 0)
        return {
            "dstDisk": r.spec(),
            "state": r.state,
            "cur": cur,
            "end": end,
            "syncWrites": r.sync_writes,
            "bandwidth": r.bandwidth,
        }
