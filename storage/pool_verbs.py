"""StorageDomain.* and StoragePool.*: the domains this host knows and the pool they form.

A domain this host creates is remembered in the domain cache's registry
(``<state_dir>/domains/``), with the arguments that open it again (a file
domain's path, a block domain's devices); a domain another host made is
found on the storage this host is connected to
(``StoragePool.connectStorageServer``, storage.connections) and kept in
memory while it is used.  The domain types, and how each is created,
opened and found, are storage.domain_types'.

This host is connected to at most one pool; the connection is remembered
in ``<state_dir>/pool.json`` and made again by :meth:`PoolVerbs.recover` at
daemon start, over the remembered storage connections.  The pool's domains
are always read from its master domain's metadata.  The pool itself (its
metadata, the SPM role, its task manager) is storage.pool's.

Roles: the verbs that change the pool (attach, detach, destroy) refuse
with ``SpmStatusError`` before anything else when this host is not SPM.

The verbs take VDSM's params (vdsm_lsm/api.yml says which are honoured):
``masterVersion`` is written by create and checked by connect, a
``blockSize`` other than 512 is refused, ``autoDetach`` detaches a domain
of the pool this host is SPM of before formatting it; the rest (``scsiKey``,
``domainDict``, sanlock timings, spmStart's ``prevID`` ...) are accepted
and change nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from storage import connections, core, domain_types, errors, pool, sd

log = logging.getLogger("storage.pool_verbs")

# The block sizes StorageDomain.create accepts (0: VDSM's "detect"; 512 it is).
BLOCK_SIZES = (0, 512)


class DomainVerbs(core.StorageCore):
    """Serves StorageDomain.* (and learn_domain, which remembers a domain
    made elsewhere in this host's registry: tests; the API's way is
    connectStorageServer)."""

    def storage_domain_create(
        self,
        storagedomain_id: str,
        domain_type: str,
        type_args: dict[str, Any],
        name: str,
        domain_class: int | None = None,
        version: int | None = None,
        block_size: int = 512,
        max_hosts: int | None = None,
    ) -> bool:
        """domain_class (1: data, the schema's only), version and max_hosts:
        VDSM's, ignored (this daemon's own format); block_size 0 or 512."""
        sd_id = storagedomain_id
        if block_size not in BLOCK_SIZES:
            raise errors.StorageDomainCreationError(
                sd_id=sd_id, reason=f"block size {block_size}: only 512 is supported"
            )
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

    def storage_domain_format(self, storagedomain_id: str, auto_detach: bool = False) -> bool:
        """Remove a domain; attached, it is refused unless auto_detach and
        this host is the SPM of its pool (then it is detached first; the
        master never is)."""
        sd_id = storagedomain_id
        with self._lock:
            dom = self.cache.get(sd_id)
            attached = dom.manifest.pool_id()
            if attached and auto_detach:
                self._detach_to_format(sd_id, attached)
                attached = dom.manifest.pool_id()
            if attached:
                raise errors.CannotFormatAttachedStorageDomain(sd_id=sd_id, pool_id=attached)
            self.check_not_prepared(sd_id)
            dom.format()
            self.cache.forget(sd_id)
        log.info("Formatted storage domain sd=%s", sd_id)
        return True

    def _detach_to_format(self, sd_id: str, pool_id: str) -> None:
        current = self._pool
        if current is None or current.pool_id != pool_id:
            raise errors.CannotFormatAttachedStorageDomain(
                sd_id=sd_id, pool_id=pool_id, reason="autoDetach: this host is not connected to it"
            )
        p = self.spm_pool(pool_id)
        self.check_not_prepared(sd_id)
        log.info("Detaching domain sd=%s from pool=%s to format it", sd_id, pool_id)
        p.detach(sd_id)

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

    # Told the status of every SPM task that finishes here (the daemon
    # pushes |storage|task_finished|); set by whoever wires storage.
    on_task_finished: Callable[[dict[str, Any]], None] | None = None

    def _task_finished(self, status: dict[str, Any]) -> None:
        if self.on_task_finished is not None:
            self.on_task_finished(status)

    def recover(self) -> None:
        """At daemon start: the remembered storage connections, then the
        pool this host was connected to."""
        self.connections.check_all()
        state = self.host_state.load()
        if state is None:
            return
        try:
            self.storage_pool_connect(state["pool_id"], state["host_id"], state["master_id"])
        except errors.Error as e:
            log.error("Cannot reconnect pool=%s: %s", state.get("pool_id"), e)

    def storage_pool_create(
        self,
        storagepool_id: str,
        name: str,
        master_sd_uuid: str,
        domain_list: list[str],
        master_version: int = 1,
        lock_renewal_interval_sec: int | None = None,
        lease_time_sec: int | None = None,
        io_op_timeout_sec: int | None = None,
        lease_retries: int | None = None,
    ) -> bool:
        """The lease timings are VDSM's, ignored ([sanlock] io_timeout is ours)."""
        with self._lock:
            pool.create(
                self.cache, storagepool_id, name, master_sd_uuid, domain_list, master_version
            )
        return True

    def storage_pool_connect(
        self,
        storagepool_id: str,
        host_id: int,
        master_sd_uuid: str,
        scsi_key: str | None = None,
        master_version: int | None = None,
        domain_dict: dict[str, str] | None = None,
    ) -> bool:
        """Connect; a master_version other than the master's is refused
        (StoragePoolWrongMaster).  scsi_key and domain_dict: VDSM's, ignored
        (the domains are always the master's POOL_DOMAINS)."""
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
                task_finished=self._task_finished,
                mailbox_services=self.mailbox_services,
            )
            p.connect()
            if master_version is not None:
                self._check_master_version(p, master_version)
            self.host_state.save(storagepool_id, host_id, master_sd_uuid)
            self._pool = p
        return True

    def _check_master_version(self, p: pool.Pool, expected: int) -> None:
        """Disconnect again and refuse unless the master's version is expected."""
        try:
            found = int(p.metadata().get(sd.MASTER_VERSION, "0") or 0)
        except (errors.Error, ValueError) as e:
            found, problem = -1, str(e)
        else:
            problem = f"its version is {found}, not {expected}"
        if found == expected:
            return
        p.disconnect()
        raise errors.StoragePoolWrongMaster(pool_id=p.pool_id, sd_id=p.master_id, reason=problem)

    def storage_pool_disconnect(
        self,
        storagepool_id: str,
        host_id: int,
        master_sd_uuid: str | None = None,
        scsi_key: str | None = None,
        remove: bool = False,
    ) -> bool:
        """Disconnect from the pool (host_id, master_sd_uuid, scsi_key and
        remove: VDSM's params, not needed: this host is connected to one pool
        only, and VDSM ignores remove too),
        leaving the storage as it was: refused while this host has volumes
        of the pool prepared; special LVs deactivated, learned domains
        forgotten."""
        with self._lock:
            p = self.pool(storagepool_id)
            for sd_id in self._pool_domain_ids(p):
                self.check_not_prepared(sd_id)
            p.disconnect()
            self._pool = None
            self.host_state.clear()
        return True

    def storage_pool_spm_start(
        self,
        storagepool_id: str,
        prev_id: int | None = None,
        prev_lver: Any = None,
        enable_scsi_fencing: Any = None,
        max_host_id: int | None = None,
        dom_version: Any = None,
    ) -> bool:
        """Synchronous (true once SPM); VDSM's other params are ignored: the
        lease says who was SPM."""
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
            p = self.spm_pool(storagepool_id)
            self.check_not_prepared(storagedomain_id)
            p.detach(storagedomain_id)
        return True

    def storage_pool_destroy(
        self, storagepool_id: str, host_id: int | None = None, scsi_key: str | None = None
    ) -> bool:
        """host_id and scsi_key: VDSM's, ignored."""
        with self._lock:
            p = self.pool(storagepool_id)
            p.destroy()
            self._pool = None
            self.host_state.clear()
        return True

    # Storage server connections (storage.connections).

    def storage_pool_connect_storage_server(
        self, storagepool_id: str, domain_type: str, connection_params: list[dict[str, Any]]
    ) -> list[dict[str, str]]:
        """Connect to storage (storagepoolID: VDSM's, unused): [{id, status}],
        status the name of the error that refused a connection ("": connected)."""
        return self.connections.connect(domain_type, connection_params)

    def storage_pool_disconnect_storage_server(
        self, storagepool_id: str, domain_type: str, connection_params: list[dict[str, Any]]
    ) -> list[dict[str, str]]:
        """Disconnect from storage: refused for a connection a domain of the
        connected pool was found on; domains learned on the dropped
        connections are closed (block: special LVs deactivated) and forgotten."""
        with self._lock:
            learned = self.cache.learned()
            in_pool = set(self._pool_domain_ids(self._pool)) if self._pool else set()

            def busy(conn: connections.Connection) -> str | None:
                used = sorted(d for d, ids in learned.items() if conn.id in ids and d in in_pool)
                if used:
                    return f"domain {used[0]} of the connected pool is on it"
                return None

            statuses, removed = self.connections.disconnect(domain_type, connection_params, busy)
            dropped = {c.id for c in removed}
            for sd_id, ids in learned.items():
                if dropped & set(ids):
                    dom = self.cache.forget_learned(sd_id)
                    if dom is not None:
                        try:
                            dom.close()
                        except errors.Error as e:
                            log.error("Cannot close domain sd=%s: %s", sd_id, e)
        return statuses

    def _pool_domain_ids(self, p: pool.Pool) -> list[str]:
        """The pool's domains and its master (the master alone if its
        metadata cannot be read)."""
        try:
            return sorted(set(p.domains()) | {p.master_id})
        except errors.Error as e:
            log.warning("Cannot read the domains of pool=%s: %s", p.pool_id, e)
            return [p.master_id]
