"""Loop devices: attach a file (or a range of a block device), resize, detach.

Used by the ``loop`` activation mode (DESIGN section 6): on hosts without
device-mapper an LV is reached through a loop device over its range of the
PV.  Everything here talks to the kernel directly (``/dev/loop-control`` and
the loop ioctls) and reads state from sysfs, so there is no parsing of
``losetup`` output and no window where another process can take the device
we chose without us noticing:

- :func:`attach` asks ``LOOP_CTL_GET_FREE`` for a free device (the kernel
  creates a new one when all are bound) and binds it atomically with
  ``LOOP_CONFIGURE``.  If another process bound it first (``EBUSY``) the
  next free device is tried.  An ``on_device`` callback sees the device
  before it is bound, so a caller can record it and find it again after a
  crash.
- :func:`set_size_limit` changes ``lo_sizelimit`` with ``LOOP_SET_STATUS64``;
  the kernel resizes the disk at once, so a process holding the device open
  (QEMU) sees the new size without reopening it.
- :func:`detach` is ``LOOP_CLR_FD``.  If the device is still open the kernel
  marks it auto-clear and releases it on the last close.
"""

from __future__ import annotations

import builtins
import dataclasses
import errno
import fcntl
import logging
import os
import re
import struct
import time
from collections.abc import Callable

from storage import errors

log = logging.getLogger("storage.loop")

# <linux/loop.h>
LOOP_SET_FD = 0x4C00
LOOP_CLR_FD = 0x4C01
LOOP_SET_STATUS64 = 0x4C04
LOOP_GET_STATUS64 = 0x4C05
LOOP_SET_CAPACITY = 0x4C07
LOOP_SET_DIRECT_IO = 0x4C08
LOOP_CONFIGURE = 0x4C0A
LOOP_CTL_GET_FREE = 0x4C82

LO_FLAGS_READ_ONLY = 1
LO_FLAGS_AUTOCLEAR = 4
LO_FLAGS_PARTSCAN = 8
LO_FLAGS_DIRECT_IO = 16

LO_NAME_SIZE = 64
LO_KEY_SIZE = 32

# <linux/fs.h>: _IOR(0x12, 114, size_t)
BLKGETSIZE64 = 0x80081272

# struct loop_info64: lo_device, lo_inode, lo_rdevice, lo_offset,
# lo_sizelimit (u64); lo_number, lo_encrypt_type, lo_encrypt_key_size,
# lo_flags (u32); lo_file_name, lo_crypt_name (u8[64]); lo_encrypt_key
# (u8[32]); lo_init (u64[2]).
_LOOP_INFO64 = struct.Struct("=5Q4I64s64s32s2Q")
# struct loop_config: fd, block_size (u32); loop_info64; __reserved (u64[8]).
_LOOP_CONFIG = struct.Struct(f"=II{_LOOP_INFO64.size}s8Q")

LOOP_CONTROL = "/dev/loop-control"
SYS_BLOCK = "/sys/block"

# How often to retry when another process takes the free device first, or
# when the kernel asks to retry a size change (dirty pages: EAGAIN).
_ATTACH_ATTEMPTS = 16
_STATUS_ATTEMPTS = 20
_NODE_WAIT = 2.0

# fullmatch: "$" would accept "/dev/loop0\n"; [0-9]: \d matches any Unicode digit.
_DEV_RE = re.compile(r"/dev/loop[0-9]+")


@dataclasses.dataclass(frozen=True)
class Status:
    """What the kernel says about a bound loop device (LOOP_GET_STATUS64)."""

    device: str
    backing_dev: int  # st_dev of the backing file
    backing_inode: int  # st_ino of the backing file
    offset: int
    sizelimit: int
    flags: int
    file_name: str  # truncated to 63 bytes by the kernel

    @property
    def read_only(self) -> bool:
        return bool(self.flags & LO_FLAGS_READ_ONLY)

    @property
    def direct_io(self) -> bool:
        return bool(self.flags & LO_FLAGS_DIRECT_IO)

    @property
    def autoclear(self) -> bool:
        return bool(self.flags & LO_FLAGS_AUTOCLEAR)

    def backed_by(self, path: str) -> bool:
        """True if the backing file is path (same device and inode)."""
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return False
        return (st.st_dev, st.st_ino) == (self.backing_dev, self.backing_inode)


@dataclasses.dataclass(frozen=True)
class LoopDevice:
    """A bound loop device as sysfs lists it."""

    name: str
    backing: str
    offset: int
    sizelimit: int
    read_only: bool
    direct_io: bool
    autoclear: bool


def attach(
    path: str,
    offset: int = 0,
    sizelimit: int = 0,
    read_only: bool = False,
    direct_io: bool = False,
    on_device: Callable[[str], None] | None = None,
    name: str | None = None,
) -> str:
    """Bind a free loop device to path[offset:offset+sizelimit]; return it.

    sizelimit 0 means up to the end of path.  on_device(dev) is called with
    each candidate device before it is bound (it may be called again with
    another device if a concurrent attach wins the race).  name is kept by
    the kernel as the device's ``lo_file_name`` (:attr:`Status.file_name`;
    at most 63 bytes), path when not given: a tag its owner finds it by.
    """
    if offset < 0 or sizelimit < 0:
        raise ValueError(f"Invalid offset={offset} sizelimit={sizelimit}")
    flags = LO_FLAGS_READ_ONLY if read_only else 0
    if direct_io:
        flags |= LO_FLAGS_DIRECT_IO
    if name is not None and len(os.fsencode(name)) >= LO_NAME_SIZE:
        raise ValueError(f"Loop device name longer than {LO_NAME_SIZE - 1} bytes: {name!r}")
    file_name = os.fsencode(path if name is None else name)[: LO_NAME_SIZE - 1]
    info = _LOOP_INFO64.pack(
        0, 0, 0, offset, sizelimit, 0, 0, 0, flags, file_name, b"", b"", 0, 0
    )
    mode = os.O_RDONLY if read_only else os.O_RDWR
    backing_fd = _open(path, mode | os.O_CLOEXEC)
    try:
        for _ in range(_ATTACH_ATTEMPTS):
            dev = _get_free()
            if on_device is not None:
                on_device(dev)
            try:
                dev_fd = _open_node(dev, mode)
            except errors.LoopDeviceError:
                continue
            try:
                config = _LOOP_CONFIG.pack(backing_fd, 0, info, *([0] * 8))
                fcntl.ioctl(dev_fd, LOOP_CONFIGURE, config)
            except OSError as e:
                if e.errno == errno.EBUSY:
                    log.debug("Loop device taken concurrently dev=%s, retrying", dev)
                    continue
                raise _error(dev, "configure", e) from e
            finally:
                os.close(dev_fd)
            if direct_io:
                ensure_direct_io(dev)
            log.info(
                "Attached loop device dev=%s path=%s offset=%d sizelimit=%d ro=%s dio=%s",
                dev,
                path,
                offset,
                sizelimit,
                read_only,
                direct_io,
            )
            return dev
    finally:
        os.close(backing_fd)
    raise errors.LoopDeviceError(dev="(any)", op="attach", reason="no free loop device")


def detach(dev: str) -> None:
    """Unbind dev.  Not an error if it is not bound.

    If dev is still open elsewhere the kernel defers the release to the
    last close (the device is marked auto-clear).
    """
    _check_name(dev)
    try:
        fd = os.open(dev, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    try:
        fcntl.ioctl(fd, LOOP_CLR_FD)
    except OSError as e:
        if e.errno == errno.ENXIO:
            log.debug("Loop device not bound dev=%s", dev)
            return
        raise _error(dev, "detach", e) from e
    finally:
        os.close(fd)
    log.info("Detached loop device dev=%s", dev)


def status(dev: str) -> Status | None:
    """The kernel's status of dev, or None if it is not bound."""
    _check_name(dev)
    try:
        fd = os.open(dev, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        raw = _get_status(fd, dev)
    finally:
        os.close(fd)
    if raw is None:
        return None
    fields = _LOOP_INFO64.unpack(raw)
    return Status(
        device=dev,
        backing_dev=fields[0],
        backing_inode=fields[1],
        offset=fields[3],
        sizelimit=fields[4],
        flags=fields[8],
        file_name=os.fsdecode(fields[9].rstrip(b"\0")),
    )


def set_size_limit(dev: str, sizelimit: int) -> int:
    """Change dev's size limit at once; return its new size in bytes.

    A process that holds dev open sees the new size immediately.  The
    kernel refuses (EAGAIN) while the device's page cache has dirty pages;
    that is retried.
    """
    _check_name(dev)
    if sizelimit < 0:
        raise ValueError(f"Invalid sizelimit={sizelimit}")
    fd = _open(dev, os.O_RDONLY | os.O_CLOEXEC)
    try:
        for attempt in range(_STATUS_ATTEMPTS):
            raw = _get_status(fd, dev)
            if raw is None:
                raise errors.LoopDeviceError(dev=dev, op="set_size_limit", reason="not bound")
            fields = builtins.list(_LOOP_INFO64.unpack(raw))
            old = fields[4]
            fields[4] = sizelimit
            try:
                fcntl.ioctl(fd, LOOP_SET_STATUS64, _LOOP_INFO64.pack(*fields))
                break
            except OSError as e:
                if e.errno == errno.EAGAIN and attempt + 1 < _STATUS_ATTEMPTS:
                    time.sleep(0.05)
                    continue
                raise _error(dev, "set_size_limit", e) from e
        new_size = _blk_size(fd, dev)
        if sizelimit and new_size != sizelimit:
            # Older kernels only re-read the size on LOOP_SET_CAPACITY.
            fcntl.ioctl(fd, LOOP_SET_CAPACITY)
            new_size = _blk_size(fd, dev)
    finally:
        os.close(fd)
    log.info("Changed loop size limit dev=%s old=%d new=%d size=%d", dev, old, sizelimit, new_size)
    return new_size


def size(dev: str) -> int:
    """Size of a block device in bytes (BLKGETSIZE64)."""
    fd = _open(dev, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return _blk_size(fd, dev)
    finally:
        os.close(fd)


def fd_size(fd: int) -> int:
    """Size in bytes of the block device open as fd (BLKGETSIZE64)."""
    return _blk_size(fd, f"fd {fd}")


def list() -> builtins.list[LoopDevice]:
    """Bound loop devices, from sysfs, sorted by number."""
    result = []
    try:
        names = os.listdir(SYS_BLOCK)
    except FileNotFoundError:
        return []
    for name in names:
        if not name.startswith("loop"):
            continue
        dev = _read_sysfs(name)
        if dev is not None:
            result.append(dev)
    result.sort(key=lambda d: int(d.name[len("/dev/loop") :]))
    return result


def is_device_name(path: str) -> bool:
    """True if path names a loop device (/dev/loopN)."""
    return bool(_DEV_RE.fullmatch(path))


def find(backing: str, offset: int = 0) -> str | None:
    """The first loop device bound to backing at offset, or None."""
    real = os.path.realpath(backing)
    for dev in list():
        if dev.backing == real and dev.offset == offset:
            return dev.name
    return None


# Helpers


def _error(dev: str, op: str, e: OSError) -> errors.LoopDeviceError:
    return errors.LoopDeviceError(dev=dev, op=op, reason=os.strerror(e.errno or 0), errno=e.errno)


def _check_name(dev: str) -> None:
    if not isinstance(dev, str) or not _DEV_RE.fullmatch(dev):
        raise ValueError(f"Not a loop device path: {dev!r}")


def _open(path: str, flags: int) -> int:
    try:
        return os.open(path, flags)
    except OSError as e:
        raise _error(path, "open", e) from e


def _open_node(dev: str, mode: int) -> int:
    # A device just created by LOOP_CTL_GET_FREE gets its node from devtmpfs;
    # give it a moment in case it is not there yet.
    deadline = time.monotonic() + _NODE_WAIT
    while True:
        try:
            return os.open(dev, mode | os.O_CLOEXEC)
        except FileNotFoundError as e:
            if time.monotonic() > deadline:
                raise errors.LoopDeviceError(dev=dev, op="open", reason="no device node") from e
            time.sleep(0.02)
        except OSError as e:
            raise _error(dev, "open", e) from e


def _get_free() -> str:
    fd = _open(LOOP_CONTROL, os.O_RDWR | os.O_CLOEXEC)
    try:
        n = fcntl.ioctl(fd, LOOP_CTL_GET_FREE)
    except OSError as e:
        raise _error(LOOP_CONTROL, "get_free", e) from e
    finally:
        os.close(fd)
    return f"/dev/loop{n}"


def _get_status(fd: int, dev: str) -> bytes | None:
    buf = bytearray(_LOOP_INFO64.size)
    try:
        fcntl.ioctl(fd, LOOP_GET_STATUS64, buf)
    except OSError as e:
        if e.errno == errno.ENXIO:
            return None
        raise _error(dev, "get_status", e) from e
    return bytes(buf)


def ensure_direct_io(dev: str) -> bool:
    """Turn on direct I/O of dev if it is a bound loop device without it.

    True if dev is a loop device with direct I/O now; False if it is not a
    (bound) loop device or the kernel refused (logged: e.g. a backing file
    on a file system without O_DIRECT).
    """
    if not is_device_name(dev):
        return False
    st = status(dev)
    if st is None:
        return False
    if st.direct_io:
        return True
    fd = os.open(dev, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, LOOP_SET_DIRECT_IO, 1)
    except OSError as e:
        log.warning("Cannot enable direct I/O dev=%s err=%s", dev, os.strerror(e.errno or 0))
        return False
    finally:
        os.close(fd)
    return True


def _blk_size(fd: int, what: str) -> int:
    buf = bytearray(8)
    try:
        fcntl.ioctl(fd, BLKGETSIZE64, buf)
    except OSError as e:
        raise _error(what, "size", e) from e
    return struct.unpack("=Q", buf)[0]


def _read_sysfs(name: str) -> LoopDevice | None:
    base = os.path.join(SYS_BLOCK, name)
    try:
        backing = _read(base, "loop/backing_file")
        offset = int(_read(base, "loop/offset"))
        sizelimit = int(_read(base, "loop/sizelimit"))
        autoclear = _read(base, "loop/autoclear") == "1"
        dio = _read(base, "loop/dio") == "1"
        ro = _read(base, "ro") == "1"
    except (FileNotFoundError, ValueError):
        # Not bound (no loop/ directory) or changing under us.
        return None
    return LoopDevice(
        name=f"/dev/{name}",
        backing=backing,
        offset=offset,
        sizelimit=sizelimit,
        read_only=ro,
        direct_io=dio,
        autoclear=autoclear,
    )


def _read(base: str, rel: str) -> str:
    with open(os.path.join(base, rel)) as f:
        return f.read().strip()
