"""Losing the SPM lease: storage.lease_monitor, TaskManager.fence and the
pool giving up the SPM role (storage.pool).

The monitor is driven here with a fake lease (a socket pair stands for the
sanlock registration); the pool with the local lock, whose loss is
simulated by dropping it.  The real sanlock daemon going away is
tests/cluster/test_spm.py's.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from storage import errors, lease_monitor, task, task_manager
from tests.storage import domain_helpers as dh

pytest_plugins = ["tests.storage.domain_fixtures"]

WAIT = 10.0


class FakeLease:
    name = "fake"

    def __init__(self, fd: int | None = None) -> None:
        self.fd = fd
        self.is_held = True
        self.checks = 0

    def held(self) -> bool:
        self.checks += 1
        return self.is_held

    def watch_fd(self) -> int | None:
        return self.fd


class Lost:
    def __init__(self) -> None:
        self.reasons: list[str] = []
        self.event = threading.Event()

    def __call__(self, reason: str) -> None:
        self.reasons.append(reason)
        self.event.set()


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    ours, daemon = socket.socketpair()
    try:
        yield ours, daemon
    finally:
        ours.close()
        daemon.close()


def test_a_hang_up_of_the_watched_socket_is_a_loss_at_once(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    ours, daemon = pair
    lost = Lost()
    monitor = lease_monitor.LeaseMonitor(FakeLease(ours.fileno()), 30.0, lost).start()
    try:
        start = time.monotonic()
        daemon.close()  # the sanlock daemon went away
        assert lost.event.wait(WAIT)
        assert time.monotonic() - start < 5.0, "not at once: the interval is 30 s"
        assert len(lost.reasons) == 1 and "sanlock daemon closed" in lost.reasons[0]
    finally:
        monitor.stop()
    assert not monitor.running


def test_replies_on_the_watched_socket_are_left_alone(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    """Data arriving (a reply to a call made by another thread) is neither
    read nor taken for a loss."""
    ours, daemon = pair
    lost = Lost()
    monitor = lease_monitor.LeaseMonitor(FakeLease(ours.fileno()), 0.1, lost).start()
    try:
        daemon.sendall(b"reply")
        time.sleep(0.5)
        assert lost.reasons == []
        ours.setblocking(False)
        assert ours.recv(16) == b"reply"
    finally:
        monitor.stop()
    assert lost.reasons == []


def test_a_lease_no_longer_held_is_a_loss_at_the_next_check() -> None:
    lease = FakeLease()
    lost = Lost()
    monitor = lease_monitor.LeaseMonitor(lease, 0.1, lost).start()
    try:
        time.sleep(0.35)
        assert lost.reasons == [] and lease.checks >= 2
        lease.is_held = False
        assert lost.event.wait(WAIT)
        assert "no longer lists the lease" in lost.reasons[0]
        time.sleep(0.3)
        assert len(lost.reasons) == 1, "called once, then ended"
        assert not monitor.running
    finally:
        monitor.stop()


def test_stop_ends_it_without_a_call() -> None:
    lease = FakeLease()
    lost = Lost()
    monitor = lease_monitor.LeaseMonitor(lease, 60.0, lost).start()
    start = time.monotonic()
    monitor.stop()
    assert time.monotonic() - start < 5.0, "stop wakes the monitor up"
    assert not monitor.running
    lease.is_held = False
    monitor.stop()  # twice: nothing more
    assert lost.reasons == []


class BlockingJob:
    """Persisted job that runs until aborted; records whether it rolled back."""

    kind = "test.blocking"

    def __init__(self, params: dict[str, Any]) -> None:
        self.params = params
        self.started = threading.Event()
        self.ended = threading.Event()
        self.rolled_back = False

    def run(self, ctx: task.Context) -> None:
        self.started.set()
        try:
            ctx.aborted.wait(WAIT)
            ctx.check_abort()
        finally:
            self.ended.set()

    def rollback(self, ctx: task.Context) -> None:
        self.rolled_back = True


@pytest.fixture
def store_dir() -> Iterator[str]:
    path = tempfile.mkdtemp(prefix="test-fence-", dir="/var/tmp")
    try:
        yield os.path.join(path, "tasks")
    finally:
        shutil.rmtree(path, ignore_errors=True)


def test_a_fenced_task_manager_touches_the_store_no_more(store_dir: str) -> None:
    manager = task_manager.TaskManager(workers=1, store_dir=store_dir)
    running, queued = BlockingJob({"n": 1}), BlockingJob({"n": 2})
    running_id = manager.submit("Test.block", running)
    queued_id = manager.submit("Test.block", queued)
    assert running.started.wait(WAIT)

    def record(task_id: str) -> dict[str, Any]:
        with open(os.path.join(store_dir, f"{task_id}.task")) as f:
            data: dict[str, Any] = json.load(f)
            return data

    before = {t: record(t) for t in (running_id, queued_id)}
    assert before[running_id]["state"] == task.RUNNING
    manager.fence()
    assert running.ended.wait(WAIT), "the running job is aborted"
    time.sleep(0.3)  # the worker would have rolled back and picked the queued task by now
    assert not running.rolled_back, "no rollback once fenced"
    assert not queued.started.is_set(), "nothing new runs once fenced"
    # The records are as they were: the next SPM recovers both tasks.
    assert {t: record(t) for t in (running_id, queued_id)} == before
    with pytest.raises(errors.AddTaskError):
        manager.submit("Test.block", BlockingJob({"n": 3}))


def test_the_pool_gives_up_the_spm_role_when_its_lease_is_lost(
    api_factory: Any, file_domain_factory: Any,
) -> None:
    """Lock: local.  The lease is dropped behind the pool's back: within an
    io_timeout the pool is no longer SPM, SPM verbs answer SpmStatusError,
    and spmStart takes the lease again."""
    api = api_factory(io_timeout=1)
    master = file_domain_factory(api)
    pool_id = dh.make_pool(api, master)
    p = api.pool(pool_id)
    first = p.spm_status()
    assert first["spmStatus"] == "SPM"
    lock = p.lease.lock
    assert lock.held()
    lock.drop()  # as if revoked
    deadline = time.monotonic() + 3 + WAIT
    while p.is_spm():
        assert time.monotonic() < deadline
        time.sleep(0.02)
    with pytest.raises(errors.SpmStatusError):
        api.volume_create(pool_id, master, dh.new_id(), dh.new_id(), dh.MiB, "RAW", "SPARSE",
                          "", dh.BLANK, dh.BLANK)
    assert p.spm_status()["spmStatus"] == "Free"
    assert api.storage_pool_spm_start(pool_id) is True
    again = p.spm_status()
    assert again["spmStatus"] == "SPM" and again["spmLver"] == first["spmLver"] + 1
    dh.create_volume(api, pool_id, master, dh.new_id(), dh.new_id(), dh.MiB)
