"""Host verbs against the real libvirtd, qemu-img, lvm2 and udev data."""

from __future__ import annotations

import os
import tempfile

from storage import loop, lvm
from vdsm_lsm import app


def test_capabilities_report_real_versions(daemon):
    caps = daemon.unix().call("Host.getCapabilities")
    conn_version = os.popen("virsh -c qemu:///system version").read()
    assert caps["libvirtVersion"] in conn_version
    assert caps["qemuVersion"] in conn_version
    assert caps["qemuImgVersion"] in os.popen("qemu-img --version").read()
    assert caps["lvmVersion"] in os.popen("lvm version").read()
    assert caps["activation"] == app.effective_activation("auto")
    assert caps["clusterLock"] in ("sanlock", "local")
    assert "disk_replicate" in caps["features"]


def test_activation_mode_from_config(daemon_factory):
    d = daemon_factory({"lvm": {"activation": "loop"}, "sanlock": {"cluster_lock": "local"}})
    caps = d.unix().call("Host.getCapabilities")
    assert caps["activation"] == "loop" and caps["clusterLock"] == "local"


def test_device_list_has_real_devices(daemon):
    devices = daemon.unix().call("Host.getDeviceList")
    assert devices
    for dev in devices:
        assert dev["path"].startswith("/dev/")
        assert dev["size"] > 0
        assert set(dev) == {"path", "size", "serial", "usedBy"}


def test_device_list_reports_lvm_users(daemon):
    backing = tempfile.NamedTemporaryFile(dir="/var/tmp", prefix="lsmtest-devlist-")
    os.truncate(backing.name, 64 * 1024**2)
    dev = loop.attach(backing.name)
    lvm_ = lvm.LVM([dev], activation=False)
    try:
        lvm_.pvcreate([dev])
        lvm_.vgcreate("lsmtest-devlist", [dev], extent_size_mb=4)
        devices = {d["path"]: d for d in daemon.unix().call("Host.getDeviceList")}
        assert devices[dev]["usedBy"] == "lvm:lsmtest-devlist"
        assert devices[dev]["size"] == 64 * 1024**2
    finally:
        try:
            lvm_.vgremove("lsmtest-devlist")
            lvm_.pvremove([dev])
        finally:
            loop.detach(dev)
            backing.close()
