"""Storage server connections (StoragePool.connectStorageServer /
disconnectStorageServer) and finding domains on them: good and bad input
(a refused connection changes nothing), answers through the schema, state
kept across a restart, domains found on the connected storage."""

from __future__ import annotations

import json
import os

import pytest

from rpc import dispatch
from storage import block_sd, connections, errors, file_sd, sd
from tests.storage.conftest import requires_root, stacked_loop_devices
from tests.storage.domain_helpers import make_pool, new_id
from vdsm_lsm import api_schema

pytest_plugins = ["tests.storage.domain_fixtures"]

pytestmark = requires_root

BLANK = sd.BLANK_UUID


def con(connection, conn_id=None):
    return {"id": conn_id or new_id(), "connection": connection}


def state_file(api):
    return os.path.join(api.state_dir, connections.STATE_FILE)


def statuses(result):
    return [r["status"] for r in result]


@pytest.fixture
def mnt(storage_tmpdir):
    path = os.path.join(storage_tmpdir, "mnt")
    os.makedirs(path, exist_ok=True)
    return path


def test_connect_file_and_block(api_factory, mnt, loop_device_factory):
    api = api_factory()
    dev = loop_device_factory(64 * 1024**2)
    file_con, block_con = con(mnt + "/"), con(dev)
    assert api.storage_pool_connect_storage_server(BLANK, "file", [file_con]) == [
        {"id": file_con["id"], "status": ""}
    ]
    assert api.storage_pool_connect_storage_server(BLANK, "block", [block_con]) == [
        {"id": block_con["id"], "status": ""}
    ]
    # Again: already connected.
    assert statuses(api.storage_pool_connect_storage_server(BLANK, "file", [file_con])) == [""]
    assert sorted((c.domain_type, c.connection) for c in api.connections.all()) == [
        ("block", dev), ("file", mnt),  # normalized: no trailing slash
    ]
    # Remembered: a restarted daemon is still connected.
    restarted = api_factory()
    restarted.recover()
    assert {c.id: c.connection for c in restarted.connections.all()} == {
        file_con["id"]: mnt, block_con["id"]: dev,
    }


def test_bad_connections_refused_and_nothing_changes(api, mnt, storage_tmpdir,
                                                     loop_device_factory):
    dev = loop_device_factory(64 * 1024**2)
    regular = os.path.join(storage_tmpdir, "regular-file")
    open(regular, "w").close()
    cases = [
        ("file", "relative/dir"),
        ("file", os.path.join(storage_tmpdir, "missing")),
        ("file", regular),
        ("file", dev),
        ("file", ""),
        ("block", mnt),
        ("block", regular),
        ("block", "/dev/loop-does-not-exist"),
        ("block", "loop0"),
        ("block", '/dev/loop0"|r'),
    ]
    for domain_type, connection in cases:
        before = sorted(os.listdir(storage_tmpdir))
        result = api.storage_pool_connect_storage_server(BLANK, domain_type, [con(connection)])
        assert statuses(result) == ["StorageServerValidationError"], (domain_type, connection)
        assert sorted(os.listdir(storage_tmpdir)) == before
    assert api.connections.all() == []
    assert not os.path.exists(state_file(api))


def test_one_refused_connection_leaves_the_others(api, mnt, storage_tmpdir):
    good, bad = con(mnt), con("not/absolute")
    result = api.storage_pool_connect_storage_server(BLANK, "file", [good, bad])
    assert result == [
        {"id": good["id"], "status": ""},
        {"id": bad["id"], "status": "StorageServerValidationError"},
    ]
    assert [c.id for c in api.connections.all()] == [good["id"]]
    # An id already naming another connection is refused; the first stays.
    other = os.path.join(storage_tmpdir, "other")
    os.makedirs(other)
    again = con(other, good["id"])
    assert statuses(api.storage_pool_connect_storage_server(BLANK, "file", [again])) == [
        "StorageServerConnectionError"
    ]
    assert [c.connection for c in api.connections.all()] == [mnt]


@pytest.mark.parametrize("bad_id", ["not-a-uuid", "../../etc", "", None, 7])
def test_ids_that_are_not_uuids_refuse_the_whole_call(api, mnt, bad_id):
    for verb in (api.storage_pool_connect_storage_server,
                 api.storage_pool_disconnect_storage_server):
        with pytest.raises(errors.InvalidUUID):
            verb(BLANK, "file", [con(mnt), {"id": bad_id, "connection": mnt}])
    assert api.connections.all() == []
    assert not os.path.exists(state_file(api))


def test_answers_through_the_schema(api, mnt):
    """The rpc layer answers [{id, status (code), error (name)}]; a non-UUID
    id never reaches the handler (-32602)."""
    d = dispatch.Dispatcher(api_schema.load(), [api])
    good, bad = con(mnt), con("relative")
    ok, result = d.handle("StoragePool.connectStorageServer", {
        "storagepoolID": BLANK, "domainType": "file", "connectionParams": [good, bad],
    })
    assert ok
    assert result == [
        {"id": good["id"], "status": 0, "error": ""},
        {"id": bad["id"], "status": 453, "error": "StorageServerValidationError"},
    ]
    ok, (code, _) = d.handle("StoragePool.connectStorageServer", {
        "storagepoolID": BLANK, "domainType": "file",
        "connectionParams": [{"id": "nope", "connection": mnt}],
    })
    assert (ok, code) == (False, -32602)
    ok, (code, _) = d.handle("StoragePool.disconnectStorageServer", {
        "storagepoolID": BLANK, "domainType": "file",
        "connectionParams": [{"id": new_id(), "connection": mnt, "extra": 1}],
    })
    assert (ok, code) == (False, -32602)
    assert [c.id for c in api.connections.all()] == [good["id"]]


def test_domains_found_on_the_connected_storage(api_factory, file_domain_factory,
                                                block_domain_factory, mnt):
    a, b = api_factory("a"), api_factory("b")
    file_id = file_domain_factory(a)
    block_id = block_domain_factory(a)
    devices = a.cache.registry.get(block_id)["devices"]
    with pytest.raises(errors.StorageDomainDoesNotExist):
        b.storage_domain_get_info(file_id)
    b.storage_pool_connect_storage_server(BLANK, "file", [con(mnt)])
    b.storage_pool_connect_storage_server(BLANK, "block", [con(d) for d in devices])
    # Found on the storage, not in b's registry.
    assert isinstance(b.cache.get(file_id), file_sd.FileDomain)
    assert isinstance(b.cache.get(block_id), block_sd.BlockDomain)
    assert list(b.cache.registry) == []
    assert set(b.cache.learned()) == {file_id, block_id}
    for sd_id in (file_id, block_id):
        assert b.storage_domain_get_info(sd_id) == a.storage_domain_get_info(sd_id)
    with pytest.raises(errors.StorageDomainDoesNotExist):
        b.storage_domain_get_info(new_id())


def test_disconnect(api_factory, file_domain_factory, block_domain_factory, mnt):
    a, b = api_factory("a"), api_factory("b")
    master = file_domain_factory(a)
    block_id = block_domain_factory(a)
    dev = a.cache.registry.get(block_id)["devices"][0]
    pool_id = make_pool(a, master, [master, block_id])
    file_con, block_con = con(mnt), con(dev)
    b.storage_pool_connect_storage_server(BLANK, "file", [file_con])
    b.storage_pool_connect_storage_server(BLANK, "block", [block_con])
    loops_a = set(stacked_loop_devices(dev))
    b.storage_pool_connect(pool_id, 2, master)
    assert len(stacked_loop_devices(dev)) > len(loops_a)  # b maps the special LVs too

    # An unknown id is already disconnected; an id naming another connection
    # is refused; a connection the connected pool's domains live on too.
    assert statuses(b.storage_pool_disconnect_storage_server(BLANK, "file", [con(mnt)])) == [""]
    wrong = con("/somewhere/else", file_con["id"])
    assert statuses(b.storage_pool_disconnect_storage_server(BLANK, "file", [wrong])) == [
        "StorageServerDisconnectionError"
    ]
    for domain_type, c in (("file", file_con), ("block", block_con)):
        result = b.storage_pool_disconnect_storage_server(BLANK, domain_type, [c])
        assert statuses(result) == ["StorageServerDisconnectionError"]
    assert len(b.connections.all()) == 2

    # Disconnected from the pool: the domains it learned are forgotten and
    # b's devices are gone; then the connections may go.
    assert b.storage_pool_disconnect(pool_id, 2, master) is True
    assert b.cache.learned() == {}
    assert set(stacked_loop_devices(dev)) == loops_a
    b.storage_domain_get_info(block_id)  # found again, maps the metadata LV
    assert len(stacked_loop_devices(dev)) > len(loops_a)
    assert statuses(b.storage_pool_disconnect_storage_server(BLANK, "block", [block_con])) == [""]
    assert set(stacked_loop_devices(dev)) == loops_a
    assert b.cache.learned() == {}
    assert statuses(b.storage_pool_disconnect_storage_server(BLANK, "file", [file_con])) == [""]
    assert b.connections.all() == []
    with open(state_file(b)) as f:
        assert json.load(f) == {}
    with pytest.raises(errors.StorageDomainDoesNotExist):
        b.storage_domain_get_info(master)
