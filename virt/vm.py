"""A running VM as the daemon sees it: identity, drives, status, pause code.

The VM object never keeps a ``virDomain``: libvirt objects die with their
connection, and the connection is re-opened when libvirtd restarts. Each
operation looks the domain up by UUID through :meth:`VM.call`.

Two locks: ``lock`` serializes operations on the VM (snapshot, cont, destroy,
replication) and may be held across libvirt calls; status and pause code are
guarded by a private lock that event handlers (event loop thread) take only
briefly, so an operation in progress never stalls event delivery.

**Down, and why.**  A VM that went Down carries VDSM's exit info
(:class:`Exit`: ``exitCode`` 0 normal / 1 error, ``exitReason``,
``exitMessage``) in ``VM.getStats`` and in its status event.  When the
daemon finds the domain gone without having destroyed it (QEMU killed or
crashed: libvirt's STOPPED event, or a lookup that finds no domain),
:meth:`VM.gone` hands it to ``on_gone`` (virt/outages.py releases the
VM's storage first, then sets it Down, as VDSM's ``_onQemuDeath`` does);
the VM stays listed, Down, until ``VM.destroy``.

**A pause the daemon made** (the watermark monitor suspends a VM whose
thin replica cannot grow: libvirt says "paused by the user") is recorded
with its pause code in the domain's metadata (:meth:`VM.record_pause`,
virt/metadata.py), so that a restarted daemon still knows the VM is paused
out of space (:meth:`VM.refresh_state`) and its monitor resumes it once
there is room; a VM paused by hand has nothing recorded and stays paused
NOERR.  The record is cleared once the VM runs again.

**While libvirtd is away** (restarting), :meth:`VM.stats` does not wait
for it: it answers the last status, sizes and mirror progress it read.
"""

from __future__ import annotations

import dataclasses
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


# VDSM's exitCode and exitReason (vdsm/virt/vmexitreason.py), and messages.
EXIT_NORMAL = 0
EXIT_ERROR = 1
LOST_QEMU_CONNECTION = 2
MIGRATION_SUCCEEDED = 4
ADMIN_SHUTDOWN = 6
USER_SHUTDOWN = 7
EXIT_MESSAGES = {
    LOST_QEMU_CONNECTION: "Lost connection with qemu process",
    MIGRATION_SUCCEEDED: "Migration succeeded",
    ADMIN_SHUTDOWN: "Admin shut down from the engine",
    USER_SHUTDOWN: "User shut down from within the guest",
}


@dataclasses.dataclass(frozen=True)
class Exit:
    """Why a VM is Down (VDSM's exit info)."""

    code: int
    reason: int
    message: str = ""

    def info(self) -> dict[str, Any]:
        return {"exitCode": self.code, "exitReason": self.reason,
                "exitMessage": self.message or EXIT_MESSAGES.get(self.reason, "")}


def exit_of(reason: int) -> Exit:
    """The Exit of a reason: an error unless the guest, the engine or a
    migration ended the VM."""
    code = EXIT_NORMAL if reason in (MIGRATION_SUCCEEDED, ADMIN_SHUTDOWN, USER_SHUTDOWN) \
        else EXIT_ERROR
    return Exit(code, reason, EXIT_MESSAGES.get(reason, ""))


LOST_QEMU = exit_of(LOST_QEMU_CONNECTION)
DESTROYED = exit_of(ADMIN_SHUTDOWN)


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
        recorded_pause: str | None = None,
    ) -> None:
        self.id = vm_id
        self.name = name
        self.drives = drives
        self._conn = conn
        self.lock = threading.RLock()
        self._state_lock = threading.Lock()
        self._status = status
        self._pause_code = pause_code
        # The pause code of a pause the daemon made, as our metadata records
        # it (None: nothing recorded); written under ``lock``.
        self._recorded_pause = recorded_pause
        # Why it is Down, once it went Down (None: not known, or not Down).
        self._exit: Exit | None = None
        # Told of every change of status or pause code (virt/notify.py).
        self.notifier: notify.Notifier = notify.NOBODY
        # Called when the domain is found gone without VM.destroy (virt/api.py
        # releases the storage, then calls set_status(DOWN, why=...)); None:
        # just Down.
        self.on_gone: Callable[[VM, Exit], None] | None = None
        # The last mirror progress read per drive, (cur, end): answered while
        # libvirtd cannot be asked.
        self._job_progress: dict[str, tuple[int, int]] = {}

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

    @property
    def recorded_pause(self) -> str | None:
        """The pause code our metadata records for a pause the daemon made (None: none)."""
        return self._recorded_pause

    @property
    def exit(self) -> Exit | None:
        """Why the VM is Down (None unless Down with a known reason)."""
        with self._state_lock:
            return self._exit if self._status == DOWN else None

    def set_status(self, status: str, pause_code: str | None = None,
                   why: Exit | None = None) -> None:
        """Set the status; pause code NOERR unless given (kept if Paused without
        one); why: why it is Down (kept if Down again without one)."""
        with self._state_lock:
            old, old_code, old_exit = self._status, self._pause_code, self._exit
            self._status = status
            if pause_code is not None:
                self._pause_code = pause_code
            elif status != PAUSED:
                self._pause_code = NOERR
            if status != DOWN:
                self._exit = None
            elif why is not None:
                self._exit = why
            code, new_exit = self._pause_code, self._exit
        if old != status or old_exit != new_exit:
            log.info("VM status vm=%s status=%s pause_code=%s exit=%s was=%s",
                     self.id, status, code, new_exit.info() if new_exit else None, old)
        if (old, old_code, old_exit) != (status, code, new_exit):
            info = new_exit.info() if new_exit is not None else None
            notify.safely(self.notifier.vm_status, self.id, status, code, info)

    def gone(self, why: Exit = LOST_QEMU) -> None:
        """The domain is gone and we did not destroy it: on_gone (release the
        storage, then Down), or just Down."""
        if self.on_gone is not None:
            self.on_gone(self, why)
        else:
            self.set_status(DOWN, why=why)

    def refresh_state(self) -> None:
        """Read status and pause code from libvirt (after a restart or a reconnect)."""
        try:
            state, reason = self.call(lambda dom: dom.state(0))
        except libvirt.libvirtError as e:
            if e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                self.gone()
                return
            raise
        if state in (libvirt.VIR_DOMAIN_PAUSED, libvirt.VIR_DOMAIN_PMSUSPENDED):
            code = NOERR
            if state == libvirt.VIR_DOMAIN_PAUSED and reason == libvirt.VIR_DOMAIN_PAUSED_IOERROR:
                code = self._read_pause_code()
            elif (state == libvirt.VIR_DOMAIN_PAUSED and reason == libvirt.VIR_DOMAIN_PAUSED_USER
                  and self._recorded_pause in (ENOSPC, EIO, EOTHER)):
                # Suspended by the daemon (the watermark monitor), not by a user.
                code = self._recorded_pause
                log.info("VM paused by the daemon vm=%s pause_code=%s (recorded)", self.id, code)
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
        """Write the drives into the domain's metadata (for recovery after a
        restart), with the pause code recorded (kept)."""
        self.call(lambda dom: metadata.write(dom, self.drives, self._recorded_pause))

    def record_pause(self, code: str | None) -> None:
        """Record in the domain's metadata (with the drives) the pause code
        of a pause the daemon makes, or with None clear it; raises libvirt's
        error if it cannot be written (nothing changed then)."""
        with self.lock:
            if code == self._recorded_pause:
                return
            self.call(lambda dom: metadata.write(dom, self.drives, code))
            if code is None:
                log.info("Cleared the recorded pause vm=%s was=%s", self.id, self._recorded_pause)
            else:
                log.info("Recorded the pause vm=%s pause_code=%s", self.id, code)
            self._recorded_pause = code

    def forget_pause(self) -> None:
        """Clear the recorded pause (the VM runs again); a failure is logged."""
        try:
            self.record_pause(None)
        except (libvirt.libvirtError, errors.Error) as e:
            log.warning("Cannot clear the recorded pause vm=%s: %s", self.id, e)

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
            self.forget_pause()

    def destroy_domain(self) -> None:
        """Stop QEMU now; a domain already gone is fine (its exit kept)."""
        with self.lock:
            try:
                self.call(lambda dom: dom.destroy())
            except libvirt.libvirtError as e:
                if e.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                    raise errors.OperationError(str(e), op="destroy", vm_id=self.id) from e
                log.info("Domain already gone vm=%s", self.id)
            self.set_status(DOWN, why=self.exit or DESTROYED)

    def stats(self) -> dict[str, Any]:
        """VDSM's stats of the VM.  Never waits for libvirtd: while it does
        not answer, the last sizes and mirror progress read are answered."""
        disks = {}
        dom = None
        reachable = True
        if self.status != DOWN:
            try:
                with connection.impatient():
                    dom = self._conn.lookup(self.id)
            except errors.LibvirtUnavailableError as e:
                log.debug("libvirt unavailable, stats from memory vm=%s: %s", self.id, e)
                reachable = False
            except libvirt.libvirtError as e:
                if e.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                    raise
                self.gone()
        for d in self.drives:
            if dom is not None:
                self._update_drive(dom, d)
            info = d.stats()
            if d.replica is not None:
                info["replicate"] = self._replica_stats(dom, d, reachable)
            disks[d.name] = info
        stats: dict[str, Any] = {
            "vmId": self.id,
            "vmName": self.name,
            "status": self.status,
            "pauseCode": self.pause_code,
            "disks": disks,
        }
        why = self.exit
        if why is not None:
            stats.update(why.info())
        return stats

    def _update_drive(self, dom: libvirt.virDomain, d: drive_mod.Drive) -> None:
        try:
            capacity, allocation, physical = dom.blockInfo(d.name)
        except libvirt.libvirtError as e:
            log.warning("blockInfo failed vm=%s drive=%s error=%s", self.id, d.name, e)
            return
        d.update_sizes(capacity, allocation, physical)

    def _replica_stats(self, dom: libvirt.virDomain | None, d: drive_mod.Drive,
                       reachable: bool = True) -> dict[str, Any]:
        r = d.replica
        assert r is not None
        cur = end = 0
        if not reachable:
            cur, end = self._job_progress.get(d.name, (0, 0))
        elif dom is not None:
            try:
                job = dom.blockJobInfo(d.name, 0)
            except libvirt.libvirtError as e:
                log.warning("blockJobInfo failed vm=%s drive=%s error=%s", self.id, d.name, e)
                job = None
            if job is None:  # libvirt could not say: the last reading
                cur, end = self._job_progress.get(d.name, (0, 0))
            else:
                cur, end = job.get("cur", 0), job.get("end", 0)
                self._job_progress[d.name] = (cur, end)
        return {
            "dstDisk": r.spec(),
            "state": r.state,
            "cur": cur,
            "end": end,
            "syncWrites": r.sync_writes,
            "bandwidth": r.bandwidth,
        }
