"""A second host joins a pool: connectStorageServer, then StoragePool.connect
with the domains read from the master's metadata on the shared storage.

Lock: local (every host here uses the fcntl lock; this is not about the
cluster lock).  Host 1 creates the pool (create_pool: a file master and a
block domain on a loop device) and is SPM; host 2 has never seen them.
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from storage import api as storage_api
from storage import block_sd, loop
from tests.cluster import conftest, hosts, joining

pytestmark = [pytest.mark.root, pytest.mark.libvirt, conftest.requires_root,
              pytest.mark.timeout(300)]

MiB = 1024**2


def test_second_host_joins_and_sees_the_pool(cluster: hosts.Cluster) -> None:
    """Lock: local.  getInfo on both hosts shows the same domains, also after
    host 2's daemon restarts (it remembers its connections and its pool);
    disconnecting leaves nothing of host 2 behind."""
    h1, h2 = cluster.add_host(hosts.LOCAL), cluster.add_host(hosts.LOCAL)
    ids = cluster.create_pool()
    devices = joining.host_devices(cluster)
    # Not connected to the storage yet: host 2 knows no domain.
    assert h2.error_code("StorageDomain.getInfo", storagedomainID=ids.block_sd) == 358
    assert h2.error_code("StoragePool.connect", storagepoolID=ids.pool_id, hostID=2,
                         masterSdUUID=ids.master) == 304  # StoragePoolMasterNotFound
    joined = joining.join(cluster, h2, ids)
    try:
        for _ in range(2):
            info1 = h1.call("StoragePool.getInfo", storagepoolID=ids.pool_id)
            info2 = h2.call("StoragePool.getInfo", storagepoolID=ids.pool_id)
            assert set(info2["dominfo"]) == set(info1["dominfo"]) == set(ids.domains)
            for key in ("name", "type", "master_uuid", "domains", "spm_id"):
                assert info2["info"][key] == info1["info"][key], key
            for sd_id in ids.domains:
                assert info2["dominfo"][sd_id]["status"] == "Active"
                assert (h2.call("StorageDomain.getInfo", storagedomainID=sd_id)
                        == h1.call("StorageDomain.getInfo", storagedomainID=sd_id))
            spm = h2.call("StoragePool.getSpmStatus", storagepoolID=ids.pool_id)
            assert (spm["spmStatus"], spm["spmId"]) == ("Free", 1)
            assert joining.host_devices(cluster) > devices  # host 2 maps special LVs
            # A restarted daemon is still connected to the storage and the pool.
            h2.restart()
        with open(os.path.join(h2.config["irs"]["state_dir"], "connections.json")) as f:
            assert {e["connection"] for e in json.load(f).values()} == {
                joined.file_con["connection"], joined.block_con["connection"]}
    finally:
        joining.leave_quietly(joined)
    assert joining.host_devices(cluster) == devices
    assert joining.host_storage_files(h2) == []
    assert h2.error_code("StoragePool.getInfo", storagepoolID=ids.pool_id) == 309
    assert h1.call("StoragePool.getInfo", storagepoolID=ids.pool_id)["info"]["spm_id"] == 1


def test_bad_connections_change_nothing(cluster: hosts.Cluster) -> None:
    """Lock: local.  Each refused connection has its own status; a non-UUID
    id is refused by the schema; host 2 remembers nothing."""
    cluster.add_host(hosts.LOCAL)
    h2 = cluster.add_host(hosts.LOCAL)
    ids = cluster.create_pool()
    regular = os.path.join(cluster.storage_dir, "regular-file")
    open(regular, "w").close()
    directory = joining.file_dir(cluster, ids)
    cases = [("file", "relative/path"), ("file", directory + "-missing"), ("file", regular),
             ("block", regular), ("block", directory), ("block", "/dev/no-such-device")]
    for domain_type, connection in cases:
        con = {"id": hosts.new_id(), "connection": connection}
        assert joining.connect_storage(h2, domain_type, [con]) == [
            {"id": con["id"], "status": 453, "error": "StorageServerValidationError"}]
    assert h2.error_code("StoragePool.connectStorageServer", storagepoolID=joining.BLANK,
                         domainType="file",
                         connectionParams=[{"id": "not-a-uuid", "connection": directory}]
                         ) == -32602
    assert not os.path.exists(os.path.join(h2.config["irs"]["state_dir"], "connections.json"))
    assert h2.error_code("StoragePool.connect", storagepoolID=ids.pool_id, hostID=2,
                         masterSdUUID=ids.master) == 304


def extend_as_spm(cluster: hosts.Cluster, ids: hosts.PoolIds, sd_id: str, img: str, vol: str,
                  size: int) -> int:
    """The SPM's lvextend, made by a third host: this test process, with its
    own run and state dirs, takes the SPM role (host 1 stopped it), extends,
    and leaves the pool (no verb extends a volume: the watermark monitor
    does it in-process on the SPM)."""
    workdir = os.path.join(cluster.storage_dir, "host3-in-process")
    spm = storage_api.StorageAPI(
        os.path.join(workdir, "run"), state_dir=os.path.join(workdir, "state"), chunk_mb=16,
        activation_mode="loop", cluster_lock_mode="local", block_extent_size_mb=4)
    try:
        for domain_type, connection in (("file", joining.file_dir(cluster, ids)),
                                        ("block", cluster.block_devices[0])):
            spm.storage_pool_connect_storage_server(
                joining.BLANK, domain_type, [{"id": hosts.new_id(), "connection": connection}])
        spm.storage_pool_connect(ids.pool_id, 3, ids.master)
        spm.storage_pool_spm_start(ids.pool_id)
        size = spm.extend(ids.pool_id, sd_id, img, vol, size)
        spm.storage_pool_spm_stop(ids.pool_id)
        spm.storage_pool_disconnect(ids.pool_id, 3, ids.master)
        return size
    finally:  # whatever is left if a step failed: its devices, the lease
        if spm._pool is not None:
            spm._pool.shutdown()
        for sd_id in spm.cache.known():
            dom = spm.cache.get(sd_id)
            if isinstance(dom, block_sd.BlockDomain):
                for lv in dom.activation.active_lvs(dom.vg):
                    dom.activation.deactivate(dom.vg, lv)
        spm.close()


def qemu_img_info(path: str) -> dict:
    out = subprocess.run(["qemu-img", "info", "-U", "--output", "json", path],
                         capture_output=True, check=True, timeout=60)
    return json.loads(out.stdout)


def test_second_host_prepares_volumes_of_the_first(cluster: hosts.Cluster) -> None:
    """Lock: local.  Host 2 prepares a file and a block volume host 1 (SPM)
    created, and follows an extension made by the SPM on another host:
    Volume.getInfo reads the new size at once, a new prepare maps it."""
    h1, h2 = cluster.add_host(hosts.LOCAL), cluster.add_host(hosts.LOCAL)
    ids = cluster.create_pool()
    devices = joining.host_devices(cluster)
    joined = joining.join(cluster, h2, ids)
    prepared = []
    try:
        vols = {}
        for sd_id in ids.domains:
            img, vol = hosts.new_id(), hosts.new_id()
            task_id = h1.call("Volume.create", storagepoolID=ids.pool_id, storagedomainID=sd_id,
                              imageID=img, volumeID=vol, size=64 * MiB, volFormat="COW",
                              preallocate="SPARSE")
            assert h1.wait_task(task_id)["taskResult"] == "success"
            args = {"storagepoolID": ids.pool_id, "storagedomainID": sd_id, "imageID": img,
                    "volumeID": vol}
            prep = h2.call("Image.prepare", **args)
            prepared.append(args)
            assert prep["path"].startswith(h2.run_dir)
            assert qemu_img_info(prep["path"])["virtual-size"] == 64 * MiB
            vols[sd_id] = (args, prep["path"])
        args, path = vols[ids.block_sd]
        assert loop.size(path) == 16 * MiB  # one chunk

        assert h1.call("StoragePool.spmStop", storagepoolID=ids.pool_id) is True
        size = extend_as_spm(cluster, ids, ids.block_sd, args["imageID"], args["volumeID"],
                             48 * MiB)
        assert size == 48 * MiB
        assert h1.call("StoragePool.spmStart", storagepoolID=ids.pool_id) is True
        assert h2.call("Volume.getInfo", **args)["apparentsize"] == 48 * MiB
        assert h1.call("Volume.getInfo", **args)["apparentsize"] == 48 * MiB
        assert loop.size(path) == 16 * MiB  # host 2's own device, until it refreshes
        assert h2.call("Image.teardown", **args) is True
        prepared.remove(args)
        path = h2.call("Image.prepare", **args)["path"]
        prepared.append(args)
        assert loop.size(path) == 48 * MiB
    finally:
        for args in prepared:
            h2.call("Image.teardown", **args)
        joining.leave_quietly(joined)
    assert joining.host_devices(cluster) == devices
    assert joining.host_storage_files(h2) == []
