"""The ``local`` cluster lock: an fcntl lock on the master's ``leases``.

For hosts where the sanlock daemon can't run (one host only, or several
daemons sharing one machine's file system): an exclusive
open-file-description lock (``fcntl`` ``F_OFD_SETLK``) on the first sector
of ``leases``, which also holds a small record: the owner's host id and the
lease version (``lver``), incremented by each acquire.  The lock belongs to
the open file, so it is released when the daemon exits or is killed; a
second process (or a second lock object) trying to acquire gets
:class:`storage.errors.AcquireLockFailure` at once.

There are no host ids (a delta lease needs sanlock): ``acquire_host_id``
and ``release_host_id`` do nothing.  Nothing can take the lock away from a
live process, so :meth:`LocalLock.held` is true for as long as it is held.
The record lives at offset 0 of ``leases``, before sanlock's ``SDM``
resource at 1 MiB, so one ``leases`` file serves both locks.
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
from typing import Any

from storage import errors

log = logging.getLogger("storage.clusterlock")

NAME = "local"
RECORD_OFFSET = 0
RECORD_SIZE = 512
MAGIC = "vdsm-lsm-local-lease"


class LocalLock:
    """fcntl lock plus version record on the first sector of leases."""

    name = NAME

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

    # Host ids: none with this lock.

    def acquire_host_id(self, host_id: int, wait: bool = False) -> None:
        self._host_id = host_id

    def has_host_id(self) -> bool:
        return True

    def release_host_id(self) -> None:
        pass

    # The SPM lease.

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

    def drop(self) -> None:
        """Let go of the lease without writing anything (it is lost anyway)."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def held(self) -> bool:
        """True while this object holds the lease (nothing revokes it)."""
        return self._fd is not None

    def watch_fd(self) -> int | None:
        """No descriptor tells of a loss: the lock lives as long as this process."""
        return None

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
        data = os.pread(fd, RECORD_SIZE, RECORD_OFFSET).rstrip(b"\0")
        if not data:
            return {"owner": 0, "lver": 0}  # never initialized: all zeros
        try:
            record = json.loads(data)
            if record.get("magic") != MAGIC:
                raise ValueError(f"bad magic {record.get('magic')!r}")
            return {"owner": int(record["owner"]), "lver": int(record["lver"])}
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise errors.ClusterLockInitError(
                lease=self.path, reason=f"invalid local lease record: {e}"
            ) from e

    def _write_record(self, fd: int, owner: int, lver: int) -> None:
        record = {
            "magic": MAGIC,
            "version": 1,
            "owner": owner,
            "lver": lver,
            "pid": os.getpid(),
            "hostname": socket.gethostname(),
            "time": int(time.time()),
        }
        data = json.dumps(record).encode().ljust(RECORD_SIZE, b"\0")
        os.pwrite(fd, data, RECORD_OFFSET)
        os.fsync(fd)


# struct flock on Linux (x86_64, aarch64): short l_type, short l_whence,
# off_t l_start, off_t l_len, pid_t l_pid (must be 0 for OFD locks).
_FLOCK = struct.Struct("hhqqi4x")


def _ofd_lock(fd: int, ltype: int) -> None:
    arg = _FLOCK.pack(ltype, os.SEEK_SET, RECORD_OFFSET, RECORD_SIZE, 0)
    fcntl.fcntl(fd, fcntl.F_OFD_SETLK, arg)


def _ofd_getlk(fd: int) -> int:
    """The type of a conflicting lock held elsewhere, or F_UNLCK."""
    arg = _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, RECORD_OFFSET, RECORD_SIZE, 0)
    return _FLOCK.unpack(fcntl.fcntl(fd, fcntl.F_OFD_GETLK, arg))[0]
