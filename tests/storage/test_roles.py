"""Joining a pool from another host, and the SPM and HSM roles.

Two StorageAPI objects with their own run and state dirs are two hosts on
the same storage: "a" creates the domains and the pool and is SPM (local
cluster lock); "b" knows nothing of them (an empty registry), connects to
the storage (connectStorageServer) and then to the pool, whose domains it
reads from the master's metadata.  b refuses every SPM verb with
SpmStatusError having changed nothing on storage, and its SPM-request path
answers SpmRequestUnavailable for set_volume_legality (extend goes to the
SPM through the storage mailbox: tests/storage/test_mailbox_io.py); what
it reads (volume lists, sizes, legality, LV layouts) always comes from the
storage, so it sees what a changed."""

from __future__ import annotations

import hashlib
import os

import pytest

from storage import block_sd, errors, image_ops, loop, lvm_cmd, sd, sync, volume
from tests.storage.conftest import requires_root, stacked_loop_devices
from tests.storage.domain_helpers import (
    create_volume,
    domain_state,
    make_pool,
    new_id,
    run_task,
)

pytest_plugins = ["tests.storage.domain_fixtures"]

pytestmark = requires_root

MiB = 1024**2
BLANK = sd.BLANK_UUID


def on_storage(provider, sd_id):
    """What another host must not change, read through provider: the VG's
    seqno, its LVs and the metadata LV's bytes (block), or every file with
    its size, mtime and, for metadata, its bytes (file)."""
    dom = provider.cache.get(sd_id)
    if isinstance(dom, block_sd.BlockDomain):
        args = lvm_cmd.report_args("vgs", "vg_seqno", [dom.vg])
        out = lvm_cmd.run(args, dom.lvm.config(), 60)
        seqno = lvm_cmd.parse_report("vgs", "vg", out)[0]["vg_seqno"]
        dev = dom.manifest.special_path("metadata")
        size = dom.manifest.lv_info("metadata").size
        data = dom.env.oop.read_direct(dev, 0, size)
        return seqno, domain_state(provider, sd_id), hashlib.sha256(data).hexdigest()
    files = []
    for dirpath, _, names in os.walk(dom.manifest.root):
        for name in names:
            path = os.path.join(dirpath, name)
            st = os.stat(path)
            digest = ""
            if name.endswith(".meta") or name == "metadata":
                with open(path, "rb") as f:
                    digest = hashlib.sha256(f.read()).hexdigest()
            files.append((os.path.relpath(path, dom.manifest.root), st.st_size,
                          st.st_mtime_ns, digest))
    return sorted(files)


@pytest.fixture
def hosts(api_factory, file_domain_factory, block_domain_factory, storage_tmpdir):
    """a: SPM of a pool (file master, block domain) plus a detached file
    domain; b: connected to the storage and to the pool as host 2."""
    a, b = api_factory("a"), api_factory("b")
    master = file_domain_factory(a, name="master")
    block_id = block_domain_factory(a, name="block")
    stranger = file_domain_factory(a, name="stranger")
    pool_id = make_pool(a, master, [master, block_id])
    mnt = os.path.join(storage_tmpdir, "mnt")
    dev = a.cache.registry.get(block_id)["devices"][0]
    assert b.storage_pool_connect_storage_server(BLANK, "file", [
        {"id": new_id(), "connection": mnt}])[0]["status"] == ""
    assert b.storage_pool_connect_storage_server(BLANK, "block", [
        {"id": new_id(), "connection": dev}])[0]["status"] == ""
    assert b.storage_pool_connect(pool_id, 2, master) is True
    return {"a": a, "b": b, "pool": pool_id, "file": master, "block": block_id,
            "stranger": stranger, "dev": dev, "mnt": mnt}


def test_joins_from_the_master_metadata(hosts):
    a, b, pool_id = hosts["a"], hosts["b"], hosts["pool"]
    assert list(b.cache.registry) == []  # nothing of this host's own
    assert set(b.cache.learned()) == {hosts["file"], hosts["block"]}
    info_a, info_b = a.storage_pool_get_info(pool_id), b.storage_pool_get_info(pool_id)
    for key in ("name", "type", "master_uuid", "master_ver", "domains", "spm_id"):
        assert info_b["info"][key] == info_a["info"][key], key
    assert info_b["info"]["spm_id"] == 1
    assert set(info_b["dominfo"]) == set(info_a["dominfo"]) == {hosts["file"], hosts["block"]}
    for sd_id, entry in info_b["dominfo"].items():
        assert entry["status"] == info_a["dominfo"][sd_id]["status"] == "Active"
        assert entry["disktotal"] == info_a["dominfo"][sd_id]["disktotal"]
    assert b.storage_pool_get_spm_status(pool_id)["spmId"] == 1
    assert b.storage_domain_get_info(hosts["block"]) == a.storage_domain_get_info(hosts["block"])


def test_a_domain_not_found_is_inaccessible(api_factory, file_domain_factory, storage_tmpdir):
    a, b = api_factory("a"), api_factory("b")
    master = file_domain_factory(a)
    other_dir = os.path.join(storage_tmpdir, "elsewhere")
    os.makedirs(other_dir)
    other = new_id()
    a.storage_domain_create(other, "file", {"path": other_dir}, "elsewhere")
    pool_id = make_pool(a, master, [master, other])
    b.storage_pool_connect_storage_server(BLANK, "file", [
        {"id": new_id(), "connection": os.path.join(storage_tmpdir, "mnt")}])
    assert b.storage_pool_connect(pool_id, 2, master) is True
    dominfo = b.storage_pool_get_info(pool_id)["dominfo"]
    assert dominfo[master]["status"] == "Active"
    assert dominfo[other]["status"] == "Inaccessible"
    assert dominfo[other]["alerts"][0]["code"] == "StorageDomainDoesNotExist"
    with pytest.raises(errors.StorageDomainDoesNotExist):
        b.volume_get_info(pool_id, other, new_id(), new_id())
    # Connected to its storage too: found at once.
    b.storage_pool_connect_storage_server(BLANK, "file", [
        {"id": new_id(), "connection": other_dir}])
    assert b.storage_pool_get_info(pool_id)["dominfo"][other]["status"] == "Active"


def test_master_must_be_found_on_the_storage(api_factory, file_domain_factory, storage_tmpdir):
    a, b = api_factory("a"), api_factory("b")
    master = file_domain_factory(a)
    other = file_domain_factory(a)
    pool_id = make_pool(a, master, [master, other], spm=False)
    with pytest.raises(errors.StoragePoolMasterNotFound):
        b.storage_pool_connect(pool_id, 2, master)  # not connected to its storage
    b.storage_pool_connect_storage_server(BLANK, "file", [
        {"id": new_id(), "connection": os.path.join(storage_tmpdir, "mnt")}])
    with pytest.raises(errors.StoragePoolMasterNotFound):
        b.storage_pool_connect(pool_id, 2, new_id())
    with pytest.raises(errors.StoragePoolWrongMaster):
        b.storage_pool_connect(pool_id, 2, other)
    assert b.cache.learned() == {}  # a failed connect keeps nothing
    with pytest.raises(errors.StoragePoolUnknown):
        b.storage_pool_get_info(pool_id)
    assert b.storage_pool_connect(pool_id, 2, master) is True


def test_hsm_refuses_every_spm_verb_and_changes_nothing(hosts):
    a, b, pool_id = hosts["a"], hosts["b"], hosts["pool"]
    vols = {}
    for sd_id in (hosts["file"], hosts["block"]):
        img, base, leaf = new_id(), new_id(), new_id()
        create_volume(a, pool_id, sd_id, img, base, 16 * MiB)
        create_volume(a, pool_id, sd_id, img, leaf, 16 * MiB, parent=base)
        vols[sd_id] = (img, leaf)
    domains = (hosts["file"], hosts["block"], hosts["stranger"])
    before = {sd_id: on_storage(a, sd_id) for sd_id in domains}
    tasks = set(a.host_get_all_tasks_info())
    ops = image_ops.ImageOps(b)
    for sd_id, other in ((hosts["file"], hosts["block"]), (hosts["block"], hosts["file"])):
        img, leaf = vols[sd_id]
        calls = [
            (b.volume_create, (pool_id, sd_id, img, new_id(), 16 * MiB, "COW", "SPARSE", "",
                               img, leaf)),
            (b.volume_delete, (pool_id, sd_id, img, leaf)),
            (b.volume_set_legality, (pool_id, sd_id, img, leaf, volume.ILLEGAL)),
            (ops.image_clone_structure, (img, pool_id, sd_id, other)),
            (ops.image_sync_data, (img, pool_id, sd_id, other, sync.ALL)),
            (ops.image_delete, (img, pool_id, sd_id)),
            (b.storage_pool_attach_storage_domain, (pool_id, hosts["stranger"])),
            (b.storage_pool_detach_storage_domain, (pool_id, hosts["block"])),
            (b.storage_pool_destroy, (pool_id,)),
            (b.host_get_all_tasks_statuses, ()),
            (b.host_get_all_tasks_info, ()),
        ]
        for verb, args in calls:
            with pytest.raises(errors.SpmStatusError):
                verb(*args)
                pytest.fail(f"{verb.__name__} succeeded on the HSM")
        # The SPM-request path (virt's): legality is for the SPM only (extend
        # goes to the SPM through the mailbox: test_mailbox_io.py).
        assert b.is_spm(pool_id) is False
        with pytest.raises(errors.SpmRequestUnavailable):
            b.set_volume_legality(pool_id, sd_id, img, leaf, False)
    assert {sd_id: on_storage(a, sd_id) for sd_id in domains} == before
    assert set(a.host_get_all_tasks_info()) == tasks  # b submitted nothing
    assert b.storage_pool_get_info(pool_id)["info"]["domains"] == (
        a.storage_pool_get_info(pool_id)["info"]["domains"])


def test_hsm_prepare_and_teardown_write_nothing(hosts):
    a, b, pool_id, dev = hosts["a"], hosts["b"], hosts["pool"], hosts["dev"]
    chains = {}
    for sd_id in (hosts["file"], hosts["block"]):
        img, base, leaf = new_id(), new_id(), new_id()
        create_volume(a, pool_id, sd_id, img, base, 16 * MiB)
        create_volume(a, pool_id, sd_id, img, leaf, 16 * MiB, parent=base)
        chains[sd_id] = (img, base, leaf)
    before = {sd_id: on_storage(a, sd_id) for sd_id in chains}
    loops = set(stacked_loop_devices(dev))
    for sd_id, (img, base, leaf) in chains.items():
        prep = b.image_prepare(pool_id, sd_id, img, leaf)
        assert [c["volumeID"] for c in prep["chain"]] == [base, leaf]
        assert prep["path"].startswith(b.run_dir)
        assert os.path.exists(prep["path"])
        assert b.unsynced_volumes(pool_id, sd_id, img, leaf) == []
    assert len(stacked_loop_devices(dev)) == len(loops) + 2  # b's own devices
    for sd_id, (img, _, leaf) in chains.items():
        assert b.image_teardown(pool_id, sd_id, img, leaf) is True
    assert set(stacked_loop_devices(dev)) == loops
    assert not os.path.exists(os.path.join(b.run_dir, "storage", hosts["block"]))
    assert {sd_id: on_storage(a, sd_id) for sd_id in chains} == before


def test_hsm_reads_what_the_spm_changed(hosts):
    """No reading of the SPM's changes is kept on the HSM: a new volume, an
    extension (the LV's new extents: refresh grows b's own device) and a
    new legality are seen at once."""
    a, b, pool_id, block_id = hosts["a"], hosts["b"], hosts["pool"], hosts["block"]
    img, base = new_id(), new_id()
    create_volume(a, pool_id, block_id, img, base, 64 * MiB)
    prep = b.image_prepare(pool_id, block_id, img, base)
    assert loop.size(prep["path"]) == 8 * MiB  # one chunk
    # a makes a snapshot leaf after b connected: b lists and prepares it.
    leaf = new_id()
    create_volume(a, pool_id, block_id, img, leaf, 64 * MiB, parent=base)
    assert b.storage_domain_get_volumes(block_id, pool_id, img) == sorted([base, leaf])
    leaf_prep = b.image_prepare(pool_id, block_id, img, leaf)
    try:
        assert a.extend(pool_id, block_id, img, leaf, 24 * MiB) == 24 * MiB
        assert b.volume_get_info(pool_id, block_id, img, leaf)["apparentsize"] == 24 * MiB
        assert loop.size(leaf_prep["path"]) == 8 * MiB  # until b refreshes
        assert b.refresh(pool_id, block_id, img, leaf) == 24 * MiB
        assert loop.size(leaf_prep["path"]) == 24 * MiB
        # Legality written by the SPM, read by the HSM.
        assert a.volume_set_legality(pool_id, block_id, img, base, volume.ILLEGAL) is True
        assert b.volume_get_info(pool_id, block_id, img, base)["legality"] == volume.ILLEGAL
        assert b.unsynced_volumes(pool_id, block_id, img, leaf) == [
            {"volumeID": base, "legality": volume.ILLEGAL}]
        a.volume_set_legality(pool_id, block_id, img, base, volume.LEGAL)
        assert b.unsynced_volumes(pool_id, block_id, img, leaf) == []
    finally:
        b.image_teardown(pool_id, block_id, img, leaf)
        b.image_teardown(pool_id, block_id, img, base)


def test_set_legality_verb(api, file_domain_factory):
    sd_id = file_domain_factory(api)
    pool_id = make_pool(api, sd_id)
    img, vol = new_id(), new_id()
    create_volume(api, pool_id, sd_id, img, vol, MiB)
    for legality in (volume.ILLEGAL, volume.ILLEGAL, volume.LEGAL):
        assert api.volume_set_legality(pool_id, sd_id, img, vol, legality) is True
        assert api.volume_get_info(pool_id, sd_id, img, vol)["legality"] == legality
    with pytest.raises(errors.VolumeDoesNotExist):
        api.volume_set_legality(pool_id, sd_id, img, new_id(), volume.LEGAL)
    with pytest.raises(errors.ImageDoesNotExistInSD):
        api.volume_set_legality(pool_id, sd_id, new_id(), vol, volume.LEGAL)
    with pytest.raises(errors.InvalidUUID):
        api.volume_set_legality(pool_id, sd_id, img, "../x", volume.LEGAL)
    # The SPM-request path runs in-process on the SPM.
    assert api.is_spm(pool_id) is True
    api.set_volume_legality(pool_id, sd_id, img, vol, False)
    assert api.volume_get_info(pool_id, sd_id, img, vol)["legality"] == volume.ILLEGAL
    api.set_volume_legality(pool_id, sd_id, img, vol, True)
    assert api.is_spm(new_id()) is False
    with pytest.raises(errors.StoragePoolUnknown):
        api.set_volume_legality(new_id(), sd_id, img, vol, True)


def test_disconnect_leaves_the_storage_as_found(hosts):
    a, b, pool_id, dev = hosts["a"], hosts["b"], hosts["pool"], hosts["dev"]
    block_id = hosts["block"]
    img, vol = new_id(), new_id()
    create_volume(a, pool_id, block_id, img, vol, 16 * MiB)
    b.image_prepare(pool_id, block_id, img, vol)
    with pytest.raises(errors.VolumeIsBusy):
        b.storage_pool_disconnect(pool_id, 2, hosts["file"])
    b.image_teardown(pool_id, block_id, img, vol)
    dom_a = a.cache.get(block_id)
    devices_a = {dom_a.activation.active_path(block_id, lv)
                 for lv in dom_a.activation.active_lvs(block_id)}
    assert set(stacked_loop_devices(dev)) > devices_a  # b's own as well
    assert b.storage_pool_disconnect(pool_id, 2, hosts["file"]) is True
    assert set(stacked_loop_devices(dev)) == devices_a
    assert b.cache.learned() == {}
    assert not os.path.exists(os.path.join(b.run_dir, "storage", block_id))
    dom_b = block_sd.open_domain(block_id, {"devices": [dev]}, b.env)
    assert dom_b.activation.active_lvs(block_id) == []
    # a is untouched: still SPM, its devices still there.
    task_id = a.volume_delete(pool_id, block_id, img, vol)
    assert run_task(a, task_id)["taskResult"] == "success"
