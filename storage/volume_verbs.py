"""Volume.*, Image.prepare/teardown, and the tasks: volumes of the connected pool.

Volume.create and Volume.delete are SPM verbs: they refuse what is invalid
on its face with a coded error before any task exists, then submit their
job (storage.volume_jobs, declared in storage.jobs) and answer the task
id.  Volume.setLegality is an SPM verb too, done at once
(storage.spm_requests.set_legality).  Every SPM verb asks for the SPM role
first: on another host it answers ``SpmStatusError`` having done nothing.
Volume.getInfo, Image.prepare and Image.teardown work on any host
connected to the pool and write no metadata (activation, links and
reference counts are this host's own).

Task.* and Host.getAllTasks* report the SPM's tasks.  A status is the task
manager's own (storage.task): ``code`` is the *name* of the error that
ended the task ("" while none); the rpc layer turns it into the API's
number (and adds the name as ``error``), the one place that maps error
names to codes.
"""

from __future__ import annotations

from typing import Any

from storage import core, errors, sd, spm_requests, task_manager, volume, volume_jobs

BLANK_UUID = volume.BLANK_UUID


class VolumeVerbs(core.StorageCore):
    """Serves Volume.*, Image.prepare and Image.teardown."""

    def volume_create(
        self,
        storagepool_id: str,
        storagedomain_id: str,
        image_id: str,
        volume_id: str,
        size: int,
        vol_format: str,
        preallocate: str,
        desc: str = "",
        src_img_uuid: str = BLANK_UUID,
        src_vol_uuid: str = BLANK_UUID,
        initial_size: int | None = None,
        disk_type: str | None = None,
        add_bitmaps: bool = False,
        legal: bool = True,
        sequence: int = 0,
        bitmap: str | None = None,
    ) -> str:
        """SPM: refuse what is invalid on its face, then create in a task.

        VDSM's disk_type, add_bitmaps, legal, sequence and bitmap are accepted
        and ignored: every volume is a data volume, LEGAL once created, and
        no volume here has bitmaps."""
        dom = self.spm_domain(storagepool_id, storagedomain_id)
        if src_vol_uuid != BLANK_UUID and src_img_uuid not in (BLANK_UUID, image_id):
            raise errors.ImageIsNotLegalChain(
                img_id=image_id, sd_id=storagedomain_id,
                reason=f"parent image {src_img_uuid} differs: templates are not supported",
            )
        volume.clean_description(desc)
        dom.validate_create(
            image_id, volume_id, size, vol_format, preallocate, src_vol_uuid, initial_size
        )
        params = volume_jobs.create_params(
            storagepool_id, storagedomain_id, image_id, volume_id, size, vol_format,
            preallocate, parent_id=src_vol_uuid, description=desc, initial_size=initial_size,
        )
        return self.submit_job(storagepool_id, volume_jobs.CREATE, params)

    def volume_get_info(
        self, storagepool_id: str, storagedomain_id: str, image_id: str, volume_id: str
    ) -> dict[str, Any]:
        dom = self.domain(storagepool_id, storagedomain_id)
        try:
            return dom.manifest.volume(image_id, volume_id).info()
        except errors.VolumeDoesNotExist:
            if not dom.manifest.list_volumes(image_id):
                raise errors.ImageDoesNotExistInSD(
                    img_id=image_id, sd_id=storagedomain_id
                ) from None
            raise

    def volume_delete(
        self,
        storagepool_id: str,
        storagedomain_id: str,
        image_id: str,
        volume_id: str,
        post_zero: bool = False,
        force: bool = False,
        discard: bool = False,
    ) -> str:
        """SPM: delete a leaf volume in a task.  VDSM's post_zero, force and
        discard are ignored: volumes are removed (not zeroed or discarded),
        and only an unused leaf ever is, whatever force says."""
        dom = self.spm_domain(storagepool_id, storagedomain_id)
        if not dom.manifest.list_volumes(image_id):
            raise errors.ImageDoesNotExistInSD(img_id=image_id, sd_id=storagedomain_id)
        dom.validate_delete(self.images, image_id, volume_id)
        params = volume_jobs.delete_params(
            storagepool_id, storagedomain_id, image_id, volume_id
        )
        return self.submit_job(storagepool_id, volume_jobs.DELETE, params)

    def volume_set_legality(
        self,
        storagepool_id: str,
        storagedomain_id: str,
        image_id: str,
        volume_id: str,
        legality: str,
    ) -> bool:
        """SPM: mark a volume LEGAL or ILLEGAL (the engine's, or move-disk's,
        after the pivot of a replication: the destination leaf)."""
        dom = self.spm_domain(storagepool_id, storagedomain_id)
        sd.check_uuid(image_id, volume_id)
        if not dom.manifest.list_volumes(image_id):
            raise errors.ImageDoesNotExistInSD(img_id=image_id, sd_id=storagedomain_id)
        spm_requests.set_legality(dom, image_id, volume_id, legality)
        return True

    # Image.prepare / Image.teardown

    def image_prepare(
        self,
        storagepool_id: str,
        storagedomain_id: str,
        image_id: str,
        volume_id: str,
        allow_illegal: bool = False,
    ) -> dict[str, Any]:
        """Prepare the chain; an ILLEGAL volume is refused unless allow_illegal."""
        return self.prepare(
            storagepool_id, storagedomain_id, image_id, volume_id, allow_illegal=allow_illegal
        )

    def image_teardown(
        self, storagepool_id: str, storagedomain_id: str, image_id: str, volume_id: str
    ) -> bool:
        self.teardown(storagepool_id, storagedomain_id, image_id, volume_id)
        return True


class TaskVerbs(core.StorageCore):
    """Serves Task.* and Host.getAllTasksStatuses / Host.getAllTasksInfo."""

    def task_get_status(self, task_id: str) -> dict[str, Any]:
        return self._task_manager(task_id).get_status(task_id)

    def task_get_info(self, task_id: str) -> dict[str, str]:
        return self._task_manager(task_id).get_info(task_id)

    def task_clear(self, task_id: str) -> bool:
        self._task_manager(task_id).clear(task_id)
        return True

    def task_stop(self, task_id: str) -> bool:
        self._task_manager(task_id).stop(task_id)
        return True

    def host_get_all_tasks_statuses(self) -> dict[str, dict[str, Any]]:
        return self._spm_tasks().all_statuses()

    def host_get_all_tasks_info(self) -> dict[str, dict[str, str]]:
        return self._spm_tasks().all_info()

    def _task_manager(self, task_id: str) -> task_manager.TaskManager:
        """The task manager that may know task_id (UnknownTask: none here)."""
        p = self._pool
        manager = p.tasks if p is not None else None
        if manager is None:
            raise errors.UnknownTask(task_id=task_id)
        return manager

    def _spm_tasks(self) -> task_manager.TaskManager:
        p = self._pool
        if p is None:
            raise errors.SpmStatusError(pool_id="(no pool connected)")
        return p.spm_tasks()
