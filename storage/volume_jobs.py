"""SPM task jobs of Volume.create and Volume.delete.

Jobs are persisted as ``{kind, params}`` (storage.task) so that a new SPM
recovers them after a crash:

``volume.create`` (recovered by rollback)
    Creates the volume under an exclusive lock on its image.  Rollback
    removes whatever exists of it (also after a restart, when the job does
    not know how far it got: the verb refused an existing volume before the
    task existed, so a volume with this id in this image is this task's)
    and makes its parent the leaf again.
``volume.delete`` (recovered by re-running)
    Marks the volume ILLEGAL, removes it, makes the parent the leaf.  Running
    it again after an interruption finishes the removal.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from storage import resource, task, volume

if TYPE_CHECKING:
    from storage import api

log = logging.getLogger("storage.volume_jobs")

CREATE = "volume.create"
DELETE = "volume.delete"


def register(provider: api.StorageAPI) -> None:
    provider.register_job_kind(CREATE, lambda p: CreateVolume(provider, p), task.ROLLBACK)
    provider.register_job_kind(DELETE, lambda p: DeleteVolume(provider, p), task.RERUN)


class CreateVolume:
    kind = CREATE

    def __init__(self, provider: api.StorageAPI, params: dict[str, Any]) -> None:
        self.provider = provider
        self.params = params
        self.created = False

    def _mark_created(self) -> None:
        self.created = True

    def run(self, ctx: task.Context) -> None:
        p = self.params
        dom = self.provider.cache.get(p["sd_id"])
        with self.provider.lock_image(p["sd_id"], p["img_id"], resource.EXCLUSIVE):
            ctx.check_abort()
            dom.create_volume(
                self.provider.images,
                p["img_id"],
                p["vol_id"],
                p["capacity"],
                p["format"],
                p["prealloc"],
                parent_id=p.get("parent_id", volume.BLANK_UUID),
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
        p = self.params
        dom = self.provider.cache.get(p["sd_id"])
        with self.provider.lock_image(p["sd_id"], p["img_id"], resource.EXCLUSIVE):
            found = dom.manifest.find_volume(p["vol_id"])
            if found not in (None, "", p["img_id"]):
                log.warning("Not removing volume vol=%s: it is in image %s", p["vol_id"], found)
                return
            log.info("Rolling back creation sd=%s img=%s vol=%s",
                     p["sd_id"], p["img_id"], p["vol_id"])
            dom.remove_volume(p["img_id"], p["vol_id"], p.get("parent_id", volume.BLANK_UUID))
            # A crashed daemon may have left the new volume linked.
            self.provider.images.forget(p["sd_id"], p["img_id"], p["vol_id"])


class DeleteVolume:
    kind = DELETE

    def __init__(self, provider: api.StorageAPI, params: dict[str, Any]) -> None:
        self.provider = provider
        self.params = params

    def run(self, ctx: task.Context) -> None:
        p = self.params
        dom = self.provider.cache.get(p["sd_id"])
        with self.provider.lock_image(p["sd_id"], p["img_id"], resource.EXCLUSIVE):
            ctx.check_abort()
            if dom.manifest.find_volume(p["vol_id"]) is None:
                log.info("Volume already removed sd=%s vol=%s", p["sd_id"], p["vol_id"])
                return
            dom.delete_volume(self.provider.images, p["img_id"], p["vol_id"])
            self.provider.images.forget(p["sd_id"], p["img_id"], p["vol_id"])
        ctx.progress(100)

    def rollback(self, ctx: task.Context) -> None:
        # A half-deleted volume is ILLEGAL: nobody uses it, deleting again finishes.
        pass
