"""SPM and HSM across hosts: host 2 (HSM) refuses every SPM verb with
SpmStatusError (654) and changes nothing on the shared storage; its
prepare and teardown write no metadata; disconnecting leaves nothing of it.

Lock: local (every host here uses the fcntl lock; this is not about the
cluster lock).  Host 1 creates the pool (create_pool) and is SPM; host 2
joins it (tests/cluster/joining.py).  What is on storage is read by the
test itself (the file tree, the VG's seqno and LVs, the metadata LV's bytes
through the PV), not through either host.
"""

from __future__ import annotations

import os

import pytest

from tests.cluster import conftest, hosts, joining

pytestmark = [pytest.mark.root, pytest.mark.libvirt, conftest.requires_root,
              pytest.mark.timeout(300)]

MiB = 1024**2
SPM_STATUS_ERROR = 654


def make_chain(h1: hosts.ClusterHost, pool_id: str, sd_id: str) -> tuple[str, str, str]:
    """(image, base, leaf) made by the SPM."""
    img, base, leaf = hosts.new_id(), hosts.new_id(), hosts.new_id()
    for vol, parent in ((base, joining.BLANK), (leaf, base)):
        task_id = h1.call("Volume.create", storagepoolID=pool_id, storagedomainID=sd_id,
                          imageID=img, volumeID=vol, size=32 * MiB, volFormat="COW",
                          preallocate="SPARSE", srcImgUUID=img if parent != joining.BLANK
                          else joining.BLANK, srcVolUUID=parent)
        assert h1.wait_task(task_id)["taskResult"] == "success"
    return img, base, leaf


def test_hsm_refuses_spm_verbs_and_changes_nothing(cluster: hosts.Cluster) -> None:
    """Lock: local."""
    h1, h2 = cluster.add_host(hosts.LOCAL), cluster.add_host(hosts.LOCAL)
    ids = cluster.create_pool()
    # A detached domain host 2 could attach, in the master's directory.
    stranger = hosts.new_id()
    h1.call("StorageDomain.create", storagedomainID=stranger, domainType="file",
            typeArgs={"path": joining.file_dir(cluster, ids)}, name="stranger")
    joined = joining.join(cluster, h2, ids)
    try:
        chains = {sd_id: make_chain(h1, ids.pool_id, sd_id) for sd_id in ids.domains}
        before = joining.on_storage(cluster, ids)
        tasks = h1.call("Host.getAllTasksInfo")
        info = h1.call("StoragePool.getInfo", storagepoolID=ids.pool_id)
        for sd_id, other in ((ids.file_sd, ids.block_sd), (ids.block_sd, ids.file_sd)):
            img, base, leaf = chains[sd_id]
            vol = {"storagepoolID": ids.pool_id, "storagedomainID": sd_id, "imageID": img}
            image = {"storagepoolID": ids.pool_id, "storagedomainID": sd_id, "imageID": img}
            calls = [
                ("Volume.create", dict(vol, volumeID=hosts.new_id(), size=32 * MiB,
                                       volFormat="COW", preallocate="SPARSE", srcImgUUID=img,
                                       srcVolUUID=leaf)),
                ("Volume.delete", dict(vol, volumeID=leaf)),
                ("Volume.setLegality", dict(vol, volumeID=leaf, legality="ILLEGAL")),
                ("Volume.setLegality", dict(vol, volumeID=base, legality="LEGAL")),
                ("Image.cloneStructure", dict(image, dstSdUUID=other)),
                ("cloneImageStructure", {"spUUID": ids.pool_id, "sdUUID": sd_id,
                                         "imgUUID": img, "dstSdUUID": other}),
                ("Image.syncData", dict(image, dstSdUUID=other, syncType="ALL")),
                ("Image.delete", image),
                ("StoragePool.attachStorageDomain", {"storagepoolID": ids.pool_id,
                                                     "storagedomainID": stranger}),
                ("StoragePool.detachStorageDomain", {"storagepoolID": ids.pool_id,
                                                     "storagedomainID": ids.block_sd}),
                ("StoragePool.destroy", {"storagepoolID": ids.pool_id}),
                ("Host.getAllTasksStatuses", {}),
                ("Host.getAllTasksInfo", {}),
            ]
            for method, params in calls:
                assert h2.error_code(method, **params) == SPM_STATUS_ERROR, method
        assert joining.on_storage(cluster, ids) == before
        assert h1.call("Host.getAllTasksInfo") == tasks
        assert h1.call("StoragePool.getInfo", storagepoolID=ids.pool_id)["info"] == info["info"]
        assert h2.call("StoragePool.getInfo", storagepoolID=ids.pool_id)["info"]["domains"] == (
            info["info"]["domains"])
        # Formatting: refused for an attached domain (any host).
        assert h2.error_code("StorageDomain.format", storagedomainID=ids.block_sd) == 391
    finally:
        joining.leave_quietly(joined)
        h1.call("StorageDomain.format", storagedomainID=stranger)


def test_hsm_prepare_writes_no_metadata_and_disconnect_cleans_up(
        cluster: hosts.Cluster) -> None:
    """Lock: local.  Activation, links and reference counts are host 2's own;
    StoragePool.disconnect is refused while it has volumes prepared, then
    takes every device of host 2 away."""
    h1, h2 = cluster.add_host(hosts.LOCAL), cluster.add_host(hosts.LOCAL)
    ids = cluster.create_pool()
    devices = joining.host_devices(cluster)
    joined = joining.join(cluster, h2, ids)
    prepared: list[dict[str, str]] = []
    try:
        chains = {sd_id: make_chain(h1, ids.pool_id, sd_id) for sd_id in ids.domains}
        before = joining.on_storage(cluster, ids)
        for sd_id, (img, base, leaf) in chains.items():
            args = {"storagepoolID": ids.pool_id, "storagedomainID": sd_id, "imageID": img,
                    "volumeID": leaf}
            for _ in range(2):  # reference counted: twice
                prep = h2.call("Image.prepare", **args)
                prepared.append(args)
            assert [c["volumeID"] for c in prep["chain"]] == [base, leaf]
            path1 = h1.call("Image.prepare", **args)["path"]
            try:
                assert prep["path"].startswith(h2.run_dir) and path1.startswith(h1.run_dir)
                if sd_id == ids.block_sd:  # each host maps the LV with its own device
                    assert os.path.realpath(prep["path"]) != os.path.realpath(path1)
            finally:
                h1.call("Image.teardown", **args)
        assert joining.on_storage(cluster, ids) == before
        assert h2.error_code("StoragePool.disconnect", storagepoolID=ids.pool_id, hostID=2,
                             masterSdUUID=ids.master) == 203  # VolumeIsBusy
        while prepared:
            assert h2.call("Image.teardown", **prepared.pop()) is True
        assert joining.on_storage(cluster, ids) == before
    finally:
        for args in prepared:
            h2.call("Image.teardown", **args)
        joining.leave_quietly(joined)
    assert joining.host_devices(cluster) == devices
    assert joining.host_storage_files(h2) == []
    assert joining.on_storage(cluster, ids)["seqno"] == before["seqno"]
