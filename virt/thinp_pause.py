"""The watermark monitor's own pause of a VM out of space, and its resume.

QEMU pauses a VM whose thin source ran out of space itself (``werror=enospc``)
and libvirt remembers why: "paused on an I/O error", ``virDomainGetDiskErrors``
saying "no space", which a restarted daemon reads back (``VM.refresh_state``).
A mirror's replica has no such policy (``report``), so the monitor
(virt/thinp.py) suspends a VM whose thin replica cannot grow itself, and for
libvirt that is a plain "paused by the user", a user's pause.  So the pause
code is **recorded in the domain's metadata first** (``VM.record_pause``:
``pauseCode="ENOSPC"`` on our element), then the VM suspended; a restarted
daemon finds it Paused with pause code ENOSPC, and its monitor extends what
needs it and resumes the VM.  Every resume (here, ``VM.cont``) clears the
record, and the monitor clears one left over (the VM runs again, or was
paused by hand since: pause code NOERR).

Recorded before the suspend: a daemon killed in between leaves a running VM
with a record, which the next daemon's monitor clears; the other order would
leave a VM paused by us that looks paused by hand.  A record that cannot be
written does not stop the pause (the replica must not overflow): that VM is
then recovered Paused NOERR, as before.
"""

from __future__ import annotations

import logging

import libvirt

from virt import errors
from virt import vm as vm_mod

log = logging.getLogger("virt.thinp")


def pause(vm: vm_mod.VM, drive: str, detail: str) -> bool:
    """Suspend vm out of space (pause code ENOSPC, recorded first) because
    drive's replica cannot be extended (detail: why, for the log); whether
    it is paused now."""
    try:
        vm.record_pause(vm_mod.ENOSPC)
    except (libvirt.libvirtError, errors.Error) as e:
        log.error("Cannot record the pause of vm=%s (a restarted daemon will not know it "
                  "paused out of space): %s", vm.id, e)
    try:
        vm.call(lambda dom: dom.suspend())
    except libvirt.libvirtError as e:
        log.error("Cannot pause vm=%s, its replica has no room drive=%s: %s", vm.id, drive, e)
        vm.forget_pause()
        return False
    vm.set_status(vm_mod.PAUSED, vm_mod.ENOSPC)
    log.warning("Paused vm=%s (ENOSPC): the replica of drive=%s cannot be extended %s",
                vm.id, drive, detail)
    return True


def resume(vm: vm_mod.VM) -> bool:
    """Resume vm if it is paused out of space (and clear its recorded pause);
    whether it was resumed."""
    if vm.status != vm_mod.PAUSED or vm.pause_code != vm_mod.ENOSPC:
        return False
    try:
        vm.call(lambda dom: dom.resume())
    except libvirt.libvirtError as e:
        log.warning("Cannot resume vm=%s after extension: %s", vm.id, e)
        return False
    vm.set_status(vm_mod.UP)
    vm.forget_pause()
    return True


def forget_stale(vm: vm_mod.VM) -> None:
    """Clear a recorded pause of a VM no longer paused out of space (resumed
    behind our back, or paused by hand since)."""
    if vm.recorded_pause is None:
        return
    if vm.status == vm_mod.PAUSED and vm.pause_code == vm_mod.ENOSPC:
        return
    log.info("Clearing the recorded pause of vm=%s: it is %s pause_code=%s now", vm.id,
             vm.status, vm.pause_code)
    vm.forget_pause()
