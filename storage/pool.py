"""Storage pools: domains attached together, one master, one SPM.

A pool is described in its domains' metadata, so any host (or a restarted
daemon) can find it again:

- every attached domain has ``POOL_UUID=<pool>`` and ``ROLE=Master`` or
  ``ROLE=Regular``;
- the master domain also holds the pool's own keys (VDSM's names):
  ``POOL_DESCRIPTION`` (name), ``POOL_DOMAINS`` (``sd:Active,...``),
  ``MASTER_VERSION``, ``POOL_SPM_ID`` and ``POOL_SPM_LVER``;
- SPM tasks are persisted in the master domain: ``master/tasks/`` on a file
  domain, the ``master`` LV on a block domain (see
  :class:`storage.master_store.MasterStore`).

What this *host* must remember to connect again after a restart (pool,
host id, master) is kept in ``<state_dir>/pool.json``.

The SPM role: :meth:`Pool.spm_start` takes the cluster lock (the SPM lease
on the master domain: sanlock, or the local fcntl lock on hosts without
the sanlock daemon), records the owner in the master metadata and starts a
task manager that first recovers the tasks a previous SPM left.  With
sanlock a connected host holds its host id on the master from connect to
disconnect, and the SPM's lease is watched: a host that loses it stops
acting as SPM at once (:mod:`storage.pool_lease`).  Verbs that
change volumes call :meth:`Pool.assert_spm`.  The task manager knows the job
kinds the pool was made with (``job_kinds``: storage.jobs' table, bound to
the provider's services), fixed for the pool's life.

The storage mailbox (:mod:`storage.pool_mailbox`) follows the pool: this
host's client from connect to disconnect, the SPM's thread from spmStart
to spmStop (fenced when the lease is lost).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import threading
from collections.abc import Callable, Mapping
from typing import Any

from storage import (
    errors,
    mailbox,
    pool_lease,
    pool_mailbox,
    sd,
    sd_registry,
    task,
    task_manager,
)

log = logging.getLogger("storage.pool")

SPM = "SPM"
FREE = "Free"
CONTEND = "Contend"
ACTIVE = "Active"
STATE_FILE = "pool.json"


def parse_domains(text: str) -> dict[str, str]:
    """``sd1:Active,sd2:Active`` -> {sd1: Active, sd2: Active}."""
    result = {}
    for item in filter(None, text.split(",")):
        sd_id, _, status = item.partition(":")
        result[sd_id] = status or ACTIVE
    return result


def format_domains(domains: dict[str, str]) -> str:
    return ",".join(f"{k}:{v}" for k, v in sorted(domains.items()))


def create(
    cache: sd_registry.DomainCache, pool_id: str, name: str, master_id: str, domain_list: list[str],
    master_version: int = 1,
) -> None:
    """Write a new pool into its domains' metadata (no connection); the
    master's MASTER_VERSION is master_version (VDSM's masterVersion)."""
    if master_id not in domain_list:
        raise errors.StoragePoolCreationError(
            pool_id=pool_id, reason=f"master domain {master_id} is not in the domain list"
        )
    domains = {sd_id: cache.get(sd_id) for sd_id in dict.fromkeys(domain_list)}
    for dom in domains.values():
        dom.open()
        current = dom.manifest.pool_id()
        if current == pool_id:
            raise errors.StoragePoolAlreadyExists(pool_id=pool_id)
        if current:
            raise errors.StorageDomainAlreadyAttached(sd_id=dom.sd_id, pool_id=current)
    log.info("Creating pool pool=%s name=%s master=%s domains=%s",
             pool_id, name, master_id, list(domains))
    done: list[sd.StorageDomain] = []
    try:
        for dom in domains.values():
            changes: dict[str, str | None] = {sd.POOL_UUID: pool_id, sd.ROLE: sd.REGULAR}
            if dom.sd_id == master_id:
                changes.update({
                    sd.ROLE: sd.MASTER,
                    sd.POOL_DESCRIPTION: name,
                    sd.POOL_DOMAINS: format_domains({d: ACTIVE for d in domains}),
                    sd.MASTER_VERSION: str(master_version),
                    sd.POOL_SPM_ID: "-1",
                    sd.POOL_SPM_LVER: "-1",
                })
            dom.manifest.update_metadata(changes)
            done.append(dom)
    except BaseException:
        for dom in done:
            _release_domain(dom)
        raise


def _release_domain(dom: sd.StorageDomain) -> None:
    """Forget a domain's pool membership (detach, destroy, failed create)."""
    changes: dict[str, str | None] = {sd.POOL_UUID: "", sd.ROLE: sd.REGULAR}
    changes.update({key: None for key in sd.POOL_KEYS})
    try:
        dom.manifest.update_metadata(changes)
    except Exception:
        log.exception("Cannot clear pool membership of domain sd=%s", dom.sd_id)
        raise


class HostState:
    """The pool this host is connected to, kept across daemon restarts."""

    def __init__(self, state_dir: str) -> None:
        self.path = os.path.join(state_dir, STATE_FILE)

    def load(self) -> dict[str, Any] | None:
        try:
            with open(self.path, encoding="utf-8") as f:
                return json.load(f)
        except FileNotFoundError:
            return None
        except ValueError:
            log.error("Ignoring corrupt pool state path=%s", self.path)
            return None

    def save(self, pool_id: str, host_id: int, master_id: str) -> None:
        sd_registry.write_json_atomic(
            self.path, {"pool_id": pool_id, "host_id": host_id, "master_id": master_id}
        )

    def clear(self) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


class Pool:
    """A pool this host is connected to."""

    def __init__(
        self,
        cache: sd_registry.DomainCache,
        pool_id: str,
        host_id: int,
        master_id: str,
        cluster_lock_mode: str = "auto",
        task_workers: int = task.DEFAULT_WORKERS,
        job_kinds: Mapping[str, task.JobKind] | None = None,
        task_finished: Callable[[dict[str, Any]], None] | None = None,
        mailbox_services: mailbox.Services | None = None,
    ) -> None:
        self.cache = cache
        self.pool_id = pool_id
        self.host_id = host_id
        self.master_id = master_id
        self.cluster_lock_mode = cluster_lock_mode
        self.task_workers = task_workers
        self.job_kinds: Mapping[str, task.JobKind] = job_kinds or {}
        # Told of every SPM task that finishes (TaskManager's on_finished).
        self.task_finished = task_finished
        self.tasks: task_manager.TaskManager | None = None
        self._lock = threading.RLock()
        # The master's host id (connect to disconnect) and SPM lease.
        self.lease = pool_lease.PoolLease(
            cluster_lock_mode, master_id, lambda: self.master().lease_paths(), host_id,
            cache.env.io_timeout, name=f"pool {pool_id}")
        self._contending = False
        self._spm_lver = -1
        self.mailbox = pool_mailbox.PoolMailbox(
            pool_id, host_id, lambda: self.master().mailbox_paths(), mailbox_services)

    # Connection.

    def connect(self) -> None:
        """Find the master, check it, open the domains of its POOL_DOMAINS
        (made here or found on the connected storage: the domain cache); one
        not found is logged and Inaccessible in :meth:`info`, as in VDSM."""
        try:
            master = self.cache.get(self.master_id)
            master.open()
            md = master.manifest.read_metadata()
        except (errors.StorageDomainDoesNotExist, errors.StorageDomainMetadataNotFound) as e:
            self._close_domains([self.master_id])
            raise errors.StoragePoolMasterNotFound(
                str(e), pool_id=self.pool_id, sd_id=self.master_id
            ) from e
        if md.get(sd.POOL_UUID) != self.pool_id or md.get(sd.ROLE) != sd.MASTER:
            self._close_domains([self.master_id])
            raise errors.StoragePoolWrongMaster(pool_id=self.pool_id, sd_id=self.master_id)
        for sd_id in parse_domains(md.get(sd.POOL_DOMAINS, "")):
            try:
                self.cache.get(sd_id).open()
            except errors.Error as e:
                log.error("Cannot open domain sd=%s of pool=%s: %s", sd_id, self.pool_id, e)
        self.lease.join()
        self.mailbox.connect()
        log.info("Connected pool=%s host_id=%d master=%s", self.pool_id, self.host_id,
                 self.master_id)

    def disconnect(self) -> None:
        """Stop SPM, close the domains (block: deactivate special LVs) and
        forget those learned from the connected storage."""
        self.spm_stop()
        self.mailbox.disconnect()
        self.lease.leave()
        try:
            domains = [d for d in self.domains() if d != self.master_id]
        except errors.Error as e:  # the master is gone: close what can be
            log.error("Cannot read the domains of pool=%s: %s", self.pool_id, e)
            domains = []
        self._close_domains(domains + [self.master_id])
        log.info("Disconnected pool=%s", self.pool_id)

    def _close_domains(self, sd_ids: list[str]) -> None:
        """Close the domains (master last) and forget those learned."""
        for sd_id in sd_ids:
            try:
                self.cache.get(sd_id).close()
            except errors.Error as e:
                log.error("Cannot close domain sd=%s: %s", sd_id, e)
            self.cache.forget_learned(sd_id)

    # Pool metadata.

    def master(self) -> sd.StorageDomain:
        return self.cache.get(self.master_id)

    def metadata(self) -> dict[str, str]:
        return self.master().manifest.read_metadata()

    def domains(self) -> dict[str, str]:
        """Attached domains: {sd_id: status}."""
        return parse_domains(self.metadata().get(sd.POOL_DOMAINS, ""))

    def has_domain(self, sd_id: str) -> bool:
        return sd_id in self.domains()

    def get_domain(self, sd_id: str) -> sd.StorageDomain:
        """An attached domain, or StorageDomainNotInPool / StorageDomainDoesNotExist."""
        if not self.has_domain(sd_id):
            self.cache.get(sd_id)  # StorageDomainDoesNotExist first if it is unknown
            raise errors.StorageDomainNotInPool(sd_id=sd_id, pool_id=self.pool_id)
        return self.cache.get(sd_id)

    def info(self) -> dict[str, Any]:
        md = self.metadata()
        spm = self.spm_status()
        domains = parse_domains(md.get(sd.POOL_DOMAINS, ""))
        dominfo = {}
        for sd_id, status in domains.items():
            entry: dict[str, Any] = {"status": status, "alerts": [], "isoprefix": ""}
            try:
                dom = self.cache.get(sd_id)
                entry.update(dom.manifest.stats())
                entry["version"] = dom.manifest.read_metadata().get(sd.VERSION_KEY, "")
            except errors.Error as e:
                entry["status"] = "Inaccessible"
                entry["alerts"] = [{"code": e.name, "message": str(e)}]
            dominfo[sd_id] = entry
        return {
            "info": {
                "name": md.get(sd.POOL_DESCRIPTION, ""),
                "type": self.master().domain_type,
                "master_uuid": self.master_id,
                "master_ver": int(md.get(sd.MASTER_VERSION, "0") or 0),
                "domains": format_domains(domains),
                "spm_id": spm["spmId"],
                "lver": spm["spmLver"],
                "pool_status": "connected",
                "version": str(sd.VERSION),
                "isoprefix": "",
            },
            "dominfo": dominfo,
        }

    # Domains (SPM).

    def attach(self, sd_id: str) -> None:
        with self._lock:
            self.assert_spm()
            dom = self.cache.get(sd_id)
            dom.open()
            current = dom.manifest.pool_id()
            if current:
                raise errors.StorageDomainAlreadyAttached(sd_id=sd_id, pool_id=current)
            master = self.master()
            with master.manifest.lock:
                domains = self.domains()
                domains[sd_id] = ACTIVE
                dom.manifest.update_metadata({sd.POOL_UUID: self.pool_id, sd.ROLE: sd.REGULAR})
                try:
                    master.manifest.update_metadata({sd.POOL_DOMAINS: format_domains(domains)})
                except BaseException:
                    _release_domain(dom)
                    raise
        log.info("Attached domain sd=%s to pool=%s", sd_id, self.pool_id)

    def detach(self, sd_id: str) -> None:
        with self._lock:
            self.assert_spm()
            dom = self.get_domain(sd_id)
            if sd_id == self.master_id:
                raise errors.CannotDetachMasterStorageDomain(sd_id=sd_id, pool_id=self.pool_id)
            master = self.master()
            with master.manifest.lock:
                domains = self.domains()
                domains.pop(sd_id, None)
                master.manifest.update_metadata({sd.POOL_DOMAINS: format_domains(domains)})
                _release_domain(dom)
        log.info("Detached domain sd=%s from pool=%s", sd_id, self.pool_id)

    def destroy(self) -> None:
        """SPM only: detach every domain, drop the tasks, stop SPM, disconnect."""
        with self._lock:
            self.assert_spm()
            self._check_no_tasks()
            domains = self.domains()
            if self.tasks is not None:
                for task_id in list(self.tasks.all_info()):
                    self.tasks.clear(task_id)
            self.spm_stop()
            self.mailbox.disconnect()
            self.lease.leave()
            for sd_id in domains:
                if sd_id == self.master_id:
                    continue
                try:
                    _release_domain(self.cache.get(sd_id))
                except errors.Error as e:
                    log.error("Cannot detach domain sd=%s: %s", sd_id, e)
            _release_domain(self.master())
            self._close_domains([d for d in domains if d != self.master_id] + [self.master_id])
        log.info("Destroyed pool=%s", self.pool_id)

    # SPM.

    def is_spm(self) -> bool:
        return self.tasks is not None

    def assert_spm(self) -> None:
        self.spm_tasks()

    def spm_tasks(self) -> task_manager.TaskManager:
        """The SPM's task manager; SpmStatusError when this host is not SPM."""
        tasks = self.tasks
        if tasks is None:
            raise errors.SpmStatusError(pool_id=self.pool_id)
        return tasks

    def spm_start(self) -> None:
        """Take the SPM lease (waiting for this host's id), record it in the
        master metadata, start the task manager (recovering what a previous
        SPM left) and watch the lease.  AcquireLockFailure while another
        host holds it."""
        with self._lock:
            if self.is_spm():
                return
            master = self.master()
            self._contending = True
            try:
                lver = self.lease.acquire()
                try:
                    master.manifest.update_metadata(
                        {sd.POOL_SPM_ID: str(self.host_id), sd.POOL_SPM_LVER: str(lver)}
                    )
                    manager = self._task_manager(master)
                    self.lease.watch(functools.partial(self._lease_lost, manager))
                    self._spm_lver = lver
                    self.tasks = manager
                    self.mailbox.spm_start()  # serves requests while tasks recover
                    recovered = manager.recover()
                except BaseException:
                    self.tasks = None
                    self.mailbox.spm_stop(fence=True)
                    self.lease.release()
                    raise
            finally:
                self._contending = False
        log.info("Became SPM pool=%s host_id=%d lver=%d lock=%s recovered_tasks=%s",
                 self.pool_id, self.host_id, lver, self.lease.lock.name, recovered)

    def spm_stop(self) -> None:
        with self._lock:
            if not self.is_spm():
                return
            self._check_no_tasks()
            self.mailbox.spm_stop()  # running extensions answered first
            assert self.tasks is not None
            self.tasks.detach()
            self.tasks = None
            self.lease.unwatch()  # before the metadata and the release
            try:
                self.master().manifest.update_metadata({sd.POOL_SPM_ID: "-1"})
            except errors.Error as e:
                log.error("Cannot clear SPM id of pool=%s: %s", self.pool_id, e)
            self.lease.release()
        log.info("Stopped SPM pool=%s", self.pool_id)

    def shutdown(self) -> None:
        """Daemon stop: running tasks finish, queued ones stay persisted for
        the next SPM, the SPM lease is released (the host id stays with the
        sanlock daemon: a restarted daemon finds it at once)."""
        with self._lock:
            self.mailbox.spm_stop()
            self.mailbox.disconnect(clear=False)
            if self.tasks is not None:
                self.tasks.shutdown(wait=True)
                self.tasks = None
            self.lease.release()

    def spm_status(self) -> dict[str, Any]:
        """This host's role; spmId/spmLver read from the lease on the storage
        (the same on every host)."""
        if self.is_spm():
            return {"spmStatus": SPM, "spmId": self.host_id, "spmLver": self._spm_lver}
        status = CONTEND if self._contending else FREE
        try:
            owner, lver = self.lease.inquire()
        except errors.Error as e:
            log.warning("Cannot inquire SPM lease of pool=%s: %s", self.pool_id, e)
            owner, lver = 0, -1
        return {"spmStatus": status, "spmId": owner or -1, "spmLver": lver}

    def _lease_lost(self, manager: task_manager.TaskManager, reason: str) -> None:
        """The lease monitor's thread, once the lease is gone: stop acting as
        SPM at once, without the pool lock (a verb may hold it) and without
        writing to the storage (another host may be SPM soon)."""
        if self.tasks is manager:
            self.tasks = None  # every SPM verb answers SpmStatusError from now on
        self.mailbox.spm_stop(fence=True)
        manager.fence()
        self.lease.drop()
        log.critical("No longer SPM of pool=%s host_id=%d: the SPM lease is lost (%s); "
                     "unfinished tasks are left on the master for the next SPM",
                     self.pool_id, self.host_id, reason)

    def _check_no_tasks(self) -> None:
        if self.tasks is not None:
            unfinished = self.tasks.unfinished()
            if unfinished:
                raise errors.SpmStopError(pool_id=self.pool_id, tasks=unfinished)

    def _task_manager(self, master: sd.StorageDomain) -> task_manager.TaskManager:
        store_dir, files = master.task_store()
        return task_manager.TaskManager(
            workers=self.task_workers, store_dir=store_dir, files=files, kinds=self.job_kinds,
            on_finished=self.task_finished,
        )
