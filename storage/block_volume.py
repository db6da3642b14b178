"""Volume operations of block domains: LV sizes, allocation, extension, removal.

A volume is an LV named by its UUID, tagged ``IU_<image>``, ``PU_<parent>``,
``MD_<metadata slot>`` and, in loop activation mode, ``RS_<extents>``.

Sizes are whole extents.  A RAW volume is preallocated: its capacity.  A COW
volume starts at its initial size, or one chunk (``[irs]
volume_utilization_chunk_mb``), or, PREALLOCATED, its maximum size
(capacity * 1.1), and grows by :func:`extend`.

Loop activation (no device-mapper) maps an LV as one contiguous range, so
each volume is created at the start of a free range big enough for its
maximum size and that *reservation* is recorded in its ``RS_`` tag: later
allocations skip reserved extents (:func:`reserved`) and :func:`extend`
takes the extents that follow the LV.  With device-mapper nothing is
reserved and LVs grow anywhere.

These functions are the block side of :class:`storage.sd.StorageDomain`'s
hooks; the metadata side is :class:`storage.block_sd.BlockDomainManifest`.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from storage import errors, lvm_model, qemuimg, volume

if TYPE_CHECKING:
    from storage import block_sd, image

log = logging.getLogger("storage.block_volume")

TAG_IMAGE = "IU_"
TAG_PARENT = "PU_"
TAG_SLOT = "MD_"
TAG_RESERVED = "RS_"


def tag(lv: lvm_model.LV, prefix: str) -> str | None:
    """The value of lv's tag with prefix, or None."""
    for t in lv.tags:
        if t.startswith(prefix):
            return t[len(prefix):]
    return None


def extents(size: int, extent_size: int) -> int:
    """Whole extents holding size bytes (at least one)."""
    return max(1, -(-size // extent_size))


def initial_size(dom: block_sd.BlockDomain, fmt: str, prealloc: str, capacity: int,
                 requested: int | None) -> int:
    if fmt == volume.RAW:
        return capacity
    if requested is not None:
        return requested
    if prealloc == volume.PREALLOCATED:
        return volume.max_size(capacity, fmt)
    return dom.env.chunk_size


def reservation(dom: block_sd.BlockDomain, fmt: str, capacity: int, size: int) -> int:
    """Bytes to keep for the volume's growth (loop mode: its maximum size)."""
    if dom.activation_mode != "loop":
        return size
    return max(size, volume.max_size(capacity, fmt))


def reserved(lvs: dict[str, lvm_model.LV]) -> list[lvm_model.PERange]:
    """Extents reserved behind each volume for its growth (loop mode)."""
    result = []
    for lv in lvs.values():
        count = tag(lv, TAG_RESERVED)
        segs = lvm_model.merged_segments(lv.segments)
        if count is None or not count.isdigit() or len(segs) != 1:
            continue
        result.append(lvm_model.PERange(segs[0].pv, segs[0].first_pe, int(count)))
    return result


def check_create(dom: block_sd.BlockDomain, fmt: str, prealloc: str, capacity: int,
                 requested: int | None, check_space: bool = True) -> None:
    """Refuse RAW SPARSE and (check_space) volumes that don't fit."""
    if fmt == volume.RAW and prealloc == volume.SPARSE:
        raise errors.IncorrectType(
            type=prealloc, reason="RAW volumes on block domains must be PREALLOCATED"
        )
    if not check_space:
        return
    with dom.manifest.reading():
        state = dom.manifest.vg_state()
        assert state is not None
        vg = state.vg
        size = initial_size(dom, fmt, prealloc, capacity, requested)
        needed = extents(reservation(dom, fmt, capacity, size), vg.extent_size)
        if dom.activation_mode != "loop":
            if needed > vg.free_count:
                raise errors.NoSpaceLeftOnDomain(
                    sd_id=dom.sd_id, reason=f"needs {needed} extents, {vg.free_count} free"
                )
            return
        try:
            state.find_free_range(needed, reserved=reserved(dom.manifest.volume_lvs()))
        except errors.VolumeGroupSizeError as e:
            raise errors.NoSpaceLeftOnDomain(sd_id=dom.sd_id, reason=str(e)) from e


def allocate(dom: block_sd.BlockDomain, img_id: str, vol_id: str, md: volume.Metadata,
             requested: int | None) -> None:
    """Create the volume's LV with its tags (claiming a metadata slot).
    One reading of the VG, then lvcreate."""
    with dom.manifest.reading():
        state = dom.manifest.vg_state()
        assert state is not None
        extent_size = state.vg.extent_size
        size = initial_size(dom, md.format, md.type, md.capacity, requested)
        count = extents(size, extent_size)
        reserve = max(count, extents(reservation(dom, md.format, md.capacity, size), extent_size))
        lvs = dom.manifest.volume_lvs()
        tags = [
            TAG_IMAGE + img_id,
            TAG_PARENT + md.parent,
            TAG_SLOT + str(dom.manifest.free_slot(lvs)),
        ]
        pv_range = None
        if dom.activation_mode == "loop":
            tags.append(TAG_RESERVED + str(reserve))
            rng = state.find_free_range(reserve, reserved=reserved(lvs))
            pv_range = lvm_model.pv_range(rng.pv, rng.first_pe, rng.first_pe + count - 1)
    try:
        dom.lvm.lvcreate(dom.vg, vol_id, count, tags=tags, pv_range=pv_range)
    except errors.VolumeGroupSizeError as e:
        raise errors.NoSpaceLeftOnDomain(sd_id=dom.sd_id, reason=str(e)) from e


def create_data(dom: block_sd.BlockDomain, images: image.ImageManager, img_id: str,
                vol_id: str, md: volume.Metadata, cluster_size: int | None) -> None:
    """Format a COW volume as qcow2 over its parent; a RAW LV is the volume.

    A new RAW LV is not zeroed (as in VDSM): its data is what it is given.
    """
    if md.format == volume.RAW:
        return
    backing = backing_fmt = None
    if md.parent != volume.BLANK_UUID:
        parent = dom.manifest.read_volume_metadata(img_id, md.parent)
        backing = md.parent
        backing_fmt = volume.QEMU_FORMAT[parent.format]
    # Prepared, the volume sits beside its parent chain's links, so qemu-img
    # resolves (and checks) the bare-UUID backing reference.
    with images.prepared(dom, img_id, vol_id, allow_illegal=True) as prep:
        qemuimg.create(
            prep["path"],
            "qcow2",
            size=md.capacity,
            backing=backing,
            backing_fmt=backing_fmt,
            cluster_size=cluster_size,
        )


def remove(dom: block_sd.BlockDomain, img_id: str, vol_id: str) -> None:
    """Deactivate and remove the LV, then clear its metadata slot; idempotent."""
    try:
        lv = dom.manifest.lv_info(vol_id)
    except errors.LogicalVolumeDoesNotExistError:
        return
    if tag(lv, TAG_IMAGE) != img_id:
        raise errors.VolumeDoesNotExist(vol_id=vol_id, sd_id=dom.sd_id)
    slot = tag(lv, TAG_SLOT)
    dom.activation.deactivate(dom.vg, vol_id)
    dom.lvm.lvremove(dom.vg, vol_id)
    if slot is not None and slot.isdigit():
        dom.manifest.write_slot(int(slot), b"")


def max_size(dom: block_sd.BlockDomain, img_id: str, vol_id: str,
             lv: lvm_model.LV | None = None) -> int:
    """Most bytes the volume's LV may take (its reservation in loop mode)."""
    lv = lv or dom.manifest.volume_lv(img_id, vol_id)
    count = tag(lv, TAG_RESERVED)
    extent_size = dom.manifest.extent_size()
    if count is not None and count.isdigit():
        return int(count) * extent_size
    md = dom.manifest.read_volume_metadata(img_id, vol_id)
    return volume.round_up(volume.max_size(md.capacity, md.format), extent_size)


def extend(dom: block_sd.BlockDomain, img_id: str, vol_id: str, new_size: int) -> int:
    """Grow the LV to hold new_size bytes (whole extents, at most its maximum
    size); returns the LV's size.  Callers serialize calls per volume.
    Two lvm2 commands: lvs and lvextend."""
    lv = dom.manifest.volume_lv(img_id, vol_id)
    extent_size = dom.manifest.extent_size()
    target = min(volume.round_up(new_size, extent_size), max_size(dom, img_id, vol_id, lv))
    if target <= lv.size:
        return lv.size
    total = target // extent_size
    pv_range = None
    if dom.activation_mode == "loop":
        segs = lvm_model.merged_segments(lv.segments)
        if len(segs) != 1:
            raise errors.LogicalVolumeNotContiguous(
                vg=dom.vg, lv=vol_id, segments=" ".join(str(s) for s in segs)
            )
        pv_range = lvm_model.pv_range(segs[0].pv, segs[0].last_pe + 1, segs[0].first_pe + total - 1)
    log.info("Extending volume sd=%s img=%s vol=%s from=%d to=%d",
             dom.sd_id, img_id, vol_id, lv.size, target)
    dom.lvm.lvextend(dom.vg, vol_id, total, pv_range=pv_range)
    return target
