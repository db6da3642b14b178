"""JSON-RPC 2.0 conformance of the real daemon, over the unix socket and TCP."""

from __future__ import annotations

import json
import os
import stat

import pytest

from vdsm_lsm import client

UUID = "4c3a1f0e-3b9a-4d0f-9e59-5c4b7a6e8d21"


@pytest.fixture(scope="module")
def shared_daemon(tmp_path_factory):
    from tests import daemon as daemon_mod

    d = daemon_mod.Daemon(str(tmp_path_factory.mktemp("rpcd")))
    d.start()
    yield d
    d.stop()


@pytest.fixture(params=["unix", "tcp"])
def rpc(request, shared_daemon) -> client.Client:
    return getattr(shared_daemon, request.param)()


def test_ping(rpc):
    assert rpc.call("Host.ping2") is True


def test_parse_error(rpc):
    resp = rpc.post(b'{"jsonrpc": "2.0", "method": ')
    assert resp["error"]["code"] == -32700 and resp["id"] is None


@pytest.mark.parametrize(
    "body",
    [
        "1",
        '"x"',
        '{"jsonrpc": "1.0", "method": "Host.ping2", "id": 1}',
        '{"method": "Host.ping2", "id": 1}',
        '{"jsonrpc": "2.0", "method": 5, "id": 1}',
        '{"jsonrpc": "2.0", "method": "Host.ping2", "params": "x", "id": 1}',
        '{"jsonrpc": "2.0", "method": "Host.ping2", "id": {"a": 1}}',
        "[]",
    ],
)
def test_invalid_request(rpc, body):
    resp = rpc.post(body)
    assert resp["error"]["code"] == -32600


def test_invalid_request_keeps_id(rpc):
    resp = rpc.post('{"jsonrpc": "2.0", "method": 5, "id": 7}')
    assert resp["id"] == 7


def test_unknown_method(rpc):
    with pytest.raises(client.ClientError) as e:
        rpc.call("Host.nothing")
    assert e.value.code == -32601


@pytest.mark.parametrize(
    "params",
    [
        {"storagedomainID": "nope"},
        {"storagedomainID": f"{UUID}/../../etc"},
        {"storagedomainID": UUID, "bogus": True},
        {},
        {"storagedomainID": None},
    ],
)
def test_invalid_params(rpc, params):
    with pytest.raises(client.ClientError) as e:
        rpc.call("StorageDomain.getInfo", **params)
    assert e.value.code == -32602


def test_batch(rpc):
    batch = [
        {"jsonrpc": "2.0", "method": "Host.ping2", "id": 1},
        {"jsonrpc": "2.0", "method": "Host.ping2"},  # notification: no entry
        {"jsonrpc": "2.0", "method": "Host.nope", "id": 2},
        {"jsonrpc": "2.0", "method": "StorageDomain.getInfo", "params": {"storagedomainID": 1},
         "id": "three"},
        5,
    ]
    resp = rpc.post(json.dumps(batch))
    by_id = {r["id"]: r for r in resp}
    assert by_id[1]["result"] is True
    assert by_id[2]["error"]["code"] == -32601
    assert by_id["three"]["error"]["code"] == -32602
    assert by_id[None]["error"]["code"] == -32600
    assert len(resp) == 4


def test_notification_has_no_response(rpc):
    assert rpc.notify("Host.ping2") is None
    assert rpc.notify("Host.nope") is None


def test_batch_of_notifications_has_no_response(rpc):
    body = json.dumps([{"jsonrpc": "2.0", "method": "Host.ping2"}] * 3)
    assert rpc.post(body) is None


def test_coded_error_for_unimplemented_verb(rpc, shared_daemon):
    implemented = rpc.call("Host.getCapabilities")
    assert implemented["version"]


def test_unix_socket_mode(shared_daemon):
    mode = stat.S_IMODE(os.stat(shared_daemon.socket_path).st_mode)
    assert mode == 0o660


def test_request_logged_with_method_duration_code(shared_daemon):
    shared_daemon.unix().call("Host.ping2")
    assert "Request method=Host.ping2 duration=" in shared_daemon.log()


@pytest.mark.parametrize(
    "body",
    [
        b'{"jsonrpc": "2.0", "method": "Host.ping2", "id": 1, "params": {"\xff\xfe": 1}}',
        b"\xc3\x28",
        b'{"jsonrpc": "2.0", "method": "Host.ping2", "id": 1, "params": {"a": '
        + b"[" * 100_000 + b"]" * 100_000 + b"}}",
        b'{"jsonrpc": "2.0", "method": "Host.ping2", "id": 1, "params": {"a": '
        + b"[" * 200 + b"]" * 200 + b"}}",
        b'{"jsonrpc": "2.0", "method": "Host.ping2", "id": 1, "params": {"a": "\\udc80"}}',
        b"",
    ],
)
def test_bad_body_is_a_parse_error_never_a_server_error(rpc, body):
    resp = rpc.post(body)
    assert resp["error"]["code"] == -32700 and resp["id"] is None
    assert rpc.call("Host.ping2") is True  # the connection and the daemon are fine


def test_nesting_within_the_limit_is_not_a_parse_error(rpc):
    params = {"storagedomainID": UUID}
    nested: object = params
    for _ in range(50):
        nested = [nested]
    with pytest.raises(client.ClientError) as e:
        rpc.call("StorageDomain.getInfo", storagedomainID=nested)
    assert e.value.code == -32602
