"""Block storage domains: an LVM volume group named by the domain's UUID.

Layout (DESIGN section 6):

- the VG ``<sdUUID>`` on the domain's devices, tagged ``RHAT_storage_domain``;
- special LVs ``metadata, ids, leases, inbox, outbox`` and ``master`` (the
  task store of a pool whose master this domain is, see below);
- each volume an LV named by its volUUID, tagged ``IU_<imgUUID>``,
  ``PU_<parent volUUID>``, ``MD_<slot>`` and, in loop activation mode,
  ``RS_<extents>``: the PE reservation it may grow into (below);
- the ``metadata`` LV holds the domain's own metadata (KEY=VALUE lines,
  ``EOF``, zero padded) in its first 8 KiB, and one 8 KiB slot per volume
  from 1 MiB on (slot N at 1 MiB + N * 8 KiB), read and written with direct
  I/O through :mod:`storage.oop`.

Special LVs are activated while the domain is in use on this host (created,
opened through the cache or connected in a pool) and deactivated when the
pool disconnects or the domain is formatted.

Volume operations (sizes, allocation inside per-volume PE reservations in
loop activation mode, extension, removal) are in :mod:`storage.block_volume`.
An operation reads the VG once (:meth:`BlockDomainManifest.reading`, one
``pvs``) for its listings, allocation and loop mappings, and again only
after it changed the VG itself.
The ``master`` LV stores SPM task records (:class:`MasterStore`).
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import threading
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from storage import activation, block_volume, clusterlock, errors, lvm, lvm_model, sd, volume

if TYPE_CHECKING:
    from storage import image

log = logging.getLogger("storage.block_sd")

MiB = 1024**2
KiB = 1024
VG_TAG = "RHAT_storage_domain"
PV_METADATA_SIZE = 16 * MiB

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

# Slot size of the master LV's record store (SPM tasks).
STORE_SLOT = 64 * KiB

TAG_IMAGE = block_volume.TAG_IMAGE
TAG_SLOT = block_volume.TAG_SLOT
_tag = block_volume.tag


def _pad(data: bytes, size: int) -> bytes:
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
        data = _pad(sd.dump_metadata(fields), DOMAIN_MD_SIZE)
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
        if _tag(lv, TAG_IMAGE) != img_id:
            raise errors.VolumeDoesNotExist(vol_id=vol_id, sd_id=self.sd_id)
        return lv

    def slot_of(self, lv: lvm_model.LV) -> int:
        slot = _tag(lv, TAG_SLOT)
        if slot is None or not slot.isdigit():
            raise errors.VolumeMetadataReadError(vol_id=lv.name, reason="no MD_ tag")
        return int(slot)

    def slot_count(self) -> int:
        md = self.lv_info("metadata")
        return (md.size - SLOT_BASE) // SLOT_SIZE

    def free_slot(self, lvs: dict[str, lvm_model.LV]) -> int:
        used = {int(s) for lv in lvs.values() if (s := _tag(lv, TAG_SLOT)) and s.isdigit()}
        for slot in range(self.slot_count()):
            if slot not in used:
                return slot
        raise errors.NoSpaceLeftOnDomain(sd_id=self.sd_id, reason="no free metadata slot")

    # Images and volumes.

    def list_images(self) -> list[str]:
        images = {_tag(lv, TAG_IMAGE) for lv in self.volume_lvs().values()}
        return sorted(i for i in images if i)

    def list_volumes(self, img_id: str) -> list[str]:
        return sorted(
            name for name, lv in self.volume_lvs().items() if _tag(lv, TAG_IMAGE) == img_id
        )

    def find_volume(self, vol_id: str) -> str | None:
        sd.check_uuid(vol_id)
        try:
            lv = self.lv_info(vol_id)
        except errors.LogicalVolumeDoesNotExistError:
            return None
        return _tag(lv, TAG_IMAGE) or ""

    def image_metadata(self, img_id: str) -> dict[str, volume.Metadata]:
        lvs = self.volume_lvs()
        return {
            name: self._read_slot(name, self.slot_of(lv))
            for name, lv in lvs.items()
            if _tag(lv, TAG_IMAGE) == img_id
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
            self.oop.write_direct(self.special_path("metadata"), offset, _pad(data, SLOT_SIZE))
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


class BlockDomain(sd.StorageDomain):
    manifest: BlockDomainManifest

    def __init__(self, manifest: BlockDomainManifest) -> None:
        super().__init__(manifest)
        self.vg = manifest.vg
        self.lvm = manifest.lvm
        self.activation = manifest.activation

    @property
    def activation_mode(self) -> str:
        return self.manifest.mode

    def open(self) -> None:
        for name in SPECIAL_LVS:
            self.activation.activate(self.vg, name)

    def close(self) -> None:
        for name in SPECIAL_LVS:
            self.activation.deactivate(self.vg, name)

    def lease_paths(self) -> tuple[str, str]:
        return self.manifest.special_path("ids"), self.manifest.special_path("leases")

    def task_store(self) -> tuple[str, Any]:
        store = MasterStore(self.manifest.special_path(MASTER_LV), self.env.oop)
        return f"{self.vg}/{MASTER_LV}/tasks", store

    def format(self) -> None:
        log.info("Formatting block domain sd=%s devices=%s", self.sd_id, self.manifest.devices)
        for name in self.activation.active_lvs(self.vg):
            self.activation.deactivate(self.vg, name)
        self.lvm.vgremove(self.vg)
        self.lvm.pvremove(self.manifest.devices)

    # Volumes: the operations are in storage/block_volume.py.

    def check_create(
        self, fmt: str, prealloc: str, capacity: int, initial_size: int | None,
        check_space: bool = True,
    ) -> None:
        block_volume.check_create(self, fmt, prealloc, capacity, initial_size, check_space)

    def activate_volume(self, img_id: str, vol_id: str) -> str:
        # Callers found the volume in the image's chain just before (within
        # a reading of the VG, whose layout loop activation then uses).
        sd.check_uuid(img_id, vol_id)
        return self.activation.activate(self.vg, vol_id, vg_state=self.manifest.vg_state())

    def deactivate_volume(self, img_id: str, vol_id: str) -> None:
        self.activation.deactivate(self.vg, vol_id)

    def volume_max_size(self, img_id: str, vol_id: str) -> int:
        """Most bytes the volume's LV may take (its reservation in loop mode)."""
        return block_volume.max_size(self, img_id, vol_id)

    def extend_volume(self, img_id: str, vol_id: str, new_size: int) -> int:
        """Grow the LV to hold new_size bytes (at most its maximum size)."""
        return block_volume.extend(self, img_id, vol_id, new_size)

    def _allocate(self, img_id: str, vol_id: str, md: volume.Metadata,
                  initial_size: int | None) -> None:
        block_volume.allocate(self, img_id, vol_id, md, initial_size)

    def _create_data(self, images: image.ImageManager, img_id: str, vol_id: str,
                     md: volume.Metadata, cluster_size: int | None) -> None:
        block_volume.create_data(self, images, img_id, vol_id, md, cluster_size)

    def _remove(self, img_id: str, vol_id: str) -> None:
        block_volume.remove(self, img_id, vol_id)


class MasterStore:
    """Small files (SPM task records) in slots of the ``master`` LV.

    It offers the file operations :class:`storage.taskstore.TaskStore` uses
    (``makedirs, write_file_atomic, listdir, read_file, unlink``), by base
    name; directories are implied.  Each slot of STORE_SLOT bytes starts
    with a header line ``LSMF1 <name> <seq> <length> <crc32>`` and the data.
    A write goes to a free slot with a higher sequence number and only then
    clears the old slot, so a crash in between leaves both and the newer
    one wins; a torn write fails its checksum and the older copy stays.
    I/O is direct (another host may write the LV) and goes through oop.
    """

    MAGIC = b"LSMF1"

    def __init__(self, device: str, oop: Any) -> None:
        self.device = device
        self.oop = oop
        self._lock = threading.Lock()
        self._index: dict[str, tuple[int, int]] | None = None  # name -> (slot, seq)
        self._seq = 0

    def makedirs(self, path: str, mode: int = 0o755, exist_ok: bool = True) -> None:
        pass

    def listdir(self, path: str) -> list[str]:
        with self._lock:
            return sorted(self._load())

    def read_file(self, path: str) -> bytes:
        name = os.path.basename(path)
        with self._lock:
            entry = self._load().get(name)
            if entry is None:
                raise FileNotFoundError(errno.ENOENT, "no such record", path)
            record = self._read_slot(entry[0])
        if record is None or record[0] != name:
            raise OSError(errno.EIO, "record changed or corrupt", path)
        return record[2]

    def write_file_atomic(self, path: str, data: bytes, mode: int = 0o644) -> None:
        name = os.path.basename(path)
        if not name or any(c.isspace() for c in name):
            raise OSError(errno.EINVAL, "bad record name", path)
        with self._lock:
            index = self._load()
            used = {slot for slot, _ in index.values()}
            free = next((s for s in range(self._slots()) if s not in used), None)
            if free is None:
                raise OSError(errno.ENOSPC, "no free slot in the master LV", path)
            self._seq += 1
            header = b"%s %s %d %d %d\n" % (
                self.MAGIC, name.encode(), self._seq, len(data), zlib.crc32(data)
            )
            block = header + data
            if len(block) > STORE_SLOT:
                raise OSError(errno.EFBIG, f"record larger than {STORE_SLOT} bytes", path)
            self.oop.write_direct(self.device, free * STORE_SLOT, _pad(block, _align(block)))
            old = index.get(name)
            index[name] = (free, self._seq)
            if old is not None:
                self._clear(old[0])

    def unlink(self, path: str) -> None:
        name = os.path.basename(path)
        with self._lock:
            entry = self._load().pop(name, None)
            if entry is None:
                raise FileNotFoundError(errno.ENOENT, "no such record", path)
            self._clear(entry[0])

    def _slots(self) -> int:
        return self._size // STORE_SLOT

    def _load(self) -> dict[str, tuple[int, int]]:
        if self._index is not None:
            return self._index
        self._size = _device_size(self.device)
        index: dict[str, tuple[int, int]] = {}
        for offset in range(0, self._slots() * STORE_SLOT, MiB):
            chunk = self.oop.read_direct(self.device, offset, min(MiB, self._size - offset))
            for pos in range(0, len(chunk) - STORE_SLOT + 1, STORE_SLOT):
                record = self._parse(offset // STORE_SLOT + pos // STORE_SLOT,
                                     chunk[pos : pos + STORE_SLOT])
                if record is None:
                    continue
                name, seq, _ = record
                slot = (offset + pos) // STORE_SLOT
                self._seq = max(self._seq, seq)
                if name not in index or index[name][1] < seq:
                    index[name] = (slot, seq)
        self._index = index
        return index

    def _read_slot(self, slot: int) -> tuple[str, int, bytes] | None:
        return self._parse(slot, self.oop.read_direct(self.device, slot * STORE_SLOT, STORE_SLOT))

    def _parse(self, slot: int, block: bytes) -> tuple[str, int, bytes] | None:
        if not block.startswith(self.MAGIC + b" "):
            return None
        line, sep, rest = block.partition(b"\n")
        try:
            _, name, seq, length, crc = line.decode().split(" ")
            seq_n, length_n, crc_n = int(seq), int(length), int(crc)
        except ValueError:
            return None
        data = rest[:length_n]
        if not sep or len(data) != length_n or zlib.crc32(data) != crc_n:
            log.warning("Ignoring torn record in master LV slot=%d", slot)
            return None
        return name, seq_n, data

    def _clear(self, slot: int) -> None:
        self.oop.write_direct(self.device, slot * STORE_SLOT, b"\0" * 512)


def _align(data: bytes, unit: int = 512) -> int:
    return volume.round_up(max(len(data), 1), unit)


def _device_size(path: str) -> int:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


def create(sd_id: str, devices: list[str], name: str, env: sd.Env) -> BlockDomain:
    """Create a block domain: PVs, the VG, special LVs, metadata, lock areas.

    On failure the VG and the PV labels are removed again.
    """
    if not devices or len(set(devices)) != len(devices):
        raise errors.StorageDomainCreationError(sd_id=sd_id, reason="devices must be distinct")
    for dev in devices:
        try:
            st = os.stat(dev)
        except OSError as e:
            raise errors.StorageDomainCreationError(sd_id=sd_id, reason=f"{dev}: {e}") from e
        if not stat.S_ISBLK(st.st_mode):
            raise errors.StorageDomainCreationError(
                sd_id=sd_id, reason=f"{dev}: not a block device"
            )
    dom = open_domain(sd_id, {"devices": devices}, env)
    try:
        dom.lvm.vg_info(sd_id)
    except errors.VolumeGroupDoesNotExist:
        pass
    else:
        raise errors.StorageDomainAlreadyExists(sd_id=sd_id)
    log.info("Creating block domain sd=%s devices=%s", sd_id, devices)
    try:
        dom.lvm.pvcreate(devices, metadata_size=PV_METADATA_SIZE)
    except errors.PhysDevInitializationError as e:
        raise errors.StorageDomainCreationError(sd_id=sd_id, reason=str(e)) from e
    created_vg = False
    try:
        dom.lvm.vgcreate(sd_id, devices, env.extent_size_mb, tags=[VG_TAG])
        created_vg = True
        _create_special_lvs(dom)
        _write_initial_metadata(dom, name)
        ids, leases = dom.lease_paths()
        clusterlock.init_domain(sd_id, ids, leases)
    except BaseException as e:
        log.error("Cannot create block domain sd=%s: %s", sd_id, e)
        _undo_create(dom, created_vg)
        if isinstance(e, errors.VolumeGroupSizeError):
            raise errors.StorageDomainCreationError(sd_id=sd_id, reason=str(e)) from e
        raise
    return dom


def _create_special_lvs(dom: BlockDomain) -> None:
    vg = dom.lvm.vg_info(dom.vg)
    for name, size in SPECIAL_SIZES.items():
        extents = block_volume.extents(size, vg.extent_size)
        rng = dom.lvm.find_free_range(dom.vg, extents)
        dom.lvm.lvcreate(dom.vg, name, extents, pv_range=str(rng))


def _write_initial_metadata(dom: BlockDomain, name: str) -> None:
    manifest = dom.manifest
    md_dev = manifest.special_path("metadata")
    size = dom.lvm.lv_info(dom.vg, "metadata").size
    zeros = b"\0" * MiB
    for offset in range(0, size, MiB):
        dom.env.oop.write_direct(md_dev, offset, zeros[: min(MiB, size - offset)])
    for special in ("ids", "leases", "inbox", "outbox", MASTER_LV):
        dev = manifest.special_path(special)
        dom.env.oop.write_direct(dev, 0, zeros)
    manifest.write_metadata(
        {
            sd.SDUUID: dom.sd_id,
            sd.TYPE: "BLOCK",
            sd.NAME: name,
            sd.CLASS: sd.DATA_CLASS,
            sd.VERSION_KEY: str(sd.VERSION),
            sd.ROLE: sd.REGULAR,
            sd.POOL_UUID: "",
            "VGNAME": dom.vg,
        }
    )


def _undo_create(dom: BlockDomain, created_vg: bool) -> None:
    try:
        for name in dom.activation.active_lvs(dom.vg):
            dom.activation.deactivate(dom.vg, name)
        if created_vg:
            dom.lvm.vgremove(dom.vg)
        dom.lvm.pvremove(dom.manifest.devices)
    except Exception:
        log.exception("Cannot undo creation of block domain sd=%s", dom.sd_id)


def open_domain(sd_id: str, args: dict[str, Any], env: sd.Env) -> BlockDomain:
    return BlockDomain(BlockDomainManifest(sd_id, list(args["devices"]), env))
