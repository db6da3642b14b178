"""Image.delete: remove every volume of an image (SPM task).

Used after a migration to remove the source image, or to remove the
destination after an aborted one (DESIGN section 1, steps "err" and 6).

:func:`validate` refuses, before any task exists, an unknown image and an
image that is prepared on this host (a VM or a copy uses it).
:class:`DeleteJob` holds the image exclusively, marks every volume ILLEGAL
first (a crash then leaves volumes nobody will use) and removes them
children first, with :meth:`storage.sd.StorageDomain.remove_volume`.  It
copes with what an interrupted creation or deletion leaves (volumes whose
metadata is missing, a broken chain).  Deletion can't be undone, so a
failed or interrupted task is finished by running it again (``rerun``):
removing is idempotent.
"""

from __future__ import annotations

import logging
from typing import Any

from storage import errors, image, job, resource, sd, task, volume

log = logging.getLogger("storage.image_delete")

KIND = "image.delete"


def validate(dom: sd.StorageDomain, img_id: str, images: image.ImageManager) -> list[str]:
    """Refuse deleting a missing or prepared image; returns its volumes."""
    vols = dom.manifest.list_volumes(img_id)
    if not vols:
        raise errors.ImageDoesNotExistInSD(img_id=img_id, sd_id=dom.sd_id)
    for vol_id in vols:
        if images.is_prepared(dom.sd_id, img_id, vol_id):
            raise errors.VolumeIsBusy(vol_id=vol_id, sd_id=dom.sd_id, reason="prepared")
    return vols


def make_params(sd_id: str, img_id: str) -> dict[str, Any]:
    return {"sd": sd_id, "img": img_id}


def removal_order(mds: dict[str, volume.Metadata | None]) -> list[str]:
    """Volumes ordered so that each comes before its parent; volumes whose
    metadata can't be read (None) first, since nothing can depend on them."""
    unknown = sorted(v for v, md in mds.items() if md is None)
    known = {v: md for v, md in mds.items() if md is not None}
    depth: dict[str, int] = {}

    def depth_of(vol_id: str, seen: frozenset[str] = frozenset()) -> int:
        if vol_id in depth:
            return depth[vol_id]
        md = known[vol_id]
        if md.parent not in known or vol_id in seen:
            value = 0
        else:
            value = depth_of(md.parent, seen | {vol_id}) + 1
        depth[vol_id] = value
        return value

    return unknown + sorted(known, key=lambda v: (-depth_of(v), v))


class DeleteJob(job.Job):
    kind = KIND

    def _read_params(self, params: dict[str, Any]) -> None:
        self.img_id: str = params["img"]
        self.sd_id: str = params["sd"]

    def __repr__(self) -> str:
        return f"<DeleteJob sd={self.sd_id} img={self.img_id}>"

    def locks(self) -> list[resource.Request]:
        return job.image_locks(self.sd_id, self.img_id, resource.EXCLUSIVE)

    def run(self, ctx: task.Context) -> None:
        dom = self.domains(self.sd_id)
        with self.lock(self.locks()):
            vols = dom.manifest.list_volumes(self.img_id)
            if not vols:
                log.info("Image already removed sd=%s img=%s", self.sd_id, self.img_id)
                return
            for vol_id in vols:
                if self.images.is_prepared(self.sd_id, self.img_id, vol_id):
                    raise errors.VolumeIsBusy(vol_id=vol_id, sd_id=self.sd_id, reason="prepared")
            log.info("Deleting image sd=%s img=%s vols=%s", self.sd_id, self.img_id, vols)
            mds = self._metadata(dom, vols)
            with dom.manifest.lock:
                for vol_id, md in mds.items():
                    if md is not None and md.legality != volume.ILLEGAL:
                        dom.manifest.volume(self.img_id, vol_id).set_legality(volume.ILLEGAL)
            order = removal_order(mds)
            for i, vol_id in enumerate(order):
                ctx.check_abort()
                md = mds[vol_id]
                dom.remove_volume(self.img_id, vol_id, md.parent if md else sd.BLANK_UUID)
                self.images.forget(self.sd_id, self.img_id, vol_id)  # a crash's stale link
                ctx.progress(100.0 * (i + 1) / len(order))
        log.info("Deleted image sd=%s img=%s", self.sd_id, self.img_id)

    def rollback(self, ctx: task.Context) -> None:
        # Removed volumes can't come back; what is left is ILLEGAL and a
        # new Image.delete removes it.
        log.info("Image deletion incomplete sd=%s img=%s", self.sd_id, self.img_id)

    def _metadata(
        self, dom: sd.StorageDomain, vols: list[str]
    ) -> dict[str, volume.Metadata | None]:
        result: dict[str, volume.Metadata | None] = {}
        for vol_id in vols:
            try:
                result[vol_id] = dom.manifest.read_volume_metadata(self.img_id, vol_id)
            except (errors.VolumeMetadataReadError, errors.VolumeDoesNotExist) as e:
                log.warning("Volume without metadata sd=%s vol=%s: %s", self.sd_id, vol_id, e)
                result[vol_id] = None
        return result
