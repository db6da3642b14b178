"""The provider of ``Image.cloneStructure``, ``Image.syncData`` and ``Image.delete``.

The SPM verbs of live storage migration that work on whole images.  Each
verb refuses what is invalid on its face with a coded error before any
task exists (not SPM, unknown pool, domain or image, source == destination,
an image already on the destination, a destination that does not match,
an image in use), then submits a persisted job to the pool's task manager
and answers the task id:

=========================  ========================  ===========================
verb                       job (module)              after a restart
=========================  ========================  ===========================
``Image.cloneStructure``   ``image.cloneStructure``  rolled back (what it made
                           (:mod:`storage.clone`)    is removed)
``Image.syncData``         ``image.syncData``        run again
                           (:mod:`storage.sync`)
``Image.delete``           ``image.delete``          run again
                           (:mod:`storage.image_delete`)
=========================  ========================  ===========================

Built on :class:`storage.api.StorageAPI` (pool, domains, prepared images,
resource locks, task submission); the daemon registers both providers.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, Any

from storage import clone, errors, image_delete, sync, task

if TYPE_CHECKING:
    from storage import api

log = logging.getLogger("storage.image_ops")

MiB = 1024**2


class ImageOps:
    """Serves the image verbs; registers their job kinds with storage.

    copy_rate_limit_mb: ``[irs] copy_rate_limit_mb``, the qemu-img copy rate
    limit of Image.syncData in MiB/s (0: unlimited).
    """

    def __init__(self, storage: api.StorageAPI, copy_rate_limit_mb: int = 0) -> None:
        self.storage = storage
        self.rate_limit_bps = copy_rate_limit_mb * MiB if copy_rate_limit_mb > 0 else None
        # Unfinished clone tasks by (destination domain, image): a second
        # clone of the image to that domain is refused at once.
        self._clones: dict[tuple[str, str], str] = {}
        self._lock = threading.Lock()
        storage.register_job_kind(clone.KIND, self._clone_job, clone.RECOVERY)
        storage.register_job_kind(sync.KIND, self._sync_job, sync.RECOVERY)
        storage.register_job_kind(image_delete.KIND, self._delete_job, image_delete.RECOVERY)

    # Verbs.

    def image_clone_structure(
        self, image_id: str, storagepool_id: str, storagedomain_id: str, dst_sd_uuid: str
    ) -> str:
        """SPM task: the image's volumes, empty and ILLEGAL, on dst_sd_uuid."""
        src, dst = self._domains(storagepool_id, storagedomain_id, dst_sd_uuid, image_id)
        with self._lock:
            chain = clone.validate(src, dst, image_id)
            running = self._running_clone(dst_sd_uuid, image_id, storagepool_id)
            if running:
                raise errors.VolumeAlreadyExists(
                    vol_id=chain[0][0], sd_id=dst_sd_uuid, img_id=image_id,
                    reason=f"task {running} is cloning the image there",
                )
            params = clone.make_params(storagedomain_id, dst_sd_uuid, image_id, chain)
            task_id = self.storage.submit(
                storagepool_id, "Image.cloneStructure", self._clone_job(params)
            )
            self._clones[(dst_sd_uuid, image_id)] = task_id
        log.info(
            "Cloning image img=%s src=%s dst=%s task=%s",
            image_id, storagedomain_id, dst_sd_uuid, task_id,
        )
        return task_id

    def image_sync_data(
        self,
        image_id: str,
        storagepool_id: str,
        storagedomain_id: str,
        dst_sd_uuid: str,
        sync_type: str,
    ) -> str:
        """SPM task: copy the data of ALL, INTERNAL or LEAF volumes to dst_sd_uuid."""
        src, dst = self._domains(storagepool_id, storagedomain_id, dst_sd_uuid, image_id)
        sync.validate(src, dst, image_id, sync_type, self.storage.images)
        params = sync.make_params(storagedomain_id, dst_sd_uuid, image_id, sync_type)
        task_id = self.storage.submit(storagepool_id, "Image.syncData", self._sync_job(params))
        log.info(
            "Syncing image img=%s src=%s dst=%s type=%s task=%s",
            image_id, storagedomain_id, dst_sd_uuid, sync_type, task_id,
        )
        return task_id

    def image_delete(self, image_id: str, storagepool_id: str, storagedomain_id: str) -> str:
        """SPM task: remove every volume of the image (refused while prepared)."""
        dom = self.storage.spm_pool(storagepool_id).get_domain(storagedomain_id)
        image_delete.validate(dom, image_id, self.storage.images)
        params = image_delete.make_params(storagedomain_id, image_id)
        task_id = self.storage.submit(storagepool_id, "Image.delete", self._delete_job(params))
        log.info("Deleting image img=%s sd=%s task=%s", image_id, storagedomain_id, task_id)
        return task_id

    # Job factories (also used by recovery, with persisted params).

    def _clone_job(self, params: dict[str, Any]) -> clone.CloneJob:
        return clone.CloneJob(
            self.storage.cache.get,
            self.storage.images,
            self.storage.resources,
            params,
            lock_timeout=self.storage.resource_timeout,
        )

    def _sync_job(self, params: dict[str, Any]) -> sync.SyncJob:
        return sync.SyncJob(
            self.storage.cache.get,
            self.storage.images,
            self.storage.resources,
            params,
            rate_limit_bps=self.rate_limit_bps,
            lock_timeout=self.storage.resource_timeout,
        )

    def _delete_job(self, params: dict[str, Any]) -> image_delete.DeleteJob:
        return image_delete.DeleteJob(
            self.storage.cache.get,
            self.storage.images,
            self.storage.resources,
            params,
            lock_timeout=self.storage.resource_timeout,
        )

    # Internals.

    def _domains(self, pool_id: str, src_id: str, dst_id: str, img_id: str) -> tuple[Any, Any]:
        p = self.storage.spm_pool(pool_id)
        src = p.get_domain(src_id)
        if dst_id == src_id:
            raise errors.SameSourceAndDestination(sd_id=src_id, img_id=img_id)
        return src, p.get_domain(dst_id)

    def _running_clone(self, dst_id: str, img_id: str, pool_id: str) -> str | None:
        task_id = self._clones.get((dst_id, img_id))
        if task_id is None:
            return None
        try:
            state = self.storage.spm_pool(pool_id).tasks.get_status(task_id)["taskState"]
        except (errors.UnknownTask, AttributeError):
            state = task.FINISHED
        if state == task.FINISHED:
            del self._clones[(dst_id, img_id)]
            return None
        return task_id
