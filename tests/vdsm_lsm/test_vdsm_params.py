"""VDSM's verb signatures: the verbs we share with VDSM take VDSM's params.

Each verb is called through a real daemon's dispatcher with the params
VDSM's schema (``lib/vdsm/api/vdsm-api.yml``) gives it, shaped as the
engine and ``vdsm-client`` send them (sizes as strings, ``scsiKey``,
``masterVersion``, ``domainDict``, ``postZero``/``force``/``discard``,
drive specs with ``device`` and ``diskType``, ...).  Params honoured here
do what they say (``masterVersion``, ``allowIllegal``, ``autoDetach``,
``blockSize``, ``snapMemory``, Host.getVMList's filters); params accepted
and ignored change nothing (the same call without them gives the same
result); an unknown param is still refused with -32602.  No guest runs:
the VM verbs are called on a VM that does not exist, which is ``noVM``
(1), not a refusal of the params.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.vdsm_lsm.stomp_env import BLANK, MiB, new_id
from vdsm_lsm import api_schema, client, client_errors

INVALID = -32602


def code(name: str) -> int:
    return api_schema.code_of(name)


class Rpc:
    def __init__(self, daemon: Any) -> None:
        self.client = daemon.unix(timeout=120)

    def call(self, method: str, **params: Any) -> Any:
        return self.client.call(method, **params)

    def error(self, method: str, **params: Any) -> int:
        with pytest.raises(client_errors.ClientError) as e:
            self.client.call(method, **params)
        return e.value.code

    def wait_task(self, task_id: str) -> dict[str, Any]:
        deadline = time.monotonic() + 120
        while True:
            status = self.call("Task.getStatus", taskID=task_id)
            if status["taskState"] == "finished":
                break
            assert time.monotonic() < deadline, status
            time.sleep(0.1)
        self.call("Task.clear", taskID=task_id)
        assert status["taskResult"] == "success", status
        return status


@pytest.fixture
def rpc(daemon: Any) -> Iterator[Rpc]:
    r = Rpc(daemon)
    yield r
    r.client.close()


class Pool:
    """Three file domains (master, data, spare) in a pool this daemon is SPM of."""

    def __init__(self, rpc: Rpc, workdir: str) -> None:
        self.rpc = rpc
        self.pool_id = new_id()
        self.master, self.data, self.spare = new_id(), new_id(), new_id()
        self.paths = {}
        for sd_id in (self.master, self.data, self.spare):
            path = self.paths[sd_id] = os.path.join(workdir, sd_id[:8])
            os.makedirs(path)
            # VDSM's StorageDomain.create params; domainClass is VDSM's number (1: data).
            assert rpc.call("StorageDomain.create", storagedomainID=sd_id, domainType="file",
                            typeArgs={"path": path}, name=f"vdsm-{sd_id[:8]}", domainClass=1,
                            version=5, blockSize=512, maxHosts=250) is True
        assert rpc.call("StoragePool.create", storagepoolID=self.pool_id, name="vdsm",
                        masterSdUUID=self.master, masterVersion=7,
                        domainList=[self.master, self.data], lockRenewalIntervalSec=5,
                        leaseTimeSec=60, ioOpTimeoutSec=10, leaseRetries=3) is True

    def connect(self, **extra: Any) -> bool:
        return bool(self.rpc.call("StoragePool.connect", storagepoolID=self.pool_id, hostID=1,
                                  masterSdUUID=self.master, **extra))

    def create_volume(self, img_id: str, vol_id: str, **extra: Any) -> dict[str, Any]:
        params: dict[str, Any] = dict(
            storagepoolID=self.pool_id, storagedomainID=self.data, imageID=img_id,
            volumeID=vol_id, size=64 * MiB, volFormat="COW", preallocate="SPARSE", desc="",
            srcImgUUID=BLANK, srcVolUUID=BLANK)
        params.update(extra)
        self.rpc.wait_task(self.rpc.call("Volume.create", **params))
        return dict(self.rpc.call("Volume.getInfo", storagepoolID=self.pool_id,
                                  storagedomainID=self.data, imageID=img_id, volumeID=vol_id))


@pytest.fixture
def pool(rpc: Rpc, tmp_path: Any) -> Iterator[Pool]:
    p = Pool(rpc, str(tmp_path))
    yield p
    for method, params in [("StoragePool.destroy", {"storagepoolID": p.pool_id})] + [
        ("StorageDomain.format", {"storagedomainID": sd}) for sd in (p.master, p.data, p.spare)
    ]:
        try:
            rpc.call(method, **params)
        except client_errors.ClientError as e:
            print(f"clean-up {method}: {e}")


def comparable(info: dict[str, Any]) -> dict[str, Any]:
    """A volume's info without what differs between two volumes anyway."""
    return {k: v for k, v in info.items() if k not in ("uuid", "image", "ctime")}


def test_storage_domain_create_takes_vdsms_params(rpc, tmp_path):
    plain, vdsm = new_id(), new_id()
    for sd_id, extra in ((plain, {}), (vdsm, {"domainClass": 1, "version": 5, "blockSize": 0,
                                              "maxHosts": 250})):
        path = os.path.join(str(tmp_path), sd_id[:8])
        os.makedirs(path)
        assert rpc.call("StorageDomain.create", storagedomainID=sd_id, domainType="file",
                        typeArgs={"path": path}, name="same", **extra) is True
    try:
        infos = [{k: v for k, v in rpc.call("StorageDomain.getInfo", storagedomainID=sd).items()
                  if k not in ("uuid", "path")} for sd in (plain, vdsm)]
        assert infos[0] == infos[1]
    finally:
        for sd_id in (plain, vdsm):
            rpc.call("StorageDomain.format", storagedomainID=sd_id)
    # Honoured: a 4096-byte block size is not what this daemon makes; an ISO
    # or backup domain (VDSM's classes 2, 3) is not a class the schema takes.
    path = os.path.join(str(tmp_path), "other")
    os.makedirs(path)
    base = dict(storagedomainID=new_id(), domainType="file", typeArgs={"path": path}, name="x")
    assert rpc.error("StorageDomain.create", blockSize=4096, **base) == code(
        "StorageDomainCreationError")
    assert rpc.error("StorageDomain.create", domainClass=2, **base) == INVALID
    assert rpc.error("StorageDomain.create", domainClassTypo=1, **base) == INVALID
    assert os.listdir(path) == []


def test_pool_verbs_take_vdsms_params(rpc, pool):
    # masterVersion is honoured: the pool was made with 7, 6 is the wrong master.
    assert rpc.error("StoragePool.connect", storagepoolID=pool.pool_id, hostID=1,
                     masterSdUUID=pool.master, masterVersion=6,
                     scsiKey=pool.pool_id) == code("StoragePoolWrongMaster")
    assert rpc.error("StoragePool.getInfo", storagepoolID=pool.pool_id) == code(
        "StoragePoolUnknown")
    assert pool.connect(scsiKey=pool.pool_id, masterVersion=7,
                        domainDict={pool.master: "active", pool.data: "active"})
    info = rpc.call("StoragePool.getInfo", storagepoolID=pool.pool_id)
    assert info["info"]["master_ver"] == 7
    # domainDict is ignored: the domains are the master's, not the caller's.
    assert set(info["dominfo"]) == {pool.master, pool.data}
    assert rpc.call("StoragePool.spmStart", storagepoolID=pool.pool_id, prevID=-1,
                    prevLver="-1", enableScsiFencing="false", maxHostID=250,
                    domVersion="5") is True
    assert rpc.call("StoragePool.getSpmStatus", storagepoolID=pool.pool_id)["spmStatus"] == "SPM"
    assert rpc.error("StoragePool.spmStart", storagepoolID=pool.pool_id,
                     prevId=-1) == INVALID  # VDSM spells it prevID

    # disconnect: VDSM's scsiKey and remove, no masterSdUUID.
    assert rpc.call("StoragePool.spmStop", storagepoolID=pool.pool_id) is True
    assert rpc.call("StoragePool.disconnect", storagepoolID=pool.pool_id, hostID=1,
                    scsiKey=pool.pool_id, remove=False) is True
    assert rpc.error("StoragePool.getInfo", storagepoolID=pool.pool_id) == code(
        "StoragePoolUnknown")
    assert pool.connect()
    rpc.call("StoragePool.spmStart", storagepoolID=pool.pool_id)
    # destroy: VDSM's hostID and scsiKey.
    assert rpc.call("StoragePool.destroy", storagepoolID=pool.pool_id, hostID=1,
                    scsiKey=pool.pool_id) is True
    assert rpc.call("StorageDomain.getInfo", storagedomainID=pool.master)["pool"] == []


def test_volume_and_image_verbs_take_vdsms_params(rpc, pool):
    pool.connect(scsiKey=pool.pool_id, masterVersion=7)
    rpc.call("StoragePool.spmStart", storagepoolID=pool.pool_id)
    img, plain, vdsm = new_id(), new_id(), new_id()
    # Volume.create: the size as a string (the engine's), diskType and the
    # ignored 4.4/4.5 additions; the volume is the same as one made without them.
    ours = pool.create_volume(img, plain)
    theirs = pool.create_volume(new_id(), vdsm, size=str(64 * MiB), diskType="DATA",
                                addBitmaps=False, legal=True, sequence=1)
    assert comparable(ours) == comparable(theirs)
    assert theirs["legality"] == "LEGAL" and theirs["capacity"] == 64 * MiB

    # Image.prepare: allowIllegal is honoured.
    ids = dict(storagepoolID=pool.pool_id, storagedomainID=pool.data, imageID=img,
               volumeID=plain)
    prepared = rpc.call("Image.prepare", allowIllegal=False, **ids)
    assert prepared == rpc.call("Image.prepare", **ids)
    rpc.call("Image.teardown", **ids)
    rpc.call("Image.teardown", **ids)
    rpc.call("Volume.setLegality", legality="ILLEGAL", **ids)
    assert rpc.error("Image.prepare", **ids) == code("prepareIllegalVolumeError")
    assert rpc.call("Image.prepare", allowIllegal=True, **ids) == prepared
    rpc.call("Image.teardown", **ids)
    rpc.call("Volume.setLegality", legality="LEGAL", **ids)

    # Volume.delete and Image.delete: postZero, force, discard accepted; the
    # checks stay (force does not delete a prepared volume).
    rpc.call("Image.prepare", **ids)
    assert rpc.error("Volume.delete", postZero=True, force=True, discard=True,
                     **ids) == code("VolumeIsBusy")
    assert rpc.error("Image.delete", imageID=img, storagepoolID=pool.pool_id,
                     storagedomainID=pool.data, postZero=False, force=True,
                     discard=False) == code("VolumeIsBusy")
    rpc.call("Image.teardown", **ids)
    rpc.wait_task(rpc.call("Volume.delete", postZero=False, force=False, discard=False, **ids))
    rpc.wait_task(rpc.call("Image.delete", imageID=theirs["image"], storagepoolID=pool.pool_id,
                           storagedomainID=pool.data, postZero=False, force=False,
                           discard=False))
    assert rpc.call("StorageDomain.getImages", storagedomainID=pool.data) == []
    assert rpc.error("Volume.delete", zero=True, **ids) == INVALID


def test_storage_domain_format_auto_detach(rpc, pool):
    pool.connect()
    rpc.call("StoragePool.spmStart", storagepoolID=pool.pool_id)
    assert rpc.error("StorageDomain.format", storagedomainID=pool.data) == code(
        "CannotFormatAttachedStorageDomain")
    assert rpc.error("StorageDomain.format", storagedomainID=pool.data,
                     autoDetach=False) == code("CannotFormatAttachedStorageDomain")
    # The master is never detached; a data domain of our pool is, then formatted.
    assert rpc.error("StorageDomain.format", storagedomainID=pool.master,
                     autoDetach=True) == code("CannotDetachMasterStorageDomain")
    assert rpc.call("StorageDomain.format", storagedomainID=pool.data, autoDetach=True) is True
    assert rpc.error("StorageDomain.getInfo", storagedomainID=pool.data) == code(
        "StorageDomainDoesNotExist")
    info = rpc.call("StoragePool.getInfo", storagepoolID=pool.pool_id)
    assert set(info["dominfo"]) == {pool.master}
    # Not SPM: nothing is detached.
    rpc.call("StoragePool.attachStorageDomain", storagepoolID=pool.pool_id,
             storagedomainID=pool.spare)
    rpc.call("StoragePool.spmStop", storagepoolID=pool.pool_id)
    assert rpc.error("StorageDomain.format", storagedomainID=pool.spare,
                     autoDetach=True) == code("SpmStatusError")
    assert rpc.call("StorageDomain.getInfo", storagedomainID=pool.spare)["pool"] == [pool.pool_id]
    rpc.call("StoragePool.spmStart", storagepoolID=pool.pool_id)


def test_host_and_vm_verbs_take_vdsms_params(rpc):
    assert rpc.call("Host.getVMList", fullStatus=False, vmList=[], onlyUUID=False) == []
    assert rpc.call("Host.getVMList", onlyUUID=True) == []
    assert rpc.call("Host.getVMList", fullStatus=True, vmList=[new_id()]) == []
    devices = rpc.call("Host.getDeviceList")
    # VDSM's params are accepted; the list is the same kind of answer (the
    # machine's devices may come and go between two calls).
    with_params = rpc.call("Host.getDeviceList", storageType="iSCSI", guids=[],
                           checkStatus=False, refresh=True)
    assert isinstance(with_params, list)
    assert all(set(d) == {"path", "size", "serial", "usedBy"} for d in with_params)
    if devices:
        first = devices[0]["path"]
        # A guid names a device by its path or its serial (a loop device's
        # serial is its backing file, which several devices may share).
        picked = rpc.call("Host.getDeviceList", guids=[first])
        assert first in [d["path"] for d in picked]
        assert all(first in (d["path"], d["serial"]) for d in picked)
    assert rpc.call("Host.getDeviceList", guids=["no-such-device"]) == []

    vm_id, pool_id, sd_id, img, vol = (new_id() for _ in range(5))
    no_vm = code("noVM")
    drive = {"poolID": pool_id, "domainID": sd_id, "imageID": img, "volumeID": vol,
             "device": "disk", "diskType": "file"}
    dst = dict(drive, domainID=new_id(), diskType="block")
    assert rpc.error("VM.getStats", vmID=vm_id) == no_vm
    assert rpc.error("VM.destroy", vmID=vm_id, gracefulAttempts=1) == no_vm
    assert rpc.error("VM.cont", vmID=vm_id) == no_vm
    snap = {"domainID": sd_id, "imageID": img, "baseVolumeID": vol, "volumeID": new_id()}
    assert rpc.error("VM.snapshot", vmID=vm_id, snapDrives=[snap], frozen=False,
                     jobUUID=new_id(), timeout=30, freeze_timeout=8) == no_vm
    assert rpc.error("VM.snapshot", vmID=vm_id, snapDrives=[dict(snap, diskType="file")],
                     snapMemory="") == no_vm
    assert rpc.error("VM.diskReplicateStart", vmID=vm_id, srcDisk=drive, dstDisk=dst,
                     needExtend=False) == no_vm
    assert rpc.error("VM.diskReplicateFinish", vmID=vm_id, srcDisk=drive, dstDisk=dst) == no_vm
    # Unknown keys and params are still refused, before the VM is looked up.
    assert rpc.error("VM.diskReplicateStart", vmID=vm_id, srcDisk=dict(drive, shared="none"),
                     dstDisk=dst) == INVALID
    assert rpc.error("VM.destroy", vmID=vm_id, graceful=1) == INVALID
    assert rpc.error("VM.diskReplicateStart", vmID=vm_id, srcDisk=drive,
                     dstDisk=dict(dst, diskType="nfs")) == INVALID


def test_old_and_new_clients_agree_on_the_result_shapes(daemon):
    """HTTP and STOMP answer the same shapes (VM.getStats' list is VDSM's)."""
    from vdsm_lsm import stomp_client

    http = daemon.unix()
    stomp = stomp_client.StompClient(socket_path=daemon.socket_path, timeout=60)
    try:
        for method in ("Host.getVMList", "Host.getAllTasksInfo", "Host.ping2"):
            try:
                want = http.call(method)
            except client.ClientError as e:
                with pytest.raises(client.ClientError) as got:
                    stomp.call(method)
                assert got.value.code == e.code
                continue
            assert stomp.call(method) == want
    finally:
        http.close()
        stomp.close()
