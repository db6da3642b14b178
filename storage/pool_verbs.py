"""StorageDomain.* and StoragePool.*: the domains this host knows and the pool they form.

A domain this host creates or learns is remembered in the domain cache's
registry (``<state_dir>/domains/``), with the arguments that open it again
(a file domain's path, a block domain's devices); the domain types, and how
each is created and opened, are storage.domain_types'.

This host is connected to at most one pool; the connection is remembered
in ``<state_dir>/pool.json`` and made again by :meth:`PoolVerbs.recover` at
daemon start.  The pool itself (its metadata, the SPM role, its task
manager) is storage.pool's.
"""

from __future__ import annotations

import logging
from typing import Any

from storage import core, domain_types, errors, pool, sd

log = logging.getLogger("storage.pool_verbs")


class DomainVerbs(core.StorageCore):
    """Serves StorageDomain.* (and learn_domain, for a second host)."""

    def storage_domain_create(
        self, storagedomain_id: str, domain_type: str, type_args: dict[str, Any], name: str
    ) -> bool:
        sd_id = storagedomain_id
        with self._lock:
            if self.cache.registry.get(sd_id) is not None:
                raise errors.StorageDomainAlreadyExists(sd_id=sd_id)
            kind = domain_types.get(domain_type)
            args = kind.args_of(type_args)
            self._check_devices_free(sd_id, args.get("devices", []))
            dom = kind.create(sd_id, args, name, self.env)
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
            self.check_not_prepared(sd_id)
            dom.format()
            self.cache.forget(sd_id)
        log.info("Formatted storage domain sd=%s", sd_id)
        return True

    def learn_domain(self, sd_id: str, domain_type: str, type_args: dict[str, Any]) -> None:
        """Remember an existing domain made by another host (what VDSM learns
        from connectStorageServer and a scan); checks its metadata."""
        kind = domain_types.get(domain_type)
        args = kind.args_of(type_args)
        dom = kind.open(sd_id, args, self.env)
        md = dom.manifest.read_metadata()
        if md.get(sd.SDUUID) != sd_id:
            raise errors.StorageDomainDoesNotExist(sd_id=sd_id, reason="metadata names another")
        self.cache.add(dom, args)
        log.info("Learned storage domain sd=%s type=%s args=%s", sd_id, domain_type, args)

    def _check_devices_free(self, sd_id: str, devices: list[str]) -> None:
        for other in self.cache.known():
            entry = self.cache.registry.get(other) or {}
            shared = set(entry.get("devices", [])) & set(devices)
            if shared:
                raise errors.StorageDomainCreationError(
                    sd_id=sd_id, reason=f"devices {sorted(shared)} belong to domain {other}"
                )


class PoolVerbs(core.StorageCore):
    """Serves StoragePool.*."""

    def recover(self) -> None:
        """At daemon start: connect again to the pool this host was connected to."""
        state = self.host_state.load()
        if state is None:
            return
        try:
            self.storage_pool_connect(state["pool_id"], state["host_id"], state["master_id"])
        except errors.Error as e:
            log.error("Cannot reconnect pool=%s: %s", state.get("pool_id"), e)

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
        self, storagepool_id: str, host_id: int, master_sd_uuid: str
    ) -> bool:
        """Disconnect from the pool (host_id and master_sd_uuid: VDSM's
        params, not needed: this host is connected to one pool only)."""
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
            self.check_not_prepared(storagedomain_id)
            p.detach(storagedomain_id)
        return True

    def storage_pool_destroy(self, storagepool_id: str) -> bool:
        with self._lock:
            p = self.pool(storagepool_id)
            p.destroy()
            self._pool = None
            self.host_state.clear()
        return True
