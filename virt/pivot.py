"""Ending a replication: the pivot onto the replica, or the abort back to the source.

Step 5 of live storage migration (DESIGN section 1), called by
virt/replication.py's ``finish`` with the VM's lock held.

**When to pivot.**  ``ready`` means what libvirt says: the BLOCK_JOB_2
READY event, or ``<mirror ready='yes'>`` in the live domain XML.  The pivot
goes ahead then, whatever ``cur`` and ``end`` show at that instant: in the
ready state QEMU copies the last dirty data itself while it completes the
job, so a guest that keeps writing cannot starve the pivot.

**A flap.**  QEMU can leave the ready state for a moment (the job goes
to standby while it is paused or drained, and QEMU refuses to complete it
then).  A mirror that was ready once and is not now is waited for, up to
:data:`READY_WAIT` seconds, and a pivot that QEMU refuses while the job
still runs is tried again within :data:`PIVOT_WINDOW` seconds, before
Finish answers.

**A pivot QEMU accepted must end.**  Both the pivot and the abort are
asked of libvirt asynchronously (``VIR_DOMAIN_BLOCK_JOB_ABORT_ASYNC``) and
waited for here, boundedly: libvirt's synchronous call waits for the job's
end holding the domain's job lock, so a job that does not end (QEMU
accepts ``job-complete`` from a job paused behind libvirt's back, then
waits to be resumed) would hang the call, the VM and every other call on
its domain, QEMU monitor pass-through included.  While the pivot is
pending, libvirt refuses both a new pivot and an abort ("still being
ended"), and it refuses to abort a paused job at all; so a job that makes
no progress for :attr:`Timeouts.job_stall` seconds is cancelled in QEMU itself
(``block-job-cancel force``, through libvirt-qemu's monitor pass-through,
which marks the domain tainted): the VM stays on the source.  A pivot that
ends without switching leaves the replica's backing chain open in QEMU
(libvirt opened it for the pivot): it is closed
(:func:`virt.mirror.release_target`) before the replica is torn down.

**Every failure is classified** by its code:

===============================  =====================================================
``unavail`` 40                   not ready (yet, or again after a flap): retry Finish
``DestinationChainNotSynced``    an internal destination volume is not LEGAL: run
                                 ``Image.syncData INTERNAL``, then retry
``changeDisk`` 41                libvirt or QEMU refused the pivot and the mirror
                                 still runs, a pivot still copies after
                                 :attr:`Timeouts.job_end` (a retry waits for it again),
                                 or the VM is paused out of space (ENOSPC) while
                                 its replica is a thin LV: retry Finish (or abort)
``PivotImpossible``              abort-only: the mirror failed, no job runs, the VM
                                 is down, the job ended without switching the
                                 drive, or the pivot was stuck and was cancelled;
                                 call Finish with dstDisk = srcDisk
===============================  =====================================================

After a pivot the drive runs on the destination chain: metadata persisted,
the destination leaf marked LEGAL if this host is the SPM
(:func:`mark_leaf_legal`), the source chain's prepare references released.
The abort cancels the mirror (the VM stays on the source) and releases the
destination's prepare reference.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable

import libvirt

from virt import drive as drive_mod
from virt import errors, mirror, storage_iface
from virt import vm as vm_mod

log = logging.getLogger("virt.pivot")

# How long Finish waits for a mirror that was ready to be ready again.
READY_WAIT = 5.0
# How long Finish keeps trying a pivot that QEMU refuses while the job runs.
PIVOT_WINDOW = 5.0
PIVOT_RETRY_DELAY = 0.25


@dataclasses.dataclass(frozen=True)
class Timeouts:
    """How long a block job asked to end (pivot, abort) is waited for
    ([replication] job_stall_timeout, job_end_timeout)."""

    # A job that makes no progress (cur) for this long is stuck: it is
    # cancelled in QEMU.
    job_stall: float = 10.0
    # A job that still makes progress is waited for this long.
    job_end: float = mirror.JOB_END_TIMEOUT
    # Called while a job is waited for, holding the VM's lock: the watermark
    # monitor's check of this VM (Monitor.checker), which would otherwise
    # skip the busy VM while its guest fills the drive and the replica.
    while_waiting: Callable[[], None] | None = dataclasses.field(default=None, compare=False)


DEFAULT = Timeouts()
ASYNC = libvirt.VIR_DOMAIN_BLOCK_JOB_ABORT_ASYNC
ENDED, STALLED, SLOW = "ended", "stalled", "slow"


def pivot(
    vm: vm_mod.VM,
    storage: storage_iface.HostStorage,
    spm: storage_iface.SpmRequests,
    d: drive_mod.Drive,
    r: drive_mod.Replica,
    timeouts: Timeouts = DEFAULT,
) -> None:
    """Switch the drive to its replica (the mirror must be ready, the chain synced)."""
    out_of_space = vm.status == vm_mod.PAUSED and vm.pause_code == vm_mod.ENOSPC
    if out_of_space and r.need_extend and r.disk_type == drive_mod.BLOCK:
        raise errors.PivotError(
            "the VM is paused out of space (ENOSPC): its thin replica may have no room; "
            "pivot once the VM runs again, or abort", drive=d.name, vm_id=vm.id)
    if mirror_state(vm, d) != "pivot":  # else an earlier Finish's pivot is pending
        _await_ready(vm, d, r)
    check_synced(storage, r)
    _complete(vm, d, r, timeouts)

    old = (d.pool_id, d.domain_id, d.image_id, list(d.prepared))
    d.domain_id = r.domain_id
    d.image_id = r.image_id
    d.volume_id = r.volume_id
    d.chain = r.chain
    d.disk_type = r.disk_type
    d.prepared = [r.volume_id]
    d.threshold = 0
    d.replica = None
    persist(vm, d)
    mark_leaf_legal(spm, vm.id, d.name, r.pool_id, r.domain_id, r.image_id, r.volume_id)
    pool_id, sd_id, img_id, prepared = old
    for vol_id in reversed(prepared):
        teardown(storage, vm, (pool_id, sd_id, img_id, vol_id))
    log.info(
        "Pivot done vm=%s drive=%s now on sd=%s leaf=%s", vm.id, d.name, d.domain_id, d.path
    )


def abort(
    vm: vm_mod.VM, storage: storage_iface.HostStorage, d: drive_mod.Drive, r: drive_mod.Replica,
    timeouts: Timeouts = DEFAULT,
) -> None:
    """Cancel the mirror; the VM stays on the source, the replica is released."""
    log.info("Aborting replication vm=%s drive=%s dst_sd=%s", vm.id, d.name, r.domain_id)
    # libvirt opened the replica's chain for a pending pivot; a job that is
    # gone already may have ended so (cancelled in QEMU by a daemon killed
    # before it closed them): either way the replica's nodes may be open.
    release = mirror_state(vm, d) == "pivot"
    d.reset_job_event()
    try:
        vm.call(lambda dom: dom.blockJobAbort(d.name, ASYNC))
    except libvirt.libvirtError as e:
        if not mirror.job_info(vm, d):
            log.info("No block job left to abort vm=%s drive=%s: %s", vm.id, d.name, e)
            release = True
        else:
            # The job is paused behind libvirt's back, or a pivot of it is pending.
            cancel_in_qemu(vm, d, errors.ReplicaError, f"libvirt cannot abort the mirror: {e}",
                           timeouts)
    ended = _wait_end(vm, d, timeouts)
    if ended != ENDED:
        cancel_in_qemu(vm, d, errors.ReplicaError, f"the aborted mirror is {ended}", timeouts)
    if release:
        mirror.release_target(vm, d, r)
    d.replica = None
    persist(vm, d)
    teardown(storage, vm, (r.pool_id, r.domain_id, r.image_id, r.volume_id))
    log.info("Replication aborted vm=%s drive=%s, VM stays on %s", vm.id, d.name, d.path)


# Readiness


def refresh_state(vm: vm_mod.VM, d: drive_mod.Drive) -> bool | None:
    """Take the replica's state from the live domain XML's <mirror ready=...>.

    Returns what the XML says (None: the disk has no mirror).  A ready
    mirror that libvirt no longer calls ready goes back to ``copying``.
    """
    r = d.replica
    if r is None or r.state == drive_mod.FAILED:
        return None
    ready = mirror.live_ready(vm, d)
    if ready is True:
        if r.state != drive_mod.READY:
            log.info("Mirror is ready vm=%s drive=%s (from domain XML)", vm.id, d.name)
        r.state = drive_mod.READY
        r.ever_ready = True
    elif r.state == drive_mod.READY:
        log.warning("Mirror left the ready state vm=%s drive=%s", vm.id, d.name)
        r.state = drive_mod.COPYING
    return ready


def _await_ready(vm: vm_mod.VM, d: drive_mod.Drive, r: drive_mod.Replica) -> None:
    """Return once libvirt says the mirror is ready; raise a classified error if not."""
    deadline = time.monotonic() + READY_WAIT
    if r.state == drive_mod.READY:
        r.ever_ready = True  # e.g. recovered ready after a restart
    while True:
        _check_alive(vm, d, r)
        if refresh_state(vm, d):
            return
        if not r.ever_ready or time.monotonic() >= deadline:
            job = mirror.job_info(vm, d)
            flap = " (it was ready: a flap)" if r.ever_ready else ""
            raise errors.ReplicaNotReadyError(
                f"the mirror is not ready{flap}: cur {job.get('cur', 0)} "
                f"end {job.get('end', 0)}",
                drive=d.name, vm_id=vm.id,
            )
        log.info("Mirror not ready for the pivot, waiting vm=%s drive=%s", vm.id, d.name)
        d.wait_job(
            lambda ev: ev is not None and ev[1] == libvirt.VIR_DOMAIN_BLOCK_JOB_READY, 0.25
        )


def _check_alive(vm: vm_mod.VM, d: drive_mod.Drive, r: drive_mod.Replica) -> None:
    """PivotImpossible unless a mirror job of the drive runs and has not failed."""
    if vm.status == vm_mod.DOWN:
        raise errors.PivotImpossibleError("the VM is down", drive=d.name, vm_id=vm.id)
    if r.state == drive_mod.FAILED:
        raise errors.PivotImpossibleError("the mirror failed", drive=d.name, vm_id=vm.id)
    if not mirror.job_info(vm, d):
        raise errors.PivotImpossibleError("no mirror job runs", drive=d.name, vm_id=vm.id)


# The pivot itself


def _complete(
    vm: vm_mod.VM, d: drive_mod.Drive, r: drive_mod.Replica, timeouts: Timeouts
) -> None:
    """blockJobAbort(PIVOT | ASYNC), retried within PIVOT_WINDOW while the job
    runs; then wait for the job to end and check the drive runs the replica."""
    deadline = time.monotonic() + PIVOT_WINDOW
    attempt = 0
    flags = libvirt.VIR_DOMAIN_BLOCK_JOB_ABORT_PIVOT | ASYNC
    while True:
        attempt += 1
        log.info("Pivoting vm=%s drive=%s to %s attempt=%d", vm.id, d.name, r.path, attempt)
        d.reset_job_event()
        try:
            vm.call(lambda dom: dom.blockJobAbort(d.name, flags), retry=False)
            break
        except (libvirt.libvirtError, errors.LibvirtUnavailableError) as e:
            if mirror_state(vm, d) == "pivot":
                log.info("A pivot is pending already vm=%s drive=%s", vm.id, d.name)
                break
            log.warning("Pivot refused vm=%s drive=%s attempt=%d error=%s",
                        vm.id, d.name, attempt, e)
            if not mirror.job_info(vm, d):
                if _live_is_replica(vm, d, r):
                    break  # the job ended by switching (the answer was lost)
                raise errors.PivotImpossibleError(
                    f"the mirror ended without switching: {e}", drive=d.name, vm_id=vm.id
                ) from e
            if time.monotonic() >= deadline:
                raise errors.PivotError(
                    f"{e} (the mirror still runs: retry or abort)", drive=d.name, vm_id=vm.id
                ) from e
        time.sleep(PIVOT_RETRY_DELAY)
        try:
            _await_ready(vm, d, r)
        except errors.ReplicaNotReadyError as e:
            raise errors.PivotError(
                f"the mirror left the ready state during the pivot: {e}",
                drive=d.name, vm_id=vm.id,
            ) from e
    ended = _wait_end(vm, d, timeouts)
    if ended == SLOW:
        raise errors.PivotError(
            f"QEMU has not completed the pivot after {timeouts.job_end:.0f}s, its job still "
            "copies: "
            "the drive switches when it ends; retry Finish to wait for it, or abort",
            drive=d.name, vm_id=vm.id)
    if ended == STALLED and not _live_is_replica(vm, d, r):
        why = ("QEMU accepted the pivot, but its job made no progress for "
               f"{timeouts.job_stall:.0f}s (paused behind libvirt's back?)")
        cancel_in_qemu(vm, d, errors.PivotError, why, timeouts)
        if not _live_is_replica(vm, d, r):
            mirror.release_target(vm, d, r)
            raise errors.PivotImpossibleError(
                f"{why}: it was cancelled, the VM stays on the source: abort the replication",
                drive=d.name, vm_id=vm.id)
    if not _live_is_replica(vm, d, r):
        # The job ended without switching (e.g. QEMU failed the pivot): no
        # mirror is left to pivot with.
        mirror.release_target(vm, d, r)
        raise errors.PivotImpossibleError(
            f"the drive still runs {mirror.live_path(vm, d)} after the pivot",
            drive=d.name, vm_id=vm.id,
        )


def _live_is_replica(vm: vm_mod.VM, d: drive_mod.Drive, r: drive_mod.Replica) -> bool:
    return mirror.live_path(vm, d) == r.path


# A job asked to end: waited for, and cancelled in QEMU when stuck


def _wait_end(vm: vm_mod.VM, d: drive_mod.Drive, timeouts: Timeouts = DEFAULT) -> str:
    """Wait for the drive's block job to end: ENDED; STALLED once it made no
    progress (cur) for timeouts.job_stall seconds; SLOW after timeouts.job_end."""
    start = moved = time.monotonic()
    cur = None
    while True:
        job = mirror.job_info_now(vm, d)
        if job == {}:
            return ENDED
        now = time.monotonic()
        if job is not None and job.get("cur") != cur:
            cur, moved = job.get("cur"), now
        elif now - moved >= timeouts.job_stall:
            log.warning("Block job ending makes no progress vm=%s drive=%s job=%s",
                        vm.id, d.name, job)
            return STALLED
        if now - start >= timeouts.job_end:
            return SLOW
        if timeouts.while_waiting is not None:
            timeouts.while_waiting()
        d.wait_job(lambda ev: ev is not None and ev[1] in mirror.JOB_ENDED, 0.5)


def mirror_state(vm: vm_mod.VM, d: drive_mod.Drive) -> str | None:
    """The live XML's ``<mirror ready=...>`` of the drive: "yes", "pivot" (a
    pivot pending), "abort", "" (not ready); None without a mirror."""
    try:
        xml = vm.call(lambda dom: dom.XMLDesc(0))
    except libvirt.libvirtError:
        return None
    for disk in ET.fromstring(xml).findall("./devices/disk"):
        target = disk.find("target")
        if target is not None and target.get("dev") == d.name:
            found = disk.find("mirror")
            return None if found is None else found.get("ready", "")
    return None


def cancel_in_qemu(
    vm: vm_mod.VM, d: drive_mod.Drive, error: type[errors.Error], why: str,
    timeouts: Timeouts = DEFAULT,
) -> None:
    """Force-cancel the drive's mirror job in QEMU, which libvirt cannot (it
    is paused, or a pivot of it is pending), and wait for its end; error if
    that fails.  libvirt-qemu's monitor pass-through: the domain is marked
    tainted.  The VM stays on the drive's source."""
    log.error("Cancelling the mirror job in QEMU vm=%s drive=%s: %s", vm.id, d.name, why)
    try:
        jobs = [j for j in mirror.qmp(vm, "query-block-jobs") or []
                if j.get("type") == "mirror"]
        mine = [j for j in jobs if str(j.get("device", "")).startswith(f"copy-{d.name}-")]
        for job in mine or (jobs if len(jobs) == 1 else []):
            mirror.qmp(vm, "block-job-cancel", device=job["device"], force=True)
    except (libvirt.libvirtError, ValueError, KeyError) as e:
        raise error(f"{why}; cancelling it in QEMU failed: {e}", drive=d.name,
                    vm_id=vm.id) from e
    if _wait_end(vm, d, timeouts) != ENDED:
        raise error(f"{why}; the job did not end once cancelled in QEMU", drive=d.name,
                    vm_id=vm.id)
    log.warning("Mirror job cancelled in QEMU vm=%s drive=%s", vm.id, d.name)


# After the pivot, and shared helpers


def mark_leaf_legal(
    spm: storage_iface.SpmRequests,
    vm_id: str,
    drive: str,
    pool_id: str,
    sd_id: str,
    img_id: str,
    vol_id: str,
) -> None:
    """After a pivot: mark the new leaf LEGAL if this host is the pool's SPM.

    On any other host nothing is written: the engine (or move-disk) calls
    Volume.setLegality on the SPM. A failure is logged, never raised (the
    pivot is done).
    """
    try:
        if not spm.is_spm(pool_id):
            log.info(
                "Not SPM: the destination leaf is left to the SPM's Volume.setLegality "
                "vm=%s drive=%s sd=%s vol=%s", vm_id, drive, sd_id, vol_id,
            )
            return
        spm.set_volume_legality(pool_id, sd_id, img_id, vol_id, True)
    except Exception:
        log.exception(
            "Cannot mark destination leaf LEGAL vm=%s drive=%s sd=%s vol=%s",
            vm_id, drive, sd_id, vol_id,
        )
        return
    log.info("Destination leaf marked LEGAL vm=%s drive=%s sd=%s vol=%s",
             vm_id, drive, sd_id, vol_id)


def check_synced(storage: storage_iface.HostStorage, r: drive_mod.Replica) -> None:
    """Every internal volume of the destination chain must be LEGAL (synced)."""
    unsynced = storage.unsynced_volumes(r.pool_id, r.domain_id, r.image_id, r.volume_id)
    if unsynced:
        first = unsynced[0]
        log.warning(
            "Refusing pivot onto unsynced chain sd=%s img=%s vol=%s legality=%s",
            r.domain_id, r.image_id, first["volumeID"], first.get("legality"),
        )
        raise errors.DestinationNotSyncedError(
            vol_id=first["volumeID"], sd_id=r.domain_id, legality=first.get("legality")
        )


def persist(vm: vm_mod.VM, d: drive_mod.Drive) -> None:
    try:
        vm.persist()
    except (libvirt.libvirtError, errors.Error) as e:
        # Recovery reads the live chain when the metadata lags behind.
        log.error("Persisting drive failed vm=%s drive=%s error=%s", vm.id, d.name, e)


def teardown(
    storage: storage_iface.HostStorage, vm: vm_mod.VM, ids: tuple[str, str, str, str]
) -> None:
    try:
        storage.teardown(*ids)
    except Exception:
        log.exception("Teardown failed vm=%s sd=%s volume=%s", vm.id, ids[1], ids[3])
