"""JSON-RPC over STOMP 1.2, the way VDSM serves it, and the event broker.

Per connection (:class:`StompSession`):

- ``CONNECT``/``STOMP`` (``accept-version`` must offer 1.2) is answered
  ``CONNECTED version:1.2`` with the negotiated ``heart-beat``: the server
  sends a heart-beat whenever it has sent nothing for the client's wished
  interval (at least :attr:`Limits.min_heartbeat`), and closes a connection
  whose client promised heart-beats and stayed silent twice that long plus a
  second. ``SUBSCRIBE`` and ``SEND`` are accepted before ``CONNECT`` (the
  engine subscribes first), but ``CONNECT`` must come within
  :attr:`Limits.request_timeout`.
- ``SEND`` to :data:`REQUESTS` or :data:`IRS_REQUESTS` (or a ``.``-child)
  carries one JSON-RPC request or a batch; up to :attr:`Limits.max_inflight`
  run at once per connection (further frames wait, unread). The reply is a
  ``MESSAGE`` to the frame's ``reply-to``, or without one to
  :data:`RESPONSES` / :data:`IRS_RESPONSES` after the request's family,
  carrying the id of each subscription *of this connection* to that
  destination (or to a ``.``-parent of it); with no such subscription the
  reply is dropped and logged.
- ``UNSUBSCRIBE``; ``ACK``/``NACK`` are accepted and ignored (subscriptions
  are ``ack:auto``); transactions are refused with ``ERROR``; ``receipt`` is
  honoured on every frame; ``DISCONNECT`` is answered (with its receipt) once
  the requests in flight are answered, then the connection closes.
- ``ERROR``: a frame that cannot be parsed (unknown command, bad header or
  escape, too large, not received within the request time-out) gets an
  ``ERROR`` and the connection is closed, as STOMP requires; a frame that
  parses but cannot be served (missing header, unknown destination, reused
  subscription id) gets an ``ERROR`` and the connection stays.

:class:`Broker` keeps every connection's subscriptions by destination and
delivers pushed messages (JSON-RPC notifications to :data:`EVENTS`).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import time
from typing import Any

from rpc import connection, jsonrpc, reactor, stomp

log = logging.getLogger("rpc.stomp")

REQUESTS = "jms.topic.vdsm_requests"
IRS_REQUESTS = "jms.topic.vdsm_irs_requests"
RESPONSES = "jms.topic.vdsm_responses"
IRS_RESPONSES = "jms.topic.vdsm_irs_responses"
EVENTS = "jms.queue.events"
_RESPONSES_OF = {REQUESTS: RESPONSES, IRS_REQUESTS: IRS_RESPONSES}

SERVER = "vdsm-lsm"


def covers(subscribed: str, destination: str) -> bool:
    """A subscription to a destination also receives its ``.``-children's messages."""
    return destination == subscribed or destination.startswith(subscribed + ".")


def request_family(destination: str) -> str | None:
    for queue in _RESPONSES_OF:
        if covers(queue, destination):
            return queue
    return None


@dataclasses.dataclass(eq=False)
class Subscription:
    session: StompSession
    id: str
    destination: str


class Broker:
    """All subscriptions, by destination (loop thread only)."""

    def __init__(self) -> None:
        self._by_destination: dict[str, list[Subscription]] = {}

    def add(self, sub: Subscription) -> None:
        self._by_destination.setdefault(sub.destination, []).append(sub)

    def remove(self, sub: Subscription) -> None:
        subs = self._by_destination.get(sub.destination, [])
        if sub in subs:
            subs.remove(sub)
        if not subs:
            self._by_destination.pop(sub.destination, None)

    def subscribers(self, destination: str) -> list[Subscription]:
        parts = destination.split(".")
        found: list[Subscription] = []
        for i in range(1, len(parts) + 1):
            found += self._by_destination.get(".".join(parts[:i]), [])
        return found

    def deliver(self, destination: str, body: bytes) -> int:
        """Send body to every subscriber of destination; answer how many got it."""
        delivered = 0
        for sub in self.subscribers(destination):
            if sub.session.push(destination, sub.id, body):
                delivered += 1
        return delivered


class StompSession:
    def __init__(
        self,
        conn: connection.Connection,
        loop: reactor.EventLoop,
        protocol: jsonrpc.Protocol,
        limits: connection.Limits,
        broker: Broker,
    ) -> None:
        self.conn = conn
        self.loop = loop
        self.protocol = protocol
        self.limits = limits
        self.broker = broker
        self._parser = stomp.Parser(limits.max_request)
        self._subs: dict[str, Subscription] = {}
        self._message_ids = itertools.count(1)
        self._connected = False
        self._opened = time.monotonic()
        self._send_every = 0.0  # seconds; 0: no server heart-beats
        self._expect_every = 0.0  # seconds; 0: the client sends none
        self._inflight = 0
        self._held = 0
        self._stopping = False
        self._disconnect: stomp.Frame | None = None

    # Session interface

    def data_received(self, data: bytes) -> None:
        self._parser.feed(data)
        self._pump()

    def eof(self) -> None:
        if self._inflight:
            self._stopping = True  # Answer what runs (a half-closed client), then close.
        else:
            self.conn.close("peer closed")

    def wants_read(self) -> bool:
        return (
            not self._stopping
            and self._disconnect is None
            and self._inflight < self.limits.max_inflight
        )

    def buffered(self) -> int:
        return self._parser.buffered + self._held

    def busy(self) -> bool:
        return self._inflight > 0 or self._parser.partial

    def in_flight(self) -> bool:
        return self._inflight > 0

    def deadline(self) -> float | None:
        times = []
        if not self._connected:
            times.append(self._opened + self.limits.request_timeout)
        if self._parser.frame_started is not None:
            times.append(self._parser.frame_started + self.limits.request_timeout)
        if self._send_every and not self.conn.output_pending:
            times.append(self.conn.last_write + self._send_every)
        if self._expect_every and self.conn.reading:
            times.append(self.conn.last_input + 2 * self._expect_every + 1.0)
        return min(times) if times else None

    def expire(self, now: float) -> None:
        timeout = self.limits.request_timeout
        if not self._connected and now >= self._opened + timeout:
            self._fatal(f"No CONNECT frame within {timeout:g}s")
        elif self._parser.frame_started is not None and now >= (
            self._parser.frame_started + timeout
        ):
            self._fatal(f"Frame not received whole within {timeout:g}s")
        elif (
            self._expect_every
            and self.conn.reading
            and now >= self.conn.last_input + 2 * self._expect_every + 1.0
        ):
            log.info("No heart-beat from client=%s: closing", self.conn.client)
            self.conn.close("heart-beat missed")
        elif (
            self._send_every
            and not self.conn.output_pending
            and now >= self.conn.last_write + self._send_every
        ):
            self.conn.write(stomp.HEARTBEAT)

    def stop(self) -> None:
        self._stopping = True
        if not self._inflight:
            self.conn.close_after_flush()

    def closed(self) -> None:
        for sub in self._subs.values():
            self.broker.remove(sub)
        self._subs.clear()

    # Frames

    def _pump(self) -> None:
        while self.conn.state is connection.State.OPEN and self.wants_read():
            try:
                item = self._parser.next()
            except stomp.FrameError as e:
                self._fatal(str(e))
                return
            if item is None:
                return
            if isinstance(item, stomp.Frame):
                self._handle(item)

    def _handle(self, frame: stomp.Frame) -> None:
        command = frame.command
        log.debug("STOMP frame command=%s client=%s", command, self.conn.client)
        if command in ("CONNECT", "STOMP"):
            self._on_connect(frame)
            return
        if command == "DISCONNECT":
            self._disconnect = frame
            self._maybe_disconnect()
            return
        if command == "SEND":
            ok = self._on_send(frame)
        elif command == "SUBSCRIBE":
            ok = self._on_subscribe(frame)
        elif command == "UNSUBSCRIBE":
            ok = self._on_unsubscribe(frame)
        elif command in ("ACK", "NACK"):
            ok = True
        else:
            ok = self._error(frame, f"{command} is not supported (no transactions)")
        receipt = frame.get("receipt")
        if ok and receipt is not None:
            self.conn.write(stomp.encode("RECEIPT", {"receipt-id": receipt}))

    def _on_connect(self, frame: stomp.Frame) -> None:
        versions = [v.strip() for v in (frame.get("accept-version") or "1.0").split(",")]
        if "1.2" not in versions:
            self._fatal("Supported protocol versions are 1.2", {"version": "1.2"})
            return
        cx, cy = _heart_beat(frame.get("heart-beat") or "0,0")
        floor = self.limits.min_heartbeat
        self._send_every = max(cy / 1000, floor) if cy else 0.0
        self._expect_every = max(cx / 1000, floor) if cx else 0.0
        self._connected = True
        beat = f"{round(self._send_every * 1000)},{round(self._expect_every * 1000)}"
        log.info("STOMP connected client=%s heart-beat=%s", self.conn.client, beat)
        self.conn.write(
            stomp.encode("CONNECTED", {"version": "1.2", "heart-beat": beat, "server": SERVER})
        )

    def _on_subscribe(self, frame: stomp.Frame) -> bool:
        destination, sub_id = frame.get("destination"), frame.get("id")
        if not destination or sub_id is None:
            return self._error(frame, "SUBSCRIBE needs the destination and id headers")
        if sub_id in self._subs:
            return self._error(frame, f"Subscription id {sub_id!r} is already used")
        if len(self._subs) >= self.limits.max_subscriptions:
            return self._error(frame, f"More than {self.limits.max_subscriptions} subscriptions")
        sub = Subscription(self, sub_id, destination)
        self._subs[sub_id] = sub
        self.broker.add(sub)
        log.debug("Subscribed client=%s id=%s destination=%s", self.conn.client, sub_id,
                  destination)
        return True

    def _on_unsubscribe(self, frame: stomp.Frame) -> bool:
        sub_id = frame.get("id")
        if sub_id is None:
            return self._error(frame, "UNSUBSCRIBE needs the id header")
        sub = self._subs.pop(sub_id, None)
        if sub is not None:
            self.broker.remove(sub)
        return True

    def _on_send(self, frame: stomp.Frame) -> bool:
        destination = frame.get("destination")
        if not destination:
            return self._error(frame, "SEND needs the destination header")
        family = request_family(destination)
        if family is None:
            return self._error(
                frame, f"Unknown destination {destination!r}: requests go to {REQUESTS} or "
                f"{IRS_REQUESTS}",
            )
        reply_to = frame.get("reply-to") or _RESPONSES_OF[family]
        log.debug("STOMP request client=%s destination=%s reply-to=%s flow=%s",
                  self.conn.client, destination, reply_to, frame.get("ovirtCorrelationId"))
        size = len(frame.body)
        self._inflight += 1
        self._held += size

        def done(result: Any, error: BaseException | None) -> None:
            self._answered(reply_to, size, result, error)

        self.loop.submit(self.protocol.process, frame.body, done)
        return True

    def _answered(self, reply_to: str, size: int, result: Any,
                  error: BaseException | None) -> None:
        self._inflight -= 1
        self._held -= size
        if self.conn.state is not connection.State.OPEN:
            return
        if error is not None:
            log.error("Request failed client=%s", self.conn.client, exc_info=error)
            result = jsonrpc.error_text(*self.protocol.dispatcher.error_of(error))
        if result:
            self._reply(reply_to, str(result).encode("utf-8"))
        if self._stopping and not self._inflight:
            self.conn.close_after_flush()
        else:
            self._maybe_disconnect()
            self._pump()
        self.conn.update()

    def _reply(self, destination: str, body: bytes) -> None:
        subs = [s for s in self._subs.values() if covers(s.destination, destination)]
        if not subs:
            log.warning("No subscription to reply destination=%s client=%s: reply dropped",
                        destination, self.conn.client)
        for sub in subs:
            self._message(destination, sub.id, body)

    def push(self, destination: str, sub_id: str, body: bytes) -> bool:
        """Deliver a pushed message; drop a subscriber too far behind."""
        if self.conn.state is not connection.State.OPEN:
            return False
        if self.conn.output_pending > self.limits.max_event_backlog:
            log.warning("Event subscriber client=%s is %d bytes behind: closing",
                        self.conn.client, self.conn.output_pending)
            self.conn.close("event subscriber too slow")
            return False
        self._message(destination, sub_id, body)
        self.conn.update()
        return True

    def _message(self, destination: str, sub_id: str, body: bytes) -> None:
        headers = {
            "destination": destination,
            "subscription": sub_id,
            "message-id": str(next(self._message_ids)),
            "content-type": "application/json",
        }
        self.conn.write(stomp.encode("MESSAGE", headers, body))

    def _maybe_disconnect(self) -> None:
        if self._disconnect is None or self._inflight:
            return
        receipt = self._disconnect.get("receipt")
        if receipt is not None:
            self.conn.write(stomp.encode("RECEIPT", {"receipt-id": receipt}))
        log.info("STOMP disconnected client=%s", self.conn.client)
        self.conn.close_after_flush()

    def _error(self, frame: stomp.Frame, message: str) -> bool:
        headers = {"message": message, "content-type": "text/plain"}
        receipt = frame.get("receipt")
        if receipt is not None:
            headers["receipt-id"] = receipt
        log.info("STOMP error client=%s command=%s: %s", self.conn.client, frame.command,
                 message)
        self.conn.write(stomp.encode("ERROR", headers, message.encode()))
        return False

    def _fatal(self, message: str, extra: dict[str, str] | None = None) -> None:
        log.warning("STOMP protocol error client=%s: %s", self.conn.client, message)
        headers = {"message": message, "content-type": "text/plain", **(extra or {})}
        self.conn.write(stomp.encode("ERROR", headers, message.encode()))
        self.conn.close_after_flush(linger=True)


def _heart_beat(value: str) -> tuple[int, int]:
    try:
        cx, cy = (int(part) for part in value.split(","))
    except ValueError:
        return 0, 0
    return max(cx, 0), max(cy, 0)
