"""Pools: create, connect, SPM role, attach/detach, destroy; two hosts
sharing the storage (two API objects with their own run dirs); state kept
across a daemon restart."""

from __future__ import annotations

import threading

import pytest

from storage import block_sd, errors, qemuimg, sd
from tests.storage.conftest import requires_root, stacked_loop_devices
from tests.storage.domain_helpers import (
    create_volume,
    make_pool,
    new_id,
    run_task,
)

pytest_plugins = ["tests.storage.domain_fixtures"]

pytestmark = requires_root

MiB = 1024**2


def domain_md(api, sd_id):
    return api.cache.get(sd_id).manifest.read_metadata()


def test_pool_lifecycle(api, domain_factory, file_domain_factory):
    master = domain_factory(api, name="master")
    other = file_domain_factory(api, name="other")
    pool_id = make_pool(api, master, [master, other], spm=False)

    md = domain_md(api, master)
    assert md["POOL_UUID"] == pool_id
    assert md["ROLE"] == "Master"
    assert md["POOL_DESCRIPTION"] == "pool"
    assert sd.parse_metadata(sd.dump_metadata(md), master) == md
    assert domain_md(api, other)["ROLE"] == "Regular"
    assert api.storage_domain_get_info(other)["pool"] == [pool_id]

    assert api.storage_pool_get_spm_status(pool_id) == {
        "spmStatus": "Free", "spmId": -1, "spmLver": 0,
    }
    assert api.storage_pool_spm_start(pool_id) is True
    status = api.storage_pool_get_spm_status(pool_id)
    assert status == {"spmStatus": "SPM", "spmId": 1, "spmLver": 1}
    assert domain_md(api, master)["POOL_SPM_ID"] == "1"
    # Idempotent.
    assert api.storage_pool_spm_start(pool_id) is True

    info = api.storage_pool_get_info(pool_id)
    assert info["info"]["name"] == "pool"
    assert info["info"]["master_uuid"] == master
    assert info["info"]["spm_id"] == 1
    assert set(info["dominfo"]) == {master, other}
    assert info["dominfo"][other]["status"] == "Active"
    assert info["dominfo"][other]["disktotal"] > 0

    assert api.storage_pool_detach_storage_domain(pool_id, other) is True
    assert domain_md(api, other)["POOL_UUID"] == ""
    assert other not in api.storage_pool_get_info(pool_id)["dominfo"]
    assert api.storage_pool_attach_storage_domain(pool_id, other) is True
    assert domain_md(api, other)["POOL_UUID"] == pool_id

    assert api.storage_pool_spm_stop(pool_id) is True
    assert api.storage_pool_get_spm_status(pool_id)["spmStatus"] == "Free"
    assert domain_md(api, master)["POOL_SPM_ID"] == "-1"
    assert api.storage_pool_spm_start(pool_id) is True
    assert api.storage_pool_get_spm_status(pool_id)["spmLver"] == 2

    assert api.storage_pool_destroy(pool_id) is True
    with pytest.raises(errors.StoragePoolUnknown):
        api.storage_pool_get_info(pool_id)
    for sd_id in (master, other):
        md = domain_md(api, sd_id)
        assert md["POOL_UUID"] == ""
        assert md["ROLE"] == "Regular"
        assert "POOL_DOMAINS" not in md
        assert api.storage_domain_format(sd_id) is True


def test_domain_rules(api, file_domain_factory):
    master = file_domain_factory(api)
    other = file_domain_factory(api)
    stranger = file_domain_factory(api)
    with pytest.raises(errors.StoragePoolCreationError):
        api.storage_pool_create(new_id(), "p", master, [other])
    with pytest.raises(errors.StorageDomainDoesNotExist):
        api.storage_pool_create(new_id(), "p", master, [master, new_id()])
    assert domain_md(api, master)["POOL_UUID"] == ""

    pool_id = make_pool(api, master, [master, other], spm=False)
    with pytest.raises(errors.StoragePoolAlreadyExists):
        api.storage_pool_create(pool_id, "p", master, [master])
    with pytest.raises(errors.StorageDomainAlreadyAttached):
        api.storage_pool_create(new_id(), "p", stranger, [stranger, other])
    assert domain_md(api, stranger)["POOL_UUID"] == ""

    # Attach and detach change the pool: SPM only.
    with pytest.raises(errors.SpmStatusError):
        api.storage_pool_attach_storage_domain(pool_id, stranger)
    api.storage_pool_spm_start(pool_id)
    with pytest.raises(errors.CannotDetachMasterStorageDomain):
        api.storage_pool_detach_storage_domain(pool_id, master)
    with pytest.raises(errors.StorageDomainNotInPool):
        api.storage_pool_detach_storage_domain(pool_id, stranger)
    with pytest.raises(errors.StorageDomainAlreadyAttached):
        api.storage_pool_attach_storage_domain(pool_id, other)
    with pytest.raises(errors.StorageDomainDoesNotExist):
        api.storage_pool_attach_storage_domain(pool_id, new_id())


def test_connect_rules(api, file_domain_factory):
    master = file_domain_factory(api)
    other = file_domain_factory(api)
    pool_id = make_pool(api, master, [master, other], spm=False)
    api.storage_pool_disconnect(pool_id, 1, master)
    with pytest.raises(errors.StoragePoolUnknown):
        api.storage_pool_get_info(pool_id)
    with pytest.raises(errors.StoragePoolWrongMaster):
        api.storage_pool_connect(pool_id, 1, other)
    with pytest.raises(errors.StoragePoolMasterNotFound):
        api.storage_pool_connect(pool_id, 1, new_id())
    with pytest.raises(errors.StoragePoolWrongMaster):
        api.storage_pool_connect(new_id(), 1, master)
    assert api.storage_pool_connect(pool_id, 1, master) is True
    assert api.storage_pool_connect(pool_id, 1, master) is True  # already connected
    with pytest.raises(errors.CannotConnectMultiplePools):
        api.storage_pool_connect(new_id(), 1, master)
    with pytest.raises(errors.StoragePoolUnknown):
        api.storage_pool_disconnect(new_id(), 1, master)
    for call in (api.storage_pool_spm_start, api.storage_pool_spm_stop,
                 api.storage_pool_get_spm_status, api.storage_pool_destroy):
        with pytest.raises(errors.StoragePoolUnknown):
            call(new_id())


def test_destroy_needs_spm(api, file_domain_factory):
    master = file_domain_factory(api)
    pool_id = make_pool(api, master, spm=False)
    with pytest.raises(errors.SpmStatusError):
        api.storage_pool_destroy(pool_id)
    assert api.storage_pool_get_info(pool_id)["info"]["name"] == "pool"


def test_disconnect_deactivates_special_lvs(api, block_domain_factory):
    sd_id = block_domain_factory(api)
    devices = api.cache.get(sd_id).manifest.devices
    pool_id = make_pool(api, sd_id)
    assert stacked_loop_devices(devices[0]) or api.cache.get(sd_id).activation_mode == "dm"
    assert api.storage_pool_disconnect(pool_id, 1, sd_id) is True
    assert stacked_loop_devices(devices[0]) == []
    # SPM was stopped by the disconnect: the lease is free again.
    api.storage_pool_connect(pool_id, 1, sd_id)
    api.storage_pool_spm_start(pool_id)
    assert api.storage_pool_get_spm_status(pool_id)["spmStatus"] == "SPM"


def test_spm_stop_refused_while_tasks_run(api, file_domain_factory, monkeypatch):
    sd_id = file_domain_factory(api)
    pool_id = make_pool(api, sd_id)
    started, release = threading.Event(), threading.Event()
    real_create = qemuimg.create

    def slow_create(*args, **kwargs):
        started.set()
        release.wait(60)
        return real_create(*args, **kwargs)

    monkeypatch.setattr(qemuimg, "create", slow_create)
    task_id = api.volume_create(pool_id, sd_id, new_id(), new_id(), MiB, "COW", "SPARSE")
    try:
        assert started.wait(60)
        with pytest.raises(errors.SpmStopError):
            api.storage_pool_spm_stop(pool_id)
        with pytest.raises(errors.SpmStopError):
            api.storage_pool_disconnect(pool_id, 1, sd_id)
        assert api.storage_pool_get_spm_status(pool_id)["spmStatus"] == "SPM"
    finally:
        release.set()
    assert run_task(api, task_id)["taskResult"] == "success"
    assert api.storage_pool_spm_stop(pool_id) is True


def test_reconnect_after_restart(api_factory, domain_factory):
    first = api_factory()
    sd_id = domain_factory(first)
    pool_id = make_pool(first, sd_id)
    img, vol = new_id(), new_id()
    task_id = first.volume_create(pool_id, sd_id, img, vol, 16 * MiB, "COW", "SPARSE")
    run_task(first, task_id)
    first.close()

    second = api_factory()  # same run dir: the daemon restarted
    second.recover()
    assert second.storage_pool_get_info(pool_id)["info"]["master_uuid"] == sd_id
    assert second.storage_pool_get_spm_status(pool_id)["spmStatus"] == "Free"
    assert second.volume_get_info(pool_id, sd_id, img, vol)["legality"] == "LEGAL"
    with pytest.raises(errors.SpmStatusError):
        second.host_get_all_tasks_info()
    second.storage_pool_spm_start(pool_id)
    # The finished task was persisted in the master domain and is listed again.
    assert second.task_get_status(task_id)["taskResult"] == "success"
    assert second.task_clear(task_id) is True
    with pytest.raises(errors.UnknownTask):
        second.task_get_status(task_id)


def test_two_hosts(api_factory, domain_factory, domain_type):
    """Host a is SPM; host b (its own run dir, the same storage) is not."""
    a = api_factory("a")
    b = api_factory("b")
    sd_id = domain_factory(a)
    entry = a.cache.registry.get(sd_id)
    b.learn_domain(sd_id, entry["type"], entry)
    pool_id = make_pool(a, sd_id)
    assert b.storage_pool_connect(pool_id, 2, sd_id) is True

    if domain_type == sd.FILE:
        # The local lock excludes another process on this kernel through the
        # shared leases file.  On a block domain each "host" here maps the
        # leases LV with its own loop device, which the local lock (one host
        # only, DESIGN section 6) can't see through; sanlock can.
        with pytest.raises(errors.AcquireLockFailure):
            b.storage_pool_spm_start(pool_id)
        status = b.storage_pool_get_spm_status(pool_id)
        assert status["spmStatus"] == "Free"
        assert status["spmId"] == 1

    img, vol = new_id(), new_id()
    with pytest.raises(errors.SpmStatusError):
        b.volume_create(pool_id, sd_id, img, vol, 16 * MiB, "COW", "SPARSE")
    task_id = a.volume_create(pool_id, sd_id, img, vol, 16 * MiB, "COW", "SPARSE")
    run_task(a, task_id)
    with pytest.raises(errors.SpmStatusError):
        b.volume_delete(pool_id, sd_id, img, vol)
    with pytest.raises(errors.SpmStatusError):
        b.host_get_all_tasks_statuses()
    # The SPM-request path: extend goes to the SPM through the storage
    # mailbox (tests/storage/test_mailbox_io.py), and a's answer is the size.
    assert b.extend(pool_id, sd_id, img, vol, 32 * MiB) == a.refresh(pool_id, sd_id, img, vol)
    with pytest.raises(errors.UnknownTask):
        b.task_get_status(task_id)

    # An HSM prepares volumes the SPM made.
    prep_b = b.image_prepare(pool_id, sd_id, img, vol)
    prep_a = a.image_prepare(pool_id, sd_id, img, vol)
    assert prep_b["path"] != prep_a["path"]
    if domain_type == sd.BLOCK:
        dom_a, dom_b = a.cache.get(sd_id), b.cache.get(sd_id)
        assert isinstance(dom_b, block_sd.BlockDomain)
        # Each host maps the LV with its own device.
        assert dom_a.activation.active_path(sd_id, vol) != dom_b.activation.active_path(
            sd_id, vol
        )
    b.image_teardown(pool_id, sd_id, img, vol)
    a.image_teardown(pool_id, sd_id, img, vol)

    # The SPM role moves: a stops, b starts and finds a's tasks.
    a.storage_pool_spm_stop(pool_id)
    assert b.storage_pool_spm_start(pool_id) is True
    assert b.storage_pool_get_spm_status(pool_id) == {
        "spmStatus": "SPM", "spmId": 2, "spmLver": 2,
    }
    if domain_type == sd.FILE:
        assert a.storage_pool_get_spm_status(pool_id)["spmId"] == 2
    assert b.task_get_status(task_id)["taskResult"] == "success"
    create_volume(b, pool_id, sd_id, img, new_id(), 16 * MiB, parent=vol)


def test_detach_of_domain_in_use_refused(api, file_domain_factory):
    master = file_domain_factory(api)
    other = file_domain_factory(api)
    pool_id = make_pool(api, master, [master, other])
    img, vol = new_id(), new_id()
    create_volume(api, pool_id, other, img, vol, 16 * MiB)
    api.image_prepare(pool_id, other, img, vol)
    with pytest.raises(errors.VolumeIsBusy):
        api.storage_pool_detach_storage_domain(pool_id, other)
    assert domain_md(api, other)["POOL_UUID"] == pool_id
    api.image_teardown(pool_id, other, img, vol)
    assert api.storage_pool_detach_storage_domain(pool_id, other) is True
