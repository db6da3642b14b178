"""SPM task jobs of Volume.create and Volume.delete.

Jobs are persisted as ``{kind, params}`` (storage.task) so that a new SPM
recovers them after a crash (their kinds are declared in storage.jobs):

``volume.create`` (recovered by rollback)
    Creates the volume under an exclusive lock on its image.  Rollback
    removes whatever exists of it (also after a restart, when the job does
    not know how far it got: the verb refused an existing volume before the
    task existed, so a volume with this id in this image is this task's)
    and makes its parent the leaf again.
``volume.delete`` (recovered by re-running)
    Marks the volume ILLEGAL, removes it, makes the parent the leaf.  Running
    it again after an interruption finishes the removal.

Params: ``sd_id``, ``img_id``, ``vol_id`` (and ``pool_id``, unused by the
job); a creation also has ``capacity``, ``format``, ``prealloc``,
``parent_id``, ``description`` and ``initial_size`` (see
:func:`create_params`).
"""

from __future__ import annotations

import logging
from typing import Any

from storage import job, resource, task, volume

log = logging.getLogger("storage.volume_jobs")

CREATE = "volume.create"
DELETE = "volume.delete"


def create_params(
    pool_id: str,
    sd_id: str,
    img_id: str,
    vol_id: str,
    capacity: int,
    fmt: str,
    prealloc: str,
    parent_id: str = volume.BLANK_UUID,
    description: str = "",
    initial_size: int | None = None,
) -> dict[str, Any]:
    """The persisted params of a volume.create job."""
    return {
        "pool_id": pool_id,
        "sd_id": sd_id,
        "img_id": img_id,
        "vol_id": vol_id,
        "capacity": capacity,
        "format": fmt,
        "prealloc": prealloc,
        "parent_id": parent_id,
        "description": description,
        "initial_size": initial_size,
    }


def delete_params(pool_id: str, sd_id: str, img_id: str, vol_id: str) -> dict[str, Any]:
    """The persisted params of a volume.delete job."""
    return {"pool_id": pool_id, "sd_id": sd_id, "img_id": img_id, "vol_id": vol_id}


class VolumeJob(job.Job):
    """A job on one volume, holding its image exclusively."""

    def _read_params(self, params: dict[str, Any]) -> None:
        self.sd_id: str = params["sd_id"]
        self.img_id: str = params["img_id"]
        self.vol_id: str = params["vol_id"]

    def __repr__(self) -> str:
        return f"<{type(self).__name__} sd={self.sd_id} img={self.img_id} vol={self.vol_id}>"

    def locks(self) -> list[resource.Request]:
        return job.image_locks(self.sd_id, self.img_id, resource.EXCLUSIVE)


class CreateVolume(VolumeJob):
    kind = CREATE

    def _read_params(self, params: dict[str, Any]) -> None:
        super()._read_params(params)
        self.parent_id: str = params.get("parent_id", volume.BLANK_UUID)
        # True once something of the volume exists on storage (this run).
        self.created = False

    def _mark_created(self) -> None:
        self.created = True

    def run(self, ctx: task.Context) -> None:
        p = self.params
        dom = self.domains(self.sd_id)
        with self.lock(self.locks()):
            ctx.check_abort()
            dom.create_volume(
                self.images,
                self.img_id,
                self.vol_id,
                p["capacity"],
                p["format"],
                p["prealloc"],
                parent_id=self.parent_id,
                description=p.get("description", ""),
                initial_size=p.get("initial_size"),
                on_allocated=self._mark_created,
            )
            # Task.stop during the creation: undo it (rollback) rather than
            # report success for a volume the caller gave up on.
            ctx.check_abort()
        ctx.progress(100)

    def rollback(self, ctx: task.Context) -> None:
        if not (self.created or ctx.recovering):
            return
        dom = self.domains(self.sd_id)
        with self.lock(self.locks()):
            found = dom.manifest.find_volume(self.vol_id)
            if found not in (None, "", self.img_id):
                log.warning("Not removing volume vol=%s: it is in image %s", self.vol_id, found)
                return
            log.info("Rolling back creation sd=%s img=%s vol=%s",
                     self.sd_id, self.img_id, self.vol_id)
            dom.remove_volume(self.img_id, self.vol_id, self.parent_id)
            # A crashed daemon may have left the new volume linked.
            self.images.forget(self.sd_id, self.img_id, self.vol_id)


class DeleteVolume(VolumeJob):
    kind = DELETE

    def run(self, ctx: task.Context) -> None:
        dom = self.domains(self.sd_id)
        with self.lock(self.locks()):
            ctx.check_abort()
            if dom.manifest.find_volume(self.vol_id) is None:
                log.info("Volume already removed sd=%s vol=%s", self.sd_id, self.vol_id)
                return
            dom.delete_volume(self.images, self.img_id, self.vol_id)
            self.images.forget(self.sd_id, self.img_id, self.vol_id)
        ctx.progress(100)

    def rollback(self, ctx: task.Context) -> None:
        # A half-deleted volume is ILLEGAL: nobody uses it, deleting again finishes.
        pass
