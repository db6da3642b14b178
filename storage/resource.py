"""Shared/exclusive locks on named storage resources (domains, images).

A resource is named by a namespace and a name: ``("sd", sd_id)`` for a
domain, ``(image_namespace(sd_id), img_id)`` for an image of that domain.
:meth:`Manager.acquire` takes a list of requests and always takes them in
sorted order, so two tasks asking for the same resources in different
orders cannot deadlock::

    with manager.acquire([(resource.image_namespace(src_sd), img, resource.SHARED),
                          (resource.image_namespace(dst_sd), img, resource.EXCLUSIVE)],
                         timeout=60):
        ...

Each resource is a fair readers-writer lock: requests are granted in
arrival order (consecutive shared requests together), so a waiting writer
is not starved by a stream of readers and readers are not starved by
writers. A request not granted in time raises
:class:`storage.errors.ResourceTimeout` and leaves nothing held.
Locks are not reentrant: a thread that holds a resource exclusively and
asks for it again waits until its timeout.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Iterable

from storage import errors

log = logging.getLogger("storage.resource")

SHARED = "shared"
EXCLUSIVE = "exclusive"
MODES = (SHARED, EXCLUSIVE)

SD_NAMESPACE = "sd"

DEFAULT_TIMEOUT = 120.0

Request = tuple[str, str, str]  # (namespace, name, mode)


def image_namespace(sd_id: str) -> str:
    """The namespace of the images of domain sd_id."""
    return f"img:{sd_id}"


def volume_namespace(sd_id: str) -> str:
    """The namespace of the volumes of domain sd_id."""
    return f"vol:{sd_id}"


class _Waiter:
    __slots__ = ("mode", "granted", "event")

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.granted = False
        self.event = threading.Event()


class _Resource:
    """State of one resource; guarded by the manager's lock."""

    __slots__ = ("shared", "exclusive", "queue")

    def __init__(self) -> None:
        self.shared = 0
        self.exclusive = False
        self.queue: collections.deque[_Waiter] = collections.deque()

    def idle(self) -> bool:
        return not self.shared and not self.exclusive and not self.queue

    def can_take(self, mode: str) -> bool:
        if mode == SHARED:
            return not self.exclusive
        return not self.exclusive and not self.shared

    def take(self, mode: str) -> None:
        if mode == SHARED:
            self.shared += 1
        else:
            self.exclusive = True

    def grant_waiters(self) -> None:
        """Grant the queue's head, in order, while compatible."""
        while self.queue and self.can_take(self.queue[0].mode):
            waiter = self.queue.popleft()
            self.take(waiter.mode)
            waiter.granted = True
            waiter.event.set()


class Manager:
    """The resources of one daemon."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._resources: dict[tuple[str, str], _Resource] = {}

    def acquire(self, requests: Iterable[Request], timeout: float = DEFAULT_TIMEOUT) -> Lease:
        """Take every requested resource (sorted order) and return a Lease,
        a context manager that releases them. Asking twice for one resource
        in a call is one request, exclusive if either asked for exclusive.

        Raises ResourceTimeout if not all were granted within timeout
        seconds (for all of them together); then none is held.
        """
        wanted: dict[tuple[str, str], str] = {}
        for namespace, name, mode in requests:
            if mode not in MODES:
                raise ValueError(f"invalid resource mode {mode!r}")
            key = (namespace, name)
            if wanted.get(key) != EXCLUSIVE:
                wanted[key] = mode
        deadline = time.monotonic() + timeout
        held: list[tuple[str, str, str]] = []
        try:
            for key in sorted(wanted):
                self._acquire_one(key, wanted[key], timeout, deadline)
                held.append((key[0], key[1], wanted[key]))
        except BaseException:
            for namespace, name, mode in reversed(held):
                self._release_one((namespace, name), mode)
            raise
        log.debug("Acquired resources=%s", held)
        return Lease(self, held)

    def status(self, namespace: str, name: str) -> dict[str, int]:
        """How a resource is held now: {shared, exclusive, waiting}."""
        with self._lock:
            res = self._resources.get((namespace, name))
            if res is None:
                return {"shared": 0, "exclusive": 0, "waiting": 0}
            return {"shared": res.shared, "exclusive": int(res.exclusive),
                    "waiting": len(res.queue)}

    def _acquire_one(self, key: tuple[str, str], mode: str, timeout: float,
                     deadline: float) -> None:
        with self._lock:
            res = self._resources.get(key)
            if res is None:
                res = self._resources[key] = _Resource()
            if not res.queue and res.can_take(mode):
                res.take(mode)
                return
            waiter = _Waiter(mode)
            res.queue.append(waiter)
        log.debug("Waiting for resource namespace=%s name=%s mode=%s", key[0], key[1], mode)
        waiter.event.wait(max(0.0, deadline - time.monotonic()))
        with self._lock:
            if waiter.granted:
                return
            res.queue.remove(waiter)
            # A writer leaving the head may let readers behind it in.
            res.grant_waiters()
            if res.idle():
                del self._resources[key]
        log.warning("Timed out waiting for resource namespace=%s name=%s mode=%s timeout=%s",
                    key[0], key[1], mode, timeout)
        raise errors.ResourceTimeout(namespace=key[0], resource=key[1], mode=mode,
                                     timeout=timeout)

    def _release_one(self, key: tuple[str, str], mode: str) -> None:
        with self._lock:
            res = self._resources[key]
            if mode == SHARED:
                res.shared -= 1
            else:
                res.exclusive = False
            res.grant_waiters()
            if res.idle():
                del self._resources[key]


class Lease:
    """Resources held by one acquire(); release() (or leaving the with
    block) gives them back, in reverse order. Releasing twice is an error."""

    def __init__(self, manager: Manager, held: list[tuple[str, str, str]]) -> None:
        self._manager = manager
        self._held = held
        self._released = False

    @property
    def resources(self) -> list[tuple[str, str, str]]:
        return list(self._held)

    def release(self) -> None:
        if self._released:
            raise RuntimeError("resources already released")
        self._released = True
        for namespace, name, mode in reversed(self._held):
            self._manager._release_one((namespace, name), mode)
        log.debug("Released resources=%s", self._held)

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
