"""Mutual-TLS fixtures shared by the TLS tests (tests/vdsm_lsm/test_tls.py,
tests/rpc/test_stomp_tls.py): a throw-away PKI made with openssl (a CA,
a rogue CA, server, client and intruder certificates) and a daemon whose
TCP listener requires client certificates of the CA.  Import both fixtures
into the test module."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from typing import Any

import pytest

from tests import daemon as daemon_mod


def _openssl(*args: str, cwd: str) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _issue(cwd: str, name: str, ca: str, cn: str) -> None:
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out",
             f"{name}.csr", "-subj", f"/CN={cn}", cwd=cwd)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key",
             "-CAcreateserial", "-out", f"{name}.crt", "-days", "2", cwd=cwd)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: Any) -> str:
    d = str(tmp_path_factory.mktemp("pki"))
    for ca in ("ca", "rogue"):
        _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{ca}.key",
                 "-out", f"{ca}.crt", "-days", "2", "-subj", f"/CN={ca}", cwd=d)
    _issue(d, "server", "ca", "localhost")
    _issue(d, "client", "ca", "engine")
    _issue(d, "intruder", "rogue", "engine")
    return d


@pytest.fixture(scope="module")
def tls_daemon(tmp_path_factory: Any, pki: str) -> Iterator[daemon_mod.Daemon]:
    d = daemon_mod.Daemon(
        str(tmp_path_factory.mktemp("tlsd")),
        {"tls": {"enabled": True, "key": f"{pki}/server.key", "cert": f"{pki}/server.crt",
                 "ca": f"{pki}/ca.crt"}},
    )
    d.start()
    try:
        yield d
    finally:
        d.stop()
