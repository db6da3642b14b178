"""The volumes of a block domain as LVs: sizes, allocation, extension, removal.

A volume is an LV named by its UUID, tagged ``IU_<image>``, ``PU_<parent>``,
``MD_<metadata slot>`` and, in loop activation mode, ``RS_<extents>``
(:mod:`storage.block_manifest` reads them).

Sizes are whole extents.  A RAW volume is preallocated: its capacity.  A COW
volume starts at its initial size, or one chunk (``[irs]
volume_utilization_chunk_mb``), or, PREALLOCATED, its maximum size
(:func:`storage.volume.max_size`), and grows by :meth:`BlockVolumes.extend`.

Loop activation (no device-mapper) maps an LV as one contiguous range, so
each volume is created at the start of a free range big enough for its
maximum size and that *reservation* is recorded in its ``RS_`` tag: later
allocations skip reserved extents (:func:`reserved`) and
:meth:`BlockVolumes.extend` takes the extents that follow the LV.  With
device-mapper nothing is reserved and LVs grow anywhere.

:class:`BlockVolumes` is what :class:`storage.block_sd.BlockDomain`'s volume
hooks use; it knows the domain's manifest, not the domain.
"""

from __future__ import annotations

import logging

from common import sizes
from storage import block_manifest, errors, lvm_model, volume

log = logging.getLogger("storage.block_volume")


def reserved(lvs: dict[str, lvm_model.LV]) -> list[lvm_model.PERange]:
    """Extents reserved behind each volume for its growth (loop mode)."""
    result = []
    for lv in lvs.values():
        count = block_manifest.tag(lv, block_manifest.TAG_RESERVED)
        segs = lvm_model.merged_segments(lv.segments)
        if count is None or not count.isdigit() or len(segs) != 1:
            continue
        result.append(lvm_model.PERange(segs[0].pv, segs[0].first_pe, int(count)))
    return result


class BlockVolumes:
    """LV operations on the volumes of one block domain."""

    def __init__(self, manifest: block_manifest.BlockDomainManifest) -> None:
        self.manifest = manifest
        self.sd_id = manifest.sd_id
        self.vg = manifest.vg
        self.lvm = manifest.lvm
        self.activation = manifest.activation
        # Loop activation: each LV one contiguous range, growing in place.
        self.loop_mode = manifest.mode == "loop"
        self.chunk_size = manifest.env.chunk_size

    def __repr__(self) -> str:
        return f"<BlockVolumes {self.sd_id}>"

    # Sizes.

    def initial_size(self, fmt: str, prealloc: str, capacity: int,
                     requested: int | None) -> int:
        """Bytes a new volume's LV starts with."""
        if fmt == volume.RAW:
            return capacity
        if requested is not None:
            return requested
        if prealloc == volume.PREALLOCATED:
            return volume.max_size(capacity, fmt)
        return self.chunk_size

    def reservation(self, fmt: str, capacity: int, size: int) -> int:
        """Bytes to keep for the volume's growth (loop mode: its maximum size)."""
        if not self.loop_mode:
            return size
        return max(size, volume.max_size(capacity, fmt))

    def max_size(self, img_id: str, vol_id: str, lv: lvm_model.LV | None = None) -> int:
        """Most bytes the volume's LV may take (its reservation in loop mode)."""
        lv = lv or self.manifest.volume_lv(img_id, vol_id)
        count = block_manifest.tag(lv, block_manifest.TAG_RESERVED)
        extent_size = self.manifest.extent_size()
        if count is not None and count.isdigit():
            return int(count) * extent_size
        md = self.manifest.read_volume_metadata(img_id, vol_id)
        return sizes.round_up(volume.max_size(md.capacity, md.format), extent_size)

    # Creation and removal.

    def check_create(self, fmt: str, prealloc: str, capacity: int,
                     requested: int | None, check_space: bool = True) -> None:
        """Refuse RAW SPARSE and (check_space) volumes that don't fit."""
        if fmt == volume.RAW and prealloc == volume.SPARSE:
            raise errors.IncorrectType(
                type=prealloc, reason="RAW volumes on block domains must be PREALLOCATED"
            )
        if not check_space:
            return
        with self.manifest.reading():
            state = self.manifest.current_state()
            vg = state.vg
            size = self.initial_size(fmt, prealloc, capacity, requested)
            needed = block_manifest.extents(
                self.reservation(fmt, capacity, size), vg.extent_size
            )
            if not self.loop_mode:
                if needed > vg.free_count:
                    raise errors.NoSpaceLeftOnDomain(
                        sd_id=self.sd_id, reason=f"needs {needed} extents, {vg.free_count} free"
                    )
                return
            try:
                state.find_free_range(needed, reserved=reserved(self.manifest.volume_lvs()))
            except errors.VolumeGroupSizeError as e:
                raise errors.NoSpaceLeftOnDomain(sd_id=self.sd_id, reason=str(e)) from e

    def allocate(self, img_id: str, vol_id: str, md: volume.Metadata,
                 requested: int | None) -> None:
        """Create the volume's LV with its tags (claiming a metadata slot).
        One reading of the VG, then lvcreate."""
        with self.manifest.reading():
            state = self.manifest.current_state()
            extent_size = state.vg.extent_size
            size = self.initial_size(md.format, md.type, md.capacity, requested)
            count = block_manifest.extents(size, extent_size)
            reserve = max(count, block_manifest.extents(
                self.reservation(md.format, md.capacity, size), extent_size))
            lvs = self.manifest.volume_lvs()
            tags = [
                block_manifest.TAG_IMAGE + img_id,
                block_manifest.TAG_PARENT + md.parent,
                block_manifest.TAG_SLOT + str(self.manifest.free_slot(lvs)),
            ]
            pv_range = None
            if self.loop_mode:
                tags.append(block_manifest.TAG_RESERVED + str(reserve))
                rng = state.find_free_range(reserve, reserved=reserved(lvs))
                pv_range = lvm_model.pv_range(rng.pv, rng.first_pe, rng.first_pe + count - 1)
        try:
            self.lvm.lvcreate(self.vg, vol_id, count, tags=tags, pv_range=pv_range)
        except errors.VolumeGroupSizeError as e:
            raise errors.NoSpaceLeftOnDomain(sd_id=self.sd_id, reason=str(e)) from e

    def remove(self, img_id: str, vol_id: str) -> None:
        """Deactivate and remove the LV, then clear its metadata slot; idempotent."""
        try:
            lv = self.manifest.lv_info(vol_id)
        except errors.LogicalVolumeDoesNotExistError:
            return
        if block_manifest.tag(lv, block_manifest.TAG_IMAGE) != img_id:
            raise errors.VolumeDoesNotExist(vol_id=vol_id, sd_id=self.sd_id)
        slot = block_manifest.tag(lv, block_manifest.TAG_SLOT)
        self.activation.deactivate(self.vg, vol_id)
        self.lvm.lvremove(self.vg, vol_id)
        if slot is not None and slot.isdigit():
            self.manifest.write_slot(int(slot), b"")

    # Growth.

    def extend(self, img_id: str, vol_id: str, new_size: int) -> int:
        """Grow the LV to hold new_size bytes (whole extents, at most its
        maximum size); returns the LV's size.  Callers serialize calls per
        volume.  Two lvm2 commands: lvs and lvextend."""
        lv = self.manifest.volume_lv(img_id, vol_id)
        extent_size = self.manifest.extent_size()
        target = min(sizes.round_up(new_size, extent_size), self.max_size(img_id, vol_id, lv))
        if target <= lv.size:
            return lv.size
        total = target // extent_size
        pv_range = None
        if self.loop_mode:
            segs = lvm_model.merged_segments(lv.segments)
            if len(segs) != 1:
                raise errors.LogicalVolumeNotContiguous(
                    vg=self.vg, lv=vol_id, segments=" ".join(str(s) for s in segs)
                )
            pv_range = lvm_model.pv_range(
                segs[0].pv, segs[0].last_pe + 1, segs[0].first_pe + total - 1
            )
        log.info("Extending volume sd=%s img=%s vol=%s from=%d to=%d",
                 self.sd_id, img_id, vol_id, lv.size, target)
        self.lvm.lvextend(self.vg, vol_id, total, pv_range=pv_range)
        return target
