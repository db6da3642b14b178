"""Live snapshot: switch running drives to new, pre-created qcow2 leaves.

The engine first creates each new leaf with Volume.create (parent = the
drive's current leaf). :func:`snapshot` then, for each snapDrive
``{domainID, imageID, baseVolumeID, volumeID}``:

1. finds the drive running ``baseVolumeID`` (a drive already on ``volumeID``
   is skipped: the verb is safe to repeat);
2. prepares the new leaf through storage and checks its chain is the drive's
   chain plus the new leaf;
3. takes one ``snapshotCreateXML(DISK_ONLY | REUSE_EXT | NO_METADATA)`` for
   all drives (no QUIESCE: there is no guest agent), other drives marked
   ``snapshot='no'``;
4. updates the drives' leaf and chain and persists them in the domain
   metadata.

If anything before the switch fails, the new leaves' prepare references are
released and the VM keeps running on its old leaves; libvirt's refusal is
``snapshotErr``, storage's own coded errors pass through.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import libvirt

from common import errors as common_errors
from virt import domxml, errors, storage_iface
from virt import drive as drive_mod
from virt import vm as vm_mod

log = logging.getLogger("virt.snapshot")

FLAGS = (
    libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_DISK_ONLY
    | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_REUSE_EXT
    | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_NO_METADATA
)


@dataclasses.dataclass
class _Step:
    drive: drive_mod.Drive
    volume_id: str  # the new leaf, prepared
    chain: list[drive_mod.Volume] = dataclasses.field(default_factory=list)


def snapshot(
    vm: vm_mod.VM, storage: storage_iface.HostStorage, snap_drives: list[dict[str, Any]]
) -> None:
    with vm.lock:
        if vm.status == vm_mod.DOWN:
            raise errors.SnapshotError("VM is down", vm_id=vm.id)
        plan: list[_Step] = []
        try:
            for spec in snap_drives:
                _prepare_one(vm, storage, spec, plan)
            if not plan:
                log.info("Nothing to snapshot vm=%s", vm.id)
                return
            _switch(vm, plan)
        except BaseException:
            _undo(vm, storage, plan)
            raise
        for step in plan:
            d = step.drive
            d.chain = step.chain
            d.volume_id = step.volume_id
            d.format = drive_mod.COW
            d.disk_type = drive_mod.disk_type(d.path)
            d.threshold = 0
            d.prepared.append(step.volume_id)
            log.info("Snapshot done vm=%s drive=%s leaf=%s", vm.id, d.name, d.volume_id)
        try:
            vm.persist()
        except libvirt.libvirtError as e:
            # The VM runs on the new leaves; recovery reads the live chain
            # from the domain XML when the metadata lags behind.
            log.error("Persisting drives after snapshot failed vm=%s error=%s", vm.id, e)


def _prepare_one(
    vm: vm_mod.VM, storage: storage_iface.HostStorage, spec: dict[str, Any], plan: list[_Step]
) -> None:
    """Prepare one snapDrive's new leaf and add it to plan (nothing if already done)."""
    try:
        domain_id = spec["domainID"]
        image_id = spec["imageID"]
        base_id = spec["baseVolumeID"]
        new_id = spec["volumeID"]
    except (KeyError, TypeError) as e:
        raise errors.SnapshotError(f"snapDrive {spec!r} lacks {e}", vm_id=vm.id) from e
    if vm.find_drive(domain_id, image_id, new_id) is not None:
        log.info("Drive already runs volume vm=%s image=%s volume=%s", vm.id, image_id, new_id)
        return
    d = vm.find_drive(domain_id, image_id, base_id)
    if d is None:
        raise errors.SnapshotError(
            f"no drive runs volume {base_id} of image {image_id} in domain {domain_id}",
            vm_id=vm.id,
        )
    if any(step.drive is d for step in plan):
        raise errors.SnapshotError(f"drive {d.name} given twice", vm_id=vm.id)
    log.info("Preparing snapshot volume vm=%s drive=%s volume=%s", vm.id, d.name, new_id)
    try:
        result = storage.prepare(d.pool_id, domain_id, image_id, new_id)
    except common_errors.Error:
        raise
    except Exception as e:
        raise errors.ImageError(str(e), sd_id=domain_id, img_id=image_id, vol_id=new_id) from e
    step = _Step(d, new_id)
    plan.append(step)  # from here on, _undo releases the reference
    step.chain = drive_mod.chain_from_prepare(result)
    old_ids = [v.volume_id for v in d.chain]
    new_ids = [v.volume_id for v in step.chain]
    if new_ids[-1] != new_id or new_ids[:-1] != old_ids:
        raise errors.SnapshotError(
            f"chain of volume {new_id} is {new_ids}, expected {old_ids} plus it", vm_id=vm.id
        )
    if step.chain[-1].format.upper() != "COW":
        raise errors.SnapshotError(f"volume {new_id} is not COW", vm_id=vm.id)


def _switch(vm: vm_mod.VM, plan: list[_Step]) -> None:
    switching = {step.drive.name for step in plan}
    xml = domxml.snapshot_xml(
        [
            (step.drive.name, drive_mod.disk_type(step.chain[-1].path), step.chain[-1].path)
            for step in plan
        ],
        [d.name for d in vm.drives if d.name not in switching],
    )
    log.info("Taking live snapshot vm=%s drives=%s", vm.id, sorted(switching))
    log.debug("Snapshot vm=%s xml=%s", vm.id, xml)
    try:
        vm.call(lambda dom: dom.snapshotCreateXML(xml, FLAGS), retry=False)
    except libvirt.libvirtError as e:
        log.warning("libvirt refused the snapshot vm=%s error=%s", vm.id, e)
        raise errors.SnapshotError(str(e), vm_id=vm.id) from e


def _undo(vm: vm_mod.VM, storage: storage_iface.HostStorage, plan: list[_Step]) -> None:
    for step in reversed(plan):
        d = step.drive
        try:
            storage.teardown(d.pool_id, d.domain_id, d.image_id, step.volume_id)
        except Exception:
            log.exception(
                "Teardown after failed snapshot failed vm=%s volume=%s", vm.id, step.volume_id
            )
