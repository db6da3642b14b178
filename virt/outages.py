"""When QEMU or libvirtd goes away: release a VM whose QEMU died; re-read after a reconnect.

**QEMU gone.**  QEMU can end without ``VM.destroy``: killed (``kill -9``),
crashed, destroyed behind the daemon's back, or the guest powered off.
libvirt says so with a STOPPED (or CRASHED) lifecycle event; a call that
finds no domain (``VM.getStats``, a refresh after a reconnect) says so too.
As VDSM's ``_onQemuDeath`` does, the storage of a VM whose QEMU was lost
is released first (every prepare reference of its drives and of a
replica, so links, activations and loop devices go) and only then is the
VM Down, with its exit info (:class:`virt.vm.Exit`): no caller sees it
Down with storage still held.  A guest that shut itself down keeps its
storage until ``VM.destroy`` (its volumes can be read as it left them).
Either way the VM stays listed, Down, until ``VM.destroy``.

:class:`Exits` is wired by virt/api.py: ``on_down`` is the event
dispatcher's (it runs in the event loop thread, so the release runs in a
thread of its own), ``gone`` every VM's ``on_gone`` (run where it is
called, unless that is the event loop thread or an operation holds the
VM).  Releasing takes the VM's lock, so it waits for an operation in
progress, and runs once: a VM Down with a reason (destroyed, or released
already) is left as it is.

**libvirtd back.**  While libvirtd restarts no event comes: a mirror may
have become ready, a VM paused or died.  :func:`resync` (the connection's
``on_reconnect``) reads every VM's status and every mirror's state again
(a VM whose domain is gone now is released as above).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from virt import connection, mirror, notify, pivot
from virt import drive as drive_mod
from virt import vm as vm_mod

log = logging.getLogger("virt.outages")


class Exits:
    """is_ours(vm): whether vm is a registered VM of this host (only those
    hold storage to release); teardown(vm_id, drive): release a drive's
    prepare references, its replica's included."""

    def __init__(self, is_ours: Callable[[vm_mod.VM], bool],
                 teardown: Callable[[str, drive_mod.Drive], None]) -> None:
        self._is_ours = is_ours
        self._teardown = teardown

    def on_down(self, vm: vm_mod.VM, why: vm_mod.Exit) -> None:
        """libvirt says the domain stopped (event loop thread: never block)."""
        threading.Thread(target=self.exited, args=(vm, why), name=f"exit-{vm.id[:8]}",
                         daemon=True).start()

    def gone(self, vm: vm_mod.VM, why: vm_mod.Exit) -> None:
        """A call found the domain gone: release now, before it answers, unless
        an operation holds the VM (then in a thread that waits for it)."""
        if not connection.in_event_loop() and vm.lock.acquire(blocking=False):
            try:
                self.exited(vm, why)
            finally:
                vm.lock.release()
        else:
            self.on_down(vm, why)

    def exited(self, vm: vm_mod.VM, why: vm_mod.Exit) -> None:
        """Release vm's storage, then set it Down with why (once)."""
        try:
            with vm.lock:
                if vm.exit is not None:
                    return
                if self._is_ours(vm) and why.reason != vm_mod.USER_SHUTDOWN:
                    log.warning("The domain of vm=%s is gone (%s): releasing its storage",
                                vm.id, why.info()["exitMessage"])
                    for d in vm.drives:
                        self._teardown(vm.id, d)
                vm.set_status(vm_mod.DOWN, why=why)
        except Exception:
            log.exception("Cannot release the storage of vm=%s", vm.id)


def resync(vms: list[vm_mod.VM], notifier: notify.Notifier) -> None:
    """After a reconnect: every VM's status and mirrors, from libvirt again."""
    for vm in vms:
        if vm.status == vm_mod.DOWN:
            continue
        try:
            vm.refresh_state()
            for d in vm.drives:
                if d.replica is None:
                    continue
                before = d.replica.state
                pivot.refresh_state(vm, d)
                notify.replica_changed(notifier, vm.id, d, before)
                job = mirror.job_info(vm, d)
                log.info("Re-read after reconnect vm=%s drive=%s replica=%s was=%s cur=%s "
                         "end=%s", vm.id, d.name, d.replica.state if d.replica else None,
                         before, job.get("cur"), job.get("end"))
            log.info("Re-read after reconnect vm=%s status=%s", vm.id, vm.status)
        except Exception:
            log.exception("Cannot refresh state after reconnect vm=%s", vm.id)
