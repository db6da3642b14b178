"""Watching the SPM lease while this host is SPM.

A host that loses its SPM lease must stop acting as SPM at once: another
host may take the lease and start changing the same volumes.  The lease
can be lost without this daemon doing anything:

- the sanlock daemon goes away (crash, kill): the registration socket the
  lease is held through hangs up (:meth:`ClusterLock.watch_fd`, polled for
  ``POLLRDHUP``/``POLLHUP`` only, so the replies of calls made on the same
  socket by other threads are never read here);
- sanlock revokes or drops the lease (a lockspace failure): every
  ``interval`` seconds (the io_timeout) :meth:`ClusterLock.held` asks
  sanlock whether it still lists the lease as held by this process.

Either way :class:`LeaseMonitor` calls ``on_lost(reason)`` once, from its
own thread, and ends.  ``stop()`` (spmStop, shutdown) ends it without a
call.  With the local lock nothing can revoke the lease; the periodic
check then only confirms it.
"""

from __future__ import annotations

import logging
import os
import select
import threading
from collections.abc import Callable
from typing import Protocol

log = logging.getLogger("storage.lease_monitor")

STOP_TIMEOUT = 10.0
_HANGUP = select.POLLRDHUP | select.POLLHUP | select.POLLERR | select.POLLNVAL


class Lease(Protocol):
    name: str

    def held(self) -> bool: ...

    def watch_fd(self) -> int | None: ...


class LeaseMonitor:
    """Calls on_lost(reason) once if lease is lost; see the module doc."""

    def __init__(
        self, lease: Lease, interval: float, on_lost: Callable[[str], None], name: str = "lease"
    ) -> None:
        self.lease = lease
        self.interval = interval
        self.on_lost = on_lost
        self.name = name
        self._stopped = threading.Event()
        self._wake_r, self._wake_w = os.pipe()
        self._pipe_lock = threading.Lock()
        self._pipe_open = True
        self._thread = threading.Thread(target=self._run, name=f"lease/{name}", daemon=True)

    def start(self) -> LeaseMonitor:
        self._thread.start()
        log.info("Monitoring SPM lease %s lock=%s interval=%.1fs watch_fd=%s",
                 self.name, self.lease.name, self.interval, self.lease.watch_fd())
        return self

    def stop(self) -> None:
        """End monitoring (no on_lost call after this returns, unless it was
        already running)."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        with self._pipe_lock:
            if self._pipe_open:
                os.write(self._wake_w, b"x")
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(STOP_TIMEOUT)
        log.info("Stopped monitoring SPM lease %s", self.name)

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def _run(self) -> None:
        try:
            reason = self._watch()
            if reason is not None and not self._stopped.is_set():
                log.critical("SPM lease %s lost: %s", self.name, reason)
                try:
                    self.on_lost(reason)
                except Exception:
                    log.exception("Error handling the loss of SPM lease %s", self.name)
        finally:
            with self._pipe_lock:
                self._pipe_open = False
                os.close(self._wake_r)
                os.close(self._wake_w)

    def _watch(self) -> str | None:
        """The reason the lease was lost, or None once stopped."""
        poller = select.poll()
        poller.register(self._wake_r, select.POLLIN)
        fd = self.lease.watch_fd()
        if fd is not None:
            poller.register(fd, select.POLLRDHUP)
        while not self._stopped.is_set():
            events = poller.poll(self.interval * 1000)
            if self._stopped.is_set():
                return None
            for ready, mask in events:
                if ready == fd and mask & _HANGUP:
                    return (f"the sanlock daemon closed this process's registration "
                            f"(events 0x{mask:x}): sanlock stopped or crashed")
            if not self.lease.held():
                return "the lock no longer lists the lease as held by this process"
        return None
