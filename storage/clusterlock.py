"""The cluster lock: host ids and the SPM lease of a pool's master domain.

Two implementations behind one interface (:class:`ClusterLock`), chosen by
:func:`open`:

``sanlock`` (:mod:`storage.sanlock_lock`)
    the real sanlock daemon: a host id is a delta lease in the domain's
    ``ids`` (lockspace named by the domain's UUID), the SPM lease the paxos
    resource ``SDM`` in ``leases`` at 1 MiB (VDSM's layout).

``local`` (:mod:`storage.local_lock`)
    for hosts where the sanlock daemon can't run: an fcntl lock with a
    small owner/lver record on the first sector of ``leases``; no host ids.

``auto`` picks sanlock when its daemon answers, else local.  Both layouts
live side by side in one ``leases`` file (record at 0, SDM at 1 MiB), so
:func:`init_domain` prepares a domain for either.

The life of a lock object on a connected host: ``acquire_host_id`` at
connect (in the background with sanlock), ``acquire`` at spmStart (waits
for the host id), ``held``/``watch_fd`` for :mod:`storage.lease_monitor`
while SPM, ``release`` at spmStop (or ``drop`` once the lease is lost),
``release_host_id`` at disconnect.  ``inquire`` reads the owner and lver
from the storage on any host.
"""

from __future__ import annotations

import logging
from typing import Protocol

from storage import local_lock, sanlock_lock

log = logging.getLogger("storage.clusterlock")

AUTO = "auto"
SANLOCK = sanlock_lock.NAME
LOCAL = local_lock.NAME
MODES = (AUTO, SANLOCK, LOCAL)

# The on-disk layout (shared by both locks).
SDM_RESOURCE = sanlock_lock.SDM_RESOURCE
SDM_LEASE_OFFSET = sanlock_lock.SDM_LEASE_OFFSET
LOCKSPACE_OFFSET = sanlock_lock.LOCKSPACE_OFFSET
IDS_SIZE = sanlock_lock.IDS_SIZE
LEASES_SIZE = sanlock_lock.LEASES_SIZE
LOCAL_RECORD_OFFSET = local_lock.RECORD_OFFSET
LOCAL_RECORD_SIZE = local_lock.RECORD_SIZE
DEFAULT_IO_TIMEOUT = sanlock_lock.DEFAULT_IO_TIMEOUT

LocalLock = local_lock.LocalLock
SanlockLock = sanlock_lock.SanlockLock
sanlock_available = sanlock_lock.available
lockspace_spec = sanlock_lock.lockspace_spec
resource_spec = sanlock_lock.resource_spec
direct_read_leader = sanlock_lock.direct_read_leader


class ClusterLock(Protocol):
    name: str

    def init(self) -> None: ...

    def acquire_host_id(self, host_id: int, wait: bool = False) -> None: ...

    def has_host_id(self) -> bool | None: ...

    def release_host_id(self) -> None: ...

    def acquire(self, host_id: int) -> None: ...

    def release(self) -> None: ...

    def drop(self) -> None: ...

    def held(self) -> bool: ...

    def watch_fd(self) -> int | None: ...

    def inquire(self) -> tuple[int, int]: ...


def resolve_mode(mode: str) -> str:
    """The lock that mode means on this host: "sanlock" or "local"."""
    if mode not in MODES:
        raise ValueError(f"invalid cluster lock mode {mode!r}, expected one of {MODES}")
    if mode == AUTO:
        return SANLOCK if sanlock_available() else LOCAL
    return mode


def open(
    mode: str,
    lockspace: str,
    ids_path: str,
    leases_path: str,
    io_timeout: int = DEFAULT_IO_TIMEOUT,
) -> ClusterLock:
    """The host ids and SPM lease of a domain. lockspace is the domain's UUID."""
    resolved = resolve_mode(mode)
    log.debug("Using cluster lock mode=%s resolved=%s lockspace=%s", mode, resolved, lockspace)
    if resolved == SANLOCK:
        return SanlockLock(lockspace, ids_path, leases_path, io_timeout=io_timeout)
    return LocalLock(leases_path)


def init_domain(
    lockspace: str, ids_path: str, leases_path: str, io_timeout: int = DEFAULT_IO_TIMEOUT
) -> None:
    """Initialize ids and leases of a new domain for both lock modes.

    Needs no daemon: sanlock's structures are written with ``sanlock
    direct``, the lockspace with io_timeout (which decides how long joining
    it takes).  ids must be at least IDS_SIZE, leases LEASES_SIZE bytes.
    """
    SanlockLock(lockspace, ids_path, leases_path, io_timeout=io_timeout).init()
    LocalLock(leases_path).init()
