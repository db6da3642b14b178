"""The cluster lock: the SPM lease of a pool's master domain.

Two implementations behind one interface (``name``, ``init()``,
``acquire(host_id)``, ``release()``, ``inquire()``), chosen by
:func:`open`:

``sanlock``
    sanlock's disk paxos lease ``SDM`` in the domain's ``leases`` at 1 MiB,
    in the lockspace named by the domain's UUID in its ``ids`` (VDSM's
    layout).  Acquiring needs the sanlock daemon; initializing and reading
    the on-disk structures don't (``sanlock direct``).

``local``
    For hosts where the sanlock daemon can't run (one host only): an
    exclusive open-file-description lock (``fcntl`` ``F_OFD_SETLK``) on the
    first sector of ``leases``, which also holds a small record: the owner's
    host id and the lease version (``lver``), incremented by each acquire.
    The lock belongs to the open file, so it is released when the daemon
    exits or is killed; a second process (or a second lock object) trying
    to acquire gets :class:`storage.errors.AcquireLockFailure` at once.

``auto`` picks sanlock when its daemon answers, else local.  Both layouts
live side by side in one ``leases`` file (record at 0, SDM at 1 MiB), so
:func:`init_domain` prepares a domain for either.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import struct
import time
from typing import Any, Protocol

from storage import commands, errors

try:
    import sanlock
except ImportError:  # pragma: no cover - python3-sanlock is a dependency
    sanlock = None

log = logging.getLogger("storage.clusterlock")

AUTO = "auto"
SANLOCK = "sanlock"
LOCAL = "local"
MODES = (AUTO, SANLOCK, LOCAL)

SDM_RESOURCE = "SDM"
SDM_LEASE_OFFSET = 1024 * 1024
LOCKSPACE_OFFSET = 0
# Minimum sizes of ids and leases for both layouts (sanlock's 1 MiB alignment).
IDS_SIZE = 1024 * 1024
LEASES_SIZE = SDM_LEASE_OFFSET + 1024 * 1024

LOCAL_RECORD_OFFSET = 0
LOCAL_RECORD_SIZE = 512
LOCAL_MAGIC = "vdsm-lsm-local-lease"

SANLOCK_TIMEOUT = 60.0


class ClusterLock(Protocol):
    name: str

    def init(self) -> None: ...

    def acquire(self, host_id: int) -> None: ...

    def release(self) -> None: ...

    def inquire(self) -> tuple[int, int]: ...


def sanlock_available() -> bool:
    """True if the sanlock daemon answers its clients."""
    if sanlock is None:
        return False
    try:
        sanlock.get_lockspaces()
    except sanlock.SanlockException as e:
        log.debug("sanlock daemon not available: %s", e)
        return False
    return True


def resolve_mode(mode: str) -> str:
    """The lock that mode means on this host: "sanlock" or "local"."""
    if mode not in MODES:
        raise ValueError(f"invalid cluster lock mode {mode!r}, expected one of {MODES}")
    if mode == AUTO:
        return SANLOCK if sanlock_available() else LOCAL
    return mode


def open(
    mode: str, lockspace: str, ids_path: str, leases_path: str, io_timeout: int = 10
) -> ClusterLock:
    """The SPM lease of a domain. lockspace is the domain's UUID."""
    resolved = resolve_mode(mode)
    log.debug("Using cluster lock mode=%s resolved=%s lockspace=%s", mode, resolved, lockspace)
    if resolved == SANLOCK:
        return SanlockLock(lockspace, ids_path, leases_path, io_timeout=io_timeout)
    return LocalLock(leases_path)


def init_domain(lockspace: str, ids_path: str, leases_path: str) -> None:
    """Initialize ids and leases of a new domain for both lock modes.

    Needs no daemon: sanlock's structures are written with ``sanlock
    direct``. ids must be at least IDS_SIZE, leases LEASES_SIZE bytes.
    """
    SanlockLock(lockspace, ids_path, leases_path).init()
    LocalLock(leases_path).init()


class LocalLock:
    """fcntl lock plus version record on the first sector of leases."""

    name = LOCAL

    def __init__(self, leases_path: str) -> None:
        self.path = leases_path
        self._fd: int | None = None
        self._host_id = 0
        self._lver = 0

    def init(self) -> None:
        """Write an empty record (no owner, lver 0); refused while held."""
        fd = self._open(create=True)
        try:
            self._lock(fd)
            try:
                self._write_record(fd, owner=0, lver=0)
            finally:
                _ofd_lock(fd, fcntl.F_UNLCK)
        finally:
            os.close(fd)
        log.info("Initialized local lease path=%s", self.path)

    def acquire(self, host_id: int) -> None:
        if self._fd is not None:
            raise errors.AcquireLockFailure(lease=self.path, reason="already held by this lock")
        fd = self._open()
        try:
            self._lock(fd)
            lver = self._read_record(fd)["lver"] + 1
            self._write_record(fd, owner=host_id, lver=lver)
        except BaseException:
            os.close(fd)
            raise
        self._fd, self._host_id, self._lver = fd, host_id, lver
        log.info("Acquired local lease path=%s host_id=%d lver=%d", self.path, host_id, lver)

    def release(self) -> None:
        """Release the lease (a no-op if not held). lver is kept."""
        fd = self._fd
        if fd is None:
            return
        try:
            self._write_record(fd, owner=0, lver=self._lver)
        except OSError as e:
            # Closing the file below releases the lock anyway; a stale
            # owner in the record is ignored when nobody holds the lock.
            log.warning("Cannot clear owner of local lease path=%s: %s", self.path, e)
        finally:
            self._fd = None
            os.close(fd)
        log.info(
            "Released local lease path=%s host_id=%d lver=%d", self.path, self._host_id, self._lver
        )

    def inquire(self) -> tuple[int, int]:
        """(owner host id, lver); owner 0 when nobody holds the lease."""
        if self._fd is not None:
            return self._host_id, self._lver
        fd = self._open()
        try:
            record = self._read_record(fd)
            held = _ofd_getlk(fd) != fcntl.F_UNLCK
        finally:
            os.close(fd)
        return (record["owner"] if held else 0), record["lver"]

    def _open(self, create: bool = False) -> int:
        flags = os.O_RDWR | (os.O_CREAT if create else 0)
        try:
            return os.open(self.path, flags, 0o660)
        except OSError as e:
            raise errors.ClusterLockInitError(lease=self.path, reason=str(e)) from e

    def _lock(self, fd: int) -> None:
        try:
            _ofd_lock(fd, fcntl.F_WRLCK)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise errors.AcquireLockFailure(lease=self.path, reason=str(e)) from e
            try:
                owner = self._read_record(fd)["owner"]
            except errors.Error:
                owner = "unknown"
            raise errors.AcquireLockFailure(
                lease=self.path,
                reason=f"held by another process (host id {owner}): another daemon is SPM",
            ) from None

    def _read_record(self, fd: int) -> dict[str, Any]:
        data = os.pread(fd, LOCAL_RECORD_SIZE, LOCAL_RECORD_OFFSET).rstrip(b"\0")
        if not data:
            return {"owner": 0, "lver": 0}  # never initialized: all zeros
        try:
            record = json.loads(data)
            if record.get("magic") != LOCAL_MAGIC:
                raise ValueError(f"bad magic {record.get('magic')!r}")
            return {"owner": int(record["owner"]), "lver": int(record["lver"])}
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise errors.ClusterLockInitError(
                lease=self.path, reason=f"invalid local lease record: {e}"
            ) from e

    def _write_record(self, fd: int, owner: int, lver: int) -> None:
        record = {
            "magic": LOCAL_MAGIC,
            "version": 1,
            "owner": owner,
            "lver": lver,
            "pid": os.getpid(),
            "hostname": socket.gethostname(),
            "time": int(time.time()),
        }
        data = json.dumps(record).encode().ljust(LOCAL_RECORD_SIZE, b"\0")
        os.pwrite(fd, data, LOCAL_RECORD_OFFSET)
        os.fsync(fd)


# struct flock on Linux (x86_64, aarch64): short l_type, short l_whence,
# off_t l_start, off_t l_len, pid_t l_pid (must be 0 for OFD locks).
_FLOCK = struct.Struct("hhqqi4x")


def _ofd_lock(fd: int, ltype: int) -> None:
    arg = _FLOCK.pack(ltype, os.SEEK_SET, LOCAL_RECORD_OFFSET, LOCAL_RECORD_SIZE, 0)
    fcntl.fcntl(fd, fcntl.F_OFD_SETLK, arg)


def _ofd_getlk(fd: int) -> int:
    """The type of a conflicting lock held elsewhere, or F_UNLCK."""
    arg = _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, LOCAL_RECORD_OFFSET, LOCAL_RECORD_SIZE, 0)
    return _FLOCK.unpack(fcntl.fcntl(fd, fcntl.F_OFD_GETLK, arg))[0]


class SanlockLock:
    """sanlock's SDM resource; acquire/release need the sanlock daemon."""

    name = SANLOCK

    def __init__(
        self, lockspace: str, ids_path: str, leases_path: str, io_timeout: int = 10
    ) -> None:
        self.lockspace = lockspace
        self.ids_path = ids_path
        self.leases_path = leases_path
        self.io_timeout = io_timeout
        self._fd: int | None = None
        self._host_id = 0
        self._lver = 0

    @property
    def _disks(self) -> list[tuple[str, int]]:
        return [(self.leases_path, SDM_LEASE_OFFSET)]

    def init(self) -> None:
        """Write the lockspace (ids) and the SDM resource (leases)."""
        try:
            if sanlock_available():
                sanlock.write_lockspace(
                    self.lockspace.encode(),
                    self.ids_path,
                    offset=LOCKSPACE_OFFSET,
                    iotimeout=self.io_timeout,
                )
                sanlock.write_resource(self.lockspace.encode(), SDM_RESOURCE.encode(), self._disks)
            else:
                direct_init_lockspace(self.lockspace, self.ids_path, LOCKSPACE_OFFSET)
                direct_init_resource(
                    self.lockspace, SDM_RESOURCE, self.leases_path, SDM_LEASE_OFFSET
                )
        except (errors.CommandFailed, errors.CommandTimeout) as e:
            raise errors.ClusterLockInitError(lease=self.leases_path, reason=str(e)) from e
        except Exception as e:
            if sanlock is not None and isinstance(e, sanlock.SanlockException):
                raise errors.ClusterLockInitError(lease=self.leases_path, reason=str(e)) from e
            raise
        log.info(
            "Initialized sanlock lockspace=%s ids=%s leases=%s",
            self.lockspace,
            self.ids_path,
            self.leases_path,
        )

    def acquire(self, host_id: int) -> None:
        if self._fd is not None:
            raise errors.AcquireLockFailure(
                lease=self.leases_path, reason="already held by this lock"
            )
        if not sanlock_available():
            raise errors.ClusterLockUnavailable(
                mode=SANLOCK, reason="the sanlock daemon is not running"
            )
        lockspace = self.lockspace.encode()
        log.info("Acquiring host id lockspace=%s host_id=%d", self.lockspace, host_id)
        try:
            sanlock.add_lockspace(
                lockspace,
                host_id,
                self.ids_path,
                offset=LOCKSPACE_OFFSET,
                iotimeout=self.io_timeout,
            )
        except sanlock.SanlockException as e:
            if e.errno != errno.EEXIST:
                raise errors.AcquireHostIdFailure(
                    host_id=host_id, lockspace=self.lockspace, reason=str(e)
                ) from e
        fd = sanlock.register()
        try:
            sanlock.acquire(lockspace, SDM_RESOURCE.encode(), self._disks, slkfd=fd)
            held = sanlock.inquire(slkfd=fd)
        except sanlock.SanlockException as e:
            os.close(fd)
            raise errors.AcquireLockFailure(lease=self.leases_path, reason=str(e)) from e
        self._fd, self._host_id = fd, host_id
        self._lver = next((r["version"] for r in held if r["resource"] == SDM_RESOURCE.encode()), 0)
        log.info(
            "Acquired sanlock lease lockspace=%s host_id=%d lver=%d",
            self.lockspace,
            host_id,
            self._lver,
        )

    def release(self) -> None:
        fd = self._fd
        if fd is None:
            return
        self._fd = None
        try:
            sanlock.release(self.lockspace.encode(), SDM_RESOURCE.encode(), self._disks, slkfd=fd)
        except sanlock.SanlockException as e:
            raise errors.ReleaseLockFailure(lease=self.leases_path, reason=str(e)) from e
        finally:
            os.close(fd)  # unregisters: sanlock drops whatever is left
        try:
            sanlock.rem_lockspace(
                self.lockspace.encode(), self._host_id, self.ids_path, offset=LOCKSPACE_OFFSET
            )
        except sanlock.SanlockException as e:
            log.warning(
                "Cannot release host id lockspace=%s host_id=%d: %s",
                self.lockspace,
                self._host_id,
                e,
            )
        log.info("Released sanlock lease lockspace=%s host_id=%d", self.lockspace, self._host_id)

    def inquire(self) -> tuple[int, int]:
        """(owner host id, lver) read from the leases file."""
        if self._fd is not None:
            return self._host_id, self._lver
        if sanlock_available():
            try:
                res = sanlock.read_resource(self.leases_path, SDM_LEASE_OFFSET)
                owners = sanlock.read_resource_owners(
                    self.lockspace.encode(), SDM_RESOURCE.encode(), self._disks
                )
            except sanlock.SanlockException as e:
                raise errors.ClusterLockInitError(lease=self.leases_path, reason=str(e)) from e
            owner = owners[0]["host_id"] if owners else 0
            return owner, res["version"]
        try:
            leader = direct_read_leader(
                resource_spec(self.lockspace, SDM_RESOURCE, self.leases_path, SDM_LEASE_OFFSET)
            )
        except (errors.CommandFailed, errors.CommandTimeout) as e:
            raise errors.ClusterLockInitError(lease=self.leases_path, reason=str(e)) from e
        return int(leader["owner_id"]), int(leader["lver"])


# sanlock's on-disk layer, without the daemon ("sanlock direct").


def _escape(path: str) -> str:
    return path.replace(":", "\\:")


def lockspace_spec(lockspace: str, host_id: int, path: str, offset: int) -> str:
    return f"{lockspace}:{host_id}:{_escape(path)}:{offset}"


def resource_spec(lockspace: str, resource: str, path: str, offset: int) -> str:
    return f"{lockspace}:{resource}:{_escape(path)}:{offset}"


def direct_init_lockspace(lockspace: str, path: str, offset: int = 0) -> None:
    commands.run(
        ["sanlock", "direct", "init", "-s", lockspace_spec(lockspace, 0, path, offset)],
        timeout=SANLOCK_TIMEOUT,
    )


def direct_init_resource(lockspace: str, resource: str, path: str, offset: int) -> None:
    commands.run(
        ["sanlock", "direct", "init", "-r", resource_spec(lockspace, resource, path, offset)],
        timeout=SANLOCK_TIMEOUT,
    )


def direct_read_leader(spec: str, lockspace: bool = False) -> dict[str, str]:
    """The leader record of a resource (or, with lockspace=True, of a host
    id's delta lease: spec from lockspace_spec) as sanlock prints it:
    magic, version, owner_id, owner_generation, lver, space_name,
    resource_name, timestamp, ... (values as text)."""
    proc = commands.run(
        ["sanlock", "direct", "read_leader", "-s" if lockspace else "-r", spec],
        timeout=SANLOCK_TIMEOUT,
    )
    leader = {}
    for line in proc.stdout.decode("utf-8", "replace").splitlines():
        key, _, value = line.strip().partition(" ")
        if key and key != "read_leader":
            leader[key] = value.strip()
    return leader
