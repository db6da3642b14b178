"""The RPC server: JSON-RPC 2.0 over HTTP and over STOMP 1.2 on the same listeners.

One :class:`Server` serves any number of listeners (TCP, optionally mutual
TLS, and AF_UNIX) with one event loop thread (:mod:`rpc.reactor`, on
``selectors``/epoll) for all socket I/O and a pool of
:attr:`Limits.workers` threads running the requests. Each connection
(:mod:`rpc.connection`) is told apart by its first bytes, after the TLS
handshake: STOMP (:mod:`rpc.stomp_session`, VDSM's wire protocol) or HTTP
``POST /`` (:mod:`rpc.http`); both hand request bodies to the same
:class:`rpc.jsonrpc.Protocol`.

Why an event loop and not a bounded pool of connection threads: a thread
per connection is what a STOMP client needs for as long as it stays
connected (the engine stays for days), and what a stalled client holds until
a time-out; with a bounded pool the cap on threads becomes a cap on clients,
reached by the first few stalled or idle ones. Measured on a 2-core machine,
the old thread-per-connection server (jsonrpclib-pelix) against this one:
300 clients sending half a request line and stalling held 305 daemon threads
(1,000 held 1,005, RSS 45 -> 74 MiB); now the daemon keeps its idle 5
threads (1,000 stalled: RSS +2 MiB), a healthy client is answered meanwhile
in 2 ms, and past the connection cap stalled ones are closed to make room. The GIL
makes a thread per connection no faster either: in back-to-back runs of
``contrib/bench/bench_rpc.py`` ``Host.ping2`` over the unix socket went
from 6,300 to 6,900 req/s with one HTTP client and from 5,900 to 9,200 with
eight (keep-alive now works), and over STOMP it serves 20,700 and 26,100.

Limits (:class:`rpc.connection.Limits`; module defaults, no configuration):

- at most :attr:`~Limits.max_connections` connections. When a new one would
  pass the cap, the connection that has been idle the longest (no request
  running; a stalled half-request counts as idle since its last byte) is
  closed to make room: a hostile client cannot lock healthy ones out by
  holding connections, and the idle one's client reconnects if it is alive.
  Only when every connection is running a request is the new one refused.
- a request (HTTP headers and body, or a STOMP frame) must arrive within
  :attr:`~Limits.request_timeout` of its first byte, a TLS handshake within
  :attr:`~Limits.handshake_timeout`, the first bytes within the request
  time-out of accepting; a keep-alive HTTP connection idle for
  :attr:`~Limits.idle_timeout` is closed (STOMP ones stay, as with VDSM).
- a body or frame larger than :attr:`~Limits.max_request` is refused from
  its declared length, before it is read: HTTP 413 with a JSON-RPC error,
  STOMP ``ERROR``; headers are bounded by :attr:`~Limits.max_header` (HTTP: h11 applies it
  to what is still incomplete, so a block sent at once may reach it plus one
  read).
- buffered input is bounded per connection by the above and for all of them
  together by :attr:`~Limits.input_budget` (connections buffering a large
  body wait, unread, while it is spent); output by flow control (a
  connection is not read while its client does not read its answers) and by
  :attr:`~Limits.write_timeout`; an event subscriber more than
  :attr:`~Limits.max_event_backlog` behind is disconnected.

Stopping a listener (SIGTERM) stops accepting, closes its idle connections
at once and the others as soon as the request they are sending (HTTP) or
running is answered; a STOMP frame still arriving is dropped.
"""

from __future__ import annotations

import logging
import math
import socket
import ssl
import threading
import time
from typing import Any

from rpc import connection, http, jsonrpc, reactor, stomp_session
from rpc import listener as listener_mod

log = logging.getLogger("rpc.server")

Protocol = jsonrpc.Protocol
Limits = connection.Limits
Listener = listener_mod.Listener

_REFUSAL_LOG_INTERVAL = 10.0


class Server:
    """One event loop, one worker pool and one event broker for its listeners."""

    def __init__(
        self, protocol: jsonrpc.Protocol, limits: Limits | None = None, name: str = "rpc"
    ) -> None:
        self.protocol = protocol
        self.limits = limits or Limits()
        self.loop = reactor.EventLoop(self.limits.workers, name)
        self.loop.housekeeping = self._housekeeping
        self.budget = connection.Budget(self.loop, self.limits.input_budget)
        self.broker = stomp_session.Broker()
        self._listeners: list[Listener] = []
        self._conns: dict[connection.Connection, Listener] = {}
        self._stopping: dict[Listener, threading.Event] = {}
        self._lock = threading.Lock()
        self._started = False
        self._active = 0
        self._last_refusal_log = -math.inf
        self._refusals = 0

    # Listeners

    def tcp_listener(
        self, host: str, port: int, ssl_context: ssl.SSLContext | None = None
    ) -> Listener:
        sock = listener_mod.bind_tcp(host, port)
        return Listener(self, sock, "tls" if ssl_context else "tcp", ssl_context)

    def unix_listener(self, path: str, mode: int = 0o660) -> Listener:
        return Listener(self, listener_mod.bind_unix(path, mode), "unix", unix_path=path)

    def start_listener(self, listener: Listener) -> None:
        with self._lock:
            if not self._started:
                self.loop.start()
                self._started = True
            self._active += 1
        self.loop.call_soon(self._attach, listener)

    def stop_listener(self, listener: Listener) -> None:
        done = threading.Event()
        self.loop.call_soon(self._begin_stop, listener, done)
        while not done.wait(1.0):
            if not self.loop.running():
                log.error("The event loop of %s died; stopping anyway", listener)
                break
        with self._lock:
            self._active -= 1
            if self._active == 0 and self._started:
                self.loop.stop()
                self._started = False

    # Events

    def publish(self, method: str, params: Any, destination: str = stomp_session.EVENTS) -> None:
        """Push a JSON-RPC notification to every subscriber of destination (any thread).

        As VDSM does, a dict of params gets ``notify_time`` (monotonic ms)
        unless it has one.
        """
        if not self._started:
            return
        if isinstance(params, dict) and "notify_time" not in params:
            params = {**params, "notify_time": int(time.monotonic() * 1000)}
        body = jsonrpc.notification(method, params).encode("utf-8")
        self.loop.call_soon(self.broker.deliver, destination, body)

    # For tests and diagnostics

    def call(self, func: Any, *args: Any, timeout: float = 10.0) -> Any:
        """Run func(*args) in the loop's thread and answer its result."""
        result: list[Any] = []
        done = threading.Event()

        def run() -> None:
            try:
                result.append(func(*args))
            finally:
                done.set()

        self.loop.call_soon(run)
        if not done.wait(timeout):
            raise TimeoutError("the event loop did not answer")
        return result[0] if result else None

    def connection_count(self) -> int:
        return int(self.call(len, self._conns))

    def stats(self) -> dict[str, int]:
        """Connections, buffered request bytes and the largest queued output."""

        def collect() -> dict[str, int]:
            outputs = [conn.output_pending for conn in self._conns]
            return {
                "connections": len(self._conns),
                "buffered_input": self.budget.used,
                "max_output": max(outputs, default=0),
            }

        result: dict[str, int] = self.call(collect)
        return result

    # Loop thread

    def _attach(self, listener: Listener) -> None:
        listener.attach(self.loop)
        self._listeners.append(listener)

    def _begin_stop(self, listener: Listener, done: threading.Event) -> None:
        if listener in self._listeners:
            self._listeners.remove(listener)
            listener.detach()
        self._stopping[listener] = done
        for conn, owner in list(self._conns.items()):
            if owner is listener:
                conn.stop()
        self._check_stopped(listener)

    def _check_stopped(self, listener: Listener) -> None:
        if listener in self._stopping and listener not in self._conns.values():
            self._stopping.pop(listener).set()

    def accepted(self, listener: Listener, sock: socket.socket, client: str) -> None:
        if len(self._conns) >= self.limits.max_connections and not self._make_room(client):
            sock.close()
            return
        try:
            conn = connection.Connection(
                sock, client, self.loop, self.limits, self.budget, self._make_session,
                self._forget, listener.ssl_context,
            )
        except (OSError, ssl.SSLError) as e:
            log.warning("Cannot set up connection client=%s: %s", client, e)
            sock.close()
            return
        self._conns[conn] = listener
        log.debug("Accepted connection client=%s listener=%s", client, listener.name)
        conn.update()

    def _make_room(self, client: str) -> bool:
        victim = min(self._conns, key=connection.Connection.idle_since)
        idle_since = victim.idle_since()
        now = time.monotonic()
        self._refusals += 1
        if now - self._last_refusal_log >= _REFUSAL_LOG_INTERVAL:
            log.warning(
                "Connection limit %d reached (%d times since last said): %s",
                self.limits.max_connections, self._refusals,
                f"closing client={victim.client} idle {now - idle_since:.1f}s"
                if idle_since != math.inf else f"refusing client={client}, all are busy",
            )
            self._last_refusal_log = now
            self._refusals = 0
        if idle_since == math.inf:
            return False
        victim.close("connection limit reached: longest idle")
        return True

    def _forget(self, conn: connection.Connection) -> None:
        listener = self._conns.pop(conn, None)
        if listener is not None:
            self._check_stopped(listener)

    def _make_session(self, kind: str, conn: connection.Connection) -> connection.Session:
        if kind == "stomp":
            log.debug("Detected protocol=stomp client=%s", conn.client)
            return stomp_session.StompSession(
                conn, self.loop, self.protocol, self.limits, self.broker
            )
        return http.HttpSession(conn, self.loop, self.protocol, self.limits)

    def _housekeeping(self, now: float) -> float | None:
        for conn in list(self._conns):
            conn.check(now)
        resume = [listener.resume_if_due(now, self.loop) for listener in self._listeners]
        times = [t for t in resume if t is not None]
        return min(times) if times else None


def tcp_listener(
    host: str, port: int, protocol: jsonrpc.Protocol, ssl_context: ssl.SSLContext | None = None
) -> Listener:
    """A listener with a server of its own (see :meth:`Server.tcp_listener` to share one)."""
    return Server(protocol).tcp_listener(host, port, ssl_context)


def unix_listener(path: str, protocol: jsonrpc.Protocol, mode: int = 0o660) -> Listener:
    """A listener with a server of its own (see :meth:`Server.unix_listener` to share one)."""
    return Server(protocol).unix_listener(path, mode)


def server_tls_context(cert: str, key: str, ca: str) -> ssl.SSLContext:
    """Mutual TLS: the client must present a certificate signed by ca."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=ca)
    ctx.load_cert_chain(cert, key)
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx
