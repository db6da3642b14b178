"""storage.clusterlock: the SPM lease, local (fcntl) and sanlock."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator

import pytest

from storage import clusterlock, errors

PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SD_ID = "3f0e4b5c-9a0d-4c52-8a6e-2d1b2c3d4e5f"

needs_sanlock_daemon = pytest.mark.skipif(
    not clusterlock.sanlock_available(),
    reason="sanlock daemon not running (it can't raise RLIMIT_MEMLOCK here); "
           "its on-disk layer is tested with 'sanlock direct'")

# A separate process holding the local lease until its stdin is closed.
HOLDER = """
import sys
from storage import clusterlock, errors
lock = clusterlock.LocalLock(sys.argv[1])
try:
    lock.acquire(int(sys.argv[2]))
except errors.Error as e:
    print("failed", e.name, flush=True)
    sys.exit(1)
print("acquired", lock.inquire()[1], flush=True)
sys.stdin.read()
lock.release()
print("released", flush=True)
"""


@pytest.fixture
def dom_md() -> Iterator[str]:
    # On the root file system: sanlock uses direct I/O, which tmpfs lacks.
    path = tempfile.mkdtemp(prefix="test-clusterlock-", dir="/var/tmp")
    try:
        for name, size in (("ids", clusterlock.IDS_SIZE), ("leases", clusterlock.LEASES_SIZE)):
            with open(os.path.join(path, name), "wb") as f:
                f.truncate(size)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def leases(dom_md: str) -> str:
    path = os.path.join(dom_md, "leases")
    clusterlock.LocalLock(path).init()
    return path


class Holder:
    def __init__(self, leases: str, host_id: int) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", HOLDER, leases, str(host_id)], cwd=PROJECT_ROOT,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.first_line = self.proc.stdout.readline().split()

    def release(self) -> None:
        self.proc.stdin.close()
        assert self.proc.stdout.readline().split() == ["released"]
        assert self.proc.wait() == 0

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def cleanup(self) -> None:
        if self.proc.poll() is None:
            self.kill()
        self.proc.stdout.close()
        if not self.proc.stdin.closed:
            self.proc.stdin.close()


@pytest.fixture
def holders() -> Iterator[list[Holder]]:
    started: list[Holder] = []
    try:
        yield started
    finally:
        for h in started:
            h.cleanup()


def test_open_modes() -> None:
    lock = clusterlock.open("local", SD_ID, "/nonexistent/ids", "/nonexistent/leases")
    assert lock.name == "local"
    expected = "sanlock" if clusterlock.sanlock_available() else "local"
    assert clusterlock.open("auto", SD_ID, "ids", "leases").name == expected
    assert clusterlock.resolve_mode("auto") == expected
    assert clusterlock.open("sanlock", SD_ID, "ids", "leases").name == "sanlock"
    with pytest.raises(ValueError):
        clusterlock.open("nfs", SD_ID, "ids", "leases")


def test_local_lock_lifecycle(leases: str) -> None:
    lock = clusterlock.LocalLock(leases)
    assert lock.inquire() == (0, 0)
    lock.acquire(1)
    assert lock.inquire() == (1, 1)
    assert clusterlock.LocalLock(leases).inquire() == (1, 1)
    lock.release()
    assert clusterlock.LocalLock(leases).inquire() == (0, 1)
    lock.release()  # not held: nothing to do
    lock.acquire(2)
    assert lock.inquire() == (2, 2)
    lock.release()


def test_local_lock_is_exclusive_within_one_process(leases: str) -> None:
    first = clusterlock.LocalLock(leases)
    first.acquire(1)
    try:
        with pytest.raises(errors.AcquireLockFailure) as e:
            clusterlock.LocalLock(leases).acquire(2)
        assert "host id 1" in str(e.value)
        with pytest.raises(errors.AcquireLockFailure):
            first.acquire(1)
        with pytest.raises(errors.AcquireLockFailure):
            clusterlock.LocalLock(leases).init()
    finally:
        first.release()
    assert first.inquire() == (0, 1)


def test_local_lock_held_by_another_process(leases: str, holders: list[Holder]) -> None:
    holder = Holder(leases, host_id=2)
    holders.append(holder)
    assert holder.first_line == ["acquired", "1"]

    lock = clusterlock.LocalLock(leases)
    assert lock.inquire() == (2, 1)
    with pytest.raises(errors.AcquireLockFailure) as e:
        lock.acquire(1)
    assert e.value.name == "AcquireLockFailure"
    assert "another daemon is SPM" in str(e.value)

    # A second process can't take it either.
    other = Holder(leases, host_id=3)
    holders.append(other)
    assert other.first_line == ["failed", "AcquireLockFailure"]
    assert other.proc.wait() == 1

    holder.release()
    assert lock.inquire() == (0, 1)
    lock.acquire(1)
    assert lock.inquire() == (1, 2)
    lock.release()


def test_local_lock_freed_when_holder_is_killed(leases: str, holders: list[Holder]) -> None:
    holder = Holder(leases, host_id=2)
    holders.append(holder)
    assert holder.first_line == ["acquired", "1"]
    holder.kill()
    # The record still names host 2, but nobody holds the lock.
    lock = clusterlock.LocalLock(leases)
    assert lock.inquire() == (0, 1)
    lock.acquire(1)
    assert lock.inquire() == (1, 2)
    lock.release()


def test_local_lock_on_missing_file(dom_md: str) -> None:
    lock = clusterlock.LocalLock(os.path.join(dom_md, "missing"))
    with pytest.raises(errors.ClusterLockInitError):
        lock.acquire(1)
    with pytest.raises(errors.ClusterLockInitError):
        lock.inquire()


def test_local_lock_refuses_corrupt_record(dom_md: str) -> None:
    path = os.path.join(dom_md, "leases")
    with open(path, "r+b") as f:
        f.write(b"garbage")
    with pytest.raises(errors.ClusterLockInitError):
        clusterlock.LocalLock(path).acquire(1)


def test_local_lock_on_uninitialized_file_starts_at_zero(dom_md: str) -> None:
    lock = clusterlock.LocalLock(os.path.join(dom_md, "leases"))
    assert lock.inquire() == (0, 0)
    lock.acquire(1)
    assert lock.inquire() == (1, 1)
    lock.release()


def test_init_domain_writes_sanlock_structures_on_disk(dom_md: str) -> None:
    ids = os.path.join(dom_md, "ids")
    leases = os.path.join(dom_md, "leases")
    clusterlock.init_domain(SD_ID, ids, leases)

    # Read back with sanlock's own reader (direct I/O, no daemon).
    resource = clusterlock.direct_read_leader(
        clusterlock.resource_spec(SD_ID, "SDM", leases, clusterlock.SDM_LEASE_OFFSET))
    assert int(resource["magic"], 16) == 0x06152010  # PAXOS_DISK_MAGIC
    assert resource["space_name"] == SD_ID
    assert resource["resource_name"] == "SDM"
    assert resource["owner_id"] == "0"
    assert resource["lver"] == "0"

    host = clusterlock.direct_read_leader(
        clusterlock.lockspace_spec(SD_ID, 1, ids, 0), lockspace=True)
    assert int(host["magic"], 16) == 0x12212010  # DELTA_DISK_MAGIC
    assert host["space_name"] == SD_ID
    assert host["owner_id"] == "0"

    # Both layouts coexist in leases: the local record at 0, SDM at 1 MiB.
    assert clusterlock.LocalLock(leases).inquire() == (0, 0)
    assert clusterlock.SanlockLock(SD_ID, ids, leases).inquire() == (0, 0)
    local = clusterlock.LocalLock(leases)
    local.acquire(1)
    local.release()
    resource = clusterlock.direct_read_leader(
        clusterlock.resource_spec(SD_ID, "SDM", leases, clusterlock.SDM_LEASE_OFFSET))
    assert resource["resource_name"] == "SDM"


@pytest.mark.parametrize("io_timeout", [1, 10])
def test_init_domain_writes_the_io_timeout_into_the_lockspace(dom_md: str, io_timeout: int) -> None:
    """The io_timeout on disk decides how long add_lockspace takes (2T + 1 s),
    whatever add_lockspace is given: domains are made with [sanlock] io_timeout."""
    ids = os.path.join(dom_md, "ids")
    clusterlock.init_domain(SD_ID, ids, os.path.join(dom_md, "leases"), io_timeout=io_timeout)
    for host_id in (1, 2, 250):
        host = clusterlock.direct_read_leader(
            clusterlock.lockspace_spec(SD_ID, host_id, ids, 0), lockspace=True)
        assert host["io_timeout"] == str(io_timeout)


def test_init_domain_defaults_to_sanlock_s_io_timeout(dom_md: str) -> None:
    ids = os.path.join(dom_md, "ids")
    clusterlock.init_domain(SD_ID, ids, os.path.join(dom_md, "leases"))
    host = clusterlock.direct_read_leader(
        clusterlock.lockspace_spec(SD_ID, 1, ids, 0), lockspace=True)
    assert host["io_timeout"] == str(clusterlock.DEFAULT_IO_TIMEOUT) == "10"


def test_local_lock_has_no_host_ids_and_cannot_be_taken_away(leases: str) -> None:
    lock = clusterlock.LocalLock(leases)
    lock.acquire_host_id(1)  # nothing to do
    assert lock.has_host_id() is True
    assert not lock.held() and lock.watch_fd() is None
    lock.acquire(1)
    assert lock.held() and lock.watch_fd() is None
    lock.release_host_id()  # nothing to do, the lease stays
    assert lock.held()
    # drop: let go without writing (the lease is lost anyway).
    lock.drop()
    assert not lock.held()
    assert clusterlock.LocalLock(leases).inquire() == (0, 1)
    other = clusterlock.LocalLock(leases)
    other.acquire(2)
    assert other.inquire() == (2, 2)
    other.release()
    lock.drop()  # not held: nothing


def test_sanlock_inquire_uninitialized(dom_md: str) -> None:
    lock = clusterlock.SanlockLock(SD_ID, os.path.join(dom_md, "ids"),
                                   os.path.join(dom_md, "leases"))
    with pytest.raises(errors.ClusterLockInitError):
        lock.inquire()


def test_sanlock_init_error(dom_md: str) -> None:
    lock = clusterlock.SanlockLock(SD_ID, os.path.join(dom_md, "missing", "ids"),
                                   os.path.join(dom_md, "missing", "leases"))
    with pytest.raises(errors.ClusterLockInitError):
        lock.init()


@pytest.mark.skipif(clusterlock.sanlock_available(), reason="sanlock daemon is running")
def test_sanlock_acquire_without_daemon(dom_md: str) -> None:
    lock = clusterlock.SanlockLock(SD_ID, os.path.join(dom_md, "ids"),
                                   os.path.join(dom_md, "leases"))
    lock.init()
    with pytest.raises(errors.ClusterLockUnavailable):
        lock.acquire_host_id(1)
    with pytest.raises(errors.ClusterLockUnavailable):
        lock.acquire(1)
    assert lock.has_host_id() is False
    assert not lock.held() and lock.watch_fd() is None
    lock.release_host_id()  # no daemon: it holds nothing
    lock.release()
    lock.drop()
    # Read from the disk without a daemon: nobody holds it.
    assert lock.inquire() == (0, 0)


@needs_sanlock_daemon
def test_sanlock_acquire_release(dom_md: str) -> None:
    ids = os.path.join(dom_md, "ids")
    leases = os.path.join(dom_md, "leases")
    lock = clusterlock.SanlockLock(SD_ID, ids, leases, io_timeout=1)
    lock.init()
    lock.acquire_host_id(1)  # in the background; acquire waits for it
    lock.acquire(1)
    try:
        owner, lver = lock.inquire()
        assert owner == 1
        assert lver >= 1
        assert lock.held() and lock.watch_fd() is not None
    finally:
        lock.release()
        assert lock.has_host_id() is True  # the host id stays until release_host_id
        lock.release_host_id()
    assert clusterlock.SanlockLock(SD_ID, ids, leases).inquire()[1] >= 1
