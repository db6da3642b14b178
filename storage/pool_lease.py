"""A connected host's hold on its pool's master domain: host id and SPM lease.

:class:`PoolLease` is what :class:`storage.pool.Pool` holds from connect to
disconnect:

- :meth:`join` at connect: this host's id in the master's lockspace
  (sanlock does it in the background, as VDSM's domain monitor has it done;
  :meth:`acquire` waits for it).  With the local lock there are no host ids.
- :meth:`acquire` at spmStart: the SPM lease; :meth:`watch` then starts a
  :class:`storage.lease_monitor.LeaseMonitor`, which calls back once if
  the lease is lost (the pool then stops acting as SPM).
- :meth:`release` at spmStop (monitor first, so the release is not taken
  for a loss), :meth:`drop` once the lease is lost (no request to
  anyone), :meth:`leave` at disconnect: the host id back.
- :meth:`inquire` on any host: the owner and lver read from the storage.

The lock is opened on first use (:func:`storage.clusterlock.open`: ``auto``
is resolved then) with ``[sanlock] io_timeout``, which is also the monitor's
check period.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from storage import clusterlock, errors, lease_monitor

log = logging.getLogger("storage.pool")

# The master's (ids, leases) paths.
LeasePaths = Callable[[], tuple[str, str]]


class PoolLease:
    def __init__(self, mode: str, lockspace: str, paths: LeasePaths, host_id: int,
                 io_timeout: int, name: str) -> None:
        self.mode = mode
        self.lockspace = lockspace
        self.paths = paths
        self.host_id = host_id
        self.io_timeout = io_timeout
        self.name = name
        self._lock: clusterlock.ClusterLock | None = None
        self._guard = threading.Lock()
        self._monitor: lease_monitor.LeaseMonitor | None = None

    @property
    def lock(self) -> clusterlock.ClusterLock:
        """The master domain's cluster lock, opened once."""
        with self._guard:
            if self._lock is None:
                ids, leases = self.paths()
                self._lock = clusterlock.open(self.mode, self.lockspace, ids, leases,
                                              io_timeout=self.io_timeout)
            return self._lock

    def join(self) -> None:
        """Start taking this host's id; a failure is logged (acquire tries again)."""
        try:
            self.lock.acquire_host_id(self.host_id)
        except errors.Error as e:
            log.error("Cannot acquire host id %d in lockspace %s of %s (spmStart tries "
                      "again): %s", self.host_id, self.lockspace, self.name, e)

    def leave(self) -> None:
        """Give the host id back (after release); a failure is logged."""
        if self._lock is None:
            return
        try:
            self._lock.release_host_id()
        except errors.Error as e:
            log.error("Cannot release host id %d of %s: %s", self.host_id, self.name, e)

    def acquire(self) -> int:
        """The SPM lease (waiting for the host id); its lver.
        AcquireLockFailure while another host holds it."""
        self.unwatch()  # one left by a lost lease
        lock = self.lock
        lock.acquire(self.host_id)
        try:
            return lock.inquire()[1]
        except BaseException:
            lock.release()
            raise

    def watch(self, on_lost: Callable[[str], None]) -> None:
        """Call on_lost(reason) once, from another thread, if the lease is lost."""
        self.unwatch()
        self._monitor = lease_monitor.LeaseMonitor(
            self.lock, self.io_timeout, on_lost, name=self.name).start()

    def unwatch(self) -> None:
        monitor, self._monitor = self._monitor, None
        if monitor is not None:
            monitor.stop()

    def release(self) -> None:
        """Stop watching, then release the SPM lease (the host id stays)."""
        self.unwatch()
        if self._lock is not None:
            self._lock.release()

    def drop(self) -> None:
        """The lease is lost: let go of it without a word to the storage."""
        if self._lock is not None:
            self._lock.drop()

    def inquire(self) -> tuple[int, int]:
        """(owner host id, lver) of the SPM lease; owner 0 when free."""
        return self.lock.inquire()
