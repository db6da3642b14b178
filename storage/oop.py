"""Out-of-process file operations with timeouts (the daemon's ioprocess).

A file system on shared storage may hang (an NFS server gone away): a
process touching it blocks in the kernel, possibly forever.  So file
operations on storage domains never run in the daemon itself: a
:class:`Pool` hands each call to a long-lived helper process (this module
run as ``python -m storage.oop --helper``) and waits for the answer at most
``timeout`` seconds.  A helper that doesn't answer in time is killed, a new
one is started on the next call, and the call raises
:class:`storage.errors.OopTimeout`; the daemon thread that asked is never
stuck.

An ``OSError`` inside a helper is raised again in the caller with the same
errno (so ``FileNotFoundError`` is caught as usual).  Other helper failures
raise :class:`storage.errors.OopError`.

Protocol: each message is a 4-byte big-endian length and a pickle, on the
helper's stdin (requests ``(op, args)``) and stdout (replies).  Only the
daemon talks to its own helpers, so pickle is safe here.

Usage::

    pool = oop.Pool(max_workers=4, timeout=60)
    pool.write_file_atomic(path, b"CAP=1024\\nEOF\\n")
    data = pool.read_direct(slot_path, offset=4096, size=512)
    pool.close()

:class:`InProcess` offers the same methods run in the calling process
(for local paths and tests), so code can take either.
"""

from __future__ import annotations

import errno
import glob as globlib
import logging
import mmap
import os
import pickle
import select
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

from storage import errors

log = logging.getLogger("storage.oop")

DEFAULT_TIMEOUT = 60.0
DEFAULT_WORKERS = 4
# Offsets and sizes of direct I/O must be multiples of the logical block size.
DIRECT_IO_ALIGNMENT = 512

_HEADER = struct.Struct(">I")
_PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class FileOps:
    """The file operations; subclasses say where they run (``_call``)."""

    def read_file(self, path: str, timeout: float | None = None) -> bytes:
        return self._call("read_file", path, (), timeout)

    def read_lines(self, path: str, timeout: float | None = None) -> list[str]:
        """The file's lines decoded as UTF-8, without line endings."""
        return self._call("read_lines", path, (), timeout)

    def write_file_atomic(self, path: str, data: bytes, mode: int = 0o644,
                          timeout: float | None = None) -> None:
        """Replace path with data: temp file in the same directory, fsync,
        rename, fsync the directory. On failure no temp file is left."""
        self._call("write_file_atomic", path, (bytes(data), mode), timeout)

    def listdir(self, path: str, timeout: float | None = None) -> list[str]:
        return self._call("listdir", path, (), timeout)

    def stat(self, path: str, timeout: float | None = None) -> os.stat_result:
        return self._call("stat", path, (), timeout)

    def statvfs(self, path: str, timeout: float | None = None) -> os.statvfs_result:
        return self._call("statvfs", path, (), timeout)

    def exists(self, path: str, timeout: float | None = None) -> bool:
        return self._call("exists", path, (), timeout)

    def truncate(self, path: str, size: int, mode: int = 0o644,
                 timeout: float | None = None) -> None:
        """Create path if missing (with mode) and set its size."""
        self._call("truncate", path, (size, mode), timeout)

    def fsync(self, path: str, timeout: float | None = None) -> None:
        """fsync a file or a directory."""
        self._call("fsync", path, (), timeout)

    def unlink(self, path: str, timeout: float | None = None) -> None:
        self._call("unlink", path, (), timeout)

    def rename(self, src: str, dst: str, timeout: float | None = None) -> None:
        self._call("rename", src, (dst,), timeout)

    def makedirs(self, path: str, mode: int = 0o755, exist_ok: bool = True,
                 timeout: float | None = None) -> None:
        self._call("makedirs", path, (mode, exist_ok), timeout)

    def rmtree(self, path: str, timeout: float | None = None) -> None:
        self._call("rmtree", path, (), timeout)

    def glob(self, pattern: str, timeout: float | None = None) -> list[str]:
        """Sorted paths matching pattern (hidden files only if asked for)."""
        return self._call("glob", pattern, (), timeout)

    def read_direct(self, path: str, offset: int, size: int,
                    timeout: float | None = None) -> bytes:
        """Read size bytes at offset with O_DIRECT (bypassing the page cache,
        so another host's writes are seen). Both must be 512-aligned."""
        _check_aligned(offset, size)
        return self._call("read_direct", path, (offset, size), timeout)

    def write_direct(self, path: str, offset: int, data: bytes,
                     timeout: float | None = None) -> None:
        """Write data at offset with O_DIRECT|O_DSYNC. The file must exist;
        offset and len(data) must be 512-aligned."""
        _check_aligned(offset, len(data))
        self._call("write_direct", path, (offset, bytes(data)), timeout)

    def _call(self, op: str, path: str, args: tuple[Any, ...], timeout: float | None) -> Any:
        raise NotImplementedError


class InProcess(FileOps):
    """The same operations run in the calling process, without timeouts.

    For paths that can't hang (local directories) and for tests; storage
    domains use a :class:`Pool`.
    """

    def close(self) -> None:
        pass

    def _call(self, op: str, path: str, args: tuple[Any, ...], timeout: float | None) -> Any:
        return _unpack_reply(op, path, _run_op((op, path) + args))


class Pool(FileOps):
    """A bounded set of helper processes running file operations.

    Thread safe: each call borrows one idle helper for its duration; when
    all ``max_workers`` helpers are busy a call waits for one, and that
    wait counts against the call's timeout too.
    """

    def __init__(self, max_workers: int = DEFAULT_WORKERS, timeout: float = DEFAULT_TIMEOUT,
                 name: str = "oop") -> None:
        if max_workers < 1:
            raise ValueError(f"max_workers must be >= 1: {max_workers}")
        self.max_workers = max_workers
        self.timeout = timeout
        self.name = name
        self._cond = threading.Condition()
        self._idle: list[_Helper] = []
        self._count = 0  # helpers alive or being started, idle or busy
        self._busy: set[_Helper] = set()
        self._closed = False

    # Pool management.

    def close(self) -> None:
        """Stop all helpers. Calls in progress fail; later calls raise."""
        with self._cond:
            self._closed = True
            helpers = self._idle + list(self._busy)
            self._idle = []
            self._cond.notify_all()
        for helper in helpers:
            helper.kill()

    def stats(self) -> dict[str, int]:
        """Counts of helpers: started (idle or busy), idle, busy."""
        with self._cond:
            return {"workers": self._count, "idle": len(self._idle), "busy": len(self._busy)}

    def pids(self) -> list[int]:
        """Process ids of the live helpers (for diagnostics and tests)."""
        with self._cond:
            return sorted(h.pid for h in self._idle + list(self._busy))

    def __enter__(self) -> Pool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # Internals.

    def _call(self, op: str, path: str, args: tuple[Any, ...], timeout: float | None) -> Any:
        timeout = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        helper = self._borrow(op, path, timeout, deadline)
        ok = False
        try:
            reply = helper.call((op, path) + args, deadline)
            ok = True
        except _HelperTimeoutError:
            log.warning("Killing hung helper pool=%s pid=%d op=%s path=%s timeout=%s",
                        self.name, helper.pid, op, path, timeout)
            raise errors.OopTimeout(op=op, path=path, timeout=timeout) from None
        except _HelperDiedError as e:
            log.error("Helper failed pool=%s pid=%d op=%s path=%s: %s",
                      self.name, helper.pid, op, path, e)
            raise errors.OopError(op=op, path=path, reason=str(e)) from None
        finally:
            self._give_back(helper, ok)
        return _unpack_reply(op, path, reply)

    def _borrow(self, op: str, path: str, timeout: float, deadline: float) -> _Helper:
        with self._cond:
            while True:
                if self._closed:
                    raise errors.OopError(op=op, path=path, reason="pool is closed")
                if self._idle:
                    idle: _Helper | None = self._idle.pop()
                    break
                if self._count < self.max_workers:
                    self._count += 1
                    idle = None
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise errors.OopTimeout(op=op, path=path, timeout=timeout)
                self._cond.wait(remaining)
            if idle is not None:
                self._busy.add(idle)
                return idle
        # Start a new helper outside the lock: it takes a while.
        try:
            helper = _Helper(self.name)
        except OSError as e:
            with self._cond:
                self._count -= 1
                self._cond.notify()
            raise errors.OopError(op=op, path=path, reason=f"cannot start helper: {e}") from e
        with self._cond:
            self._busy.add(helper)
            if self._closed:
                helper.kill()
        return helper

    def _give_back(self, helper: _Helper, ok: bool) -> None:
        with self._cond:
            self._busy.discard(helper)
            if ok and not self._closed:
                self._idle.append(helper)
            else:
                self._count -= 1
            self._cond.notify()
        if not ok:
            helper.kill()


def _check_aligned(offset: int, size: int) -> None:
    if offset % DIRECT_IO_ALIGNMENT or size % DIRECT_IO_ALIGNMENT or offset < 0:
        raise ValueError(
            f"direct I/O needs offset and size aligned to {DIRECT_IO_ALIGNMENT}: "
            f"offset={offset} size={size}")


def _unpack_reply(op: str, path: str, reply: Any) -> Any:
    kind = reply[0]
    if kind == "ok":
        return reply[1]
    if kind == "oserror":
        _, err, strerror, filename, filename2 = reply
        # OSError(errno, ...) picks the subclass: ENOENT -> FileNotFoundError.
        raise OSError(err, strerror, filename, None, filename2)
    if kind == "value":
        raise ValueError(reply[1])
    raise errors.OopError(op=op, path=path, reason=f"{reply[1]}: {reply[2]}")


class _HelperTimeoutError(Exception):
    pass


class _HelperDiedError(Exception):
    pass


class _Helper:
    """One helper process and its pipes; used by one thread at a time."""

    def __init__(self, pool_name: str) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (_PROJECT_ROOT, env.get("PYTHONPATH")) if p)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "storage.oop", "--helper"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, close_fds=True)
        self.pid = self.proc.pid
        log.debug("Started helper pool=%s pid=%d", pool_name, self.pid)

    def call(self, request: tuple[Any, ...], deadline: float) -> Any:
        payload = pickle.dumps(request, protocol=pickle.HIGHEST_PROTOCOL)
        assert self.proc.stdin is not None and self.proc.stdout is not None  # PIPE
        try:
            # An idle helper is blocked reading its stdin, so this write
            # finishes even for large requests.
            self.proc.stdin.write(_HEADER.pack(len(payload)) + payload)
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError) as e:
            raise _HelperDiedError(f"cannot send request: {e}") from e
        header = self._read(_HEADER.size, deadline)
        (length,) = _HEADER.unpack(header)
        return pickle.loads(self._read(length, deadline))

    def _read(self, size: int, deadline: float) -> bytes:
        assert self.proc.stdout is not None  # PIPE
        fd = self.proc.stdout.fileno()
        chunks = []
        while size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise _HelperTimeoutError()
            ready, _, _ = select.select([fd], [], [], remaining)
            if not ready:
                continue
            chunk = os.read(fd, min(size, 1024 * 1024))
            if not chunk:
                raise _HelperDiedError(f"helper exited rc={self.proc.poll()}")
            chunks.append(chunk)
            size -= len(chunk)
        return b"".join(chunks)

    def kill(self) -> None:
        try:
            self.proc.kill()
        except OSError:
            pass
        for f in (self.proc.stdin, self.proc.stdout):
            if f is None:
                continue
            try:
                f.close()
            except OSError:
                pass
        # A process stuck in uninterruptible I/O is reaped when the I/O
        # ends; never wait for that in the caller's thread.
        threading.Thread(target=self.proc.wait, name=f"oop-reap-{self.pid}",
                         daemon=True).start()


# The helper process side.

def _op_read_file(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _op_read_lines(path: str) -> list[str]:
    with open(path, "rb") as f:
        return f.read().decode("utf-8").splitlines()


def _op_write_file_atomic(path: str, data: bytes, mode: int) -> None:
    dirname, basename = os.path.split(path)
    dirname = dirname or "."
    fd, tmp = tempfile.mkstemp(prefix=f".{basename}.", suffix=".tmp", dir=dirname)
    try:
        try:
            os.fchmod(fd, mode)
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _op_fsync(dirname)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _op_truncate(path: str, size: int, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, mode)
    try:
        os.ftruncate(fd, size)
    finally:
        os.close(fd)


def _op_fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _op_read_direct(path: str, offset: int, size: int) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        with mmap.mmap(-1, max(size, mmap.PAGESIZE)) as buf:  # page aligned
            view = memoryview(buf)
            try:
                n = os.preadv(fd, [view[:size]], offset)
                return bytes(view[:n])
            finally:
                view.release()
    finally:
        os.close(fd)


def _op_write_direct(path: str, offset: int, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_DIRECT | os.O_DSYNC)
    try:
        with mmap.mmap(-1, max(len(data), mmap.PAGESIZE)) as buf:
            buf[:len(data)] = data
            view = memoryview(buf)
            try:
                n = os.pwritev(fd, [view[:len(data)]], offset)
            finally:
                view.release()
            if n != len(data):
                raise OSError(errno.EIO, f"short direct write {n} of {len(data)}", path)
    finally:
        os.close(fd)


_OPS: dict[str, Callable[..., Any]] = {
    "read_file": _op_read_file,
    "read_lines": _op_read_lines,
    "write_file_atomic": _op_write_file_atomic,
    "listdir": os.listdir,
    "stat": os.stat,
    "statvfs": os.statvfs,
    "exists": os.path.exists,
    "truncate": _op_truncate,
    "fsync": _op_fsync,
    "unlink": os.unlink,
    "rename": os.rename,
    "makedirs": os.makedirs,
    "rmtree": shutil.rmtree,
    "glob": lambda pattern: sorted(globlib.glob(pattern)),
    "read_direct": _op_read_direct,
    "write_direct": _op_write_direct,
}


def _run_op(request: tuple[Any, ...]) -> tuple[Any, ...]:
    op, *args = request
    try:
        return ("ok", _OPS[op](*args))
    except OSError as e:
        return ("oserror", e.errno, e.strerror, e.filename, e.filename2)
    except ValueError as e:
        return ("value", str(e))
    except Exception as e:
        return ("error", type(e).__name__, str(e))


def _helper_main() -> None:
    # Ctrl-C in the daemon's terminal is for the daemon; it ends us by
    # closing our stdin or by killing us.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    stdin = sys.stdin.buffer
    stdout = sys.stdout.buffer
    while True:
        header = stdin.read(_HEADER.size)
        if len(header) < _HEADER.size:
            return
        (length,) = _HEADER.unpack(header)
        request = pickle.loads(stdin.read(length))
        reply = pickle.dumps(_run_op(request), protocol=pickle.HIGHEST_PROTOCOL)
        stdout.write(_HEADER.pack(len(reply)) + reply)
        stdout.flush()


if __name__ == "__main__" and sys.argv[1:] == ["--helper"]:
    _helper_main()
