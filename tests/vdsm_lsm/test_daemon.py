"""The daemon process: start-up checks, readiness, signals, the run-dir lock."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from tests import daemon as daemon_mod


def test_sigterm_exits_cleanly_and_removes_socket(daemon):
    assert os.path.exists(daemon.socket_path)
    assert daemon.stop(signal.SIGTERM) == 0
    assert not os.path.exists(daemon.socket_path)
    assert "Stopped" in daemon.log()


def test_sigint_exits_cleanly(daemon):
    assert daemon.stop(signal.SIGINT) == 0
    assert not os.path.exists(daemon.socket_path)


def test_second_daemon_on_same_run_dir_refused(daemon):
    second = subprocess.run(daemon.command(), capture_output=True, timeout=60, text=True)
    assert second.returncode == 1
    assert "Another vdsm-lsm" in second.stderr
    # The first one is unharmed.
    assert daemon.unix().call("Host.ping2") is True


def test_restart_after_kill9_reuses_run_dir(daemon):
    daemon.kill9()
    daemon.start()
    assert daemon.unix().call("Host.ping2") is True


def test_non_loopback_without_tls_refused(daemon_factory):
    d = daemon_factory({"addresses": {"management_ip": "0.0.0.0"}}, start=False)
    proc = subprocess.run(d.command(), capture_output=True, timeout=60, text=True)
    assert proc.returncode == 1
    assert "without TLS" in proc.stderr
    assert not os.path.exists(d.socket_path)


def test_bad_config_is_a_clear_startup_error(daemon_factory):
    d = daemon_factory(start=False)
    with open(os.path.join(d.workdir, "conf.d", "50-bad.conf"), "w") as f:
        f.write("[thinp]\nmonitor_interval = soon\n")
    proc = subprocess.run(d.command(), capture_output=True, timeout=60, text=True)
    assert proc.returncode == 2
    assert "50-bad.conf" in proc.stderr and "[thinp] monitor_interval" in proc.stderr


def test_show_config_shows_conf_d_override(daemon_factory):
    d = daemon_factory(start=False)
    override = os.path.join(d.workdir, "conf.d", "90-override.conf")
    with open(override, "w") as f:
        f.write("[thinp]\nmonitor_interval = 0.5\n")
    proc = subprocess.run(
        [*d.command(), "--show-config"], capture_output=True, timeout=60, text=True
    )
    assert proc.returncode == 0
    lines = proc.stdout.splitlines()
    i = lines.index("monitor_interval = 0.5")
    assert override in lines[i - 1]


def test_systemd_notify_ready_and_stopping(daemon_factory, tmp_path):
    sock_path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(sock_path)
    sock.settimeout(60)
    try:
        d = daemon_factory(start=False)
        d.extra_env["NOTIFY_SOCKET"] = sock_path
        d.start()
        assert sock.recv(256) == b"READY=1"
        d.stop()
        assert sock.recv(256) == b"STOPPING=1"
    finally:
        sock.close()


def test_running_requests_finish_on_sigterm(daemon):
    """A request in flight when SIGTERM arrives still gets its answer."""
    body = b'{"jsonrpc": "2.0", "method": "Host.ping2", "id": 1}'
    head = (
        b"POST / HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n"
    )
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(60)
        s.connect(daemon.socket_path)
        before = daemon.log().count("Reading request")
        s.sendall(head + body[:10])
        # Wait until the daemon has the request: its handler thread is reading the body.
        deadline = time.monotonic() + 60
        while daemon.log().count("Reading request") == before and time.monotonic() < deadline:
            time.sleep(0.05)
        daemon.proc.send_signal(signal.SIGTERM)
        s.sendall(body[10:])
        answer = b""
        while b'"result": true' not in answer:
            chunk = s.recv(4096)
            if not chunk:
                break
            answer += chunk
    assert b'"result": true' in answer
    assert daemon.stop() == 0


@pytest.mark.parametrize("flag", ["--help"])
def test_help(flag):
    proc = subprocess.run(
        [sys.executable, "-m", "vdsm_lsm.daemon", flag], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0 and "--show-config" in proc.stdout


def test_unit_file_is_notify_and_after_libvirtd():
    top = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))
    with open(os.path.join(top, "vdsm-lsm.service")) as f:
        unit = f.read()
    assert "Type=notify" in unit
    assert "Restart=on-failure" in unit
    assert "After=" in unit and "libvirtd.service" in unit


def test_daemon_module_helpers():
    assert daemon_mod.free_port() > 0
