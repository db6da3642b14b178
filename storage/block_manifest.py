"""The metadata face of block domains: the layout of the VG and reading it.

Layout (DESIGN section 6):

- the VG ``<sdUUID>`` on the domain's devices, tagged ``RHAT_storage_domain``;
- special LVs ``metadata, ids, leases, inbox, outbox`` and ``master`` (the
  task store of a pool whose master this domain is,
  :class:`storage.master_store.MasterStore`);
- each volume an LV named by its volUUID, tagged ``IU_<imgUUID>``,
  ``PU_<parent volUUID>``, ``MD_<slot>`` and, in loop activation mode,
  ``RS_<extents>``: the PE reservation it may grow into
  (:mod:`storage.block_volume`);
- the ``metadata`` LV holds the domain's own metadata (KEY=VALUE lines,
  ``EOF``, zero padded) in its first 8 KiB, and one 8 KiB slot per volume
  from 1 MiB on (slot N at 1 MiB + N * 8 KiB), read and written with direct
  I/O through :mod:`storage.oop`.

An operation reads the VG once (:meth:`BlockDomainManifest.reading`, one
``pvs``) for its listings, allocation and loop mappings, and again only
after it changed the VG itself.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from storage import activation, clusterlock, errors, lvm, lvm_model, sd, volume

MiB = 1024**2
KiB = 1024
VG_TAG = "RHAT_storage_domain"

MASTER_LV = "master"
# Sizes of the special LVs before rounding up to whole extents.
SPECIAL_SIZES = {
    "metadata": 16 * MiB,
    "ids": clusterlock.IDS_SIZE,
    "leases": clusterlock.LEASES_SIZE,
    "inbox": 1 * MiB,
    "outbox": 1 * MiB,
    MASTER_LV: 16 * MiB,
}
SPECIAL_LVS = tuple(SPECIAL_SIZES)

DOMAIN_MD_SIZE = 8 * KiB
SLOT_BASE = 1 * MiB
SLOT_SIZE = 8 * KiB

# Tags of a volume's LV.
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


def pad(data: bytes, size: int) -> bytes:
    """data zero padded to size bytes; MetadataOverflowError if it is longer."""
    if len(data) > size:
        raise errors.MetadataOverflowError(size=len(data), limit=size)
    return data + b"\0" * (size - len(data))


def resolve_mode(mode: str) -> str:
    """The activation mode in effect: "dm" or "loop"."""
    if mode == "auto":
        return "dm" if activation.dm_available() else "loop"
    return mode


class BlockDomainManifest(sd.DomainManifest):
    domain_type = sd.BLOCK

    def __init__(self, sd_id: str, devices: list[str], env: sd.Env) -> None:
        super().__init__(sd_id, env)
        self.devices = list(devices)
        self.vg = sd_id
        self.mode = resolve_mode(env.activation_mode)
        self.lvm = lvm.LVM(self.devices, activation=self.mode == "dm")
        self.activation = activation.open(self.mode, self.lvm, env.run_dir)
        self.oop = env.oop
        self._extent_size: int | None = None
        self._local = threading.local()  # .depth, .state: see reading()

    def extent_size(self) -> int:
        """The VG's extent size in bytes (fixed at creation; read once)."""
        if self._extent_size is None:
            self._extent_size = self.lvm.vg_info(self.vg).extent_size
        return self._extent_size

    def special_path(self, name: str) -> str:
        """Device of a special LV, activating it if needed (idempotent)."""
        return self.activation.activate(self.vg, name)

    # Domain metadata: the first DOMAIN_MD_SIZE bytes of the metadata LV.

    def read_metadata(self) -> dict[str, str]:
        try:
            data = self.oop.read_direct(self.special_path("metadata"), 0, DOMAIN_MD_SIZE)
        except (errors.VolumeGroupDoesNotExist, errors.LogicalVolumeDoesNotExistError) as e:
            raise errors.StorageDomainDoesNotExist(sd_id=self.sd_id, reason=str(e)) from e
        return sd.parse_metadata(data, self.sd_id)

    def write_metadata(self, fields: dict[str, str]) -> None:
        data = pad(sd.dump_metadata(fields), DOMAIN_MD_SIZE)
        self.oop.write_direct(self.special_path("metadata"), 0, data)

    # One reading of the VG per operation.

    @contextmanager
    def reading(self) -> Iterator[None]:
        """Within the block, this thread's listings of the VG come from one
        :meth:`lvm.LVM.vg_state` reading, taken on first use and taken again
        after any command of this process changed the VG; it is dropped at
        the end of the outermost block.  For one operation (other hosts do
        not change a domain's LVs during an SPM operation), never longer."""
        depth = getattr(self._local, "depth", 0)
        self._local.depth = depth + 1
        try:
            yield
        finally:
            self._local.depth = depth
            if depth == 0:
                self._local.state = None

    def vg_state(self) -> lvm_model.VGState | None:
        """The reading of the VG of the enclosing :meth:`reading` block
        (current), or None outside one."""
        if not getattr(self._local, "depth", 0):
            return None
        state: lvm_model.VGState | None = getattr(self._local, "state", None)
        if state is None or not state.current():
            state = self._local.state = self.lvm.vg_state(self.vg)
            if self._extent_size is None:
                self._extent_size = state.vg.extent_size
        return state

    def current_state(self) -> lvm_model.VGState:
        """:meth:`vg_state` for callers that hold a :meth:`reading` block."""
        state = self.vg_state()
        if state is None:
            raise RuntimeError("vg_state() needs a reading() block")
        return state

    def vg_info(self) -> lvm_model.VG:
        state = self.vg_state()
        return state.vg if state is not None else self.lvm.vg_info(self.vg)

    def lv_info(self, name: str) -> lvm_model.LV:
        """An LV of the VG (LogicalVolumeDoesNotExistError if missing)."""
        state = self.vg_state()
        return state.lv(name) if state is not None else self.lvm.lv_info(self.vg, name)

    # LVs.

    def volume_lvs(self) -> dict[str, lvm_model.LV]:
        """LVs of volumes (not special LVs) by name."""
        state = self.vg_state()
        lvs = state.lvs.values() if state is not None else self.lvm.lvs(self.vg)
        return {lv.name: lv for lv in lvs if lv.name not in SPECIAL_LVS}

    def volume_lv(self, img_id: str, vol_id: str) -> lvm_model.LV:
        sd.check_uuid(img_id, vol_id)
        try:
            lv = self.lv_info(vol_id)
        except errors.LogicalVolumeDoesNotExistError as e:
            raise errors.VolumeDoesNotExist(vol_id=vol_id, sd_id=self.sd_id) from e
        if tag(lv, TAG_IMAGE) != img_id:
            raise errors.VolumeDoesNotExist(vol_id=vol_id, sd_id=self.sd_id)
        return lv

    def slot_of(self, lv: lvm_model.LV) -> int:
        slot = tag(lv, TAG_SLOT)
        if slot is None or not slot.isdigit():
            raise errors.VolumeMetadataReadError(vol_id=lv.name, reason="no MD_ tag")
        return int(slot)

    def slot_count(self) -> int:
        md = self.lv_info("metadata")
        return (md.size - SLOT_BASE) // SLOT_SIZE

    def free_slot(self, lvs: dict[str, lvm_model.LV]) -> int:
        used = {int(s) for lv in lvs.values() if (s := tag(lv, TAG_SLOT)) and s.isdigit()}
        for slot in range(self.slot_count()):
            if slot not in used:
                return slot
        raise errors.NoSpaceLeftOnDomain(sd_id=self.sd_id, reason="no free metadata slot")

    # Images and volumes.

    def list_images(self) -> list[str]:
        images = {tag(lv, TAG_IMAGE) for lv in self.volume_lvs().values()}
        return sorted(i for i in images if i)

    def list_volumes(self, img_id: str) -> list[str]:
        return sorted(
            name for name, lv in self.volume_lvs().items() if tag(lv, TAG_IMAGE) == img_id
        )

    def find_volume(self, vol_id: str) -> str | None:
        sd.check_uuid(vol_id)
        try:
            lv = self.lv_info(vol_id)
        except errors.LogicalVolumeDoesNotExistError:
            return None
        return tag(lv, TAG_IMAGE) or ""

    def image_metadata(self, img_id: str) -> dict[str, volume.Metadata]:
        lvs = self.volume_lvs()
        return {
            name: self._read_slot(name, self.slot_of(lv))
            for name, lv in lvs.items()
            if tag(lv, TAG_IMAGE) == img_id
        }

    def read_volume_metadata(self, img_id: str, vol_id: str) -> volume.Metadata:
        return self._read_slot(vol_id, self.slot_of(self.volume_lv(img_id, vol_id)))

    def write_volume_metadata(self, img_id: str, vol_id: str, md: volume.Metadata) -> None:
        self.write_slot(self.slot_of(self.volume_lv(img_id, vol_id)), md.dump())

    def update_volume_metadata(
        self, img_id: str, vol_id: str, change: Callable[[volume.Metadata], volume.Metadata]
    ) -> volume.Metadata:
        slot = self.slot_of(self.volume_lv(img_id, vol_id))
        md = change(self._read_slot(vol_id, slot))
        self.write_slot(slot, md.dump())
        return md

    def write_slot(self, slot: int, data: bytes) -> None:
        offset = SLOT_BASE + slot * SLOT_SIZE
        try:
            self.oop.write_direct(self.special_path("metadata"), offset, pad(data, SLOT_SIZE))
        except OSError as e:
            raise errors.VolumeMetadataWriteError(vol_id=f"slot {slot}", reason=str(e)) from e

    def _read_slot(self, vol_id: str, slot: int) -> volume.Metadata:
        offset = SLOT_BASE + slot * SLOT_SIZE
        try:
            data = self.oop.read_direct(self.special_path("metadata"), offset, SLOT_SIZE)
        except OSError as e:
            raise errors.VolumeMetadataReadError(vol_id=vol_id, reason=str(e)) from e
        return volume.Metadata.parse(data, vol_id)

    def volume_size(self, img_id: str, vol_id: str) -> tuple[int, int]:
        size = self.volume_lv(img_id, vol_id).size
        return size, size

    def stats(self) -> dict[str, int]:
        vg = self.lvm.vg_info(self.vg)
        return {
            "disktotal": vg.extent_size * vg.extent_count,
            "diskfree": vg.extent_size * vg.free_count,
        }

    def type_info(self) -> dict[str, Any]:
        return {"vgname": self.vg, "devices": list(self.devices)}
