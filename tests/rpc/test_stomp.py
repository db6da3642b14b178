"""JSON-RPC over STOMP 1.2 against the real daemon, on the same listeners as HTTP.

Driven by ``stomp.py`` (an independent client from PyPI) over TCP and by
frames written by hand over the unix socket.
"""

from __future__ import annotations

import json
import queue
import socket
import time
import uuid

import pytest
import stomp as stomp_py

from tests.rpc.conftest import RawStomp, frame, request

REQUESTS = "jms.topic.vdsm_requests"
IRS_REQUESTS = "jms.topic.vdsm_irs_requests"
RESPONSES = "jms.topic.vdsm_responses"
IRS_RESPONSES = "jms.topic.vdsm_irs_responses"


@pytest.fixture(scope="module")
def shared_daemon(tmp_path_factory):
    from tests import daemon as daemon_mod

    d = daemon_mod.Daemon(str(tmp_path_factory.mktemp("stompd")))
    d.start()
    yield d
    d.stop()


class Collector(stomp_py.ConnectionListener):
    def __init__(self) -> None:
        self.messages: queue.Queue[stomp_py.utils.Frame] = queue.Queue()
        self.errors: queue.Queue[stomp_py.utils.Frame] = queue.Queue()

    def on_message(self, frame):
        self.messages.put(frame)

    def on_error(self, frame):
        self.errors.put(frame)


@pytest.fixture
def engine(shared_daemon):
    """A stomp.py connection over TCP, as the engine would open one."""
    conn = stomp_py.Connection12([("127.0.0.1", shared_daemon.port)], heartbeats=(0, 0))
    collector = Collector()
    conn.set_listener("collector", collector)
    conn.connect(wait=True)
    conn.collector = collector
    yield conn
    if conn.is_connected():
        conn.disconnect()


@pytest.fixture
def raw(shared_daemon):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(30)
    sock.connect(shared_daemon.socket_path)
    client = RawStomp(sock)
    yield client
    client.close()


def call(conn, body, destination=REQUESTS, reply_to=None, subscribe=RESPONSES):
    sub_id = str(uuid.uuid4())
    conn.subscribe(subscribe, id=sub_id)
    headers = {"reply-to": reply_to} if reply_to else {}
    conn.send(destination, body, content_type="application/json", headers=headers)
    message = conn.collector.messages.get(timeout=30)
    conn.unsubscribe(sub_id)
    return message, json.loads(message.body)


def test_ping_over_tcp_with_stomp_py(engine):
    message, response = call(engine, request("Host.ping2", req_id=7))
    assert response == {"jsonrpc": "2.0", "id": 7, "result": True}
    assert message.headers["destination"] == RESPONSES


def test_ping_over_unix_socket_by_hand(raw):
    headers = raw.connect()
    assert headers["version"] == "1.2"
    raw.send(frame("SUBSCRIBE", {"destination": RESPONSES, "id": "s1"}))
    assert raw.call(request("Host.ping2"))["result"] is True


def test_verb_over_irs_requests_answers_on_irs_responses(engine):
    sd = str(uuid.uuid4())
    message, response = call(engine, request("StorageDomain.getInfo", {"storagedomainID": sd}),
                             destination=IRS_REQUESTS, subscribe=IRS_RESPONSES)
    assert message.headers["destination"] == IRS_RESPONSES
    assert response["id"] == 1 and response["error"]["code"] > 0
    assert sd in response["error"]["message"]


def test_request_to_a_child_destination(engine):
    _, response = call(engine, request("Host.ping2"), destination=REQUESTS + ".host")
    assert response["result"] is True


def test_batch(engine):
    batch = json.dumps([
        {"jsonrpc": "2.0", "id": 1, "method": "Host.ping2"},
        {"jsonrpc": "2.0", "method": "Host.ping2"},
        {"jsonrpc": "2.0", "id": 2, "method": "Host.nope"},
    ])
    _, response = call(engine, batch)
    by_id = {r["id"]: r for r in response}
    assert len(response) == 2
    assert by_id[1]["result"] is True and by_id[2]["error"]["code"] == -32601


def test_reply_routed_by_reply_to_with_its_subscription_id(raw):
    raw.connect()
    raw.send(frame("SUBSCRIBE", {"destination": RESPONSES, "id": "default"}))
    raw.send(frame("SUBSCRIBE", {"destination": "client.replies", "id": "mine"}))
    raw.send(frame("SEND", {"destination": REQUESTS, "reply-to": "client.replies"},
                   request("Host.ping2")))
    command, headers, body = raw.next()
    assert command == "MESSAGE"
    assert headers["destination"] == "client.replies" and headers["subscription"] == "mine"
    assert json.loads(body)["result"] is True
    with pytest.raises(queue.Empty):
        raw.next(timeout=0.5)  # Nothing went to the default destination.


def test_subscribe_before_connect_is_accepted(raw):
    raw.send(frame("SUBSCRIBE", {"destination": RESPONSES, "id": "early"}))
    raw.connect()
    assert raw.call(request("Host.ping2"))["result"] is True


def test_notification_gets_no_reply_and_receipt_is_sent(raw):
    raw.connect()
    raw.send(frame("SUBSCRIBE", {"destination": RESPONSES, "id": "s", "receipt": "r1"}))
    assert raw.next()[:2] == ("RECEIPT", {"receipt-id": "r1", "content-length": "0"})
    body = json.dumps({"jsonrpc": "2.0", "method": "Host.ping2"})
    raw.send(frame("SEND", {"destination": REQUESTS, "receipt": "r2"}, body))
    assert raw.next()[1]["receipt-id"] == "r2"
    with pytest.raises(queue.Empty):
        raw.next(timeout=0.5)


def test_disconnect_with_receipt_closes(raw):
    raw.connect()
    raw.send(frame("DISCONNECT", {"receipt": "bye"}))
    assert raw.next()[:2] == ("RECEIPT", {"receipt-id": "bye", "content-length": "0"})
    assert raw.closed.wait(10)


@pytest.mark.parametrize(
    "body",
    [b'{"jsonrpc": "2.0", "id": 1, "method": "Host.ping2", "params": {"\xff": 1}}',
     b"[" * 100_000 + b"]" * 100_000,
     b'{"jsonrpc": "2.0", "id": 1, "method": "Host.ping2", "params": {"a": "\\ud800"}}',
     b""],
)
def test_bad_body_is_a_parse_error(raw, body):
    raw.connect()
    raw.send(frame("SUBSCRIBE", {"destination": RESPONSES, "id": "s"}))
    response = raw.call(body)
    assert response["error"]["code"] == -32700 and response["id"] is None


def test_heart_beats_sent_on_an_idle_connection(raw):
    headers = raw.connect(heart_beat="0,100")
    assert headers["heart-beat"] == "100,0"
    time.sleep(1.5)
    assert raw.heartbeats >= 3
    assert not raw.closed.is_set()


def test_heart_beat_interval_has_a_floor(raw):
    headers = raw.connect(heart_beat="10,1")
    assert headers["heart-beat"] == "100,100"


@pytest.mark.parametrize(
    "data",
    [
        b"BOGUS\n\n\0",
        b"SEND\ndestination:" + REQUESTS.encode() + b"\nbroken header\n\n\0",
        b"SEND\ndestination:a\\qb\n\n\0",
    ],
)
def test_malformed_frame_gets_error_and_others_are_served(raw, shared_daemon, data):
    raw.connect()
    raw.send(data)
    command, headers, _ = raw.next()
    assert command == "ERROR" and headers["message"]
    assert raw.closed.wait(10)
    assert shared_daemon.unix().call("Host.ping2") is True


def test_oversized_frame_refused_before_its_body(raw, shared_daemon):
    raw.connect()
    raw.send(b"SEND\ndestination:%s\ncontent-length:%d\n\n" % (REQUESTS.encode(), 64 << 20))
    command, headers, _ = raw.next()
    assert command == "ERROR" and "larger than the maximum" in headers["message"]
    assert shared_daemon.unix().call("Host.ping2") is True


def test_semantic_error_keeps_the_connection(raw):
    raw.connect()
    raw.send(frame("SEND", {"destination": "nowhere"}, "x"))
    command, headers, _ = raw.next()
    assert command == "ERROR" and "Unknown destination" in headers["message"]
    raw.send(frame("SUBSCRIBE", {"destination": RESPONSES, "id": "s"}))
    assert raw.call(request("Host.ping2"))["result"] is True


def test_connect_without_version_1_2_refused(raw):
    raw.send(frame("CONNECT", {"accept-version": "1.0,1.1"}))
    command, headers, _ = raw.next()
    assert command == "ERROR" and headers["version"] == "1.2"
    assert raw.closed.wait(10)


def test_http_and_stomp_on_the_same_port(shared_daemon, engine):
    assert shared_daemon.tcp().call("Host.ping2") is True
    assert call(engine, request("Host.ping2"))[1]["result"] is True
