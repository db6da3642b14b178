"""Replication: mirror a running drive into another domain, then pivot or abort.

Steps 3 and 5 of live storage migration (DESIGN section 1). The engine has
cloned the image's structure onto the destination domain (same volume UUIDs,
empty, ILLEGAL).

:func:`start` (``VM.diskReplicateStart``) prepares the destination leaf with
its chain (ILLEGAL allowed), then asks libvirt for a block copy of the
drive's leaf into it::

    blockCopy(vda, <disk> destination leaf + backing chain </disk>,
              {bandwidth}, SHALLOW | REUSE_EXT | TRANSIENT_JOB [| SYNCHRONOUS_WRITES])

QEMU copies the leaf's data and mirrors every new guest write; the drive's
``replica`` records the destination and is persisted in the domain metadata.
BLOCK_JOB_2 events move ``replica.state``: ``copying`` -> ``ready`` (the
mirror converged) or ``failed``.

:func:`finish` (``VM.diskReplicateFinish``) with ``dstDisk`` = the replica
pivots: refused with ``unavail`` while the mirror is not ready (retry),
with ``DestinationChainNotSynced`` while an internal volume of the
destination is not LEGAL (``Image.syncData INTERNAL`` has not finished:
pivoting would make the guest read garbage), then
``blockJobAbort(PIVOT)``. Afterwards the drive runs on the destination
chain: metadata persisted, the destination leaf marked LEGAL, the source
chain's prepare references released. A failed pivot is ``changeDisk``: the
mirror still runs, the caller may retry or abort.

``finish`` with ``dstDisk`` = ``srcDisk`` aborts: the mirror is cancelled,
the VM stays on the source and the destination's prepare reference is
released (the engine then deletes the destination image).

After a daemon restart, :func:`recover_replica` rebuilds a drive's replica
from the metadata and the live domain (the job is gone: the replica is
dropped).
"""

from __future__ import annotations

import logging
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from typing import Any

import libvirt

from common import errors as common_errors
from virt import domxml, errors, storage_iface
from virt import drive as drive_mod
from virt import vm as vm_mod

log = logging.getLogger("virt.replication")

MiB = 1024**2

COPY_FLAGS = (
    libvirt.VIR_DOMAIN_BLOCK_COPY_SHALLOW
    | libvirt.VIR_DOMAIN_BLOCK_COPY_REUSE_EXT
    | libvirt.VIR_DOMAIN_BLOCK_COPY_TRANSIENT_JOB
)

# How long finish waits for the block job to end after blockJobAbort.
JOB_END_TIMEOUT = 60.0
_JOB_ENDED = (
    libvirt.VIR_DOMAIN_BLOCK_JOB_COMPLETED,
    libvirt.VIR_DOMAIN_BLOCK_JOB_FAILED,
    libvirt.VIR_DOMAIN_BLOCK_JOB_CANCELED,
)

LEGAL = "LEGAL"


# Start


def start(
    vm: vm_mod.VM,
    storage: storage_iface.Storage,
    src_disk: dict[str, Any],
    dst_disk: dict[str, Any],
    need_extend: bool = True,
    bandwidth: int = 0,
    sync_writes: bool = False,
    before_copy: Callable[[vm_mod.VM, drive_mod.Drive, drive_mod.Replica], None] | None = None,
) -> None:
    """Start mirroring the drive running src_disk into dst_disk (VM.diskReplicateStart).

    before_copy(vm, drive, replica) runs before the mirror starts (the
    watermark monitor gives a thin replica the source's size); its error
    fails the start.
    """
    with vm.lock:
        d = _find_drive(vm, src_disk)
        if vm.status == vm_mod.DOWN:
            raise errors.ReplicaError("VM is down", drive=d.name, vm_id=vm.id)
        if d.replica is not None:
            raise errors.ReplicaError(
                f"replication to domain {d.replica.domain_id} already in progress",
                drive=d.name,
                vm_id=vm.id,
            )
        _check_destination(vm, d, dst_disk)
        ids = (dst_disk["poolID"], dst_disk["domainID"], dst_disk["imageID"], dst_disk["volumeID"])
        log.info(
            "Preparing replica vm=%s drive=%s dst_sd=%s img=%s vol=%s",
            vm.id, d.name, ids[1], ids[2], ids[3],
        )
        try:
            result = storage.prepare(*ids, allow_illegal=True)
        except common_errors.Error:
            raise
        except Exception as e:
            raise errors.ImageError(str(e), sd_id=ids[1], img_id=ids[2], vol_id=ids[3]) from e
        try:
            replica = _replica(vm, d, ids, result, need_extend, bandwidth, sync_writes)
            if before_copy is not None:
                before_copy(vm, d, replica)
            _block_copy(vm, d, replica)
        except BaseException:
            d.replica = None
            _teardown(storage, vm, ids)
            raise
        try:
            vm.persist()
        except libvirt.libvirtError as e:
            # The mirror runs; recovery finds the job but not the replica
            # (an unknown job is left to the engine to abort).
            log.error("Persisting replica failed vm=%s drive=%s error=%s", vm.id, d.name, e)
        log.info(
            "Replication started vm=%s drive=%s dst=%s bandwidth=%d sync_writes=%s",
            vm.id, d.name, replica.path, bandwidth, sync_writes,
        )


def _check_destination(vm: vm_mod.VM, d: drive_mod.Drive, dst: dict[str, Any]) -> None:
    reason = None
    if dst["domainID"] == d.domain_id:
        reason = "destination is the drive's own domain"
    elif dst["imageID"] != d.image_id or dst["volumeID"] != d.volume_id:
        reason = (
            f"destination {dst['imageID']}/{dst['volumeID']} is not the drive's "
            f"leaf {d.image_id}/{d.volume_id}"
        )
    elif dst["poolID"] != d.pool_id:
        reason = f"destination pool {dst['poolID']} is not the drive's {d.pool_id}"
    if reason:
        raise errors.ReplicaError(reason, drive=d.name, vm_id=vm.id)


def _replica(
    vm: vm_mod.VM,
    d: drive_mod.Drive,
    ids: tuple[str, str, str, str],
    result: dict[str, Any],
    need_extend: bool,
    bandwidth: int,
    sync_writes: bool,
) -> drive_mod.Replica:
    chain = drive_mod.chain_from_prepare(result)
    src_shape = [(v.volume_id, v.format.upper()) for v in d.chain]
    dst_shape = [(v.volume_id, v.format.upper()) for v in chain]
    if src_shape != dst_shape:
        raise errors.ReplicaError(
            f"destination chain {dst_shape} does not match the drive's {src_shape}",
            drive=d.name,
            vm_id=vm.id,
        )
    if chain[-1].format.upper() != "COW":
        raise errors.ReplicaError("destination leaf is not COW", drive=d.name, vm_id=vm.id)
    return drive_mod.Replica(
        pool_id=ids[0],
        domain_id=ids[1],
        image_id=ids[2],
        volume_id=ids[3],
        chain=chain,
        disk_type=drive_mod.disk_type(chain[-1].path),
        format=drive_mod.COW,
        state=drive_mod.COPYING,
        bandwidth=bandwidth,
        sync_writes=sync_writes,
        need_extend=need_extend,
    )


def copy_xml(replica: drive_mod.Replica) -> str:
    """The destination of blockCopy: the replica's leaf and its backing chain."""
    disk = ET.Element("disk", type=replica.disk_type)
    disk.append(domxml.source_element(replica.disk_type, replica.path))
    ET.SubElement(disk, "driver", type="qcow2")
    parent = disk
    for vol in reversed(replica.chain[:-1]):
        vol_type = drive_mod.disk_type(vol.path)
        backing = ET.SubElement(parent, "backingStore", type=vol_type)
        ET.SubElement(backing, "format", type=vol.qemu_format)
        backing.append(domxml.source_element(vol_type, vol.path))
        parent = backing
    ET.SubElement(parent, "backingStore")
    return ET.tostring(disk, encoding="unicode")


def _block_copy(vm: vm_mod.VM, d: drive_mod.Drive, replica: drive_mod.Replica) -> None:
    xml = copy_xml(replica)
    params: dict[str, Any] = {}
    if replica.bandwidth:
        params[libvirt.VIR_DOMAIN_BLOCK_COPY_BANDWIDTH] = replica.bandwidth * MiB
    flags = COPY_FLAGS
    if replica.sync_writes:
        flags |= libvirt.VIR_DOMAIN_BLOCK_COPY_SYNCHRONOUS_WRITES
    # Events may come as soon as the job exists: the replica must be there.
    d.reset_job_event()
    d.replica = replica
    log.debug("blockCopy vm=%s drive=%s xml=%s flags=%#x", vm.id, d.name, xml, flags)
    try:
        vm.call(lambda dom: dom.blockCopy(d.name, xml, params, flags), retry=False)
    except libvirt.libvirtError as e:
        log.warning("libvirt refused blockCopy vm=%s drive=%s error=%s", vm.id, d.name, e)
        raise errors.ReplicaError(str(e), drive=d.name, vm_id=vm.id) from e


# Finish


def finish(
    vm: vm_mod.VM,
    storage: storage_iface.Storage,
    src_disk: dict[str, Any],
    dst_disk: dict[str, Any],
) -> None:
    """Pivot to dst_disk, or abort when dst_disk is src_disk (VM.diskReplicateFinish)."""
    with vm.lock:
        d = _find_drive(vm, src_disk)
        r = d.replica
        if r is None:
            raise errors.ReplicationNotInProgressError(drive=d.name, vm_id=vm.id)
        if _same_volume(dst_disk, src_disk):
            _abort(vm, storage, d, r)
            return
        if not _same_volume(dst_disk, r.spec()):
            raise errors.ReplicaError(
                f"destination {_spec_text(dst_disk)} is not the replica {_spec_text(r.spec())}",
                drive=d.name,
                vm_id=vm.id,
            )
        _pivot(vm, storage, d, r)


def _abort(
    vm: vm_mod.VM, storage: storage_iface.Storage, d: drive_mod.Drive, r: drive_mod.Replica
) -> None:
    log.info("Aborting replication vm=%s drive=%s dst_sd=%s", vm.id, d.name, r.domain_id)
    d.reset_job_event()
    try:
        vm.call(lambda dom: dom.blockJobAbort(d.name, 0))
    except libvirt.libvirtError as e:
        if _job_info(vm, d):
            raise errors.ReplicaError(str(e), drive=d.name, vm_id=vm.id) from e
        log.info("No block job left to abort vm=%s drive=%s: %s", vm.id, d.name, e)
    _wait_job_end(vm, d, errors.ReplicaError)
    d.replica = None
    _persist(vm, d)
    _teardown(storage, vm, (r.pool_id, r.domain_id, r.image_id, r.volume_id))
    log.info("Replication aborted vm=%s drive=%s, VM stays on %s", vm.id, d.name, d.path)


def _pivot(
    vm: vm_mod.VM, storage: storage_iface.Storage, d: drive_mod.Drive, r: drive_mod.Replica
) -> None:
    refresh_state(vm, d)
    if r.state == drive_mod.FAILED:
        raise errors.ReplicaError("the mirror failed: abort it", drive=d.name, vm_id=vm.id)
    job = _job_info(vm, d)
    if not job:
        raise errors.ReplicaError("no mirror job is running: abort", drive=d.name, vm_id=vm.id)
    cur, end = job.get("cur", 0), job.get("end", 0)
    if r.state != drive_mod.READY or cur != end:
        raise errors.ReplicaNotReadyError(
            f"state {r.state} cur {cur} end {end}", drive=d.name, vm_id=vm.id
        )
    _check_synced(storage, r)

    log.info("Pivoting vm=%s drive=%s to %s", vm.id, d.name, r.path)
    d.reset_job_event()
    try:
        vm.call(
            lambda dom: dom.blockJobAbort(d.name, libvirt.VIR_DOMAIN_BLOCK_JOB_ABORT_PIVOT),
            retry=False,
        )
    except (libvirt.libvirtError, errors.LibvirtUnavailableError) as e:
        log.warning("Pivot failed vm=%s drive=%s error=%s", vm.id, d.name, e)
        raise errors.PivotError(str(e), drive=d.name, vm_id=vm.id) from e
    _wait_job_end(vm, d, errors.PivotError)
    live = _live_path(vm, d)
    if live != r.path:
        # The job ended without switching (e.g. QEMU failed the pivot).
        raise errors.PivotError(
            f"the drive still runs {live} after the pivot", drive=d.name, vm_id=vm.id
        )

    old = (d.pool_id, d.domain_id, d.image_id, list(d.prepared))
    d.domain_id = r.domain_id
    d.image_id = r.image_id
    d.volume_id = r.volume_id
    d.chain = r.chain
    d.disk_type = r.disk_type
    d.prepared = [r.volume_id]
    d.threshold = 0
    d.replica = None
    _persist(vm, d)
    try:
        storage.set_volume_legality(r.pool_id, r.domain_id, r.image_id, r.volume_id, True)
    except Exception:
        log.exception(
            "Cannot mark destination leaf LEGAL vm=%s sd=%s vol=%s", vm.id, r.domain_id, r.volume_id
        )
    pool_id, sd_id, img_id, prepared = old
    for vol_id in reversed(prepared):
        _teardown(storage, vm, (pool_id, sd_id, img_id, vol_id))
    log.info(
        "Pivot done vm=%s drive=%s now on sd=%s leaf=%s", vm.id, d.name, d.domain_id, d.path
    )


def _check_synced(storage: storage_iface.Storage, r: drive_mod.Replica) -> None:
    """Every internal volume of the destination chain must be LEGAL (synced)."""
    for v in r.chain[:-1]:
        info = storage.volume_get_info(r.pool_id, r.domain_id, r.image_id, v.volume_id)
        legality = info.get("legality")
        if legality != LEGAL:
            log.warning(
                "Refusing pivot onto unsynced chain sd=%s img=%s vol=%s legality=%s",
                r.domain_id, r.image_id, v.volume_id, legality,
            )
            raise errors.DestinationNotSyncedError(
                vol_id=v.volume_id, sd_id=r.domain_id, legality=legality
            )


def _wait_job_end(vm: vm_mod.VM, d: drive_mod.Drive, error: type[errors.Error]) -> None:
    """Wait until the drive's block job is gone (BLOCK_JOB_2 end event, blockJobInfo)."""
    deadline = time.monotonic() + JOB_END_TIMEOUT
    while _job_info(vm, d):
        if time.monotonic() > deadline:
            raise error(
                f"block job still running after {JOB_END_TIMEOUT}s", drive=d.name, vm_id=vm.id
            )
        d.wait_job(lambda ev: ev is not None and ev[1] in _JOB_ENDED, 0.5)


# State from libvirt (also after a restart)


def refresh_state(vm: vm_mod.VM, d: drive_mod.Drive) -> None:
    """Take the replica's state from the live domain XML's <mirror ready=...>."""
    r = d.replica
    if r is None or r.state == drive_mod.FAILED:
        return
    ready = live_mirror_ready(vm.call(lambda dom: dom.XMLDesc(0)), d.name)
    if ready is True and r.state != drive_mod.READY:
        log.info("Mirror is ready vm=%s drive=%s (from domain XML)", vm.id, d.name)
        r.state = drive_mod.READY


def live_mirror_ready(domain_xml: str, name: str) -> bool | None:
    """Whether the disk's mirror is ready; None if the disk has no mirror."""
    root = ET.fromstring(domain_xml)
    for disk in root.findall("./devices/disk"):
        target = disk.find("target")
        if target is None or target.get("dev") != name:
            continue
        mirror = disk.find("mirror")
        if mirror is None:
            return None
        return mirror.get("ready") == "yes"
    return None


def recover_replica(
    vm_id: str,
    dom: libvirt.virDomain,
    storage: storage_iface.Storage,
    d: drive_mod.Drive,
    domain_xml: str,
) -> None:
    """After a restart: keep d's replica (from metadata) if its mirror job still runs.

    The replica's prepare reference is taken again; a replica whose job is
    gone (a transient job ends with QEMU's mirror) is dropped.
    """
    r = d.replica
    if r is None:
        return
    try:
        job = dom.blockJobInfo(d.name, 0)
    except libvirt.libvirtError as e:
        log.warning("blockJobInfo failed vm=%s drive=%s error=%s", vm_id, d.name, e)
        job = {}
    if not job or job.get("type") != libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_COPY:
        log.warning(
            "Replica without a mirror job dropped vm=%s drive=%s dst_sd=%s",
            vm_id, d.name, r.domain_id,
        )
        d.replica = None
        return
    ready = live_mirror_ready(domain_xml, d.name)
    if r.state != drive_mod.FAILED:
        r.state = drive_mod.READY if ready else drive_mod.COPYING
    try:
        storage.prepare(r.pool_id, r.domain_id, r.image_id, r.volume_id, allow_illegal=True)
    except Exception as e:
        log.error(
            "Cannot prepare replica of recovered vm=%s drive=%s volume=%s: %s",
            vm_id, d.name, r.volume_id, e,
        )
    log.info(
        "Recovered replica vm=%s drive=%s dst_sd=%s state=%s cur=%s end=%s",
        vm_id, d.name, r.domain_id, r.state, job.get("cur"), job.get("end"),
    )


# Helpers


def _find_drive(vm: vm_mod.VM, disk: dict[str, Any]) -> drive_mod.Drive:
    d = vm.find_drive(disk["domainID"], disk["imageID"], disk["volumeID"])
    if d is None:
        raise errors.ImageError(
            f"no drive of VM {vm.id} runs this volume",
            sd_id=disk["domainID"],
            img_id=disk["imageID"],
            vol_id=disk["volumeID"],
        )
    return d


def _same_volume(a: dict[str, Any], b: dict[str, Any]) -> bool:
    keys = ("domainID", "imageID", "volumeID")
    return all(a.get(k) == b.get(k) for k in keys)


def _spec_text(spec: dict[str, Any]) -> str:
    return f"{spec.get('domainID')}/{spec.get('imageID')}/{spec.get('volumeID')}"


def _job_info(vm: vm_mod.VM, d: drive_mod.Drive) -> dict[str, Any]:
    try:
        return dict(vm.call(lambda dom: dom.blockJobInfo(d.name, 0)) or {})
    except libvirt.libvirtError as e:
        log.warning("blockJobInfo failed vm=%s drive=%s error=%s", vm.id, d.name, e)
        return {}


def _live_path(vm: vm_mod.VM, d: drive_mod.Drive) -> str:
    disks = domxml.parse_disks(vm.call(lambda dom: dom.XMLDesc(0)))
    disk = disks.get(d.name)
    return disk.path if disk is not None else ""


def _persist(vm: vm_mod.VM, d: drive_mod.Drive) -> None:
    try:
        vm.persist()
    except (libvirt.libvirtError, errors.Error) as e:
        # Recovery reads the live chain when the metadata lags behind.
        log.error("Persisting drive failed vm=%s drive=%s error=%s", vm.id, d.name, e)


def _teardown(
    storage: storage_iface.Storage, vm: vm_mod.VM, ids: tuple[str, str, str, str]
) -> None:
    try:
        storage.teardown(*ids)
    except Exception:
        log.exception("Teardown failed vm=%s sd=%s volume=%s", vm.id, ids[1], ids[3])
