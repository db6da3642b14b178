"""Replication: mirror a running drive into another domain, then pivot or abort.

Steps 3 and 5 of live storage migration (DESIGN section 1). The engine has
cloned the image's structure onto the destination domain (same volume UUIDs,
empty, ILLEGAL).

:func:`start` (``VM.diskReplicateStart``) prepares the destination leaf with
its chain (ILLEGAL allowed), then starts QEMU's mirror of the drive's leaf
into it with the libvirt call ``[replication] api`` names (virt/mirror.py)::

    blockCopy(vda, <disk> destination leaf + backing chain </disk>,
              {bandwidth}, SHALLOW | REUSE_EXT | TRANSIENT_JOB [| SYNCHRONOUS_WRITES])
    blockRebase(vda, destination leaf, bandwidth, COPY | SHALLOW | REUSE_EXT [| COPY_DEV])

QEMU copies the leaf's data and mirrors every new guest write; the drive's
``replica`` records the destination and is persisted in the domain metadata.
BLOCK_JOB_2 events move ``replica.state``: ``copying`` -> ``ready`` (the
mirror converged) or ``failed``.  :func:`add_rates` adds the mirror's rate
and ETA to ``VM.getStats``' ``replicate``.

:func:`finish` (``VM.diskReplicateFinish``) with ``dstDisk`` = the replica
pivots once libvirt says the mirror is ready, whatever cur/end show (QEMU
finishes the last dirty data itself), refusing an unsynced destination
chain; ``dstDisk`` = ``srcDisk`` aborts.  Both, and how each failure is
classified (retry Finish, or abort), are virt/pivot.py's.

After a daemon restart, recovery (virt/recovery.py) rebuilds a drive's
replica from the metadata and the live domain with :func:`live_mirror_ready`
(the job is gone: the replica is dropped).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import libvirt

from common import errors as common_errors
from virt import drive as drive_mod
from virt import errors, mirror, pivot, storage_iface
from virt import vm as vm_mod

log = logging.getLogger("virt.replication")

# Kept here for their callers (recovery, tests): they are mirror's and pivot's.
COPY_FLAGS = mirror.COPY_FLAGS
JOB_END_TIMEOUT = mirror.JOB_END_TIMEOUT
copy_xml = mirror.copy_xml
live_mirror_ready = mirror.live_mirror_ready
mark_leaf_legal = pivot.mark_leaf_legal
refresh_state = pivot.refresh_state


# Start


def start(
    vm: vm_mod.VM,
    storage: storage_iface.HostStorage,
    src_disk: dict[str, Any],
    dst_disk: dict[str, Any],
    need_extend: bool = True,
    bandwidth: int = 0,
    sync_writes: bool = False,
    before_copy: Callable[[vm_mod.VM, drive_mod.Drive, drive_mod.Replica], None] | None = None,
    api: str = mirror.BLOCKCOPY,
) -> None:
    """Start mirroring the drive running src_disk into dst_disk (VM.diskReplicateStart).

    api is the libvirt call (mirror.BLOCKCOPY or BLOCKREBASE); sync_writes
    with BLOCKREBASE is SyncWritesUnsupported.  before_copy(vm, drive,
    replica) runs before the mirror starts (the watermark monitor gives a
    thin replica the source's size); its error fails the start.
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
        mirror.check_api(api, sync_writes, d.name, vm.id)
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
            replica.api = api
            if before_copy is not None:
                before_copy(vm, d, replica)
            mirror.start_job(vm, d, replica)
        except BaseException:
            d.replica = None
            pivot.teardown(storage, vm, ids)
            raise
        try:
            vm.persist()
        except libvirt.libvirtError as e:
            # The mirror runs; recovery finds the job but not the replica
            # (an unknown job is left to the engine to abort).
            log.error("Persisting replica failed vm=%s drive=%s error=%s", vm.id, d.name, e)
        log.info(
            "Replication started vm=%s drive=%s dst=%s api=%s bandwidth=%d sync_writes=%s",
            vm.id, d.name, replica.path, api, bandwidth, sync_writes,
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


# Finish


def finish(
    vm: vm_mod.VM,
    storage: storage_iface.HostStorage,
    spm: storage_iface.SpmRequests,
    src_disk: dict[str, Any],
    dst_disk: dict[str, Any],
    timeouts: pivot.Timeouts = pivot.DEFAULT,
) -> None:
    """Pivot to dst_disk, or abort when dst_disk is src_disk (VM.diskReplicateFinish).

    spm marks the destination leaf LEGAL after the pivot if this host is the
    SPM; otherwise nothing is written (the SPM's Volume.setLegality does it).
    """
    with vm.lock:
        d = _find_drive(vm, src_disk)
        r = d.replica
        if r is None:
            raise errors.ReplicationNotInProgressError(drive=d.name, vm_id=vm.id)
        if _same_volume(dst_disk, src_disk):
            pivot.abort(vm, storage, d, r, timeouts)
            return
        if not _same_volume(dst_disk, r.spec()):
            raise errors.ReplicaError(
                f"destination {_spec_text(dst_disk)} is not the replica {_spec_text(r.spec())}",
                drive=d.name,
                vm_id=vm.id,
            )
        pivot.pivot(vm, storage, spm, d, r, timeouts)


# Stats


def add_rates(vm: vm_mod.VM, stats: dict[str, Any]) -> dict[str, Any]:
    """Add each replicating drive's mirror rate (bytes/s) and ETA (s, -1:
    not converging) to VM.getStats' ``replicate``, from this reading."""
    for d in vm.drives:
        r = d.replica
        rep = stats.get("disks", {}).get(d.name, {}).get("replicate")
        if r is None or rep is None:
            continue
        rate, eta = r.rate.sample(
            int(rep.get("cur", 0)), int(rep.get("end", 0)), rep.get("state") == drive_mod.READY
        )
        rep["rate"] = rate
        rep["eta"] = eta
    return stats


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
