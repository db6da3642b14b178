"""The storage API provider: the object whose methods serve the storage verbs.

Verb ``Namespace.verbName`` is served by the method ``namespace_verb_name``
(``Volume.create`` -> :meth:`StorageAPI.volume_create`), with the schema's
params snake-cased as keyword arguments, already validated by the schema.
Results are plain values; failures raise coded errors (storage.errors).

Besides the verbs it offers the narrow interface other packages use:
:meth:`prepare`/:meth:`teardown` and :meth:`extend`/:meth:`refresh` (virt:
VMs and the watermark monitor), and :meth:`domain`, :meth:`pool`,
:meth:`submit`, :meth:`register_job_kind`, ``images`` and ``resources``
(the SPM verbs of live storage migration, built on top of this module).

State that survives a daemon restart: the domains this host knows
(``<state_dir>/domains/``), the pool it is connected to
(``<state_dir>/pool.json``; :meth:`recover` connects again), pool membership
and SPM tasks on the storage itself.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from typing import Any

from rpc import errors as rpc_errors
from storage import (
    block_sd,
    errors,
    extend,
    file_sd,
    image,
    oop,
    pool,
    resource,
    sd,
    task,
    volume,
    volume_jobs,
)

log = logging.getLogger("storage.api")

BLANK_UUID = volume.BLANK_UUID
MiB = 1024**2


class StorageAPI:
    """Serves StorageDomain.*, StoragePool.*, Volume.*, Image.prepare/teardown,
    Task.* and Host.getAllTasks*.  Plain values in, no config object."""

    def __init__(
        self,
        run_dir: str,
        *,
        state_dir: str | None = None,
        chunk_mb: int = 2560,
        utilization_percent: int = 20,
        activation_mode: str = "auto",
        cluster_lock_mode: str = "auto",
        oop_timeout: float = 60.0,
        oop_workers: int = 4,
        task_workers: int = task.DEFAULT_WORKERS,
        block_extent_size_mb: int = 128,
        resource_timeout: float = resource.DEFAULT_TIMEOUT,
    ) -> None:
        self.run_dir = run_dir
        self.state_dir = state_dir or os.path.join(run_dir, "state")
        self.chunk_size = chunk_mb * MiB
        self.utilization_percent = utilization_percent
        self.cluster_lock_mode = cluster_lock_mode
        self.task_workers = task_workers
        self.resource_timeout = resource_timeout
        os.makedirs(self.state_dir, exist_ok=True)
        self.oop = oop.Pool(max_workers=oop_workers, timeout=oop_timeout, name="storage")
        self.env = sd.Env(
            oop=self.oop,
            run_dir=run_dir,
            activation_mode=activation_mode,
            chunk_size=self.chunk_size,
            extent_size_mb=block_extent_size_mb,
        )
        self.cache = sd.DomainCache(
            sd.Registry(self.state_dir),
            self.env,
            {sd.FILE: file_sd.open_domain, sd.BLOCK: block_sd.open_domain},
        )
        self.images = image.ImageManager(run_dir)
        self.resources = resource.Manager()
        self.extender = extend.Extender(self.cache.get)
        self.host_state = pool.HostState(self.state_dir)
        self.job_kinds: pool.JobKinds = {}
        self._pool: pool.Pool | None = None
        self._lock = threading.RLock()
        # Maps an error name to its API code; the daemon passes the schema's
        # table.  Unwired (tests of this layer), statuses keep the name.
        self.error_code: Callable[[str], int | None] = lambda name: None
        volume_jobs.register(self)

    @classmethod
    def from_config(cls, config: Any) -> StorageAPI:
        """Build from the daemon's config object (sections as attributes)."""
        irs = config.irs
        return cls(
            irs.run_dir,
            # Optional key: where domains and the pool connection are
            # remembered (default <run_dir>/state; a persistent directory
            # such as /var/lib/vdsm-lsm survives a reboot).
            state_dir=irs.state_dir or None,
            chunk_mb=irs.volume_utilization_chunk_mb,
            utilization_percent=irs.volume_utilization_percent,
            activation_mode=config.lvm.activation,
            cluster_lock_mode=config.sanlock.cluster_lock,
            oop_timeout=irs.oop_timeout,
            task_workers=irs.task_workers,
            block_extent_size_mb=irs.block_extent_size_mb,
        )

    # Lifecycle.

    def recover(self) -> None:
        """At daemon start: connect again to the pool this host was connected to."""
        state = self.host_state.load()
        if state is None:
            return
        try:
            self.storage_pool_connect(state["pool_id"], state["host_id"], state["master_id"])
        except errors.Error as e:
            log.error("Cannot reconnect pool=%s: %s", state.get("pool_id"), e)

    def close(self) -> None:
        """At daemon stop: let running tasks finish (queued ones stay persisted
        for the next SPM), release the SPM lease, stop the helpers."""
        with self._lock:
            if self._pool is not None:
                self._pool.shutdown()
        self.oop.close()

    # Narrow interface for other packages.

    def pool(self, pool_id: str) -> pool.Pool:
        """The connected pool, or StoragePoolUnknown."""
        p = self._pool
        if p is None or p.pool_id != pool_id:
            raise errors.StoragePoolUnknown(pool_id=pool_id)
        return p

    def domain(self, pool_id: str, sd_id: str) -> sd.StorageDomain:
        """A domain of the connected pool."""
        return self.pool(pool_id).get_domain(sd_id)

    def spm_pool(self, pool_id: str) -> pool.Pool:
        """The connected pool if this host is its SPM, else SpmStatusError."""
        p = self.pool(pool_id)
        p.assert_spm()
        return p

    def submit(self, pool_id: str, verb: str, job: task.Job) -> str:
        """Run job as an SPM task of the pool; returns the task id."""
        p = self.spm_pool(pool_id)
        assert p.tasks is not None
        return p.tasks.submit(verb, job)

    def register_job_kind(
        self, kind: str, factory: Callable[[dict[str, Any]], Any], recovery: str = task.ROLLBACK
    ) -> None:
        """A persisted job kind, rebuilt by factory(params) when a new SPM recovers it."""
        self.job_kinds[kind] = (factory, recovery)
        p = self._pool
        if p is not None and p.tasks is not None:
            p.tasks.register_job_kind(kind, factory, recovery)

    def lock_image(self, sd_id: str, img_id: str, mode: str) -> resource.Lease:
        return self.resources.acquire(
            [
                (resource.SD_NAMESPACE, sd_id, resource.SHARED),
                (resource.image_namespace(sd_id), img_id, mode),
            ],
            timeout=self.resource_timeout,
        )

    def prepare(self, pool_id: str, sd_id: str, img_id: str, vol_id: str,
                allow_illegal: bool = False) -> dict[str, Any]:
        """Image.prepare; allow_illegal is for the replication path only."""
        dom = self.domain(pool_id, sd_id)
        with self.lock_image(sd_id, img_id, resource.SHARED):
            return self.images.prepare(dom, img_id, vol_id, allow_illegal=allow_illegal)

    def teardown(self, pool_id: str, sd_id: str, img_id: str, vol_id: str) -> None:
        dom = self.domain(pool_id, sd_id)
        with self.lock_image(sd_id, img_id, resource.SHARED):
            self.images.teardown(dom, img_id, vol_id)

    def extend(self, pool_id: str, sd_id: str, img_id: str, vol_id: str, new_size: int) -> int:
        """SPM: grow a thin block volume to new_size bytes; returns its size."""
        self.spm_pool(pool_id).get_domain(sd_id)
        return self.extender.extend(sd_id, img_id, vol_id, new_size)

    def refresh(self, pool_id: str, sd_id: str, img_id: str, vol_id: str) -> int:
        """HSM: make the local device follow an extended volume; returns its size."""
        self.domain(pool_id, sd_id)
        return self.extender.refresh(sd_id, img_id, vol_id)

    def set_volume_legality(
        self, pool_id: str, sd_id: str, img_id: str, vol_id: str, legal: bool
    ) -> None:
        """Mark a volume LEGAL or ILLEGAL (the pivot of a replication marks the
        destination leaf LEGAL); same metadata path as Image.syncData's."""
        dom = self.domain(pool_id, sd_id)
        legality = volume.LEGAL if legal else volume.ILLEGAL
        with dom.manifest.lock:
            if dom.manifest.read_volume_metadata(img_id, vol_id).legality != legality:
                dom.manifest.volume(img_id, vol_id).set_legality(legality)

    # StorageDomain.*

    def storage_domain_create(
        self, storagedomain_id: str, domain_type: str, type_args: dict[str, Any], name: str
    ) -> bool:
        sd_id = storagedomain_id
        with self._lock:
            if self.cache.registry.get(sd_id) is not None:
                raise errors.StorageDomainAlreadyExists(sd_id=sd_id)
            if domain_type == sd.FILE:
                path = type_args.get("path")
                if not path:
                    raise rpc_errors.InvalidParams(reason="a file domain needs typeArgs.path")
                dom: sd.StorageDomain = file_sd.create(sd_id, path, name, self.env)
                args: dict[str, Any] = {"path": path}
            elif domain_type == sd.BLOCK:
                devices = list(type_args.get("devices") or [])
                if not devices:
                    raise rpc_errors.InvalidParams(reason="a block domain needs typeArgs.devices")
                self._check_devices_free(sd_id, devices)
                dom = block_sd.create(sd_id, devices, name, self.env)
                args = {"devices": devices}
            else:
                raise rpc_errors.InvalidParams(reason=f"unknown domainType {domain_type!r}")
            self.cache.add(dom, args)
        log.info("Created storage domain sd=%s type=%s args=%s", sd_id, domain_type, args)
        return True

    def storage_domain_get_info(self, storagedomain_id: str) -> dict[str, Any]:
        return self.cache.get(storagedomain_id).manifest.info()

    def storage_domain_get_stats(self, storagedomain_id: str) -> dict[str, int]:
        return self.cache.get(storagedomain_id).manifest.stats()

    def storage_domain_get_images(self, storagedomain_id: str) -> list[str]:
        return self.cache.get(storagedomain_id).manifest.list_images()

    def storage_domain_get_volumes(
        self, storagedomain_id: str, storagepool_id: str, image_id: str
    ) -> list[str]:
        dom = self.domain(storagepool_id, storagedomain_id)
        vols = dom.manifest.list_volumes(image_id)
        if not vols:
            raise errors.ImageDoesNotExistInSD(img_id=image_id, sd_id=storagedomain_id)
        return vols

    def storage_domain_format(self, storagedomain_id: str) -> bool:
        sd_id = storagedomain_id
        with self._lock:
            dom = self.cache.get(sd_id)
            attached = dom.manifest.pool_id()
            if attached:
                raise errors.CannotFormatAttachedStorageDomain(sd_id=sd_id, pool_id=attached)
            self._check_not_prepared(sd_id)
            dom.format()
            self.cache.forget(sd_id)
        log.info("Formatted storage domain sd=%s", sd_id)
        return True

    def learn_domain(self, sd_id: str, domain_type: str, type_args: dict[str, Any]) -> None:
        """Remember an existing domain made by another host (what VDSM learns
        from connectStorageServer and a scan); checks its metadata."""
        opener = {sd.FILE: file_sd.open_domain, sd.BLOCK: block_sd.open_domain}[domain_type]
        args = {"path": type_args["path"]} if domain_type == sd.FILE else {
            "devices": list(type_args["devices"])
        }
        dom = opener(sd_id, args, self.env)
        md = dom.manifest.read_metadata()
        if md.get(sd.SDUUID) != sd_id:
            raise errors.StorageDomainDoesNotExist(sd_id=sd_id, reason="metadata names another")
        self.cache.add(dom, args)
        log.info("Learned storage domain sd=%s type=%s args=%s", sd_id, domain_type, args)

    def _check_not_prepared(self, sd_id: str) -> None:
        """Refuse taking a domain away while this host uses its volumes."""
        prepared = self.images.prepared_volumes(sd_id)
        if prepared:
            img_id, vol_id = prepared[0]
            raise errors.VolumeIsBusy(
                vol_id=vol_id, sd_id=sd_id, reason=f"prepared on this host (image {img_id})"
            )

    def _check_devices_free(self, sd_id: str, devices: list[str]) -> None:
        for other in self.cache.known():
            entry = self.cache.registry.get(other) or {}
            shared = set(entry.get("devices", [])) & set(devices)
            if shared:
                raise errors.StorageDomainCreationError(
                    sd_id=sd_id, reason=f"devices {sorted(shared)} belong to domain {other}"
                )

    # StoragePool.*

    def storage_pool_create(
        self, storagepool_id: str, name: str, master_sd_uuid: str, domain_list: list[str]
    ) -> bool:
        with self._lock:
            pool.create(self.cache, storagepool_id, name, master_sd_uuid, domain_list)
        return True

    def storage_pool_connect(self, storagepool_id: str, host_id: int, master_sd_uuid: str) -> bool:
        with self._lock:
            current = self._pool
            if current is not None:
                if current.pool_id == storagepool_id and current.host_id == host_id:
                    return True
                raise errors.CannotConnectMultiplePools(
                    pool_id=storagepool_id, connected=f"{current.pool_id} as host {current.host_id}"
                )
            p = pool.Pool(
                self.cache,
                storagepool_id,
                host_id,
                master_sd_uuid,
                cluster_lock_mode=self.cluster_lock_mode,
                task_workers=self.task_workers,
                job_kinds=self.job_kinds,
            )
            p.connect()
            self.host_state.save(storagepool_id, host_id, master_sd_uuid)
            self._pool = p
        return True

    def storage_pool_disconnect(
        self, storagepool_id: str, host_id: int | None = None, master_sd_uuid: str | None = None
    ) -> bool:
        with self._lock:
            p = self.pool(storagepool_id)
            p.disconnect()
            self._pool = None
            self.host_state.clear()
        return True

    def storage_pool_spm_start(self, storagepool_id: str) -> bool:
        with self._lock:
            self.pool(storagepool_id).spm_start()
        return True

    def storage_pool_spm_stop(self, storagepool_id: str) -> bool:
        with self._lock:
            self.pool(storagepool_id).spm_stop()
        return True

    def storage_pool_get_spm_status(self, storagepool_id: str) -> dict[str, Any]:
        return self.pool(storagepool_id).spm_status()

    def storage_pool_get_info(self, storagepool_id: str) -> dict[str, Any]:
        return self.pool(storagepool_id).info()

    def storage_pool_attach_storage_domain(
        self, storagepool_id: str, storagedomain_id: str
    ) -> bool:
        with self._lock:
            self.pool(storagepool_id).attach(storagedomain_id)
        return True

    def storage_pool_detach_storage_domain(
        self, storagepool_id: str, storagedomain_id: str
    ) -> bool:
        with self._lock:
            p = self.pool(storagepool_id)
            self._check_not_prepared(storagedomain_id)
            p.detach(storagedomain_id)
        return True

    def storage_pool_destroy(self, storagepool_id: str) -> bool:
        with self._lock:
            p = self.pool(storagepool_id)
            p.destroy()
            self._pool = None
            self.host_state.clear()
        return True

    # Volume.*

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
    ) -> str:
        """SPM: refuse what is invalid on its face, then create in a task."""
        p = self.spm_pool(storagepool_id)
        dom = p.get_domain(storagedomain_id)
        if src_vol_uuid != BLANK_UUID and src_img_uuid not in (BLANK_UUID, image_id):
            raise errors.ImageIsNotLegalChain(
                img_id=image_id, sd_id=storagedomain_id,
                reason=f"parent image {src_img_uuid} differs: templates are not supported",
            )
        volume.clean_description(desc)
        dom.validate_create(
            image_id, volume_id, size, vol_format, preallocate, src_vol_uuid, initial_size
        )
        job = volume_jobs.CreateVolume(self, {
            "pool_id": storagepool_id,
            "sd_id": storagedomain_id,
            "img_id": image_id,
            "vol_id": volume_id,
            "capacity": size,
            "format": vol_format,
            "prealloc": preallocate,
            "parent_id": src_vol_uuid,
            "description": desc,
            "initial_size": initial_size,
        })
        return self.submit(storagepool_id, "Volume.create", job)

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
        self, storagepool_id: str, storagedomain_id: str, image_id: str, volume_id: str
    ) -> str:
        p = self.spm_pool(storagepool_id)
        dom = p.get_domain(storagedomain_id)
        if not dom.manifest.list_volumes(image_id):
            raise errors.ImageDoesNotExistInSD(img_id=image_id, sd_id=storagedomain_id)
        dom.validate_delete(self.images, image_id, volume_id)
        job = volume_jobs.DeleteVolume(self, {
            "pool_id": storagepool_id,
            "sd_id": storagedomain_id,
            "img_id": image_id,
            "vol_id": volume_id,
        })
        return self.submit(storagepool_id, "Volume.delete", job)

    # Image.prepare / Image.teardown

    def image_prepare(
        self, storagepool_id: str, storagedomain_id: str, image_id: str, volume_id: str
    ) -> dict[str, Any]:
        return self.prepare(storagepool_id, storagedomain_id, image_id, volume_id)

    def image_teardown(
        self, storagepool_id: str, storagedomain_id: str, image_id: str, volume_id: str
    ) -> bool:
        self.teardown(storagepool_id, storagedomain_id, image_id, volume_id)
        return True

    # Task.* and Host.getAllTasks*

    def _tasks(self) -> task.TaskManager | None:
        p = self._pool
        return p.tasks if p is not None else None

    def _task_manager(self, task_id: str) -> task.TaskManager:
        manager = self._tasks()
        if manager is None:
            raise errors.UnknownTask(task_id=task_id)
        return manager

    def task_get_status(self, task_id: str) -> dict[str, Any]:
        return self._coded(self._task_manager(task_id).get_status(task_id))

    def _coded(self, status: dict[str, Any]) -> dict[str, Any]:
        """A task status as the API answers it: ``code`` the number of the
        error that ended the task (0: none), ``error`` its name."""
        name = status.get("code") or ""
        code: int | str = 0
        if name:
            number = self.error_code(name)
            code = name if number is None else number
        return {**status, "code": code, "error": name}

    def task_get_info(self, task_id: str) -> dict[str, str]:
        return self._task_manager(task_id).get_info(task_id)

    def task_clear(self, task_id: str) -> bool:
        self._task_manager(task_id).clear(task_id)
        return True

    def task_stop(self, task_id: str) -> bool:
        self._task_manager(task_id).stop(task_id)
        return True

    def _spm_tasks(self) -> task.TaskManager:
        p = self._pool
        if p is None:
            raise errors.SpmStatusError(pool_id="(no pool connected)")
        p.assert_spm()
        assert p.tasks is not None
        return p.tasks

    def host_get_all_tasks_statuses(self) -> dict[str, dict[str, Any]]:
        return {tid: self._coded(st) for tid, st in self._spm_tasks().all_statuses().items()}

    def host_get_all_tasks_info(self) -> dict[str, dict[str, str]]:
        return self._spm_tasks().all_info()
