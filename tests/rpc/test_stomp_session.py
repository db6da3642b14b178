"""STOMP sessions in an in-process server: heart-beats around slow calls,
pushed events, per-connection limits and time-outs."""

from __future__ import annotations

import json
import queue
import socket
import threading
import time

import pytest
import stomp as stomp_py

from rpc import server
from tests.rpc.conftest import RawStomp, frame, request

REQUESTS = "jms.topic.vdsm_requests"
RESPONSES = "jms.topic.vdsm_responses"
EVENTS = "jms.queue.events"


class Watcher(stomp_py.ConnectionListener):
    def __init__(self) -> None:
        self.messages: queue.Queue[stomp_py.utils.Frame] = queue.Queue()
        self.heartbeats = 0
        self.timeouts = 0
        self.disconnected = threading.Event()

    def on_message(self, frame):
        self.messages.put(frame)

    def on_heartbeat(self):
        self.heartbeats += 1

    def on_heartbeat_timeout(self):
        self.timeouts += 1

    def on_disconnected(self):
        self.disconnected.set()


def stomp_client(served, heartbeats=(0, 0)):
    conn = stomp_py.Connection12([("127.0.0.1", served.port)], heartbeats=heartbeats)
    watcher = Watcher()
    conn.set_listener("watcher", watcher)
    conn.connect(wait=True)
    return conn, watcher


def raw_client(served):
    return RawStomp(served.unix_socket())


def test_call_longer_than_the_heart_beat_window_keeps_the_connection(served):
    # stomp.py drops a connection silent for 1.5 heart-beat intervals (150 ms here).
    conn, watcher = stomp_client(served, heartbeats=(0, 100))
    try:
        conn.subscribe(RESPONSES, id="s")
        conn.send(REQUESTS, request("Test.sleep", {"seconds": 1.5}))
        message = watcher.messages.get(timeout=30)
        assert json.loads(message.body)["result"] is True
        assert watcher.timeouts == 0 and not watcher.disconnected.is_set()
        assert watcher.heartbeats >= 5
        assert conn.is_connected()
    finally:
        conn.disconnect()


def test_client_heart_beats_keep_it_and_silence_closes_it(served):
    raw = raw_client(served)
    raw.connect(heart_beat="100,0")  # the client promises a beat every 100 ms
    for _ in range(10):
        time.sleep(0.1)
        raw.send(b"\n")
    assert not raw.closed.is_set()
    assert raw.closed.wait(10)  # silent: closed after 2 intervals and a second


def test_events_reach_every_subscriber_of_the_events_queue(served):
    subscribers = [raw_client(served) for _ in range(3)]
    for i, client in enumerate(subscribers):
        client.connect()
        client.send(frame("SUBSCRIBE", {"destination": EVENTS, "id": f"ev{i}",
                                         "receipt": "r"}))
        assert client.next()[0] == "RECEIPT"
    bystander = raw_client(served)
    bystander.connect()
    bystander.send(frame("SUBSCRIBE", {"destination": RESPONSES, "id": "r", "receipt": "r"}))
    assert bystander.next()[0] == "RECEIPT"

    vm = "5f1c7e0e-3b9a-4d0f-9e59-5c4b7a6e8d21"
    served.server.publish(f"|virt|VM_status|{vm}", {vm: {"status": "Paused", "pauseCode": "EIO"}})
    for i, client in enumerate(subscribers):
        command, headers, body = client.next()
        assert command == "MESSAGE"
        assert headers["destination"] == EVENTS and headers["subscription"] == f"ev{i}"
        event = json.loads(body)
        assert "id" not in event and event["method"] == f"|virt|VM_status|{vm}"
        assert event["params"][vm]["status"] == "Paused"
        assert isinstance(event["params"]["notify_time"], int)
    with pytest.raises(queue.Empty):
        bystander.next(timeout=0.3)


def test_unsubscribed_or_gone_subscribers_get_nothing(served):
    first, second = raw_client(served), raw_client(served)
    for client in (first, second):
        client.connect()
        client.send(frame("SUBSCRIBE", {"destination": EVENTS, "id": "e", "receipt": "r"}))
        assert client.next()[0] == "RECEIPT"
    first.send(frame("UNSUBSCRIBE", {"id": "e", "receipt": "u"}))
    assert first.next()[0] == "RECEIPT"
    second.close()
    time.sleep(0.2)
    served.server.publish("|virt|VM_status|x", {})
    with pytest.raises(queue.Empty):
        first.next(timeout=0.3)
    third = raw_client(served)  # still serving
    third.connect()


def test_publish_from_many_threads(served):
    client = raw_client(served)
    client.connect()
    client.send(frame("SUBSCRIBE", {"destination": EVENTS, "id": "e", "receipt": "r"}))
    assert client.next()[0] == "RECEIPT"

    def burst(n):
        for i in range(50):
            served.server.publish("|test|burst|", {"thread": n, "i": i})

    threads = [threading.Thread(target=burst, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seen = {(json.loads(client.next()[2])["params"]["thread"]) for _ in range(200)}
    assert seen == {0, 1, 2, 3}


def test_requests_run_concurrently_up_to_the_per_connection_limit(served_factory):
    served = served_factory(server.Limits(max_inflight=2))
    client = raw_client(served)
    client.connect()
    client.send(frame("SUBSCRIBE", {"destination": RESPONSES, "id": "s"}))
    start = time.monotonic()
    for i in range(4):
        client.send(frame("SEND", {"destination": REQUESTS},
                          request("Test.sleep", {"seconds": 0.5}, req_id=i)))
    ids = {json.loads(client.next()[2])["id"] for _ in range(4)}
    assert ids == {0, 1, 2, 3}
    assert time.monotonic() - start >= 1.0  # two at a time, not four


def test_partial_frame_times_out_with_error(served_factory):
    served = served_factory(server.Limits(request_timeout=0.5))
    client = raw_client(served)
    client.connect()
    client.send(b"SEND\ndestination:" + REQUESTS.encode() + b"\n\n{\"jsonrpc\"")
    command, headers, _ = client.next()
    assert command == "ERROR" and "within" in headers["message"]
    assert client.closed.wait(10)


def test_connect_must_come_in_time(served_factory):
    served = served_factory(server.Limits(request_timeout=0.5))
    client = raw_client(served)
    client.send(frame("SUBSCRIBE", {"destination": RESPONSES, "id": "s"}))
    command, headers, _ = client.next()
    assert command == "ERROR" and "CONNECT" in headers["message"]
    assert client.closed.wait(10)


def test_slow_event_subscriber_is_dropped(served_factory):
    served = served_factory(server.Limits(max_event_backlog=64 * 1024))
    slow = served.unix_socket()
    slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    slow.sendall(frame("CONNECT", {"accept-version": "1.2"}))
    slow.sendall(frame("SUBSCRIBE", {"destination": EVENTS, "id": "e", "receipt": "r"}))
    time.sleep(0.2)
    for _ in range(2000):  # never read: the server's queue for it grows
        served.server.publish("|test|big|", {"data": "x" * 1024})
    deadline = time.monotonic() + 10
    while served.server.connection_count() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert served.server.connection_count() == 0
    slow.close()
