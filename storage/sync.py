"""Image.syncData: copy an image's data into its clone, layer by layer.

Step 4 of live storage migration (DESIGN section 1): after
Image.cloneStructure made the empty chain on the destination, this copies
the data of ``ALL`` volumes, the ``INTERNAL`` ones (all but the leaf, which
QEMU's mirror fills) or the ``LEAF`` only.

Each volume is copied into the destination volume of the same UUID,
keeping the structure: the destination layer ends up holding exactly what
the source layer holds (see :func:`storage.qemuimg_copy.copy_layer`), so a read
of any layer's chain on the destination equals the same read on the source.
The copy is ``qemu-img convert -t none -T none -W -m 16``, at most
``[irs] copy_rate_limit_mb`` MiB/s (the services' ``copy_rate_limit_bps``).
A base volume that is known to read as zeros (any qcow2 base, a RAW base on a file
domain, while the destination volume is still ILLEGAL, i.e. written by
nothing but a sync from this source) is copied with ``--target-is-zero``:
zero areas are skipped, so a sparse image stays sparse and costs only its
data.  A RAW base on a block domain is copied whole, since an LV is not
known to read as zeros.

The source image is held shared, the destination image exclusive (shared
for ``INTERNAL``, see :meth:`SyncJob.locks`).

Progress (0-100) is qemu-img's own, weighted across layers by what each
layer takes on storage (a file's allocation, an LV's size).  A destination volume
becomes LEGAL once its copy is complete: after ``ALL`` every volume is
LEGAL, after ``INTERNAL`` the leaf stays ILLEGAL until the pivot.

``Task.stop`` kills the running qemu-img; the task ends aborted.  The
volume being copied stays ILLEGAL and the layers already copied stay
LEGAL, so the destination is consistent for a retry (copying a layer again
is harmless) or for Image.delete.  Rollback has nothing to undo.  After a
restart the task is run again (``rerun``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from storage import errors, image, job, qemuimg_copy, resource, sd, task, volume

log = logging.getLogger("storage.sync")

KIND = "image.syncData"

ALL = "ALL"
INTERNAL = "INTERNAL"
LEAF = "LEAF"
SYNC_TYPES = (ALL, INTERNAL, LEAF)

MiB = 1024**2
# Least weight of a layer in the progress, so empty layers still count.
MIN_WEIGHT = 1 * MiB


def validate(
    src: sd.StorageDomain,
    dst: sd.StorageDomain,
    img_id: str,
    sync_type: str,
    images: image.ImageManager,
) -> tuple[image.Chain, image.Chain]:
    """Refuse a sync that is invalid on its face; returns both chains."""
    if sync_type not in SYNC_TYPES:
        raise errors.InvalidSyncType(sync_type=sync_type)
    if src.sd_id == dst.sd_id:
        raise errors.SameSourceAndDestination(sd_id=src.sd_id, img_id=img_id)
    src_chain = image.image_chain(src.manifest, img_id)
    dst_chain = image.image_chain(dst.manifest, img_id)
    check_structure(src_chain, dst_chain, img_id, dst.sd_id)
    leaf_id = dst_chain[-1][0]
    if sync_type in (ALL, LEAF) and images.is_prepared(dst.sd_id, img_id, leaf_id):
        # The leaf is in use (a VM or a mirror writes it): copying into it
        # would overwrite what it wrote.
        raise errors.VolumeIsBusy(vol_id=leaf_id, sd_id=dst.sd_id, reason="prepared")
    return src_chain, dst_chain


def check_structure(src: image.Chain, dst: image.Chain, img_id: str, dst_id: str) -> None:
    """The destination chain must have the source's volumes, parents and formats."""
    src_shape = [(v, md.parent, md.format) for v, md in src]
    dst_shape = [(v, md.parent, md.format) for v, md in dst]
    if src_shape != dst_shape:
        raise errors.ImageStructureMismatch(
            img_id=img_id, sd_id=dst_id, reason=f"source {src_shape} destination {dst_shape}"
        )
    for (v, smd), (_, dmd) in zip(src, dst, strict=True):
        if dmd.capacity < smd.capacity:
            raise errors.ImageStructureMismatch(
                img_id=img_id,
                sd_id=dst_id,
                reason=f"volume {v} capacity {dmd.capacity} < {smd.capacity}",
            )


def targets(chain: image.Chain, sync_type: str) -> list[int]:
    """Indexes into chain of the volumes sync_type copies, base first."""
    if sync_type == ALL:
        return list(range(len(chain)))
    if sync_type == INTERNAL:
        return list(range(len(chain) - 1))
    if sync_type == LEAF:
        return [len(chain) - 1]
    raise errors.InvalidSyncType(sync_type=sync_type)


def make_params(src_id: str, dst_id: str, img_id: str, sync_type: str) -> dict[str, Any]:
    return {"src_sd": src_id, "dst_sd": dst_id, "img": img_id, "sync_type": sync_type}


class SyncJob(job.Job):
    kind = KIND

    def _read_params(self, params: dict[str, Any]) -> None:
        self.rate_limit_bps = self.services.copy_rate_limit_bps or None
        self.img_id: str = params["img"]
        self.src_id: str = params["src_sd"]
        self.dst_id: str = params["dst_sd"]
        self.sync_type: str = params["sync_type"]

    def __repr__(self) -> str:
        return f"<SyncJob img={self.img_id} {self.src_id} -> {self.dst_id} {self.sync_type}>"

    def locks(self) -> list[resource.Request]:
        """The source image shared; the destination image exclusive, except
        for INTERNAL: the leaf is then in use by the mirror, whose prepare
        and teardown (shared) must not wait for a long copy that does not
        touch the leaf.  Clone, delete and volume creation (exclusive) wait."""
        dst_mode = resource.SHARED if self.sync_type == INTERNAL else resource.EXCLUSIVE
        return [
            *job.image_locks(self.src_id, self.img_id, resource.SHARED),
            *job.image_locks(self.dst_id, self.img_id, dst_mode),
        ]

    def run(self, ctx: task.Context) -> None:
        src = self.domains(self.src_id)
        dst = self.domains(self.dst_id)
        with self.lock(self.locks()):
            src_chain, dst_chain = validate(src, dst, self.img_id, self.sync_type, self.images)
            indexes = targets(src_chain, self.sync_type)
            if not indexes:
                log.info("Nothing to sync img=%s type=%s", self.img_id, self.sync_type)
                return
            top_id = src_chain[indexes[-1]][0]
            start = time.monotonic()
            with self.images.prepared(src, self.img_id, top_id) as src_prep, \
                    self.images.prepared(dst, self.img_id, top_id, allow_illegal=True) as dst_prep:
                src_paths = [e["path"] for e in src_prep["chain"]]
                dst_paths = [e["path"] for e in dst_prep["chain"]]
                weights = [_weight(src, self.img_id, src_chain[i][0]) for i in indexes]
                total = float(sum(weights))
                done = 0.0
                for i, weight in zip(indexes, weights, strict=True):
                    ctx.check_abort()
                    vol_id, md = src_chain[i]
                    base = done

                    def report(pct: float, base: float = base, weight: float = weight) -> None:
                        ctx.progress(100.0 * (base + weight * pct / 100.0) / total)

                    self._copy(ctx, dst, vol_id, md, dst_chain[i][1],
                               src_paths[i], dst_paths[i], report)
                    done += weight
                    ctx.progress(100.0 * done / total)
        log.info(
            "Synced image img=%s src=%s dst=%s type=%s elapsed=%.3f",
            self.img_id, self.src_id, self.dst_id, self.sync_type, time.monotonic() - start,
        )

    def rollback(self, ctx: task.Context) -> None:
        # Nothing to undo: copied layers are complete and LEGAL, the one
        # interrupted is still ILLEGAL; a retry copies it again.
        log.info(
            "Sync stopped img=%s dst=%s type=%s: destination volumes not fully copied stay ILLEGAL",
            self.img_id, self.dst_id, self.sync_type,
        )

    def _copy(
        self,
        ctx: task.Context,
        dst: sd.StorageDomain,
        vol_id: str,
        md: volume.Metadata,
        dst_md: volume.Metadata,
        src_path: str,
        dst_path: str,
        progress: Callable[[float], None],
    ) -> None:
        fmt = volume.QEMU_FORMAT[md.format]
        reads_zero = md.parent == sd.BLANK_UUID and dst_md.legality == volume.ILLEGAL and (
            md.format == volume.COW or dst.new_raw_reads_zero
        )
        log.info(
            "Copying volume img=%s vol=%s src=%s dst=%s fmt=%s target_is_zero=%s rate=%s",
            self.img_id, vol_id, self.src_id, self.dst_id, fmt, reads_zero, self.rate_limit_bps,
        )
        # A raw LV is whole extents, maybe more than the volume: copy the volume.
        src_size = md.capacity if md.format == volume.RAW else None
        start = time.monotonic()
        if reads_zero:
            qemuimg_copy.convert(
                src_path,
                dst_path,
                fmt,
                fmt,
                target_is_zero=True,
                rate_limit_bps=self.rate_limit_bps,
                src_size=src_size,
                progress=progress,
                abort=ctx.aborted,
            )
        else:
            qemuimg_copy.copy_layer(
                src_path,
                dst_path,
                fmt,
                rate_limit_bps=self.rate_limit_bps,
                src_size=src_size,
                progress=progress,
                abort=ctx.aborted,
            )
        with dst.manifest.lock:
            if dst.manifest.read_volume_metadata(self.img_id, vol_id).legality != volume.LEGAL:
                dst.manifest.volume(self.img_id, vol_id).set_legality(volume.LEGAL)
        log.info(
            "Copied volume img=%s vol=%s dst=%s elapsed=%.3f",
            self.img_id, vol_id, self.dst_id, time.monotonic() - start,
        )


def _weight(dom: sd.StorageDomain, img_id: str, vol_id: str) -> int:
    """What copying this layer costs, for the progress: the bytes it takes
    on storage (a file's allocation, an LV's size); no qemu-img run."""
    try:
        size = dom.manifest.volume_size(img_id, vol_id)[1]
    except errors.Error as e:
        log.warning("Cannot size volume sd=%s vol=%s: %s", dom.sd_id, vol_id, e)
        size = 0
    return max(int(size), MIN_WEIGHT)
