"""Image.cloneStructure: the empty copy of an image's chain on another domain.

Step 2 of live storage migration (DESIGN section 1).  :func:`validate`
refuses a request that is invalid on its face before any task exists
(same domain, unknown image, an image already on the destination);
:class:`CloneJob` then runs as an SPM task:

- it holds the source image shared and the destination image exclusive;
- it reads each source volume's qcow2 cluster size and measures what
  copying its own layer needs (``qemu-img measure``, the layer without its
  backing);
- it creates, base first, every volume of the chain on the destination with
  the same UUID, parent, format and capacity, and the source's cluster size
  (QEMU's mirror copies whole clusters; copy_layer needs dst clusters no
  larger than src's).  qcow2 backing references are bare parent UUIDs, so
  the chain is valid on the destination at once.  On a block domain an
  internal COW volume is created big enough for its data (the measure,
  plus room for L2 tables); the leaf starts at one chunk, or at what the
  source leaf needs if that is more.  RAW volumes are PREALLOCATED on block
  domains; a RAW volume coming from a block domain becomes SPARSE on a file
  domain (the block preallocation was forced, not chosen);
- every new volume is left ILLEGAL: nothing may use it before
  Image.syncData (or the pivot) has filled it.

If the job fails or is stopped, :meth:`CloneJob.rollback` removes what it
created, leaf first.  After a crash (``ctx.recovering``) it cannot know
what it made, so it removes those volumes of the chain (listed in the
task's params) that exist on the destination ILLEGAL with a creation time
not older than the task, or whose metadata was never written.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

from storage import errors, image, job, qemuimg, resource, sd, task, volume

log = logging.getLogger("storage.clone")

KIND = "image.cloneStructure"

MiB = 1024**2
# Room for qcow2 metadata beyond qemu-img measure's figure (refcount blocks
# of the destination's own layout, rounding).
SLACK = 1 * MiB


@dataclasses.dataclass
class VolumePlan:
    """How one destination volume is created."""

    vol_id: str
    parent: str
    capacity: int
    format: str
    type: str
    description: str
    cluster_size: int | None
    initial_size: int | None


def validate(
    src: sd.StorageDomain, dst: sd.StorageDomain, img_id: str
) -> image.Chain:
    """Refuse a clone that is invalid on its face; returns the source chain."""
    if src.sd_id == dst.sd_id:
        raise errors.SameSourceAndDestination(sd_id=src.sd_id, img_id=img_id)
    chain = image.image_chain(src.manifest, img_id)
    check_absent(dst, img_id, [vol_id for vol_id, _ in chain])
    return chain


def check_absent(dst: sd.StorageDomain, img_id: str, vol_ids: list[str]) -> None:
    """VolumeAlreadyExists if the image or any of the volumes is on dst."""
    existing = dst.manifest.list_volumes(img_id)
    if existing:
        raise errors.VolumeAlreadyExists(vol_id=existing[0], sd_id=dst.sd_id, img_id=img_id)
    for vol_id in vol_ids:
        found = dst.manifest.find_volume(vol_id)
        if found is not None:
            raise errors.VolumeAlreadyExists(vol_id=vol_id, sd_id=dst.sd_id, img_id=found)


def make_params(src_id: str, dst_id: str, img_id: str, chain: image.Chain) -> dict[str, Any]:
    """The job's persisted params (JSON)."""
    return {
        "src_sd": src_id,
        "dst_sd": dst_id,
        "img": img_id,
        "vols": [vol_id for vol_id, _ in chain],
        "submitted": int(time.time()),
    }


class CloneJob(job.Job):
    kind = KIND

    def _read_params(self, params: dict[str, Any]) -> None:
        self.img_id: str = params["img"]
        self.src_id: str = params["src_sd"]
        self.dst_id: str = params["dst_sd"]
        # Volumes this run put on storage, in creation order.
        self.created: list[tuple[str, str]] = []

    def __repr__(self) -> str:
        return f"<CloneJob img={self.img_id} {self.src_id} -> {self.dst_id}>"

    def locks(self) -> list[resource.Request]:
        return [
            *job.image_locks(self.src_id, self.img_id, resource.SHARED),
            *job.image_locks(self.dst_id, self.img_id, resource.EXCLUSIVE),
        ]

    def run(self, ctx: task.Context) -> None:
        src = self.domains(self.src_id)
        dst = self.domains(self.dst_id)
        with self.lock(self.locks()):
            chain = image.image_chain(src.manifest, self.img_id)
            if [v for v, _ in chain] != self.params["vols"]:
                raise errors.ImageIsNotLegalChain(
                    img_id=self.img_id, sd_id=self.src_id, reason="the chain changed"
                )
            # Checked again under the lock: a clone that raced us must not
            # be undone by our rollback (nothing is in self.created yet).
            check_absent(dst, self.img_id, self.params["vols"])
            plans = self._plan(ctx, src, dst, chain)
            log.info(
                "Cloning image img=%s src=%s dst=%s vols=%s",
                self.img_id, self.src_id, self.dst_id, [p.vol_id for p in plans],
            )
            for i, plan in enumerate(plans):
                ctx.check_abort()
                self._create(dst, plan)
                ctx.progress(100.0 * (i + 1) / len(plans))
        log.info("Cloned image img=%s src=%s dst=%s", self.img_id, self.src_id, self.dst_id)

    def rollback(self, ctx: task.Context) -> None:
        dst = self.domains(self.dst_id)
        with self.lock(self.locks()[2:]):
            if ctx.recovering:
                victims = self._leftovers(dst)
            else:
                victims = list(self.created)
            log.info(
                "Rolling back clone img=%s dst=%s remove=%s recovering=%s",
                self.img_id, self.dst_id, [v for v, _ in victims], ctx.recovering,
            )
            for vol_id, parent in reversed(victims):
                dst.remove_volume(self.img_id, vol_id, parent)
                # A crashed run may have left the new volume linked.
                self.images.forget(self.dst_id, self.img_id, vol_id)
            self.created = []

    # Internals.

    def _plan(
        self, ctx: task.Context, src: sd.StorageDomain, dst: sd.StorageDomain, chain: image.Chain
    ) -> list[VolumePlan]:
        leaf_id = chain[-1][0]
        thin = dst.grows_by_extension
        plans = []
        with self.images.prepared(src, self.img_id, leaf_id) as prep:
            paths = {entry["volumeID"]: entry["path"] for entry in prep["chain"]}
            for vol_id, md in chain:
                ctx.check_abort()
                fmt = volume.QEMU_FORMAT[md.format]
                cluster_size = None
                initial_size = None
                if md.format == volume.COW:
                    cluster_size = qemuimg.info(paths[vol_id], fmt=fmt)["cluster-size"]
                    if thin and md.type == volume.SPARSE:
                        need = _layer_need(paths[vol_id], fmt, md.capacity, cluster_size)
                        if vol_id == leaf_id:
                            need = max(need, dst.env.chunk_size)
                        initial_size = min(need, volume.max_size(md.capacity, md.format))
                plans.append(
                    VolumePlan(
                        vol_id=vol_id,
                        parent=md.parent,
                        capacity=md.capacity,
                        format=md.format,
                        type=_dst_type(md, src, dst),
                        description=md.description,
                        cluster_size=cluster_size,
                        initial_size=initial_size,
                    )
                )
        return plans

    def _create(self, dst: sd.StorageDomain, plan: VolumePlan) -> None:
        def allocated() -> None:
            self.created.append((plan.vol_id, plan.parent))

        dst.create_volume(
            self.images,
            self.img_id,
            plan.vol_id,
            plan.capacity,
            plan.format,
            plan.type,
            parent_id=plan.parent,
            description=plan.description,
            initial_size=plan.initial_size,
            cluster_size=plan.cluster_size,
            legal=False,
            on_allocated=allocated,
        )

    def _leftovers(self, dst: sd.StorageDomain) -> list[tuple[str, str]]:
        """Volumes of the chain that an interrupted run of this task made."""
        found = set(dst.manifest.list_volumes(self.img_id))
        result = []
        for vol_id in self.params["vols"]:
            if vol_id not in found:
                continue
            try:
                md = dst.manifest.read_volume_metadata(self.img_id, vol_id)
            except (errors.VolumeMetadataReadError, errors.VolumeDoesNotExist):
                result.append((vol_id, sd.BLANK_UUID))  # half made: ours
                continue
            if md.legality == volume.ILLEGAL and md.ctime >= self.params["submitted"]:
                result.append((vol_id, md.parent))
            else:
                log.warning(
                    "Not removing volume sd=%s img=%s vol=%s legality=%s ctime=%d: not ours",
                    self.dst_id, self.img_id, vol_id, md.legality, md.ctime,
                )
        return result


def _dst_type(md: volume.Metadata, src: sd.StorageDomain, dst: sd.StorageDomain) -> str:
    if md.format == volume.RAW:
        if not dst.supports_sparse_raw:
            return volume.PREALLOCATED
        if not src.supports_sparse_raw:
            # A preallocated RAW copied where RAW may be sparse: keep it sparse.
            return volume.SPARSE
    return md.type


def _layer_need(path: str, fmt: str, capacity: int, cluster_size: int) -> int:
    """Bytes a qcow2 copy of this one layer needs: its data and metadata,
    plus L2 tables for the whole capacity (zero clusters need entries too)."""
    required = qemuimg.measure(path, fmt=fmt, backing=False)["required"]
    l2_tables = -(-capacity // cluster_size) * 8
    return required + l2_tables + 2 * cluster_size + SLACK
