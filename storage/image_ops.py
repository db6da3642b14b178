"""The provider of ``Image.cloneStructure``, ``Image.syncData`` and ``Image.delete``.

The SPM verbs of live storage migration that work on whole images.  Each
verb refuses what is invalid on its face with a coded error before any
task exists (not SPM, unknown pool, domain or image, source == destination,
an image already on the destination, a destination that does not match,
an image in use), then submits a persisted job and answers the task id:

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

(the kinds are declared in :mod:`storage.jobs`).  :class:`ImageOps` asks
storage only what :class:`Storage` lists; the storage API provider
(:class:`storage.api.StorageAPI`) is such a storage, and the daemon
registers both providers.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Protocol

from storage import clone, errors, image, image_delete, sd, sync, task

log = logging.getLogger("storage.image_ops")


class Storage(Protocol):
    """What the image verbs ask of storage."""

    @property
    def images(self) -> image.ImageManager:
        """The volumes prepared on this host (a prepared image is in use)."""
        ...

    def spm_domain(self, pool_id: str, sd_id: str) -> sd.StorageDomain:
        """A domain of the pool; SpmStatusError unless this host is its SPM."""
        ...

    def submit_job(self, pool_id: str, kind: str, params: dict[str, Any]) -> str:
        """Run a job of kind (storage.jobs) as an SPM task; its id."""
        ...

    def task_state(self, task_id: str) -> str | None:
        """A task's taskState, None if this host has no such task."""
        ...


class ImageOps:
    """Serves the image verbs on storage."""

    def __init__(self, storage: Storage) -> None:
        self.storage = storage
        # Unfinished clone tasks by (destination domain, image): a second
        # clone of the image to that domain is refused at once.
        self._clones: dict[tuple[str, str], str] = {}
        self._lock = threading.Lock()

    # Verbs.

    def image_clone_structure(
        self, image_id: str, storagepool_id: str, storagedomain_id: str, dst_sd_uuid: str
    ) -> str:
        """SPM task: the image's volumes, empty and ILLEGAL, on dst_sd_uuid."""
        src, dst = self._domains(storagepool_id, storagedomain_id, dst_sd_uuid, image_id)
        with self._lock:
            chain = clone.validate(src, dst, image_id)
            running = self._running_clone(dst_sd_uuid, image_id)
            if running:
                raise errors.VolumeAlreadyExists(
                    vol_id=chain[0][0], sd_id=dst_sd_uuid, img_id=image_id,
                    reason=f"task {running} is cloning the image there",
                )
            params = clone.make_params(storagedomain_id, dst_sd_uuid, image_id, chain)
            task_id = self.storage.submit_job(storagepool_id, clone.KIND, params)
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
        task_id = self.storage.submit_job(storagepool_id, sync.KIND, params)
        log.info(
            "Syncing image img=%s src=%s dst=%s type=%s task=%s",
            image_id, storagedomain_id, dst_sd_uuid, sync_type, task_id,
        )
        return task_id

    def image_delete(
        self,
        image_id: str,
        storagepool_id: str,
        storagedomain_id: str,
        post_zero: bool = False,
        force: bool = False,
        discard: bool = False,
    ) -> str:
        """SPM task: remove every volume of the image (refused while prepared).

        VDSM's post_zero, force and discard are ignored: volumes are removed,
        not zeroed or discarded, and an image in use is refused whatever force
        says."""
        dom = self.storage.spm_domain(storagepool_id, storagedomain_id)
        image_delete.validate(dom, image_id, self.storage.images)
        params = image_delete.make_params(storagedomain_id, image_id)
        task_id = self.storage.submit_job(storagepool_id, image_delete.KIND, params)
        log.info("Deleting image img=%s sd=%s task=%s", image_id, storagedomain_id, task_id)
        return task_id

    # Internals.

    def _domains(
        self, pool_id: str, src_id: str, dst_id: str, img_id: str
    ) -> tuple[sd.StorageDomain, sd.StorageDomain]:
        src = self.storage.spm_domain(pool_id, src_id)
        if dst_id == src_id:
            raise errors.SameSourceAndDestination(sd_id=src_id, img_id=img_id)
        return src, self.storage.spm_domain(pool_id, dst_id)

    def _running_clone(self, dst_id: str, img_id: str) -> str | None:
        """The unfinished clone task of img_id to dst_id submitted here, if any."""
        task_id = self._clones.get((dst_id, img_id))
        if task_id is None:
            return None
        if self.storage.task_state(task_id) in (None, task.FINISHED):
            del self._clones[(dst_id, img_id)]
            return None
        return task_id
