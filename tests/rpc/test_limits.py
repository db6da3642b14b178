"""A bounded server: stalled, idle and oversized clients cannot take it from healthy ones.

In-process servers with small limits (tests/rpc/conftest.py) and, where the
daemon's own memory matters, the real daemon. Time bounds are generous: the
machine is shared.
"""

from __future__ import annotations

import json
import select
import socket
import threading
import time

import pytest

from rpc import server
from tests.rpc.conftest import RawStomp, frame, request
from vdsm_lsm import client

HEAD = b"POST / HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"


def post(body: bytes, extra: bytes = b"") -> bytes:
    return HEAD + extra + b"Content-Length: %d\r\n\r\n" % len(body) + body


def read_all(sock: socket.socket, timeout: float = 10.0) -> bytes:
    sock.settimeout(timeout)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except (TimeoutError, ConnectionResetError):
        pass
    return data


def read_until(sock: socket.socket, marker: bytes, timeout: float = 10.0) -> bytes:
    sock.settimeout(timeout)
    data = b""
    while marker not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def healthy_ping(served, timeout: float = 5.0) -> float:
    start = time.monotonic()
    assert client.Client(socket_path=served.unix_path, timeout=timeout).call("Host.ping2") is True
    rpc = client.Client(host="127.0.0.1", port=served.port, timeout=timeout)
    assert rpc.call("Host.ping2") is True
    return time.monotonic() - start


def stalled(served, count: int, data: bytes = b"POST / HTT") -> list[socket.socket]:
    socks = []
    for _ in range(count):
        s = served.tcp_socket()
        s.sendall(data)
        socks.append(s)
    wait_connections(served, count)
    return socks


def wait_connections(served, count: int) -> None:
    """Until the server has accepted that many (connect() returns before that)."""
    deadline = time.monotonic() + 30
    while served.server.connection_count() < count and time.monotonic() < deadline:
        time.sleep(0.02)


def test_slow_loris_dropped_after_the_timeout_while_others_are_served(served_factory):
    served = served_factory(server.Limits(request_timeout=1.0))
    half_line = stalled(served, 1)[0]
    half_body = served.tcp_socket()
    half_body.sendall(HEAD + b"Content-Length: 100\r\n\r\n{\"jsonrpc\"")
    silent = served.tcp_socket()
    assert healthy_ping(served) < 5
    for sock in (half_line, half_body):
        answer = read_all(sock)
        assert answer.startswith(b"HTTP/1.1 408 ")
        assert b"Request not received within 1s" in answer
    assert read_all(silent) == b""  # closed without a word: it never began
    assert healthy_ping(served) < 5


def test_200_idle_connections_while_a_healthy_client_is_served(served):
    stomps = []
    for _ in range(50):  # connected STOMP clients, silent
        stomps.append(RawStomp(served.unix_socket()))
        stomps[-1].connect()
    keepalive = []
    for _ in range(50):  # HTTP keep-alive connections between requests
        rpc = client.Client(host="127.0.0.1", port=served.port)
        assert rpc.call("Host.ping2") is True
        keepalive.append(rpc)
    idle = [served.tcp_socket() for _ in range(100)]  # connected, nothing sent yet
    wait_connections(served, 200)
    assert served.server.connection_count() == 200
    assert healthy_ping(served) < 5
    stomp = RawStomp(served.unix_socket())
    stomp.connect()
    stomp.send(frame("SUBSCRIBE", {"destination": "jms.topic.vdsm_responses", "id": "s"}))
    assert stomp.call(request("Host.ping2"))["result"] is True
    for sock in idle:
        sock.close()


def test_threads_stay_bounded_with_300_stalled_connections(served_factory):
    limits = server.Limits(workers=4)
    served = served_factory(limits)
    healthy_ping(served)
    before = threading.active_count()
    socks = stalled(served, 300)
    assert healthy_ping(served) < 5
    assert served.server.connection_count() >= 300
    assert threading.active_count() <= before + limits.workers
    for s in socks:
        s.close()


def test_connection_cap_closes_the_longest_idle_for_a_new_client(served_factory):
    served = served_factory(server.Limits(max_connections=20))
    socks = stalled(served, 20)
    assert served.server.connection_count() == 20
    assert healthy_ping(served) < 5  # two new connections: two were closed
    assert read_all(socks[0], timeout=5) == b""
    assert served.server.connection_count() <= 20


def test_connection_cap_refuses_when_every_connection_is_busy(served_factory):
    served = served_factory(server.Limits(max_connections=3, workers=4))
    busy = [served.unix_socket() for _ in range(3)]
    for sock in busy:
        sock.sendall(post(request("Test.sleep", {"seconds": 1.5}).encode()))
    time.sleep(0.3)
    refused = served.unix_socket()
    assert read_all(refused, timeout=5) == b""  # closed at once
    for sock in busy:
        assert b'"result": true' in read_until(sock, b'"result": true')
    assert healthy_ping(served) < 5


def test_oversized_body_refused_before_it_is_read(served):
    sock = served.unix_socket()
    size = 64 << 20
    sock.sendall(HEAD + b"Content-Length: %d\r\n\r\n" % size)
    sock.setblocking(False)
    chunk = b" " * (1 << 20)
    sent, answer = 0, b""
    deadline = time.monotonic() + 30
    while sent < size and time.monotonic() < deadline:
        readable, writable, _ = select.select([sock], [sock], [], 1)
        if readable:
            answer = sock.recv(65536)
            break
        if writable:
            try:
                sent += sock.send(chunk)
            except (BlockingIOError, BrokenPipeError, ConnectionResetError):
                pass
    assert answer.startswith(b"HTTP/1.1 413 ")
    assert sent < size // 2  # answered long before the client could send it
    body = json.loads(answer.split(b"\r\n\r\n", 1)[1])
    assert body["error"]["code"] == -32600 and "Request too large" in body["error"]["message"]
    sock.close()


def test_chunked_body_cut_off_at_the_limit(served_factory):
    served = served_factory(server.Limits(max_request=1024))
    sock = served.unix_socket()
    sock.sendall(HEAD + b"Transfer-Encoding: chunked\r\n\r\n" + b"800\r\n" + b"x" * 0x800 + b"\r\n")
    assert read_all(sock).startswith(b"HTTP/1.1 413 ")


def test_chunked_body_within_the_limit_is_served(served):
    body = request("Host.ping2").encode()
    sock = served.unix_socket()
    sock.sendall(HEAD + b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
                 + b"%x\r\n" % len(body) + body + b"\r\n0\r\n\r\n")
    assert b'"result": true' in read_all(sock)


def test_expect_100_continue(served):
    body = request("Host.ping2").encode()
    sock = served.unix_socket()
    sock.sendall(HEAD + b"Expect: 100-continue\r\nContent-Length: %d\r\n\r\n" % len(body))
    assert sock.recv(4096).startswith(b"HTTP/1.1 100 ")
    sock.sendall(body)
    assert b'"result": true' in sock.recv(4096)


def test_keep_alive_and_pipelined_requests_answered_in_order(served):
    sock = served.unix_socket()
    sock.sendall(b"".join(post(request("Test.echo", {"value": i}, req_id=i).encode())
                          for i in range(5)))
    data = b""
    while data.count(b"HTTP/1.1 200") < 5:
        data += sock.recv(65536)
        if b'"id": 4' in data:
            break
    ids = [int(part.split(b",", 1)[0]) for part in data.split(b'"id": ')[1:]]
    assert ids == [0, 1, 2, 3, 4]


@pytest.mark.parametrize(
    "raw, status",
    [
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"501"),
        (b"POST /other HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}", b"404"),
        (b"POST / HTTP/1.1\r\nHost: x\r\n\r\n", b"411"),
        (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n", b"400"),
        (b"garbage\r\n\r\n", b"400"),
        (b"POST / HTTP/1.1\r\nHost: x\r\nX: " + b"y" * 200_000 + b"\r\n\r\n", b"431"),
    ],
)
def test_bad_http_requests_get_an_error_status(served, raw, status):
    sock = served.unix_socket()
    sock.sendall(raw)
    assert read_all(sock).split(b" ")[1] == status
    assert healthy_ping(served) < 5


def test_input_budget_makes_big_uploads_wait_not_small_requests(served_factory):
    limits = server.Limits(input_budget=512 * 1024, small_input=64 * 1024, request_timeout=2.0)
    served = served_factory(limits)
    big = request("Test.echo", {"value": "x" * 400 * 1024}).encode()
    stuck = served.unix_socket()
    stuck.sendall(HEAD + b"Content-Length: %d\r\n\r\n" % len(big) + big[:-10])  # stalls
    time.sleep(0.3)
    second = served.unix_socket()
    second.sendall(post(big))  # waits for the budget
    assert healthy_ping(served) < 5
    assert read_all(stuck).startswith(b"HTTP/1.1 408 ")
    answer = read_all(second, timeout=10)
    assert answer.startswith(b"HTTP/1.1 200 ") and b'"result": "xxx' in answer


def test_stop_closes_idle_connections_and_finishes_running_requests(served_factory):
    served = served_factory()
    idle = client.Client(socket_path=served.unix_path)
    assert idle.call("Host.ping2") is True  # now an idle keep-alive connection
    http_busy = served.unix_socket()
    http_busy.sendall(post(request("Test.sleep", {"seconds": 1.0}).encode()))
    stomp_busy = RawStomp(served.unix_socket())
    stomp_busy.connect()
    stomp_busy.send(frame("SUBSCRIBE", {"destination": "jms.topic.vdsm_responses", "id": "s"}))
    stomp_busy.send(frame("SEND", {"destination": "jms.topic.vdsm_requests"},
                          request("Test.sleep", {"seconds": 1.0})))
    time.sleep(0.3)
    stopper = threading.Thread(target=served.stop)
    stopper.start()
    answer = read_all(http_busy)
    assert b'"result": true' in answer and b"Connection: close" in answer
    assert json.loads(stomp_busy.next()[2])["result"] is True
    assert stomp_busy.closed.wait(10)
    stopper.join(30)
    assert not stopper.is_alive()
    served.listeners = []  # stopped
    with pytest.raises(OSError):
        idle.call("Host.ping2")


def test_daemon_refuses_a_64_mib_body_without_reading_it(daemon):
    def rss_kib() -> int:
        with open(f"/proc/{daemon.proc.pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))

    before = rss_kib()
    size = 64 << 20
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=30) as sock:
        sock.sendall(HEAD + b"Content-Length: %d\r\n\r\n" % size)
        sock.settimeout(0.2)
        sent, answer = 0, b""
        while sent < size and not answer:
            try:
                answer = sock.recv(65536)
            except TimeoutError:
                try:
                    sock.sendall(b" " * (1 << 20))
                    sent += 1 << 20
                except OSError:
                    break
    assert answer.startswith(b"HTTP/1.1 413 ") and sent < size // 2
    assert rss_kib() - before < 16 * 1024
    assert daemon.unix().call("Host.ping2") is True


def _push_without_reading(sock: socket.socket, data: bytes, seconds: float) -> int:
    """Send as much as the server takes in `seconds`, reading nothing back."""
    sock.setblocking(False)
    sent = 0
    deadline = time.monotonic() + seconds
    while sent < len(data) and time.monotonic() < deadline:
        _, writable, _ = select.select([], [sock], [], 0.1)
        if writable:
            try:
                sent += sock.send(data[sent:sent + 65536])
            except BlockingIOError:
                pass
    return sent




@pytest.mark.parametrize("protocol", ["http", "stomp"])
def test_client_that_does_not_read_is_not_buffered_without_bound(served_factory, protocol):
    limits = server.Limits(output_high_water=256 * 1024, write_timeout=2.0)
    served = served_factory(limits)
    value = "x" * 100 * 1024
    one = request("Test.echo", {"value": value})
    if protocol == "http":
        data = post(one.encode()) * 200
    else:
        data = (frame("CONNECT", {"accept-version": "1.2"})
                + frame("SUBSCRIBE", {"destination": "jms.topic.vdsm_responses", "id": "s"})
                + frame("SEND", {"destination": "jms.topic.vdsm_requests"}, one) * 200)
    sock = served.unix_socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sent = _push_without_reading(sock, data, 1.5)
    assert sent < len(data) // 2  # the server stopped reading
    # What it holds for this client: the high-water mark plus the answers in flight.
    stats = served.server.stats()
    assert stats["max_output"] < limits.output_high_water + 20 * len(value)
    assert stats["buffered_input"] < 4 * 1024 * 1024  # what was read and not yet answered
    deadline = time.monotonic() + 10
    while served.server.connection_count() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert served.server.connection_count() == 0  # closed by the write time-out
    assert healthy_ping(served) < 5
    sock.close()
