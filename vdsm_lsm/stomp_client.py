"""A JSON-RPC client over STOMP 1.2, VDSM's wire protocol, that also receives events.

:class:`StompClient` has :class:`vdsm_lsm.client.Client`'s interface
(``call(method, **params)``, ``close()``, ``host``/``port``/``socket_path``)
over the daemon's unix socket or TCP (TLS), and keeps the daemon's pushed
events (``jms.queue.events``) for :meth:`StompClient.wait`::

    rpc = StompClient(socket_path="/run/vdsm-lsm/api.sock")
    task = rpc.call("Image.syncData", ...)
    rpc.wait("|storage|task_finished|" + task, timeout=60)   # its params, or None

On the first call it connects: ``CONNECT`` (asking the server for
heart-beats), a subscription to a reply destination of its own
(``jms.queue.vdsm-lsm-client.<uuid>``, sent as each request's
``reply-to``) and one to the events; requests go to
``jms.topic.vdsm_requests``.  A reader thread takes every frame: replies
by JSON-RPC id to their caller, events into a bounded history that
:meth:`wait` searches from the oldest (an event that came before the wait
is found).  A connection that closes, answers ``ERROR`` or stays silent
past three heart-beat intervals fails every call in progress with
:class:`OSError`, as the HTTP client does when the daemon cannot be
reached; the next call connects again (the history is kept).
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import json
import logging
import socket
import ssl
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from vdsm_lsm import client_errors, client_socket

log = logging.getLogger("vdsm_lsm.stomp_client")

REQUESTS = "jms.topic.vdsm_requests"
EVENTS = "jms.queue.events"
REPLY_PREFIX = "jms.queue.vdsm-lsm-client."

# The server is asked for a heart-beat after this much silence; three
# missed ones mean the connection is dead.
HEARTBEAT_MS = 10000
MAX_FRAME = 64 * 1024 * 1024
HISTORY = 1000
_POLL = 0.05  # how often a TLS reader lets a writer take the socket

Predicate = Callable[[dict[str, Any]], bool]


@dataclasses.dataclass(eq=False)
class StompClient(client_socket.Endpoint):
    """Talks JSON-RPC 2.0 in STOMP frames to the daemon; keeps its events.

    StompClient(socket_path=None, host=None, port=54321, tls_key=None,
    tls_cert=None, tls_ca=None, timeout=600.0, destination=REQUESTS): the
    address as vdsm_lsm/client_socket.py's, the requests' destination.
    """

    destination: str = REQUESTS

    def __post_init__(self) -> None:
        super().__post_init__()
        self._ids = itertools.count(1)
        self._cond = threading.Condition()
        self._replies: dict[Any, dict[str, Any]] = {}
        self._events: collections.deque[tuple[str, Any]] = collections.deque(maxlen=HISTORY)
        self._conn: _Connection | None = None
        self._connecting = threading.Lock()  # one connection at a time is made
        self._failure = ""

    # Calls

    def call(self, method: str, **params: Any) -> Any:
        req_id = next(self._ids)
        body = json.dumps({"jsonrpc": "2.0", "id": req_id, "method": method, "params": params})
        conn = self._connected()
        conn.send("SEND", {"destination": self.destination, "reply-to": conn.reply_to,
                           "content-type": "application/json"}, body.encode("utf-8"))
        deadline = time.monotonic() + self.timeout
        with self._cond:
            while req_id not in self._replies:
                if self._conn is not conn:
                    raise ConnectionResetError(f"STOMP connection lost: {self._failure}")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"no answer to {method} in {self.timeout:g}s")
                self._cond.wait(remaining)
            response = self._replies.pop(req_id)
        if "error" in response:
            error = response["error"] or {}
            raise client_errors.ClientError(error.get("code", -32603), error.get("message", ""))
        return response.get("result")

    # Events

    def wait(self, prefix: str, predicate: Predicate | None = None,
             timeout: float = 60.0) -> dict[str, Any] | None:
        """The params of the first event kept whose method starts with
        prefix and that predicate accepts, waiting up to timeout for one; None
        if none came.  OSError if the connection is lost meanwhile."""
        conn = self._connected()
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for name, params in self._events:
                    if name.startswith(prefix) and (predicate is None or predicate(params)):
                        return dict(params) if isinstance(params, dict) else {"params": params}
                if self._conn is not conn:
                    raise ConnectionResetError(f"STOMP connection lost: {self._failure}")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self._cond.wait(remaining)

    def events(self) -> list[tuple[str, Any]]:
        """(method, params) of the events kept, oldest first."""
        with self._cond:
            return list(self._events)

    def close(self) -> None:
        with self._cond:
            conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    # Connection

    def _connected(self) -> _Connection:
        with self._connecting:
            with self._cond:
                if self._conn is not None:
                    return self._conn
            conn = _Connection(self.open_socket(), self._on_frame, self._on_closed)
            try:
                conn.handshake()
            except BaseException:
                conn.close()
                raise
            with self._cond:
                self._conn = conn
            conn.start()
            return conn

    def _on_frame(self, conn: _Connection, command: str, headers: dict[str, str],
                  body: bytes) -> None:
        if command != "MESSAGE":
            return
        try:
            message = json.loads(body)
        except ValueError:
            log.warning("Not JSON from the daemon: %r", body[:200])
            return
        with self._cond:
            if headers.get("subscription") == conn.events_id:
                for item in message if isinstance(message, list) else [message]:
                    if isinstance(item, dict) and "method" in item:
                        self._events.append((str(item["method"]), item.get("params")))
            else:
                for item in message if isinstance(message, list) else [message]:
                    if isinstance(item, dict) and "id" in item:
                        self._replies[item["id"]] = item
            self._cond.notify_all()

    def _on_closed(self, conn: _Connection, reason: str) -> None:
        with self._cond:
            if self._conn is conn:
                self._conn = None
                self._failure = reason
            self._cond.notify_all()


class _Connection:
    """One STOMP connection: the socket, its reader thread, the subscriptions."""

    def __init__(
        self,
        sock: socket.socket,
        on_frame: Callable[[_Connection, str, dict[str, str], bytes], None],
        on_closed: Callable[[_Connection, str], None],
    ) -> None:
        self.sock = sock
        self.on_frame = on_frame
        self.on_closed = on_closed
        self.reply_to = REPLY_PREFIX + str(uuid.uuid4())
        self.events_id = "events-" + str(uuid.uuid4())
        self.heartbeat = 0.0  # seconds between the server's heart-beats, 0: none
        self._tls = isinstance(sock, ssl.SSLSocket)
        # An SSL socket may not be read and written by two threads at once;
        # frames of two callers must not interleave.
        self._io = threading.Lock()
        self._sending = threading.Lock()
        self._buf = b""
        self._thread = threading.Thread(target=self._read, name="stomp-client", daemon=True)
        self._closing = False  # close() was called: the reader stops quietly

    def handshake(self) -> None:
        """CONNECT and the two subscriptions, before the reader runs."""
        self.send("CONNECT", {"accept-version": "1.2", "host": "localhost",
                              "heart-beat": f"0,{HEARTBEAT_MS}"})
        command, headers, body = self._next_frame()
        if command != "CONNECTED":
            raise ConnectionRefusedError(
                f"STOMP CONNECT answered {command}: {headers.get('message', '')} {body[:200]!r}"
            )
        # CONNECTED's heart-beat: how often the server sends one, then what it wants.
        server_ms, _, _ = headers.get("heart-beat", "0,0").partition(",")
        if server_ms.isdigit() and int(server_ms) > 0:
            self.heartbeat = int(server_ms) / 1000.0
        self.send("SUBSCRIBE", {"destination": self.reply_to, "id": "replies", "ack": "auto"})
        self.send("SUBSCRIBE", {"destination": EVENTS, "id": self.events_id, "ack": "auto"})

    def start(self) -> None:
        self.sock.settimeout(_POLL if self._tls else self._silence())
        self._thread.start()

    def send(self, command: str, headers: dict[str, str], body: bytes = b"") -> None:
        data = _encode(command, headers, body)
        try:
            with self._sending:
                if not self._tls:
                    self.sock.sendall(data)
                    return
                with self._io:
                    before = self.sock.gettimeout()
                    self.sock.settimeout(30)
                    try:
                        self.sock.sendall(data)
                    finally:
                        self.sock.settimeout(before)
        except OSError as e:
            self.close(f"cannot send: {e}")
            raise

    def close(self, reason: str = "closed") -> None:
        self._closing = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        if threading.current_thread() is not self._thread and self._thread.is_alive():
            self._thread.join(5)
        self.sock.close()
        self.on_closed(self, reason)

    def _silence(self) -> float | None:
        return 3 * self.heartbeat + 1 if self.heartbeat else None

    def _read(self) -> None:
        reason = "closed by the daemon"
        last = time.monotonic()
        done = False
        while not done and not self._closing:
            try:
                with self._io:
                    data = self.sock.recv(65536)
            except TimeoutError:
                silence = self._silence()
                if silence is not None and time.monotonic() - last > silence:
                    reason = f"no heart-beat from the daemon for {silence:g}s"
                    break
                continue
            except OSError as e:
                reason = str(e)
                break
            if not data:
                break
            last = time.monotonic()
            self._buf += data
            try:
                for command, headers, body in self._frames():
                    if command == "ERROR":
                        reason = f"ERROR from the daemon: {headers.get('message', '')}"
                        done = True
                        break
                    self.on_frame(self, command, headers, body)
            except ValueError as e:
                reason = f"bad frame from the daemon: {e}"
                break
        if not self._closing:
            log.warning("STOMP connection lost: %s", reason)
        try:
            self.sock.close()
        except OSError:
            pass
        self.on_closed(self, reason)

    def _next_frame(self) -> tuple[str, dict[str, str], bytes]:
        """One frame, read synchronously (the handshake, before the reader runs)."""
        while True:
            for frame in self._frames():
                return frame
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionResetError("the daemon closed the connection")
            self._buf += data

    def _frames(self) -> list[tuple[str, dict[str, str], bytes]]:
        """The complete frames buffered (heart-beats skipped); ValueError on garbage."""
        frames: list[tuple[str, dict[str, str], bytes]] = []
        while True:
            buf = self._buf.lstrip(b"\r\n")
            self._buf = buf
            head_end = buf.find(b"\n\n")
            if head_end < 0:
                if len(buf) > MAX_FRAME:
                    raise ValueError("headers too long")
                return frames
            lines = buf[:head_end].decode("utf-8").split("\n")
            command = lines[0].rstrip("\r")
            headers: dict[str, str] = {}
            for line in lines[1:]:
                name, sep, value = line.rstrip("\r").partition(":")
                if not sep:
                    raise ValueError(f"header line {line[:80]!r}")
                headers.setdefault(_unescape(name), _unescape(value))
            start = head_end + 2
            if "content-length" in headers:
                length = int(headers["content-length"])
                if length > MAX_FRAME:
                    raise ValueError(f"frame of {length} bytes")
                end = start + length
                if len(buf) <= end:
                    return frames
                if buf[end:end + 1] != b"\0":
                    raise ValueError("body not ended by NUL")
            else:
                end = buf.find(b"\0", start)
                if end < 0:
                    return frames
            frames.append((command, headers, buf[start:end]))
            self._buf = buf[end + 1:]


def _escape(text: str) -> str:
    return (text.replace("\\", "\\\\").replace("\r", "\\r").replace("\n", "\\n")
            .replace(":", "\\c"))


def _unescape(text: str) -> str:
    out, i = [], 0
    while i < len(text):
        ch = text[i]
        if ch == "\\" and i + 1 < len(text):
            out.append({"r": "\r", "n": "\n", "c": ":", "\\": "\\"}.get(text[i + 1], text[i + 1]))
            i += 2
            continue
        out.append(ch)
        i += 1
    return "".join(out)


def _encode(command: str, headers: dict[str, str], body: bytes) -> bytes:
    escape = command != "CONNECT"
    lines = [command] + [
        f"{_escape(k) if escape else k}:{_escape(v) if escape else v}" for k, v in headers.items()
    ]
    lines.append(f"content-length:{len(body)}")
    return ("\n".join(lines) + "\n\n").encode("utf-8") + body + b"\0"
