"""The vdsm-lsm-client command against a real daemon."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from vdsm_lsm import client


def run_cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vdsm_lsm.cli", *args],
        capture_output=True, text=True, timeout=120, input=stdin,
    )


def test_call_over_unix_socket(daemon):
    proc = run_cli("--socket", daemon.socket_path, "Host", "ping2")
    assert proc.returncode == 0 and json.loads(proc.stdout) is True


def test_call_over_tcp(daemon):
    proc = run_cli("-a", "127.0.0.1", "-p", str(daemon.port), "Host", "getCapabilities")
    assert proc.returncode == 0
    caps = json.loads(proc.stdout)
    assert caps["libvirtVersion"] and caps["qemuVersion"] and caps["lvmVersion"]


def test_error_prints_code_and_exits_nonzero(daemon):
    proc = run_cli("--socket", daemon.socket_path, "StorageDomain", "getInfo",
                   "storagedomainID=../../etc")
    assert proc.returncode == 1
    assert proc.stderr.startswith("error -32602:")


def test_params_from_file_and_stdin(daemon, tmp_path):
    params = tmp_path / "p.json"
    params.write_text(json.dumps({"storagedomainID": "x"}))
    proc = run_cli("--socket", daemon.socket_path, "StorageDomain", "getInfo", "-f", str(params))
    assert "error -32602" in proc.stderr
    proc = run_cli("--socket", daemon.socket_path, "StorageDomain", "getInfo", "-f", "-",
                   stdin='{"storagedomainID": 5}')
    assert "error -32602" in proc.stderr


def test_help_lists_namespaces_and_verbs():
    proc = run_cli("-h")
    assert proc.returncode == 0
    assert "Image: prepare, teardown, cloneStructure, syncData, verify, delete" in proc.stdout
    assert "cloneImageStructure -> Image.cloneStructure" in proc.stdout


def test_verb_help_from_schema():
    proc = run_cli("Volume", "create", "-h")
    assert proc.returncode == 0
    assert "volFormat: COW|RAW" in proc.stdout
    assert "initialSize: size (optional)" in proc.stdout


def test_unknown_verb():
    proc = run_cli("Volume", "explode")
    assert proc.returncode == 2 and "unknown verb" in proc.stderr


def test_python_m_vdsm_lsm_client_still_runs_the_command(daemon):
    proc = subprocess.run(
        [sys.executable, "-m", "vdsm_lsm.client", "--socket", daemon.socket_path, "Host", "ping2"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0 and json.loads(proc.stdout) is True


def test_daemon_unreachable(tmp_path):
    proc = run_cli("--socket", str(tmp_path / "none.sock"), "Host", "ping2")
    assert proc.returncode == 3 and "cannot reach" in proc.stderr


@pytest.mark.parametrize(
    "text, value",
    [("5", 5), ("true", True), ('["a"]', ["a"]), ("abc", "abc"),
     ("4c3a1f0e-3b9a-4d0f-9e59-5c4b7a6e8d21", "4c3a1f0e-3b9a-4d0f-9e59-5c4b7a6e8d21")],
)
def test_value_parsing(text, value):
    assert client.parse_value(text) == value


def test_bad_pair():
    with pytest.raises(ValueError):
        client.parse_params(["novalue"], None)
