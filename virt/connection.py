"""One libvirt connection that survives libvirtd restarts, and the event loop.

libvirt delivers domain events through an event loop implementation that must
be registered before the first connection is opened;
:func:`start_event_loop` registers libvirt's default implementation once per
process and runs it in one daemon thread.

:class:`Connection` owns one ``virConnect``. It opens it at :meth:`open`,
registers the domain event callbacks the daemon needs (lifecycle,
IO_ERROR_REASON, BLOCK_JOB_2, BLOCK_THRESHOLD) on every (re)connect, and
re-opens it when libvirtd goes away: the close callback (keepalive or EOF)
starts a reconnect thread that retries until libvirtd answers again, then
calls ``on_reconnect`` so the owner can re-read what it missed. Calls made
through :meth:`call` that fail because the connection broke
(VIR_ERR_SYSTEM_ERROR / VIR_ERR_INTERNAL_ERROR "client socket is closed")
reconnect and are retried once.

**Riding out a libvirtd restart.**  While libvirtd does not answer, a call
waits for it, up to ``unavailable_wait`` seconds (:data:`UNAVAILABLE_WAIT`),
trying to connect again every ``reconnect_interval``; only then does it
raise LibvirtUnavailableError.  Nothing is run twice by this: the wait is
before ``fn`` runs (a connection that cannot be opened ran nothing).  Two
kinds of caller never wait: the event loop thread (it must not block), and
code inside ``with connection.impatient():`` (``VM.getStats`` answers what
it knows at once, virt/vm.py).  A call that had to wait goes on only once
``on_reconnect`` has re-read what was missed (bounded by the same wait):
it never acts on the state of before the restart.

Events are handed to ``dispatch(kind, vm_id, args)`` in the event loop
thread, where kind is one of :data:`EVENT_KINDS`; a dispatcher must not block.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import libvirt

from virt import errors

log = logging.getLogger("virt.connection")

T = TypeVar("T")

LIFECYCLE = "lifecycle"
IO_ERROR = "io_error"
BLOCK_JOB = "block_job"
BLOCK_THRESHOLD = "block_threshold"
EVENT_KINDS = (LIFECYCLE, IO_ERROR, BLOCK_JOB, BLOCK_THRESHOLD)

Dispatch = Callable[[str, str, tuple[Any, ...]], None]

# Errors that mean "the connection is gone", as VDSM's libvirtconnection
# classifies them.
_DISCONNECT_DOMAINS = (libvirt.VIR_FROM_REMOTE, libvirt.VIR_FROM_RPC)
_DISCONNECT_CODES = (
    libvirt.VIR_ERR_SYSTEM_ERROR,
    libvirt.VIR_ERR_INTERNAL_ERROR,
    libvirt.VIR_ERR_NO_CONNECT,
    libvirt.VIR_ERR_INVALID_CONN,
)

KEEPALIVE_INTERVAL = 5
KEEPALIVE_COUNT = 3

# How long a call waits for libvirtd to answer again (a restart) before it
# raises LibvirtUnavailableError.
UNAVAILABLE_WAIT = 30.0

_loop_lock = threading.Lock()
_loop_thread: threading.Thread | None = None
_local = threading.local()


def start_event_loop() -> None:
    """Register libvirt's default event loop and run it in a daemon thread.

    Idempotent; must run before the first connection is opened (Connection.open
    calls it).
    """
    global _loop_thread
    with _loop_lock:
        if _loop_thread is not None:
            return
        # libvirt prints every error on stderr unless a handler is set; we
        # report errors through exceptions and logs instead.
        libvirt.registerErrorHandler(_ignore_error, None)
        libvirt.virEventRegisterDefaultImpl()
        _loop_thread = threading.Thread(target=_run_loop, name="libvirt-events", daemon=True)
        _loop_thread.start()
        log.info("Started libvirt event loop")


def _ignore_error(ctx: Any, err: Any) -> None:
    pass


def _run_loop() -> None:
    while True:
        try:
            libvirt.virEventRunDefaultImpl()
        except Exception:
            log.exception("libvirt event loop iteration failed")
            time.sleep(0.1)


def in_event_loop() -> bool:
    """Whether this thread runs libvirt's event loop (it must never block)."""
    return _loop_thread is not None and threading.current_thread() is _loop_thread


@contextlib.contextmanager
def impatient() -> Iterator[None]:
    """Calls made in this block (this thread) do not wait for libvirtd."""
    before = getattr(_local, "impatient", False)
    _local.impatient = True
    try:
        yield
    finally:
        _local.impatient = before


def may_wait() -> bool:
    """Whether a call in this thread may wait for libvirtd to come back."""
    return not in_event_loop() and not getattr(_local, "impatient", False)


def is_disconnect(e: libvirt.libvirtError) -> bool:
    """Whether e means the connection to libvirtd is broken."""
    return e.get_error_domain() in _DISCONNECT_DOMAINS and e.get_error_code() in _DISCONNECT_CODES


def version_string(n: int) -> str:
    """libvirt's packed version number (major * 1e6 + minor * 1e3 + micro) as text."""
    return f"{n // 1000000}.{n // 1000 % 1000}.{n % 1000}"


class Connection:
    def __init__(
        self,
        uri: str = "qemu:///system",
        dispatch: Dispatch | None = None,
        on_reconnect: Callable[[], None] | None = None,
        reconnect_interval: float = 0.5,
        max_reconnect_interval: float = 5.0,
        unavailable_wait: float = UNAVAILABLE_WAIT,
    ) -> None:
        self.uri = uri
        self.unavailable_wait = unavailable_wait
        self._dispatch = dispatch
        self._on_reconnect = on_reconnect
        self._reconnect_interval = reconnect_interval
        self._max_reconnect_interval = max_reconnect_interval
        # Held while opening or closing the connection; never taken in an
        # event callback.
        self._lock = threading.Lock()
        self._thread_lock = threading.Lock()
        self._conn: libvirt.virConnect | None = None
        self._callback_ids: list[int] = []
        self._closed = False
        self._reconnect_thread: threading.Thread | None = None
        # Clear from a reconnect until on_reconnect returned.
        self._resynced = threading.Event()
        self._resynced.set()
        # Number of connections opened so far; tests and callers can see a
        # reconnect happened.
        self.generation = 0

    # Public interface

    def open(self) -> None:
        """Open the connection now; raise LibvirtUnavailableError if libvirtd does not answer."""
        start_event_loop()
        with self._lock:
            self._closed = False
            if self._conn is None:
                self._open_locked()
        self._resynced.set()  # the owner reads what it needs after open()

    def close(self) -> None:
        """Close the connection and stop reconnecting."""
        with self._lock:
            self._closed = True
            conn, self._conn = self._conn, None
            if conn is not None:
                self._release(conn)
        log.info("Closed libvirt connection uri=%s", self.uri)

    def get(self) -> libvirt.virConnect:
        """The live connection, re-opened first if it broke."""
        reopened = False
        with self._lock:
            if self._closed:
                raise errors.LibvirtUnavailableError("connection closed", uri=self.uri)
            conn = self._conn
            if conn is None or not _alive(conn):
                if conn is not None:
                    self._conn = None
                    self._release(conn)
                conn = self._open_locked()
                reopened = self.generation > 1
        if reopened:
            self._notify_reconnect()
        return conn

    def call(self, fn: Callable[[libvirt.virConnect], T], retry: bool = True) -> T:
        """fn(connection), retried once on a fresh connection if this one broke.

        Pass retry=False for calls that must not run twice (creating a
        domain, taking a snapshot): a connection that breaks under fn then
        raises LibvirtUnavailableError.  Either way, a connection that cannot
        be opened is waited for first (see the module's doc: nothing ran).
        """
        conn = self._get_waiting()
        try:
            return fn(conn)
        except libvirt.libvirtError as e:
            if not is_disconnect(e):
                raise
            log.warning("libvirt connection broken uri=%s error=%s", self.uri, e)
            self._drop(conn)
            if not retry:
                raise errors.LibvirtUnavailableError(str(e), uri=self.uri) from e
        return fn(self._get_waiting())

    def _get_waiting(self) -> libvirt.virConnect:
        """get(), waiting up to unavailable_wait for libvirtd when it does not answer."""
        deadline = 0.0
        while True:
            try:
                conn = self.get()
            except errors.LibvirtUnavailableError:
                if self._closed or not may_wait():
                    raise
                now = time.monotonic()
                if not deadline:
                    deadline = now + self.unavailable_wait
                    log.warning("libvirtd does not answer uri=%s: waiting up to %.0fs",
                                self.uri, self.unavailable_wait)
                if now >= deadline:
                    raise
            else:
                if deadline and not getattr(_local, "resyncing", False):
                    # It waited for libvirtd: not before the re-read of the reconnect.
                    self._resynced.wait(max(0.0, deadline - time.monotonic()))
                return conn
            time.sleep(self._reconnect_interval)

    def lookup(self, vm_id: str) -> libvirt.virDomain:
        """The running domain vm_id (raises libvirtError VIR_ERR_NO_DOMAIN)."""
        return self.call(lambda c: c.lookupByUUIDString(vm_id))

    def libvirt_version(self) -> str:
        """Version of the libvirt daemon, e.g. "9.0.0"."""
        return version_string(self.call(lambda c: c.getLibVersion()))

    def qemu_version(self) -> str:
        """Version of the hypervisor (QEMU) libvirt drives, e.g. "7.2.22"."""
        return version_string(self.call(lambda c: c.getVersion()))

    def wait_connected(self, generation: int, timeout: float) -> bool:
        """Wait until a connection newer than generation is open."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if self.generation > generation and self._conn is not None:
                    return True
            time.sleep(0.1)
        return False

    # Opening and closing (callers hold self._lock)

    def _open_locked(self) -> libvirt.virConnect:
        start_event_loop()
        try:
            conn = libvirt.open(self.uri)
        except libvirt.libvirtError as e:
            raise errors.LibvirtUnavailableError(str(e), uri=self.uri) from e
        try:
            conn.setKeepAlive(KEEPALIVE_INTERVAL, KEEPALIVE_COUNT)
            conn.registerCloseCallback(self._on_close, None)
            self._callback_ids = self._register_events(conn)
        except libvirt.libvirtError as e:
            _quiet_close(conn)
            raise errors.LibvirtUnavailableError(str(e), uri=self.uri) from e
        self._conn = conn
        self.generation += 1
        if self.generation > 1 and self._on_reconnect is not None:
            self._resynced.clear()
        log.info("Connected to libvirt uri=%s generation=%d", self.uri, self.generation)
        return conn

    def _register_events(self, conn: libvirt.virConnect) -> list[int]:
        callbacks = (
            (libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._on_lifecycle),
            (libvirt.VIR_DOMAIN_EVENT_ID_IO_ERROR_REASON, self._on_io_error),
            (libvirt.VIR_DOMAIN_EVENT_ID_BLOCK_JOB_2, self._on_block_job),
            (libvirt.VIR_DOMAIN_EVENT_ID_BLOCK_THRESHOLD, self._on_block_threshold),
        )
        return [conn.domainEventRegisterAny(None, ev, cb, None) for ev, cb in callbacks]

    def _release(self, conn: libvirt.virConnect) -> None:
        """Forget conn's callbacks and close it; it may be dead already."""
        for cb_id in self._callback_ids:
            try:
                conn.domainEventDeregisterAny(cb_id)
            except libvirt.libvirtError:
                pass
        self._callback_ids = []
        try:
            conn.unregisterCloseCallback()
        except libvirt.libvirtError:
            pass
        _quiet_close(conn)

    def _drop(self, conn: libvirt.virConnect) -> None:
        with self._lock:
            if self._conn is conn:
                self._conn = None
                self._release(conn)
        self._start_reconnect()

    # Reconnecting

    def _on_close(self, conn: libvirt.virConnect, reason: int, opaque: Any) -> None:
        # Runs in the event loop thread while libvirt holds the connection's
        # close-callback lock: taking self._lock here could deadlock with a
        # thread that holds it and unregisters this callback. Only hand the
        # reconnect to its own thread.
        log.warning("libvirt connection closed uri=%s reason=%d", self.uri, reason)
        self._start_reconnect()

    def _start_reconnect(self) -> None:
        with self._thread_lock:
            if self._closed:
                return
            if self._reconnect_thread is not None and self._reconnect_thread.is_alive():
                return
            self._reconnect_thread = threading.Thread(
                target=self._reconnect_loop, name="libvirt-reconnect", daemon=True
            )
            self._reconnect_thread.start()

    def _reconnect_loop(self) -> None:
        delay = self._reconnect_interval
        while True:
            with self._lock:
                if self._closed:
                    return
                conn = self._conn
                if conn is not None and _alive(conn):
                    return
                if conn is not None:
                    self._conn = None
                    self._release(conn)
                try:
                    self._open_locked()
                except errors.LibvirtUnavailableError as e:
                    log.debug("Reconnect to libvirt failed uri=%s error=%s", self.uri, e)
                else:
                    break
            time.sleep(delay)
            delay = min(delay * 2, self._max_reconnect_interval)
        self._notify_reconnect()

    def _notify_reconnect(self) -> None:
        if self._on_reconnect is None:
            return
        _local.resyncing = True  # its own calls do not wait for it
        try:
            self._on_reconnect()
        except Exception:
            log.exception("Reconnect handler failed uri=%s", self.uri)
        finally:
            _local.resyncing = False
            self._resynced.set()

    # Event callbacks (event loop thread)

    def _on_lifecycle(self, conn: Any, dom: Any, event: int, detail: int, opaque: Any) -> None:
        self._emit(LIFECYCLE, dom, event, detail)

    def _on_io_error(
        self,
        conn: Any,
        dom: Any,
        src_path: str,
        dev_alias: str,
        action: int,
        reason: str,
        opaque: Any,
    ) -> None:
        self._emit(IO_ERROR, dom, src_path, dev_alias, action, reason)

    def _on_block_job(
        self, conn: Any, dom: Any, disk: str, job_type: int, status: int, opaque: Any
    ) -> None:
        self._emit(BLOCK_JOB, dom, disk, job_type, status)

    def _on_block_threshold(
        self, conn: Any, dom: Any, dev: str, path: str, threshold: int, excess: int, opaque: Any
    ) -> None:
        self._emit(BLOCK_THRESHOLD, dom, dev, path, threshold, excess)

    def _emit(self, kind: str, dom: libvirt.virDomain, *args: Any) -> None:
        if self._dispatch is None:
            return
        try:
            vm_id = dom.UUIDString()
            self._dispatch(kind, vm_id, args)
        except Exception:
            log.exception("Dispatching libvirt event kind=%s failed", kind)


def _alive(conn: libvirt.virConnect) -> bool:
    try:
        return bool(conn.isAlive())
    except libvirt.libvirtError:
        return False


def _quiet_close(conn: libvirt.virConnect) -> None:
    try:
        conn.close()
    except libvirt.libvirtError:
        pass
