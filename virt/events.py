"""libvirt domain events, dispatched to the VM they belong to.

:class:`Dispatcher` is the ``dispatch`` callable of a
:class:`virt.connection.Connection`: it runs in the event loop thread, finds
the VM by UUID and applies the event:

- lifecycle: status (Up, Paused, Down); resuming clears the pause code; a
  VM that stopped gets its exit info (:func:`exit_of_stop`) and, unless it
  left by migration, goes to ``on_down`` (virt/outages.py releases its
  storage in a thread of its own, then sets it Down);
- IO_ERROR_REASON with action "pause": Paused with pause code ENOSPC, EIO or
  EOTHER, then the io-error hooks (the watermark monitor extends and resumes
  a VM paused on ENOSPC);
- BLOCK_JOB_2: to the drive (its replica state and job waiters; a replica
  that becomes ready or fails is told to the notifier), then the block-job
  hooks (replication);
- BLOCK_THRESHOLD: the drive's threshold is spent (libvirt fires once), then
  the threshold hooks (the watermark monitor).

Hooks are plain callables registered by the modules that need them; they run
in the event loop thread and must hand any slow work (extending a volume) to
their own thread. A failing hook is logged and does not stop the others.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import libvirt

from virt import connection, notify
from virt import drive as drive_mod
from virt import vm as vm_mod

log = logging.getLogger("virt.events")

# hook(vm, drive, reason) -- drive None if the event named an unknown disk
IOErrorHook = Callable[[vm_mod.VM, drive_mod.Drive | None, str], None]
# hook(vm, drive, job_type, status)
BlockJobHook = Callable[[vm_mod.VM, drive_mod.Drive, int, int], None]
# hook(vm, drive, dev, path, threshold, excess); dev may be "vda[3]" for a backing node
ThresholdHook = Callable[[vm_mod.VM, drive_mod.Drive, str, str, int, int], None]
# on_down(vm, why): the domain stopped (not by migration); must not block
DownHook = Callable[[vm_mod.VM, vm_mod.Exit], None]

_UP_EVENTS = (libvirt.VIR_DOMAIN_EVENT_STARTED, libvirt.VIR_DOMAIN_EVENT_RESUMED)
_PAUSED_EVENTS = (libvirt.VIR_DOMAIN_EVENT_SUSPENDED, libvirt.VIR_DOMAIN_EVENT_PMSUSPENDED)
_DOWN_EVENTS = (
    libvirt.VIR_DOMAIN_EVENT_STOPPED,
    libvirt.VIR_DOMAIN_EVENT_SHUTDOWN,
    libvirt.VIR_DOMAIN_EVENT_CRASHED,
)


def exit_of_stop(event: int, detail: int) -> vm_mod.Exit:
    """VDSM's exit info of a domain that stopped: the guest shut it down, it
    migrated away, or (anything else: QEMU killed or crashed, destroyed
    behind our back) the connection with QEMU was lost.  VM.destroy sets
    its own (ADMIN_SHUTDOWN) before the event comes."""
    if event == libvirt.VIR_DOMAIN_EVENT_SHUTDOWN:  # QEMU saw a shutdown (before STOPPED)
        return vm_mod.exit_of(vm_mod.USER_SHUTDOWN)
    if event == libvirt.VIR_DOMAIN_EVENT_STOPPED:
        if detail == libvirt.VIR_DOMAIN_EVENT_STOPPED_SHUTDOWN:
            return vm_mod.exit_of(vm_mod.USER_SHUTDOWN)
        if detail == libvirt.VIR_DOMAIN_EVENT_STOPPED_MIGRATED:
            return vm_mod.exit_of(vm_mod.MIGRATION_SUCCEEDED)
    return vm_mod.LOST_QEMU


class Dispatcher:
    def __init__(self, lookup: Callable[[str], vm_mod.VM | None]) -> None:
        self._lookup = lookup
        self.io_error_hooks: list[IOErrorHook] = []
        self.block_job_hooks: list[BlockJobHook] = []
        self.threshold_hooks: list[ThresholdHook] = []
        # Told when a replica becomes ready or fails (virt/notify.py).
        self.notifier: notify.Notifier = notify.NOBODY
        # A VM whose domain stopped (not by migration); None: just Down.
        self.on_down: DownHook | None = None

    def __call__(self, kind: str, vm_id: str, args: tuple[Any, ...]) -> None:
        vm = self._lookup(vm_id)
        if vm is None:
            log.debug("Event for unknown vm=%s kind=%s args=%s", vm_id, kind, args)
            return
        if kind == connection.LIFECYCLE:
            self.lifecycle(vm, *args)
        elif kind == connection.IO_ERROR:
            self.io_error(vm, *args)
        elif kind == connection.BLOCK_JOB:
            self.block_job(vm, *args)
        elif kind == connection.BLOCK_THRESHOLD:
            self.block_threshold(vm, *args)
        else:
            log.warning("Unknown event kind=%s vm=%s", kind, vm_id)

    def lifecycle(self, vm: vm_mod.VM, event: int, detail: int) -> None:
        log.debug("Lifecycle event vm=%s event=%d detail=%d", vm.id, event, detail)
        if event in _UP_EVENTS:
            vm.set_status(vm_mod.UP)
        elif event in _PAUSED_EVENTS:
            code = None
            if (
                event == libvirt.VIR_DOMAIN_EVENT_SUSPENDED
                and detail == libvirt.VIR_DOMAIN_EVENT_SUSPENDED_IOERROR
                and vm.pause_code == vm_mod.NOERR
            ):
                # The IO_ERROR_REASON event (which says why) normally comes
                # first; without it we only know it was an I/O error.
                code = vm_mod.EOTHER
            vm.set_status(vm_mod.PAUSED, code)
        elif event in _DOWN_EVENTS:
            why = exit_of_stop(event, detail)
            if self.on_down is not None and why.reason != vm_mod.MIGRATION_SUCCEEDED:
                self.on_down(vm, why)
            else:
                vm.set_status(vm_mod.DOWN, why=why)

    def io_error(
        self, vm: vm_mod.VM, src_path: str, dev_alias: str, action: int, reason: str
    ) -> None:
        d = vm.drive_by_alias(dev_alias) or vm.drive_by_path(src_path)
        name = d.name if d is not None else dev_alias
        if action != libvirt.VIR_DOMAIN_EVENT_IO_ERROR_PAUSE:
            log.warning(
                "I/O error vm=%s drive=%s path=%s reason=%s action=%d",
                vm.id,
                name,
                src_path,
                reason,
                action,
            )
            return
        code = vm_mod.pause_code_of(reason)
        log.warning(
            "VM paused on I/O error vm=%s drive=%s path=%s reason=%s pause_code=%s",
            vm.id,
            name,
            src_path,
            reason,
            code,
        )
        vm.set_status(vm_mod.PAUSED, code)
        for hook in list(self.io_error_hooks):
            _run_hook(hook, vm, d, reason)

    def block_job(self, vm: vm_mod.VM, disk: str, job_type: int, status: int) -> None:
        d = vm.drive(disk) or vm.drive_by_path(disk)
        if d is None:
            log.warning("Block job event for unknown drive vm=%s disk=%s", vm.id, disk)
            return
        log.info(
            "Block job event vm=%s drive=%s type=%d status=%d", vm.id, d.name, job_type, status
        )
        before = d.replica.state if d.replica is not None else None
        d.on_block_job(job_type, status)
        notify.replica_changed(self.notifier, vm.id, d, before)
        for hook in list(self.block_job_hooks):
            _run_hook(hook, vm, d, job_type, status)

    def block_threshold(
        self, vm: vm_mod.VM, dev: str, path: str, threshold: int, excess: int
    ) -> None:
        name = dev.split("[", 1)[0]
        d = vm.drive(name)
        if d is None:
            log.warning("Threshold event for unknown drive vm=%s dev=%s", vm.id, dev)
            return
        log.info(
            "Block threshold crossed vm=%s dev=%s path=%s threshold=%d excess=%d",
            vm.id,
            dev,
            path,
            threshold,
            excess,
        )
        if dev == d.name:
            # libvirt removes a threshold once it fired.
            d.threshold = 0
        if not self.threshold_hooks:
            log.debug("No threshold hook registered vm=%s dev=%s", vm.id, dev)
        for hook in list(self.threshold_hooks):
            _run_hook(hook, vm, d, dev, path, threshold, excess)


def _run_hook(hook: Callable[..., None], *args: Any) -> None:
    try:
        hook(*args)
    except Exception:
        log.exception("Event hook %r failed", hook)
