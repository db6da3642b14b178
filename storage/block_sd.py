"""Block storage domains: an LVM volume group named by the domain's UUID.

The layout of the VG and reading it (metadata, slots, tags) is the manifest,
:mod:`storage.block_manifest`; the LV side of volumes (sizes, allocation
inside per-volume PE reservations in loop activation mode, extension,
removal) is :class:`storage.block_volume.BlockVolumes`; the SPM task records
of a master domain live in the ``master`` LV
(:class:`storage.master_store.MasterStore`).  This module is the domain
itself (:class:`BlockDomain`: activation, extension and refresh, the volume
hooks of :class:`storage.sd.StorageDomain`) and its creation (:func:`create`).

Special LVs are activated while the domain is in use on this host (created,
opened through the cache or connected in a pool) and deactivated when the
pool disconnects or the domain is formatted.
"""

from __future__ import annotations

import logging
import os
import stat
from typing import Any

from storage import (
    block_manifest,
    block_volume,
    clusterlock,
    errors,
    master_store,
    qemuimg,
    sd,
    volume,
)

log = logging.getLogger("storage.block_sd")

MiB = 1024**2
PV_METADATA_SIZE = 16 * MiB


class BlockDomain(sd.StorageDomain):
    manifest: block_manifest.BlockDomainManifest

    # Thin COW volumes are LVs the SPM extends; RAW LVs are preallocated
    # and not zeroed (as in VDSM).
    grows_by_extension = True
    supports_sparse_raw = False
    new_raw_reads_zero = False

    def __init__(self, manifest: block_manifest.BlockDomainManifest) -> None:
        super().__init__(manifest)
        self.vg = manifest.vg
        self.lvm = manifest.lvm
        self.activation = manifest.activation
        self.volumes = block_volume.BlockVolumes(manifest)

    @property
    def activation_mode(self) -> str:
        return self.manifest.mode

    def open(self) -> None:
        for name in block_manifest.SPECIAL_LVS:
            self.activation.activate(self.vg, name)

    def close(self) -> None:
        for name in block_manifest.SPECIAL_LVS:
            self.activation.deactivate(self.vg, name)

    def lease_paths(self) -> tuple[str, str]:
        return self.manifest.special_path("ids"), self.manifest.special_path("leases")

    def mailbox_paths(self) -> tuple[str, str]:
        return self.manifest.special_path("inbox"), self.manifest.special_path("outbox")

    def task_store(self) -> tuple[str, Any]:
        device = self.manifest.special_path(block_manifest.MASTER_LV)
        store = master_store.MasterStore(device, self.env.oop)
        return f"{self.vg}/{block_manifest.MASTER_LV}/tasks", store

    def format(self) -> None:
        log.info("Formatting block domain sd=%s devices=%s", self.sd_id, self.manifest.devices)
        # issue 13: also any device of this host over the PVs that no state names.
        self.activation.deactivate_all(self.vg, self.manifest.devices)
        self.lvm.vgremove(self.vg)
        self.lvm.pvremove(self.manifest.devices)

    # Volumes: the LV operations are BlockVolumes'.

    def check_create(
        self, fmt: str, prealloc: str, capacity: int, initial_size: int | None,
        check_space: bool = True,
    ) -> None:
        self.volumes.check_create(fmt, prealloc, capacity, initial_size, check_space)

    def activate_volume(self, img_id: str, vol_id: str) -> str:
        # Callers found the volume in the image's chain just before (within
        # a reading of the VG, whose layout loop activation then uses).
        sd.check_uuid(img_id, vol_id)
        return self.activation.activate(self.vg, vol_id, vg_state=self.manifest.vg_state())

    def deactivate_volume(self, img_id: str, vol_id: str) -> None:
        self.activation.deactivate(self.vg, vol_id)

    def volume_max_size(self, img_id: str, vol_id: str) -> int:
        """Most bytes the volume's LV may take (its reservation in loop mode)."""
        return self.volumes.max_size(img_id, vol_id)

    def extend_volume(self, img_id: str, vol_id: str, new_size: int) -> int:
        """``lvextend`` the LV to hold new_size bytes (whole extents, at most
        its maximum size), then refresh it here if it is active here; the
        size is read back (from the device if active) and must hold what
        was asked for, else VolumeExtendingError."""
        try:
            size = self.volumes.extend(img_id, vol_id, new_size)
        except errors.VolumeGroupSizeError as e:
            raise errors.VolumeExtendingError(
                vol_id=vol_id, sd_id=self.sd_id, size=new_size, reason=str(e)
            ) from e
        # Read the size back: from the device if it is active here.
        if self.activation.is_active(self.vg, vol_id):
            actual = self.activation.refresh(self.vg, vol_id)
        else:
            actual = self.manifest.volume_lv(img_id, vol_id).size
        if actual < size:
            raise errors.VolumeExtendingError(
                vol_id=vol_id, sd_id=self.sd_id, size=size, reason=f"size read back is {actual}"
            )
        log.info("Extended volume sd=%s img=%s vol=%s requested=%d size=%d",
                 self.sd_id, img_id, vol_id, new_size, actual)
        return actual

    def refresh_volume(self, img_id: str, vol_id: str) -> int:
        """Make the active device follow its LV (raise the loop device's size
        limit, or ``lvchange --refresh``), so a QEMU holding it open sees the
        new size at once; returns the device's size (the LV's if it is not
        active here)."""
        # One reading of the VG gives the LV's size and (loop mode) its layout.
        with self.manifest.reading():
            lv = self.manifest.volume_lv(img_id, vol_id)
            if not self.activation.is_active(self.vg, vol_id):
                return lv.size
            size = self.activation.refresh(self.vg, vol_id, vg_state=self.manifest.vg_state())
            if size < lv.size:
                raise errors.VolumeExtendingError(
                    vol_id=vol_id, sd_id=self.sd_id, size=lv.size, reason=f"device size is {size}"
                )
        log.info("Refreshed volume sd=%s img=%s vol=%s size=%d", self.sd_id, img_id, vol_id, size)
        return size

    def _allocate(self, img_id: str, vol_id: str, md: volume.Metadata,
                  initial_size: int | None) -> None:
        self.volumes.allocate(img_id, vol_id, md, initial_size)

    def _create_data(self, images: sd.Images, img_id: str, vol_id: str,
                     md: volume.Metadata, cluster_size: int | None) -> None:
        """Format a COW volume as qcow2 over its parent; a RAW LV is the volume.

        A new RAW LV is not zeroed (as in VDSM): its data is what it is given.
        """
        if md.format == volume.RAW:
            return
        backing, backing_fmt = self._backing(img_id, md)
        # Prepared, the volume sits beside its parent chain's links, so qemu-img
        # resolves (and checks) the bare-UUID backing reference.
        with images.prepared(self, img_id, vol_id, allow_illegal=True) as prep:
            qemuimg.create(
                prep["path"],
                "qcow2",
                size=md.capacity,
                backing=backing,
                backing_fmt=backing_fmt,
                cluster_size=cluster_size,
            )

    def _remove(self, img_id: str, vol_id: str) -> None:
        self.volumes.remove(img_id, vol_id)


def open_domain(sd_id: str, args: dict[str, Any], env: sd.Env) -> BlockDomain:
    return BlockDomain(block_manifest.BlockDomainManifest(sd_id, list(args["devices"]), env))


# Creation.


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
        dom.lvm.vgcreate(sd_id, devices, env.extent_size_mb, tags=[block_manifest.VG_TAG])
        created_vg = True
        _create_special_lvs(dom)
        _write_initial_metadata(dom, name)
        ids, leases = dom.lease_paths()
        clusterlock.init_domain(sd_id, ids, leases, io_timeout=env.io_timeout)
    except BaseException as e:
        log.error("Cannot create block domain sd=%s: %s", sd_id, e)
        _undo_create(dom, created_vg)
        if isinstance(e, errors.VolumeGroupSizeError):
            raise errors.StorageDomainCreationError(sd_id=sd_id, reason=str(e)) from e
        raise
    return dom


def _create_special_lvs(dom: BlockDomain) -> None:
    vg = dom.lvm.vg_info(dom.vg)
    for name, size in block_manifest.SPECIAL_SIZES.items():
        extents = block_manifest.extents(size, vg.extent_size)
        rng = dom.lvm.find_free_range(dom.vg, extents)
        dom.lvm.lvcreate(dom.vg, name, extents, pv_range=str(rng))


def _write_initial_metadata(dom: BlockDomain, name: str) -> None:
    manifest = dom.manifest
    md_dev = manifest.special_path("metadata")
    size = dom.lvm.lv_info(dom.vg, "metadata").size
    zeros = b"\0" * MiB
    for offset in range(0, size, MiB):
        dom.env.oop.write_direct(md_dev, offset, zeros[: min(MiB, size - offset)])
    for special in ("ids", "leases", "inbox", "outbox", block_manifest.MASTER_LV):
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
        dom.activation.deactivate_all(dom.vg, dom.manifest.devices)  # issue 13
        if created_vg:
            dom.lvm.vgremove(dom.vg)
        dom.lvm.pvremove(dom.manifest.devices)
    except Exception:
        log.exception("Cannot undo creation of block domain sd=%s", dom.sd_id)
