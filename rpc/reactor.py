"""The event loop of the RPC server: one thread doing all socket I/O, plus a
bounded pool of worker threads running the requests.

Everything that touches a socket or a connection's state runs in the loop's
thread. Other threads talk to it only through :meth:`EventLoop.call_soon`
(a callback queue and a wake-up pipe); a request runs in the pool through
:meth:`EventLoop.submit`, whose completion callback again runs in the loop.

Time-outs are checked by one *housekeeping* callback (the server's), run when
the earliest deadline any connection asked for (:meth:`EventLoop.schedule`)
has come, and never more often than every :data:`TICK` seconds: deadlines
may fire up to a tick late, and a loop with no deadline does not wake up.
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import math
import os
import selectors
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

log = logging.getLogger("rpc.reactor")

TICK = 0.05

READ = selectors.EVENT_READ
WRITE = selectors.EVENT_WRITE

# A request's completion, called in the loop: done(result, error).
Done = Callable[[Any, "BaseException | None"], None]


class Handler(Protocol):
    def on_event(self, mask: int) -> None: ...

    def on_error(self, exc: BaseException) -> None: ...


class EventLoop:
    def __init__(self, workers: int, name: str = "rpc") -> None:
        self.name = name
        self.selector = selectors.DefaultSelector()
        self.pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=workers, thread_name_prefix=f"{name}-worker"
        )
        self.housekeeping: Callable[[float], float | None] = lambda now: None
        self._callbacks: collections.deque[tuple[Callable[..., Any], tuple[Any, ...]]] = (
            collections.deque()
        )
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._woken = False
        self.selector.register(self._wake_r, READ, None)
        self._next_pass = math.inf
        self._last_pass = 0.0
        self._stopping = False
        self._thread: threading.Thread | None = None

    # Any thread

    def call_soon(self, func: Callable[..., Any], *args: Any) -> None:
        """Run func(*args) in the loop's thread, soon."""
        self._callbacks.append((func, args))
        if not self._woken:
            self._woken = True
            try:
                os.write(self._wake_w, b"x")
            except BlockingIOError:
                pass  # The pipe is full of wake-ups already.

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Stop the loop (after the callbacks queued so far) and the workers."""
        if self._thread is None:
            return
        self.call_soon(self._set_stopping)
        self._thread.join()
        self._thread = None
        self.pool.shutdown(wait=True)
        self.selector.close()
        os.close(self._wake_r)
        os.close(self._wake_w)

    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def in_loop(self) -> bool:
        return self._thread is not None and threading.current_thread() is self._thread

    # Loop thread

    def submit(self, func: Callable[[Any], Any], arg: Any, done: Done) -> None:
        """Run func(arg) in a worker; then done(result, error) in the loop."""
        self.pool.submit(self._work, func, arg, done)

    def _work(self, func: Callable[[Any], Any], arg: Any, done: Done) -> None:
        try:
            result = func(arg)
        except BaseException as e:  # noqa: BLE001 (handed to the loop, which logs it)
            self.call_soon(done, None, e)
            return
        self.call_soon(done, result, None)

    def schedule(self, when: float) -> None:
        """Ask for a housekeeping pass at `when` (monotonic) at the latest."""
        if when < self._next_pass:
            self._next_pass = when

    def _set_stopping(self) -> None:
        self._stopping = True

    def _run(self) -> None:
        while not self._stopping:
            due = max(self._next_pass, self._last_pass + TICK)
            timeout = None if due == math.inf else max(0.0, due - time.monotonic())
            if self._callbacks:
                timeout = 0
            for key, mask in self.selector.select(timeout):
                handler = key.data
                if handler is None:
                    self._drain_wakeups()
                    continue
                self._dispatch(handler, mask)
            self._run_callbacks()
            now = time.monotonic()
            if now >= due:
                self._last_pass = now
                self._next_pass = math.inf
                try:
                    nxt = self.housekeeping(now)
                except Exception:
                    log.exception("Housekeeping failed")
                    nxt = now + 1.0
                if nxt is not None:
                    self.schedule(nxt)

    def _dispatch(self, handler: Handler, mask: int) -> None:
        try:
            handler.on_event(mask)
        except Exception as e:
            log.exception("Error handling events of %s", handler)
            handler.on_error(e)

    def _drain_wakeups(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass
        self._woken = False

    def _run_callbacks(self) -> None:
        if self._woken:
            self._drain_wakeups()
        for _ in range(len(self._callbacks)):
            func, args = self._callbacks.popleft()
            try:
                func(*args)
            except Exception:
                log.exception("Error in callback %s", func)
