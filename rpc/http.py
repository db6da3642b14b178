"""JSON-RPC over HTTP/1.1 (``POST /``) on a connection of the event loop.

HTTP framing is h11's (a sans-I/O HTTP/1.1 state machine); this module
decides what a request may be and when it is answered:

- ``POST /`` with a ``Content-Length`` (or a chunked body) carries one
  JSON-RPC request or batch; the answer is ``200`` with the JSON-RPC response
  (empty for notifications). Other paths are 404, other methods 501, a
  missing length 411, a malformed request 400: each with ``Connection:
  close``.
- A declared body larger than :attr:`Limits.max_request` is answered 413 at
  once, from the headers, before any of it is read; a chunked body is cut off
  the same way as soon as it passes the limit. The connection then lingers
  briefly, discarding input, so that the client reads the answer.
- A request must arrive whole within :attr:`Limits.request_timeout` of its
  first byte (408 otherwise); a keep-alive connection idle for
  :attr:`Limits.idle_timeout` is closed. Requests on one connection are
  answered in order, one at a time; a pipelined one waits in h11's buffer and
  reading stops until the one before it is answered.
"""

from __future__ import annotations

import email.utils
import http
import logging
import time
from typing import Any

import h11

from rpc import connection, errors, jsonrpc, reactor

log = logging.getLogger("rpc.http")

CONTENT_TYPE = "application/json-rpc"
SERVER = "vdsm-lsm"


class HttpSession:
    def __init__(
        self,
        conn: connection.Connection,
        loop: reactor.EventLoop,
        protocol: jsonrpc.Protocol,
        limits: connection.Limits,
    ) -> None:
        self.conn = conn
        self.loop = loop
        self.protocol = protocol
        self.limits = limits
        self._h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=limits.max_header)
        self._body = bytearray()
        self._held = 0  # size of the body being served
        self._serving = False
        self._started: float | None = None  # first byte of the request being received
        self._stopping = False

    # Session interface

    def data_received(self, data: bytes) -> None:
        if self._started is None:
            self._started = time.monotonic()
        self._h11.receive_data(data)
        self._pump()

    def eof(self) -> None:
        self._h11.receive_data(b"")
        if not self._serving:
            self._pump()

    def wants_read(self) -> bool:
        return not self._serving

    def buffered(self) -> int:
        return len(self._body) + self._held

    def busy(self) -> bool:
        return self._serving or self._started is not None

    def in_flight(self) -> bool:
        return self._serving

    def deadline(self) -> float | None:
        if self._serving:
            return None
        if self._started is not None:
            return self._started + self.limits.request_timeout
        return self.conn.last_activity + self.limits.idle_timeout

    def expire(self, now: float) -> None:
        if self._started is not None:
            log.info("Request not received in time client=%s", self.conn.client)
            self._refuse(
                408, f"Request not received within {self.limits.request_timeout:g}s", linger=False
            )
        else:
            self.conn.close("idle keep-alive connection")

    def stop(self) -> None:
        self._stopping = True
        if not self.busy():
            self.conn.close_after_flush()

    def closed(self) -> None:
        self._body = bytearray()

    # Requests

    def _pump(self) -> None:
        while not self._serving and self.conn.state is connection.State.OPEN:
            try:
                event = self._h11.next_event()
            except h11.RemoteProtocolError as e:
                self._refuse(e.error_status_hint, f"Bad HTTP request: {e}")
                return
            if event is h11.NEED_DATA or event is h11.PAUSED:
                return
            if isinstance(event, h11.Request):
                self._on_request(event)
            elif isinstance(event, h11.Data):
                self._body += event.data
                if len(self._body) > self.limits.max_request:
                    self._too_large(len(self._body))
            elif isinstance(event, h11.EndOfMessage):
                self._dispatch()
            elif isinstance(event, h11.ConnectionClosed):
                self.conn.close("peer closed")

    def _on_request(self, request: h11.Request) -> None:
        target = request.target.decode("ascii", "replace")
        log.debug("Reading request client=%s path=%s", self.conn.client, target)
        headers = {name: value for name, value in request.headers}
        if request.method != b"POST":
            method = request.method.decode("ascii", "replace")
            self._refuse(501, f"Unsupported method ({method!r})")
        elif target != "/":
            self._refuse(404, "No such page")
        elif b"content-length" not in headers and b"transfer-encoding" not in headers:
            self._refuse(411, "Content-Length header is required.")
        elif int(headers.get(b"content-length", b"0")) > self.limits.max_request:
            self._too_large(int(headers[b"content-length"]))
        elif self._h11.they_are_waiting_for_100_continue:
            self.conn.write(self._h11.send(h11.InformationalResponse(status_code=100, headers=[])))

    def _too_large(self, size: int) -> None:
        log.warning(
            "Request too large client=%s size=%d max=%d", self.conn.client, size,
            self.limits.max_request,
        )
        self._refuse(
            413, f"Request too large: {size} bytes, the maximum is {self.limits.max_request}"
        )

    def _dispatch(self) -> None:
        body = bytes(self._body)
        self._body = bytearray()
        self._held = len(body)
        self._serving = True
        self.loop.submit(self.protocol.process, body, self._answered)

    def _answered(self, result: Any, error: BaseException | None) -> None:
        self._serving = False
        self._held = 0
        if self.conn.state is not connection.State.OPEN:
            return
        if error is not None:
            log.error("Request failed client=%s", self.conn.client, exc_info=error)
            code, message = self.protocol.dispatcher.error_of(error)
            result = jsonrpc.error_text(code, message)
        self._respond(200, str(result).encode("utf-8"))
        if self._h11.our_state is h11.MUST_CLOSE or self._stopping:
            self.conn.close_after_flush()
            return
        try:
            self._h11.start_next_cycle()
        except h11.LocalProtocolError:
            self.conn.close_after_flush()
            return
        self._started = time.monotonic() if self._h11.trailing_data[0] else None
        self._pump()
        self.conn.update()

    # Answers

    def _respond(self, status: int, body: bytes) -> None:
        headers = _headers(CONTENT_TYPE, len(body), close=self._stopping)
        try:
            data = self._h11.send(h11.Response(status_code=status, headers=headers))
            data += self._h11.send(h11.Data(data=body)) if body else b""
            data += self._h11.send(h11.EndOfMessage())
        except h11.LocalProtocolError as e:
            self.conn.close(f"cannot answer: {e}")
            return
        self.conn.write(data)

    def _refuse(self, status: int, message: str, linger: bool = True) -> None:
        """Answer an error and close the connection, whatever was received.

        Written without h11, which cannot answer a request it has not seen
        whole (a half-sent request line, a request line too long).
        """
        self._body = bytearray()
        self._started = None
        if status == 404:
            content_type, body = "text/plain", message.encode()
        else:
            content_type = CONTENT_TYPE
            body = jsonrpc.error_text(errors.InvalidRequest.code, message).encode()
        reason = http.HTTPStatus(status).phrase if status in _STATUSES else ""
        lines = [f"HTTP/1.1 {status} {reason}"]
        lines += [f"{name}: {value}" for name, value in _headers(content_type, len(body), True)]
        self.conn.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
        self.conn.close_after_flush(linger=linger)


_STATUSES = {s.value for s in http.HTTPStatus}


def _headers(content_type: str, length: int, close: bool) -> list[tuple[str, str]]:
    headers = [
        ("Server", SERVER),
        ("Date", email.utils.formatdate(usegmt=True)),
        ("Content-Type", content_type),
        ("Content-Length", str(length)),
    ]
    if close:
        headers.append(("Connection", "close"))
    return headers
