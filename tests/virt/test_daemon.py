"""VMs through the real vdsm-lsm daemon: JSON-RPC verbs, kill -9 and recovery."""

from __future__ import annotations

import os
import uuid
from typing import Any

import libvirt
import pytest

from contrib.guest import verifier
from tests import pool_site
from tests.virt.conftest import libvirt_connection
from vdsm_lsm import app, client

BLANK = "00000000-0000-0000-0000-000000000000"


def new_id() -> str:
    return str(uuid.uuid4())


class Site(pool_site.PoolSite):
    """A daemon with a pool of one file domain; this host is SPM."""

    def __init__(self, daemon: Any, workdir: str) -> None:
        super().__init__(daemon, new_id())
        self.sd_id = new_id()
        self.sd_path = os.path.join(workdir, "sd")
        self.create_file_domain(self.sd_id, self.sd_path, "vmtest")
        self.create_pool("vmtest", self.sd_id, [self.sd_id])

    def create_volume(self, img_id: str, vol_id: str, fmt: str, parent: str = BLANK) -> None:
        self.create_volume_on(self.sd_id, img_id, vol_id, fmt, parent)

    def cleanup(self) -> None:
        if self.daemon.proc is None:
            return
        for method, params in (
            ("StoragePool.destroy", {"storagepoolID": self.pool_id}),
            ("StorageDomain.format", {"storagedomainID": self.sd_id}),
        ):
            try:
                self.call(method, **params)
            except (client.ClientError, OSError) as e:
                print(f"clean-up {method}: {e}")


@pytest.fixture
def site(daemon_factory, workdir, domains):
    d = daemon_factory({"sanlock": {"cluster_lock": "local"}})
    s = Site(d, workdir)
    try:
        yield s
    finally:
        for vm_id in list(domains):
            try:
                s.call("VM.destroy", vmID=vm_id)
            except (client.ClientError, OSError):
                pass
        s.cleanup()


def code(name: str) -> int:
    return app.load_schema().code_of(name)


def test_vm_survives_daemon_kill9_and_is_recovered(site, vm_params):
    img, base, leaf = new_id(), new_id(), new_id()
    site.create_volume(img, base, "RAW")
    site.create_volume(img, leaf, "COW", parent=base)
    drive = {"poolID": site.pool_id, "domainID": site.sd_id, "imageID": img,
             "volumeID": leaf, "format": "cow"}
    vm = vm_params([drive], rate=100)
    assert site.call("VM.create", vmID=vm.vm_id, vmParams=vm.params)["vmId"] == vm.vm_id
    vm.wait_acks(20)

    site.daemon.kill9()
    # The guest does not notice: QEMU runs on without the daemon.
    before = vm.acks()
    vm.wait_acks(before + 10)
    site.daemon.start()

    assert (vm.vm_id, "Up") in [(v["vmId"], v["status"]) for v in site.call("Host.getVMList")]
    stats = site.call("VM.getStats", vmID=vm.vm_id)[0]
    assert stats["status"] == "Up" and stats["pauseCode"] == "NOERR"
    disk = stats["disks"]["vda"]
    assert [v["volumeID"] for v in disk["volumeChain"]] == [base, leaf]
    assert (disk["imageID"], disk["volumeID"]) == (img, leaf)
    # The recovered daemon holds the image prepared: deleting it is refused.
    with pytest.raises(client.ClientError):
        site.call("Image.delete", imageID=img, storagepoolID=site.pool_id,
                  storagedomainID=site.sd_id)

    after = vm.acks()
    vm.wait_acks(after + 10)
    assert site.call("VM.destroy", vmID=vm.vm_id) is True
    with pytest.raises(client.ClientError) as e:
        site.call("VM.getStats", vmID=vm.vm_id)[0]
    assert e.value.code == code("noVM")
    conn = libvirt_connection()
    try:
        with pytest.raises(libvirt.libvirtError):
            conn.lookupByUUIDString(vm.vm_id)
    finally:
        conn.close()
    leaf_path = os.path.join(site.sd_path, site.sd_id, "images", img, leaf)
    result = verifier.verify(vm.serial_log, leaf_path, image_format="qcow2")
    assert result.ok, str(result)


def test_vm_verbs_answer_coded_errors(site, vm_params):
    unknown = new_id()
    with pytest.raises(client.ClientError) as e:
        site.call("VM.getStats", vmID=unknown)[0]
    assert e.value.code == code("noVM")
    drive = {"poolID": site.pool_id, "domainID": site.sd_id, "imageID": new_id(),
             "volumeID": new_id(), "format": "cow"}
    vm = vm_params([drive])
    with pytest.raises(client.ClientError) as e:
        site.call("VM.create", vmID=vm.vm_id, vmParams=vm.params)
    assert e.value.code not in (code("GeneralException"), 0)
    assert site.call("Host.getVMList") == []
    bad = dict(vm.params, accel="xen")
    with pytest.raises(client.ClientError) as e:
        site.call("VM.create", vmID=vm.vm_id, vmParams=bad)
    assert e.value.code == -32602
