"""Mutual TLS on the TCP listener (the certificates and the daemon: tests/tls_fixtures.py)."""

from __future__ import annotations

import ssl
import subprocess
import time

import pytest

from vdsm_lsm import client

# pki, tls_daemon
pytest_plugins = ["tests.tls_fixtures"]


def test_client_with_certificate_signed_by_ca_works(tls_daemon, pki):
    rpc = tls_daemon.tcp(tls_key=f"{pki}/client.key", tls_cert=f"{pki}/client.crt",
                         tls_ca=f"{pki}/ca.crt")
    assert rpc.call("Host.ping2") is True


def test_client_without_certificate_refused(tls_daemon, pki):
    rpc = tls_daemon.tcp(tls_ca=f"{pki}/ca.crt")
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        rpc.call("Host.ping2")
    # With TLS 1.3 the client may see the refusal before the server logs it.
    deadline = time.monotonic() + 60
    while "TLS handshake failed" not in tls_daemon.log() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "TLS handshake failed" in tls_daemon.log()


def test_client_with_foreign_certificate_refused(tls_daemon, pki):
    rpc = tls_daemon.tcp(tls_key=f"{pki}/intruder.key", tls_cert=f"{pki}/intruder.crt",
                         tls_ca=f"{pki}/ca.crt")
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        rpc.call("Host.ping2")


def test_plain_http_refused_on_tls_port(tls_daemon):
    rpc = client.Client(host="127.0.0.1", port=tls_daemon.port, timeout=30)
    with pytest.raises((ConnectionError, OSError, ValueError)):
        rpc.call("Host.ping2")


def test_unix_socket_still_plain(tls_daemon):
    assert tls_daemon.unix().call("Host.ping2") is True


def test_non_loopback_with_tls_allowed(daemon_factory, pki):
    d = daemon_factory(
        {"addresses": {"management_ip": "0.0.0.0"},
         "tls": {"enabled": True, "key": f"{pki}/server.key", "cert": f"{pki}/server.crt",
                 "ca": f"{pki}/ca.crt"}},
    )
    rpc = d.tcp(tls_key=f"{pki}/client.key", tls_cert=f"{pki}/client.crt",
                tls_ca=f"{pki}/ca.crt")
    assert rpc.call("Host.ping2") is True


def test_tls_enabled_with_missing_files_refused(daemon_factory, tmp_path):
    d = daemon_factory({"tls": {"enabled": True, "key": str(tmp_path / "nokey")}}, start=False)
    proc = subprocess.run(d.command(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "no such file" in proc.stderr
