"""The storage provider's state and the narrow interface other packages use.

:class:`StorageCore` holds what this host knows of storage: its
connections to shared storage (``connections``, ``<state_dir>/connections.json``),
the domains (``cache``: those it created, remembered under
``<state_dir>/domains/``, and those it found on the connected storage),
the prepared volumes (``images``), the resource locks (``resources``), the
pool it is connected to (``<state_dir>/pool.json``) and the job services
and kinds its SPM tasks are built from (:mod:`storage.jobs`).  The verb
groups (:mod:`storage.pool_verbs`, :mod:`storage.volume_verbs`) extend it
and :class:`storage.api.StorageAPI` puts them together.

Besides the verbs, it offers what other packages ask of storage.  For virt
(``virt/storage_iface.py``), in two parts:

- the *host-side service*, which works on any host connected to the pool
  and writes no metadata: :meth:`prepare`, :meth:`teardown`,
  :meth:`refresh`, ``volume_get_info`` and :meth:`unsynced_volumes` ("is
  this chain synced");
- the *SPM-request path* (``spm_requests``, :mod:`storage.spm_requests`):
  :meth:`is_spm`, :meth:`extend` and :meth:`set_volume_legality`, run
  in-process when this host is the pool's SPM; else ``extend`` goes to the
  SPM through the storage mailbox (:mod:`storage.mailbox`, settings
  ``mailbox``) and ``set_volume_legality`` is refused with
  ``SpmRequestUnavailable``.

For the image verbs (``image_ops.Storage``): ``images``,
:meth:`spm_domain`, :meth:`submit_job` and :meth:`task_state`.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

from storage import (
    connections,
    domain_types,
    errors,
    extend,
    image,
    job,
    jobs,
    oop,
    resource,
    sd,
    sd_registry,
    spm_requests,
    task,
    volume,
)
from storage import mailbox as mailbox_mod
from storage import pool as storage_pool

log = logging.getLogger("storage.core")

MiB = 1024**2


class StorageCore:
    """State shared by the storage verbs.  Plain values in, no config object.

    chunk_mb: [irs] volume_utilization_chunk_mb; copy_rate_limit_mb: [irs]
    copy_rate_limit_mb (Image.syncData's qemu-img rate limit, 0: none);
    io_timeout: [sanlock] io_timeout (new lockspaces, add_lockspace);
    mailbox: the storage mailbox's timing ([mailbox]; default: its defaults).
    """

    def __init__(
        self,
        run_dir: str,
        *,
        state_dir: str | None = None,
        chunk_mb: int = 2560,
        activation_mode: str = "auto",
        cluster_lock_mode: str = "auto",
        oop_timeout: float = 60.0,
        oop_workers: int = 4,
        task_workers: int = task.DEFAULT_WORKERS,
        block_extent_size_mb: int = 128,
        resource_timeout: float = resource.DEFAULT_TIMEOUT,
        copy_rate_limit_mb: int = 0,
        io_timeout: int = 10,
        mailbox: mailbox_mod.Settings | None = None,
    ) -> None:
        self.run_dir = run_dir
        self.state_dir = state_dir or os.path.join(run_dir, "state")
        self.chunk_size = chunk_mb * MiB
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
            io_timeout=io_timeout,
        )
        self.connections = connections.Connections(self.state_dir, self.env)
        self.cache = sd_registry.DomainCache(
            sd_registry.Registry(self.state_dir),
            self.env,
            domain_types.openers(),
            locate=self.connections.locate,
        )
        self.images = image.ImageManager(run_dir)
        self.resources = resource.Manager()
        self.extender = extend.Extender(self.cache.get)
        self.spm_requests = spm_requests.SpmRequests(self.pool, self.extender)
        # What every pool's storage mailbox runs with (storage.pool_mailbox).
        self.mailbox_services = mailbox_mod.Services(
            mailbox or mailbox_mod.Settings(), self.spm_requests.extend_in_process)
        self.host_state = storage_pool.HostState(self.state_dir)
        self.job_services = job.Services(
            domains=self.cache.get,
            images=self.images,
            resources=self.resources,
            lock_timeout=resource_timeout,
            copy_rate_limit_bps=copy_rate_limit_mb * MiB if copy_rate_limit_mb > 0 else None,
        )
        # What every pool's task manager rebuilds jobs from (never changes).
        self.job_kinds = jobs.task_kinds(self.job_services)
        self._pool: storage_pool.Pool | None = None
        self._lock = threading.RLock()

    def close(self) -> None:
        """At daemon stop: let running tasks finish (queued ones stay persisted
        for the next SPM), release the SPM lease, stop the helpers."""
        with self._lock:
            if self._pool is not None:
                self._pool.shutdown()
        self.oop.close()

    # The pool and its domains.

    def pool(self, pool_id: str) -> storage_pool.Pool:
        """The connected pool, or StoragePoolUnknown."""
        p = self._pool
        if p is None or p.pool_id != pool_id:
            raise errors.StoragePoolUnknown(pool_id=pool_id)
        return p

    def domain(self, pool_id: str, sd_id: str) -> sd.StorageDomain:
        """A domain of the connected pool."""
        return self.pool(pool_id).get_domain(sd_id)

    def spm_pool(self, pool_id: str) -> storage_pool.Pool:
        """The connected pool if this host is its SPM, else SpmStatusError."""
        p = self.pool(pool_id)
        p.assert_spm()
        return p

    def spm_domain(self, pool_id: str, sd_id: str) -> sd.StorageDomain:
        """A domain of the pool this host is SPM of (SPM verbs)."""
        return self.spm_pool(pool_id).get_domain(sd_id)

    def check_not_prepared(self, sd_id: str) -> None:
        """Refuse taking a domain away while this host uses its volumes."""
        prepared = self.images.prepared_volumes(sd_id)
        if prepared:
            img_id, vol_id = prepared[0]
            raise errors.VolumeIsBusy(
                vol_id=vol_id, sd_id=sd_id, reason=f"prepared on this host (image {img_id})"
            )

    # SPM tasks.

    def submit_job(self, pool_id: str, kind: str, params: dict[str, Any]) -> str:
        """Run a job of kind (storage.jobs) as an SPM task of the pool; its id."""
        tasks = self.spm_pool(pool_id).spm_tasks()
        return tasks.submit(jobs.get(kind).verb, jobs.build(kind, self.job_services, params))

    def task_state(self, task_id: str) -> str | None:
        """The state of a task of this SPM (None: no such task here)."""
        p = self._pool
        tasks = p.tasks if p is not None else None
        if tasks is None:
            return None
        try:
            return str(tasks.get_status(task_id)["taskState"])
        except errors.UnknownTask:
            return None

    # Volumes, for virt and the image verbs.

    def lock_image(self, sd_id: str, img_id: str, mode: str) -> resource.Lease:
        return self.resources.acquire(
            job.image_locks(sd_id, img_id, mode), timeout=self.resource_timeout
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

    def refresh(self, pool_id: str, sd_id: str, img_id: str, vol_id: str) -> int:
        """Any host: make this host's device follow an extended volume (read
        from the storage now, so another host's lvextend is seen); its size."""
        self.domain(pool_id, sd_id)
        return self.extender.refresh(sd_id, img_id, vol_id)

    def unsynced_volumes(
        self, pool_id: str, sd_id: str, img_id: str, vol_id: str
    ) -> list[dict[str, str]]:
        """Any host: the volumes below vol_id in its chain that are not LEGAL,
        base first, as [{"volumeID", "legality"}]; empty: the chain under
        vol_id is synced (a pivot onto vol_id may go ahead)."""
        dom = self.domain(pool_id, sd_id)
        with dom.manifest.reading():
            vols = image.chain(dom.manifest, img_id, vol_id)
        return [
            {"volumeID": v, "legality": md.legality}
            for v, md in vols[:-1]
            if md.legality != volume.LEGAL
        ]

    # The SPM-request path (storage.spm_requests).

    def is_spm(self, pool_id: str) -> bool:
        """Whether this host is the pool's SPM now (SPM requests run in-process)."""
        return self.spm_requests.is_spm(pool_id)

    def extend(self, pool_id: str, sd_id: str, img_id: str, vol_id: str, new_size: int) -> int:
        """SPM request: grow a thin block volume to new_size bytes; its size."""
        return self.spm_requests.extend(pool_id, sd_id, img_id, vol_id, new_size)

    def set_volume_legality(
        self, pool_id: str, sd_id: str, img_id: str, vol_id: str, legal: bool
    ) -> None:
        """SPM request: mark a volume LEGAL or ILLEGAL (the pivot of a
        replication marks the destination leaf LEGAL)."""
        self.spm_requests.set_volume_legality(pool_id, sd_id, img_id, vol_id, legal)
