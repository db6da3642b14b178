"""Both protocols over mutual TLS on the daemon's TCP port (the certificates and
the daemon: tests/tls_fixtures.py)."""

from __future__ import annotations

import json
import queue
import socket
import ssl

import pytest
import stomp as stomp_py

from tests.rpc.conftest import RawStomp, frame, request
from vdsm_lsm import client

# pki, tls_daemon
pytest_plugins = ["tests.tls_fixtures"]


def tls_socket(daemon, pki, name="client") -> ssl.SSLSocket:
    ctx = ssl.create_default_context(cafile=f"{pki}/ca.crt")
    ctx.check_hostname = False
    ctx.load_cert_chain(f"{pki}/{name}.crt", f"{pki}/{name}.key")
    sock = socket.create_connection(("127.0.0.1", daemon.port), timeout=30)
    return ctx.wrap_socket(sock)


def test_http_over_mutual_tls(tls_daemon, pki):
    rpc = tls_daemon.tcp(tls_key=f"{pki}/client.key", tls_cert=f"{pki}/client.crt",
                         tls_ca=f"{pki}/ca.crt")
    assert rpc.call("Host.ping2") is True
    assert rpc.call("Host.ping2") is True  # kept alive


def test_stomp_over_mutual_tls_with_stomp_py(tls_daemon, pki):
    conn = stomp_py.Connection12([("localhost", tls_daemon.port)], heartbeats=(0, 100))
    conn.set_ssl(for_hosts=[("localhost", tls_daemon.port)], key_file=f"{pki}/client.key",
                 cert_file=f"{pki}/client.crt", ca_certs=f"{pki}/ca.crt",
                 ssl_version=ssl.PROTOCOL_TLS_CLIENT)
    messages: queue.Queue = queue.Queue()

    class Listener(stomp_py.ConnectionListener):
        def on_message(self, frame):
            messages.put(frame)

    conn.set_listener("l", Listener())
    conn.connect(wait=True)
    try:
        conn.subscribe("jms.topic.vdsm_irs_responses", id="irs")
        conn.send("jms.topic.vdsm_irs_requests", request("Host.ping2", req_id="tls"))
        message = messages.get(timeout=30)
        assert json.loads(message.body) == {"jsonrpc": "2.0", "id": "tls", "result": True}
        assert message.headers["subscription"] == "irs"
    finally:
        conn.disconnect()


def test_stomp_heart_beats_over_tls(tls_daemon, pki):
    raw = RawStomp(tls_socket(tls_daemon, pki))
    try:
        assert raw.connect(heart_beat="0,100")["heart-beat"] == "100,0"
        raw.send(frame("SUBSCRIBE", {"destination": "jms.topic.vdsm_responses", "id": "s"}))
        assert raw.call(request("Host.ping2"))["result"] is True
        raw.closed.wait(1.0)
        assert raw.heartbeats >= 3 and not raw.closed.is_set()
    finally:
        raw.close()


@pytest.mark.parametrize("name", [None, "intruder"])
def test_stomp_client_without_a_trusted_certificate_refused(tls_daemon, pki, name):
    ctx = ssl.create_default_context(cafile=f"{pki}/ca.crt")
    ctx.check_hostname = False
    if name:
        ctx.load_cert_chain(f"{pki}/{name}.crt", f"{pki}/{name}.key")
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        with socket.create_connection(("127.0.0.1", tls_daemon.port), timeout=30) as sock:
            with ctx.wrap_socket(sock) as tls:
                tls.sendall(frame("CONNECT", {"accept-version": "1.2"}))
                if not tls.recv(4096):
                    raise ConnectionError("closed")
    rpc = client.Client(host="127.0.0.1", port=tls_daemon.port, tls_key=f"{pki}/client.key",
                        tls_cert=f"{pki}/client.crt", tls_ca=f"{pki}/ca.crt", timeout=30)
    assert rpc.call("Host.ping2") is True


def test_plain_stomp_refused_on_the_tls_port(tls_daemon):
    with socket.create_connection(("127.0.0.1", tls_daemon.port), timeout=30) as sock:
        sock.sendall(frame("CONNECT", {"accept-version": "1.2"}))
        try:
            data = sock.recv(4096)
        except ConnectionResetError:
            data = b""
    assert not data.startswith(b"CONNECTED")


def test_unix_socket_speaks_plain_stomp_beside_tls(tls_daemon):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(30)
    sock.connect(tls_daemon.socket_path)
    raw = RawStomp(sock)
    try:
        raw.connect()
        raw.send(frame("SUBSCRIBE", {"destination": "jms.topic.vdsm_responses", "id": "s"}))
        assert raw.call(request("Host.ping2"))["result"] is True
    finally:
        raw.close()
