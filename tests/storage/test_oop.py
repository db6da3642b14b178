"""storage.oop: file operations in helper processes, with timeouts."""

from __future__ import annotations

import errno
import os
import shutil
import stat
import tempfile
import threading
from collections.abc import Iterator

import pytest

from storage import errors, oop


@pytest.fixture
def tmp_dir() -> Iterator[str]:
    # Root file system, not tmpfs: direct I/O needs a real file system.
    path = tempfile.mkdtemp(prefix="test-oop-", dir="/var/tmp")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(params=["pool", "in_process"])
def files(request: pytest.FixtureRequest) -> Iterator[oop.FileOps]:
    """The same operations, in helper processes or in this process."""
    ops = oop.Pool(max_workers=2, timeout=30) if request.param == "pool" else oop.InProcess()
    try:
        yield ops
    finally:
        ops.close()


@pytest.fixture
def pool() -> Iterator[oop.Pool]:
    p = oop.Pool(max_workers=2, timeout=30)
    try:
        yield p
    finally:
        p.close()


def test_write_read_atomic(files: oop.FileOps, tmp_dir: str) -> None:
    path = os.path.join(tmp_dir, "vol.meta")
    files.write_file_atomic(path, b"CAP=1024\nFORMAT=COW\nEOF\n", mode=0o600)
    assert files.read_file(path) == b"CAP=1024\nFORMAT=COW\nEOF\n"
    assert files.read_lines(path) == ["CAP=1024", "FORMAT=COW", "EOF"]
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    files.write_file_atomic(path, b"replaced\n")
    assert files.read_file(path) == b"replaced\n"
    assert os.listdir(tmp_dir) == ["vol.meta"]


def test_directory_operations(files: oop.FileOps, tmp_dir: str) -> None:
    images = os.path.join(tmp_dir, "images", "img1")
    files.makedirs(images)
    files.makedirs(images)  # exist_ok by default
    assert files.exists(images)
    assert not files.exists(os.path.join(tmp_dir, "missing"))
    files.truncate(os.path.join(images, "vol1"), 1024 * 1024)
    files.write_file_atomic(os.path.join(images, "vol1.meta"), b"EOF\n")
    assert sorted(files.listdir(images)) == ["vol1", "vol1.meta"]
    assert files.glob(os.path.join(tmp_dir, "images", "*", "*.meta")) == [
        os.path.join(images, "vol1.meta")]
    st = files.stat(os.path.join(images, "vol1"))
    assert st.st_size == 1024 * 1024
    assert files.statvfs(tmp_dir).f_bsize > 0
    files.fsync(os.path.join(images, "vol1"))
    files.fsync(images)
    files.rename(os.path.join(images, "vol1"), os.path.join(images, "vol2"))
    assert sorted(files.listdir(images)) == ["vol1.meta", "vol2"]
    files.unlink(os.path.join(images, "vol2"))
    assert files.listdir(images) == ["vol1.meta"]
    files.rmtree(os.path.join(tmp_dir, "images"))
    assert os.listdir(tmp_dir) == []


def test_oserror_keeps_errno(files: oop.FileOps, tmp_dir: str) -> None:
    missing = os.path.join(tmp_dir, "missing")
    with pytest.raises(FileNotFoundError) as e:
        files.read_file(missing)
    assert e.value.errno == errno.ENOENT
    assert e.value.filename == missing
    with pytest.raises(FileNotFoundError):
        files.unlink(missing)
    with pytest.raises(FileExistsError):
        files.makedirs(tmp_dir, exist_ok=False)
    files.write_file_atomic(os.path.join(tmp_dir, "x"), b"")
    with pytest.raises(NotADirectoryError):
        files.listdir(os.path.join(tmp_dir, "x"))


def test_atomic_write_failure_leaves_no_temp_file(files: oop.FileOps, tmp_dir: str) -> None:
    # The final name is a non-empty directory: the rename fails after the
    # temp file was written.
    target = os.path.join(tmp_dir, "target")
    os.mkdir(target)
    open(os.path.join(target, "keep"), "w").close()
    with pytest.raises(OSError) as e:
        files.write_file_atomic(target, b"data")
    assert e.value.errno in (errno.EISDIR, errno.ENOTEMPTY, errno.EEXIST)
    assert os.listdir(tmp_dir) == ["target"]
    assert os.listdir(target) == ["keep"]


def test_direct_io(files: oop.FileOps, tmp_dir: str) -> None:
    path = os.path.join(tmp_dir, "metadata")
    files.truncate(path, 1024 * 1024)
    block = b"slot 3".ljust(512, b"\0")
    files.write_direct(path, 3 * 512, block)
    assert files.read_direct(path, 3 * 512, 512) == block
    assert files.read_direct(path, 0, 512) == b"\0" * 512
    with open(path, "rb") as f:
        f.seek(3 * 512)
        assert f.read(512) == block
    # Two slots at once.
    files.write_direct(path, 4096, b"a" * 512 + b"b" * 512)
    assert files.read_direct(path, 4096, 1024) == b"a" * 512 + b"b" * 512


def test_direct_io_checks_alignment(files: oop.FileOps, tmp_dir: str) -> None:
    path = os.path.join(tmp_dir, "metadata")
    files.truncate(path, 4096)
    with pytest.raises(ValueError):
        files.read_direct(path, 100, 512)
    with pytest.raises(ValueError):
        files.write_direct(path, 0, b"short")


@pytest.fixture
def fifo(tmp_dir: str) -> str:
    # Opening a FIFO for reading blocks, for real, until a writer opens it:
    # a stand-in for a hung NFS mount.
    path = os.path.join(tmp_dir, "hang")
    os.mkfifo(path)
    return path


def test_hung_operation_times_out_and_helper_is_replaced(
        tmp_dir: str, fifo: str) -> None:
    with oop.Pool(max_workers=1, timeout=30) as pool:
        pool.exists(tmp_dir)
        [hung_pid] = pool.pids()
        with pytest.raises(errors.OopTimeout) as e:
            pool.read_file(fifo, timeout=0.5)
        assert e.value.op == "read_file"
        assert e.value.path == fifo
        assert "timed out" in str(e.value)
        assert pool.pids() == []
        # The next call gets a new helper.
        path = os.path.join(tmp_dir, "after")
        pool.write_file_atomic(path, b"ok")
        assert pool.read_file(path) == b"ok"
        [new_pid] = pool.pids()
        assert new_pid != hung_pid
    # The hung helper was killed.
    _wait_for_exit(hung_pid)


def _wait_for_exit(pid: int) -> None:
    # The reaper thread waits for it; poll /proc until it is gone.
    done = threading.Event()
    for _ in range(600):
        if not os.path.exists(f"/proc/{pid}") or _is_zombie(pid):
            return
        done.wait(0.1)
    raise AssertionError(f"helper {pid} still running")


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_hung_helper_does_not_block_other_calls(tmp_dir: str, fifo: str) -> None:
    with oop.Pool(max_workers=2, timeout=60) as pool:
        result: dict[str, object] = {}

        def hang() -> None:
            result["data"] = pool.read_file(fifo)

        t = threading.Thread(target=hang)
        t.start()
        try:
            # While one helper is blocked, the other one serves calls.
            for i in range(5):
                path = os.path.join(tmp_dir, f"f{i}")
                pool.write_file_atomic(path, b"x")
                assert pool.read_file(path) == b"x"
        finally:
            # Unblock the reader: open the writer side and write.
            with open(fifo, "wb") as w:
                w.write(b"released")
            t.join()
        assert result["data"] == b"released"


def test_waiting_for_a_busy_pool_times_out(fifo: str, tmp_dir: str) -> None:
    with oop.Pool(max_workers=1, timeout=60) as pool:
        t = threading.Thread(target=pool.read_file, args=(fifo,))
        t.start()
        try:
            # Wait until the only helper is busy on the FIFO.
            while pool.stats()["busy"] == 0:
                threading.Event().wait(0.05)
            with pytest.raises(errors.OopTimeout):
                pool.exists(tmp_dir, timeout=0.3)
        finally:
            with open(fifo, "wb"):
                pass
            t.join()
        assert pool.exists(tmp_dir)


def test_concurrent_calls(pool: oop.Pool, tmp_dir: str) -> None:
    failures: list[BaseException] = []

    def worker(n: int) -> None:
        try:
            for i in range(10):
                path = os.path.join(tmp_dir, f"t{n}-{i}")
                data = f"{n}:{i}".encode() * 100
                pool.write_file_atomic(path, data)
                assert pool.read_file(path) == data
        except BaseException as e:
            failures.append(e)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []
    assert len(os.listdir(tmp_dir)) == 80
    assert len(pool.pids()) <= 2


def test_helper_death_is_an_error_and_pool_recovers(pool: oop.Pool, tmp_dir: str) -> None:
    pool.exists(tmp_dir)
    [pid] = pool.pids()
    os.kill(pid, 9)
    _wait_for_exit(pid)
    with pytest.raises(errors.OopError):
        pool.exists(tmp_dir)
    assert pool.exists(tmp_dir)


def test_closed_pool_refuses_calls(tmp_dir: str) -> None:
    pool = oop.Pool(max_workers=1)
    pool.exists(tmp_dir)
    [pid] = pool.pids()
    pool.close()
    _wait_for_exit(pid)
    with pytest.raises(errors.OopError):
        pool.exists(tmp_dir)
