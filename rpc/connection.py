"""One client connection: non-blocking socket I/O, TLS, protocol detection.

A connection goes through these states, all driven by the event loop::

    HANDSHAKE --> DETECT --> OPEN --> CLOSING --> (LINGER) --> CLOSED
    (TLS only)    first bytes  a session speaks HTTP or STOMP over it

DETECT looks at the first bytes (after the TLS handshake): a STOMP client
frame's command line (``CONNECT``, ``STOMP``, ``SUBSCRIBE``, ``SEND``, ...) or
a leading EOL (a heart-beat) means STOMP, anything else HTTP. The session
then owns the bytes; the connection owns the socket, the output queue, the
deadlines of the states before and after the session, and the flow control:
it reads only while the session wants input, its output is below
:attr:`Limits.output_high_water`, and (for a session buffering more than
:attr:`Limits.small_input`) the server-wide :class:`Budget` of buffered
request bytes is not spent. CLOSING flushes what is queued; LINGER then
drains, for a short time, what a client still sends after being refused
(so that it reads the refusal instead of a reset).
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import logging
import math
import socket
import ssl
import time
from collections.abc import Callable
from typing import Protocol

from rpc import reactor, stomp

log = logging.getLogger("rpc.connection")

READ_SIZE = 64 * 1024
SEND_SIZE = 256 * 1024
LINGER_TIME = 2.0
DETECT_BYTES = 16


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one client may hold of the server; module defaults, no config."""

    max_connections: int = 512
    workers: int = 16
    max_request: int = 16 * 1024 * 1024  # an HTTP body or a STOMP frame body
    max_header: int = 64 * 1024  # HTTP request line and headers
    request_timeout: float = 10.0  # a request (or a frame) being sent
    handshake_timeout: float = 10.0
    idle_timeout: float = 300.0  # an HTTP keep-alive connection
    write_timeout: float = 60.0  # queued output that the client does not read
    max_inflight: int = 16  # STOMP requests running for one connection
    max_subscriptions: int = 100
    output_high_water: int = 1024 * 1024  # stop reading requests above this
    max_event_backlog: int = 32 * 1024 * 1024  # an event subscriber this far behind is dropped
    small_input: int = 64 * 1024  # buffered below this without asking the budget
    input_budget: int = 128 * 1024 * 1024  # all connections' buffered request bytes
    min_heartbeat: float = 0.1  # seconds


class State(enum.Enum):
    HANDSHAKE = "handshake"
    DETECT = "detect"
    OPEN = "open"
    CLOSING = "closing"
    LINGER = "linger"
    CLOSED = "closed"


class Session(Protocol):
    """A protocol spoken over an OPEN connection (rpc.http, rpc.stomp_session)."""

    def data_received(self, data: bytes) -> None: ...

    def eof(self) -> None: ...

    def wants_read(self) -> bool: ...

    def buffered(self) -> int: ...

    def busy(self) -> bool: ...

    def in_flight(self) -> bool: ...

    def deadline(self) -> float | None: ...

    def expire(self, now: float) -> None: ...

    def stop(self) -> None: ...

    def closed(self) -> None: ...


class Budget:
    """Request bytes buffered by all connections together (loop thread only)."""

    def __init__(self, loop: reactor.EventLoop, limit: int) -> None:
        self.loop = loop
        self.limit = limit
        self.used = 0
        self.waiting: set[Connection] = set()

    def available(self) -> bool:
        return self.used < self.limit

    def charge(self, delta: int) -> None:
        self.used += delta
        if delta < 0 and self.waiting and self.used < self.limit:
            waiting, self.waiting = self.waiting, set()
            for conn in waiting:
                self.loop.call_soon(conn.update)


def detect(data: bytes) -> str | None:
    """"stomp", "http", or None when more bytes are needed to tell."""
    if not data:
        return None
    if data[:1] in (b"\n", b"\r"):
        return "stomp"
    for command in stomp.OPENING_COMMANDS:
        for line in (command.encode() + b"\n", command.encode() + b"\r\n"):
            if data.startswith(line):
                return "stomp"
            if line.startswith(data):
                return None
    return "http"


class Connection:
    def __init__(
        self,
        sock: socket.socket,
        client: str,
        loop: reactor.EventLoop,
        limits: Limits,
        budget: Budget,
        make_session: Callable[[str, Connection], Session],
        on_close: Callable[[Connection], None],
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.client = client
        self.loop = loop
        self.limits = limits
        self.budget = budget
        self._make_session = make_session
        self._on_close = on_close
        self.session: Session | None = None
        now = time.monotonic()
        self.last_read = self.last_write = self.last_activity = self.last_input = now
        self._out: collections.deque[bytes] = collections.deque()
        self._out_offset = 0
        self.output_pending = 0
        self._write_progress = now
        self._in = bytearray()
        self._mask = 0
        self.reading = False
        self._want_write_for_read = False  # TLS: a read needs the socket writable
        self._want_read_for_write = False  # TLS: a write needs the socket readable
        self._charged = 0
        self._linger_after = False
        self.stopping = False
        sock.setblocking(False)
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if ssl_context is not None:
            self.sock: socket.socket = ssl_context.wrap_socket(
                sock, server_side=True, do_handshake_on_connect=False
            )
            self.state = State.HANDSHAKE
            self._handshake_mask = reactor.READ
            self.deadline: float | None = now + limits.handshake_timeout
        else:
            self.sock = sock
            self.state = State.DETECT
            self._handshake_mask = 0
            self.deadline = now + limits.request_timeout

    def __repr__(self) -> str:
        return f"<Connection client={self.client} state={self.state.value}>"

    # Events

    def on_event(self, mask: int) -> None:
        if self.state is State.HANDSHAKE:
            self._handshake()
        else:
            if mask & reactor.WRITE or (mask & reactor.READ and self._want_read_for_write):
                self._flush()
            if self.state is not State.CLOSED and (
                mask & reactor.READ or (mask & reactor.WRITE and self._want_write_for_read)
            ):
                self._read()
        self.update()

    def on_error(self, exc: BaseException) -> None:
        self.close(f"internal error: {exc}")

    def _handshake(self) -> None:
        assert isinstance(self.sock, ssl.SSLSocket)
        try:
            self.sock.do_handshake()
        except ssl.SSLWantReadError:
            self._handshake_mask = reactor.READ
            return
        except ssl.SSLWantWriteError:
            self._handshake_mask = reactor.WRITE
            return
        except (ssl.SSLError, OSError) as e:
            log.warning("TLS handshake failed client=%s: %s", self.client, e)
            self.close("TLS handshake failed")
            return
        self.state = State.DETECT
        self.deadline = time.monotonic() + self.limits.request_timeout
        self._read()

    def _read(self) -> None:
        self._want_write_for_read = False
        try:
            data = self.sock.recv(READ_SIZE)
            if data and isinstance(self.sock, ssl.SSLSocket):
                while self.sock.pending():
                    data += self.sock.recv(self.sock.pending())
        except (BlockingIOError, ssl.SSLWantReadError):
            return
        except ssl.SSLWantWriteError:
            self._want_write_for_read = True
            return
        except OSError as e:
            self.close(f"read failed: {e}")
            return
        now = time.monotonic()
        if not data:
            self._eof()
            return
        self.last_read = self.last_activity = self.last_input = now
        if self.state is State.LINGER:
            return  # Discarded: the client was refused.
        if self.state is State.DETECT:
            self._in += data
            kind = detect(bytes(self._in[:DETECT_BYTES]))
            if kind is None and len(self._in) < DETECT_BYTES:
                return
            self.state = State.OPEN
            self.deadline = None
            data, self._in = bytes(self._in), bytearray()
            self.session = self._make_session(kind or "http", self)
            self.session.data_received(data)
            if self.stopping and self.state is State.OPEN:
                self.session.stop()
        elif self.session is not None and self.state is State.OPEN:
            self.session.data_received(data)

    def _eof(self) -> None:
        if self.state is State.OPEN and self.session is not None:
            self.session.eof()
        else:
            self.close("peer closed")

    # Output

    def write(self, data: bytes) -> None:
        """Queue data for the client and send what the socket takes now."""
        if self.state is State.CLOSED or not data:
            return
        if not self._out:
            self._write_progress = time.monotonic()
        self._out.append(data)
        self.output_pending += len(data)
        self._flush()

    def _flush(self) -> None:
        self._want_read_for_write = False
        while self._out:
            chunk = self._out[0]
            view = memoryview(chunk)[self._out_offset : self._out_offset + SEND_SIZE]
            try:
                sent = self.sock.send(view)
            except (BlockingIOError, ssl.SSLWantWriteError):
                break
            except ssl.SSLWantReadError:
                self._want_read_for_write = True
                break
            except OSError as e:
                self.close(f"write failed: {e}")
                return
            now = time.monotonic()
            self.last_write = self.last_activity = self._write_progress = now
            self.output_pending -= sent
            self._out_offset += sent
            if self._out_offset >= len(chunk):
                self._out.popleft()
                self._out_offset = 0
        if not self._out and self.state is State.CLOSING:
            self._closing_flushed()

    # Closing

    def close_after_flush(self, linger: bool = False) -> None:
        """Send what is queued, then close (after a linger when input may be pending)."""
        if self.state in (State.CLOSING, State.LINGER, State.CLOSED):
            return
        self.state = State.CLOSING
        self._linger_after = linger
        self.deadline = time.monotonic() + self.limits.request_timeout
        if not self._out:
            self._closing_flushed()
        self.update()

    def _closing_flushed(self) -> None:
        if not self._linger_after:
            self.close("closed after reply")
            return
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self.close("closed after reply")
            return
        self.state = State.LINGER
        self.deadline = time.monotonic() + LINGER_TIME

    def close(self, reason: str) -> None:
        if self.state is State.CLOSED:
            return
        log.debug("Closing connection client=%s: %s", self.client, reason)
        self.state = State.CLOSED
        if self._mask:
            self.loop.selector.unregister(self.sock)
            self._mask = 0
        try:
            self.sock.close()
        except OSError:
            pass
        self._out.clear()
        self.output_pending = 0
        self.budget.waiting.discard(self)
        if self._charged:
            self.budget.charge(-self._charged)
            self._charged = 0
        if self.session is not None:
            self.session.closed()
        self._on_close(self)

    # Flow control and deadlines

    def wants_read(self) -> bool:
        if self.state in (State.DETECT, State.LINGER):
            return True
        if self.state is not State.OPEN or self.session is None:
            return False
        if not self.session.wants_read() or self.output_pending > self.limits.output_high_water:
            return False
        if self.session.buffered() >= self.limits.small_input and not self.budget.available():
            self.budget.waiting.add(self)
            return False
        return True

    def update(self) -> None:
        """Re-evaluate what to wait for, the budget charge and the next deadline."""
        if self.state is State.CLOSED:
            return
        if self.state is State.HANDSHAKE:
            mask = self._handshake_mask
        else:
            reading = self.wants_read()
            if reading and not self.reading:
                self.last_input = time.monotonic()
            self.reading = reading
            mask = reactor.READ if reading or self._want_read_for_write else 0
            if self._out or self._want_write_for_read:
                mask |= reactor.WRITE
        if mask != self._mask:
            if not self._mask:
                self.loop.selector.register(self.sock, mask, self)
            elif not mask:
                self.loop.selector.unregister(self.sock)
            else:
                self.loop.selector.modify(self.sock, mask, self)
            self._mask = mask
        charge = self.session.buffered() if self.session is not None else len(self._in)
        if charge != self._charged:
            self.budget.charge(charge - self._charged)
            self._charged = charge
        deadline = self.next_deadline()
        if deadline is not None:
            self.loop.schedule(deadline)

    def next_deadline(self) -> float | None:
        deadlines = []
        if self.state is State.OPEN and self.session is not None:
            deadlines.append(self.session.deadline())
        else:
            deadlines.append(self.deadline)
        if self._out:
            deadlines.append(self._write_progress + self.limits.write_timeout)
        times = [d for d in deadlines if d is not None]
        return min(times) if times else None

    def check(self, now: float) -> None:
        """Housekeeping: act on a deadline that has passed."""
        if self.state is State.CLOSED:
            return
        if self._out and now >= self._write_progress + self.limits.write_timeout:
            self.close(f"client read nothing for {self.limits.write_timeout:.0f}s")
        elif self.state is State.OPEN and self.session is not None:
            deadline = self.session.deadline()
            if deadline is not None and now >= deadline:
                self.session.expire(now)
        elif self.deadline is not None and now >= self.deadline:
            self.close(f"timed out in state {self.state.value}")
        self.update()

    def idle_since(self) -> float:
        """For eviction: when this connection last did anything (inf if serving)."""
        if self.session is not None and self.session.in_flight():
            return math.inf
        return self.last_activity

    def stop(self) -> None:
        """The server is stopping: finish what is in flight, close the rest."""
        self.stopping = True
        if self.state is State.OPEN and self.session is not None:
            self.session.stop()
        elif self.state is State.DETECT and self._in:
            pass  # A request is arriving; its deadline bounds the wait.
        elif self.state in (State.HANDSHAKE, State.DETECT):
            self.close("server stopping")
        self.update()
