"""storage.resource: shared/exclusive resource locks taken in sorted order."""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest

from storage import errors, resource

SD = "sd"
IMG = resource.image_namespace("4b7e2a2e-0000-4000-8000-000000000001")


def wait_until(condition: Callable[[], bool]) -> None:
    """Wait for another thread to reach a state (no timing asserted)."""
    pause = threading.Event()
    for _ in range(3000):
        if condition():
            return
        pause.wait(0.01)
    raise AssertionError("condition never became true")


class Holder:
    """A thread that acquires resources, reports it, and holds them until told."""

    def __init__(self, manager: resource.Manager, requests: list[resource.Request],
                 timeout: float = 60) -> None:
        self.acquired = threading.Event()
        self.release = threading.Event()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(manager, requests, timeout))
        self._thread.start()

    def _run(self, manager: resource.Manager, requests: list[resource.Request],
             timeout: float) -> None:
        try:
            with manager.acquire(requests, timeout=timeout):
                self.acquired.set()
                self.release.wait()
        except BaseException as e:
            self.error = e

    def finish(self) -> None:
        self.release.set()
        self._thread.join()


def test_shared_requests_are_held_together() -> None:
    manager = resource.Manager()
    with manager.acquire([(IMG, "img1", resource.SHARED)]):
        with manager.acquire([(IMG, "img1", resource.SHARED)], timeout=0):
            assert manager.status(IMG, "img1") == {"shared": 2, "exclusive": 0, "waiting": 0}
    assert manager.status(IMG, "img1") == {"shared": 0, "exclusive": 0, "waiting": 0}


def test_exclusive_waits_for_shared_then_gets_it() -> None:
    manager = resource.Manager()
    reader = Holder(manager, [(IMG, "img1", resource.SHARED)])
    reader.acquired.wait()
    writer = Holder(manager, [(IMG, "img1", resource.EXCLUSIVE)])
    wait_until(lambda: manager.status(IMG, "img1")["waiting"] == 1)
    assert not writer.acquired.is_set()
    reader.finish()
    writer.acquired.wait()
    assert manager.status(IMG, "img1") == {"shared": 0, "exclusive": 1, "waiting": 0}
    writer.finish()
    assert reader.error is None and writer.error is None


def test_timeout_raises_and_holds_nothing() -> None:
    manager = resource.Manager()
    writer = Holder(manager, [(SD, "sd1", resource.EXCLUSIVE)])
    writer.acquired.wait()
    try:
        with pytest.raises(errors.ResourceTimeout) as e:
            manager.acquire([(SD, "sd1", resource.SHARED)], timeout=0.2)
        assert e.value.namespace == SD
        assert e.value.resource == "sd1"
        assert e.value.name == "ResourceTimeout"
        assert manager.status(SD, "sd1") == {"shared": 0, "exclusive": 1, "waiting": 0}
    finally:
        writer.finish()
    assert manager.status(SD, "sd1")["exclusive"] == 0


def test_failed_acquire_releases_what_it_took() -> None:
    manager = resource.Manager()
    blocker = Holder(manager, [(IMG, "zzz", resource.EXCLUSIVE)])
    blocker.acquired.wait()
    try:
        with pytest.raises(errors.ResourceTimeout):
            manager.acquire([(IMG, "aaa", resource.EXCLUSIVE),
                             (IMG, "zzz", resource.EXCLUSIVE)], timeout=0.2)
        # "aaa" (sorted first, so taken first) was given back.
        assert manager.status(IMG, "aaa") == {"shared": 0, "exclusive": 0, "waiting": 0}
        with manager.acquire([(IMG, "aaa", resource.EXCLUSIVE)], timeout=0):
            pass
    finally:
        blocker.finish()


def test_queued_writer_is_not_overtaken_by_later_readers() -> None:
    manager = resource.Manager()
    reader1 = Holder(manager, [(IMG, "img1", resource.SHARED)])
    reader1.acquired.wait()
    writer = Holder(manager, [(IMG, "img1", resource.EXCLUSIVE)])
    wait_until(lambda: manager.status(IMG, "img1")["waiting"] == 1)
    reader2 = Holder(manager, [(IMG, "img1", resource.SHARED)])
    wait_until(lambda: manager.status(IMG, "img1")["waiting"] == 2)
    assert not reader2.acquired.is_set()

    reader1.finish()
    writer.acquired.wait()
    assert not reader2.acquired.is_set()
    writer.finish()
    reader2.acquired.wait()
    reader2.finish()
    assert manager.status(IMG, "img1") == {"shared": 0, "exclusive": 0, "waiting": 0}


def test_readers_behind_a_timed_out_writer_are_let_in() -> None:
    manager = resource.Manager()
    reader1 = Holder(manager, [(IMG, "img1", resource.SHARED)])
    reader1.acquired.wait()
    writer_error: list[BaseException] = []

    def writer() -> None:
        try:
            manager.acquire([(IMG, "img1", resource.EXCLUSIVE)], timeout=1)
        except errors.ResourceTimeout as e:
            writer_error.append(e)

    t = threading.Thread(target=writer)
    t.start()
    # (On a very slow machine the writer may give up before reader2 queues;
    # reader2 must get in either way.)
    wait_until(lambda: manager.status(IMG, "img1")["waiting"] == 1 or bool(writer_error))
    reader2 = Holder(manager, [(IMG, "img1", resource.SHARED)])
    t.join()
    assert writer_error
    # The writer gave up; the reader queued behind it shares with reader1.
    reader2.acquired.wait()
    assert manager.status(IMG, "img1")["shared"] == 2
    reader1.finish()
    reader2.finish()


def test_opposite_orders_do_not_deadlock() -> None:
    manager = resource.Manager()
    a = (IMG, "a", resource.EXCLUSIVE)
    b = (SD, "b", resource.EXCLUSIVE)
    start = threading.Barrier(4)
    failures: list[BaseException] = []
    counter = [0]

    def worker(requests: list[resource.Request]) -> None:
        try:
            start.wait()
            for _ in range(200):
                with manager.acquire(requests, timeout=60):
                    value = counter[0]
                    counter[0] = value + 1
        except BaseException as e:
            failures.append(e)

    threads = [threading.Thread(target=worker, args=(r,)) for r in ([a, b], [b, a]) * 2]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []
    assert counter[0] == 800


def test_lease_lists_sorted_resources_and_merges_duplicates() -> None:
    manager = resource.Manager()
    lease = manager.acquire([(SD, "sd1", resource.SHARED),
                             (IMG, "img1", resource.SHARED),
                             (IMG, "img1", resource.EXCLUSIVE)])
    assert lease.resources == [(IMG, "img1", resource.EXCLUSIVE), (SD, "sd1", resource.SHARED)]
    lease.release()
    with pytest.raises(RuntimeError):
        lease.release()
    assert manager.status(IMG, "img1") == {"shared": 0, "exclusive": 0, "waiting": 0}


def test_invalid_mode() -> None:
    with pytest.raises(ValueError):
        resource.Manager().acquire([(SD, "sd1", "write")])
