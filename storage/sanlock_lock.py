"""The ``sanlock`` cluster lock: host ids and the SPM lease on the real daemon.

VDSM's layout on the pool's master domain:

- the **lockspace** named by the domain's UUID is the ``ids`` file (or LV):
  one delta lease per host id.  A connected host holds its host id there
  (``add_lockspace``, renewed by its sanlock daemon every 2 * io_timeout);
- the **SPM lease** is the paxos resource ``SDM`` in ``leases`` at 1 MiB.
  It can only be acquired by a process registered with a sanlock daemon
  that holds a host id in the lockspace.

Timing follows sanlock's rules for an io_timeout of T seconds: joining the
lockspace takes about 2T + 1 s, and T is the one written on disk when the
lockspace was initialized (``sanlock direct init -o T``), so domains are
made with the configured io_timeout and ``add_lockspace`` is given it too.
A held ``SDM`` is refused to another host after about 2 s
(``SANLK_ACQUIRE_IDLIVE``, -243).  When the holding *process* dies its
sanlock daemon releases the lease at once; when the holder's *sanlock
daemon* dies, other hosts can take the lease only after the dead host id
expires, 8T + 60 s after its last renewal.

The lease is held through the registration socket (``sanlock.register()``):
closing it releases whatever is left, and it hangs up when the daemon goes
away, which is how :mod:`storage.lease_monitor` notices a loss at once
(:meth:`SanlockLock.watch_fd`).  Every call on that socket is serialized
(the monitor's :meth:`SanlockLock.held` runs in another thread).

Initializing and reading the on-disk structures needs no daemon
(``sanlock direct``); everything else does.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import time

from storage import commands, errors

try:
    import sanlock
except ImportError:  # pragma: no cover - python3-sanlock is a dependency
    sanlock = None

log = logging.getLogger("storage.clusterlock")

NAME = "sanlock"
SDM_RESOURCE = "SDM"
SDM_LEASE_OFFSET = 1024 * 1024
LOCKSPACE_OFFSET = 0
# Minimum sizes of ids and leases (sanlock's 1 MiB alignment; the local
# lock's record shares the first MiB of leases).
IDS_SIZE = 1024 * 1024
LEASES_SIZE = SDM_LEASE_OFFSET + 1024 * 1024

DEFAULT_IO_TIMEOUT = 10  # sanlock's own default
COMMAND_TIMEOUT = 60.0
# How long acquire waits for this host's id (VDSM waits as long: a host id
# last held by a crashed daemon takes 8 * io_timeout + 60 s to free).
HOST_ID_TIMEOUT = 180.0
HOST_ID_POLL = 0.1

# sanlock's paxos_lease_acquire results (sanlock_rv.h).
_ACQUIRE_REASONS = {
    -243: "held by another host whose host id is live",
    -244: "owned by another host",
    -245: "held by another host",
}


def available() -> bool:
    """True if a sanlock daemon answers this process."""
    if sanlock is None:
        return False
    try:
        sanlock.get_lockspaces()
    except sanlock.SanlockException as e:
        log.debug("sanlock daemon not available: %s", e)
        return False
    return True


def _is_sanlock_error(e: BaseException) -> bool:
    return sanlock is not None and isinstance(e, sanlock.SanlockException)


class SanlockLock:
    """A domain's lockspace (host ids) and its SDM resource (the SPM lease)."""

    name = NAME

    def __init__(
        self,
        lockspace: str,
        ids_path: str,
        leases_path: str,
        io_timeout: int = DEFAULT_IO_TIMEOUT,
        host_id_timeout: float = HOST_ID_TIMEOUT,
    ) -> None:
        self.lockspace = lockspace
        self.ids_path = ids_path
        self.leases_path = leases_path
        self.io_timeout = io_timeout
        self.host_id_timeout = host_id_timeout
        self._io = threading.Lock()  # one call at a time on the registration socket
        self._fd: int | None = None
        self._host_id = 0
        self._lver = 0

    @property
    def _name(self) -> bytes:
        return self.lockspace.encode()

    @property
    def _disks(self) -> list[tuple[str, int]]:
        return [(self.leases_path, SDM_LEASE_OFFSET)]

    def init(self) -> None:
        """Write the lockspace (ids, with this io_timeout) and SDM (leases)."""
        try:
            direct_init_lockspace(self.lockspace, self.ids_path, LOCKSPACE_OFFSET,
                                  io_timeout=self.io_timeout)
            direct_init_resource(self.lockspace, SDM_RESOURCE, self.leases_path, SDM_LEASE_OFFSET)
        except (errors.CommandFailed, errors.CommandTimeout) as e:
            raise errors.ClusterLockInitError(lease=self.leases_path, reason=str(e)) from e
        log.info("Initialized sanlock lockspace=%s ids=%s leases=%s io_timeout=%d",
                 self.lockspace, self.ids_path, self.leases_path, self.io_timeout)

    # Host ids (delta leases in ids).

    def acquire_host_id(self, host_id: int, wait: bool = False) -> None:
        """Join the lockspace as host_id; without wait, sanlock does it in
        the background (:meth:`acquire` waits for it)."""
        self._require_daemon()
        self._host_id = host_id
        log.info("Acquiring host id lockspace=%s host_id=%d wait=%s io_timeout=%d",
                 self.lockspace, host_id, wait, self.io_timeout)
        start = time.monotonic()
        try:
            sanlock.add_lockspace(self._name, host_id, self.ids_path, offset=LOCKSPACE_OFFSET,
                                  iotimeout=self.io_timeout, wait=wait)
        except sanlock.SanlockException as e:
            if e.errno == errno.EEXIST:
                log.info("Host id already held lockspace=%s host_id=%d", self.lockspace, host_id)
                return
            if e.errno == errno.EINPROGRESS:  # being acquired already
                if wait:
                    self._wait_host_id()
                return
            raise errors.AcquireHostIdFailure(
                host_id=host_id, lockspace=self.lockspace, reason=str(e)) from e
        if wait:
            log.info("Acquired host id lockspace=%s host_id=%d in %.1fs",
                     self.lockspace, host_id, time.monotonic() - start)

    def has_host_id(self) -> bool | None:
        """True if held, False if not, None while sanlock is acquiring or
        releasing it."""
        if not self._host_id:
            return False
        try:
            state = sanlock.inq_lockspace(self._name, self._host_id, self.ids_path,
                                          offset=LOCKSPACE_OFFSET)
        except Exception as e:
            if not _is_sanlock_error(e):
                raise
            log.debug("Cannot inquire lockspace=%s: %s", self.lockspace, e)
            return False
        return None if state is None else bool(state)

    def release_host_id(self) -> None:
        """Leave the lockspace (refused by sanlock while a lease is held)."""
        host_id = self._host_id
        if not host_id or not available():
            return  # no daemon: it holds nothing
        try:
            self._wait_pending(time.monotonic() + self.host_id_timeout)
            sanlock.rem_lockspace(self._name, host_id, self.ids_path, offset=LOCKSPACE_OFFSET,
                                  unused=True)
        except sanlock.SanlockException as e:
            if e.errno != errno.ENOENT:
                log.warning("Cannot release host id lockspace=%s host_id=%d: %s",
                            self.lockspace, host_id, e)
                return
        self._host_id = 0
        log.info("Released host id lockspace=%s host_id=%d", self.lockspace, host_id)

    def _wait_host_id(self) -> None:
        """Return once this host's id is held; join synchronously if sanlock
        is not acquiring it (never asked, failed, or the daemon restarted)."""
        deadline = time.monotonic() + self.host_id_timeout
        state = self._wait_pending(deadline)
        if state:
            return
        self.acquire_host_id(self._host_id, wait=True)

    def _wait_pending(self, deadline: float) -> bool | None:
        state = self.has_host_id()
        while state is None:
            if time.monotonic() > deadline:
                raise errors.AcquireHostIdFailure(
                    host_id=self._host_id, lockspace=self.lockspace,
                    reason=f"still pending after {self.host_id_timeout:.0f}s")
            time.sleep(HOST_ID_POLL)
            state = self.has_host_id()
        return state

    # The SPM lease (SDM in leases).

    def acquire(self, host_id: int) -> None:
        if self._fd is not None:
            raise errors.AcquireLockFailure(
                lease=self.leases_path, reason="already held by this lock"
            )
        self._require_daemon()
        self._host_id = host_id
        self._wait_host_id()
        with self._io:
            try:
                fd = sanlock.register()
            except sanlock.SanlockException as e:
                raise errors.AcquireLockFailure(
                    lease=self.leases_path, reason=f"cannot register with sanlock: {e}") from e
            try:
                sanlock.acquire(self._name, SDM_RESOURCE.encode(), self._disks, slkfd=fd)
                held = sanlock.inquire(slkfd=fd)
            except sanlock.SanlockException as e:
                os.close(fd)
                reason = _ACQUIRE_REASONS.get(e.errno or 0, "refused")
                raise errors.AcquireLockFailure(
                    lease=self.leases_path, reason=f"{reason} (sanlock: {e})") from e
            self._fd = fd
        self._lver = next((r["version"] for r in held if r["resource"] == SDM_RESOURCE.encode()), 0)
        log.info("Acquired sanlock lease lockspace=%s host_id=%d lver=%d",
                 self.lockspace, host_id, self._lver)

    def release(self) -> None:
        """Release the SPM lease; the host id stays (see release_host_id)."""
        with self._io:
            fd = self._fd
            if fd is None:
                return
            self._fd = None
            try:
                sanlock.release(self._name, SDM_RESOURCE.encode(), self._disks, slkfd=fd)
            except sanlock.SanlockException as e:
                raise errors.ReleaseLockFailure(lease=self.leases_path, reason=str(e)) from e
            finally:
                os.close(fd)  # unregisters: sanlock drops whatever is left
        log.info("Released sanlock lease lockspace=%s host_id=%d", self.lockspace, self._host_id)

    def drop(self) -> None:
        """Close the registration after a loss (no request to sanlock)."""
        with self._io:
            fd, self._fd = self._fd, None
            if fd is not None:
                os.close(fd)

    def held(self) -> bool:
        """Does sanlock still list SDM as held by this process?"""
        with self._io:
            if self._fd is None:
                return False
            try:
                resources = sanlock.inquire(slkfd=self._fd)
            except sanlock.SanlockException as e:
                log.warning("Cannot inquire sanlock lease lockspace=%s: %s", self.lockspace, e)
                return False
        return any(r["resource"] == SDM_RESOURCE.encode() for r in resources)

    def watch_fd(self) -> int | None:
        """The registration socket: it hangs up when the sanlock daemon goes."""
        return self._fd

    def inquire(self) -> tuple[int, int]:
        """(owner host id, lver) read from the leases; owner 0 when free."""
        if self._fd is not None:
            return self._host_id, self._lver
        if available():
            try:
                res = sanlock.read_resource(self.leases_path, SDM_LEASE_OFFSET)
                owners = sanlock.read_resource_owners(self._name, SDM_RESOURCE.encode(),
                                                      self._disks)
            except sanlock.SanlockException as e:
                raise errors.ClusterLockInitError(lease=self.leases_path, reason=str(e)) from e
            owner = owners[0]["host_id"] if owners else 0
            return owner, res["version"]
        try:
            leader = direct_read_leader(
                resource_spec(self.lockspace, SDM_RESOURCE, self.leases_path, SDM_LEASE_OFFSET))
        except (errors.CommandFailed, errors.CommandTimeout) as e:
            raise errors.ClusterLockInitError(lease=self.leases_path, reason=str(e)) from e
        # A released lease keeps its last owner with a zero timestamp.
        free = leader.get("timestamp", "0") == "0"
        return (0 if free else int(leader["owner_id"])), int(leader["lver"])

    def _require_daemon(self) -> None:
        if not available():
            raise errors.ClusterLockUnavailable(
                mode=NAME, reason="the sanlock daemon is not running")


# sanlock's on-disk layer, without the daemon ("sanlock direct").


def _escape(path: str) -> str:
    return path.replace(":", "\\:")


def lockspace_spec(lockspace: str, host_id: int, path: str, offset: int) -> str:
    return f"{lockspace}:{host_id}:{_escape(path)}:{offset}"


def resource_spec(lockspace: str, resource: str, path: str, offset: int) -> str:
    return f"{lockspace}:{resource}:{_escape(path)}:{offset}"


def direct_init_lockspace(lockspace: str, path: str, offset: int = 0,
                          io_timeout: int = DEFAULT_IO_TIMEOUT) -> None:
    """Write an empty lockspace whose delta leases carry io_timeout."""
    commands.run(
        ["sanlock", "direct", "init", "-o", str(io_timeout),
         "-s", lockspace_spec(lockspace, 0, path, offset)],
        timeout=COMMAND_TIMEOUT,
    )


def direct_init_resource(lockspace: str, resource: str, path: str, offset: int) -> None:
    commands.run(
        ["sanlock", "direct", "init", "-r", resource_spec(lockspace, resource, path, offset)],
        timeout=COMMAND_TIMEOUT,
    )


def direct_read_leader(spec: str, lockspace: bool = False) -> dict[str, str]:
    """The leader record of a resource (or, with lockspace=True, of a host
    id's delta lease: spec from lockspace_spec) as sanlock prints it:
    magic, version, owner_id, owner_generation, lver, space_name,
    resource_name, timestamp, io_timeout, ... (values as text)."""
    proc = commands.run(
        ["sanlock", "direct", "read_leader", "-s" if lockspace else "-r", spec],
        timeout=COMMAND_TIMEOUT,
    )
    leader = {}
    for line in proc.stdout.decode("utf-8", "replace").splitlines():
        key, _, value = line.strip().partition(" ")
        if key and key != "read_leader":
            leader[key] = value.strip()
    return leader

