"""The whole live storage migration (DESIGN section 1) over STOMP, as VDSM's engine drives it.

A client that is not ours (``stomp.py`` frames, tests/vdsm_lsm/stomp_env.py)
talks to one daemon (SPM, ``cluster_lock = local``) over TCP with VDSM's
params and shapes: sizes as strings, drive specs with ``device`` and
``diskType``, the pool's ``scsiKey``/``masterVersion``/``domainDict``,
spmStart's ``prevID``/``prevLver``, VM.snapshot's ``frozen``/``jobUUID``,
VM.getStats answering a list of one.  It waits on the pushed events (task
finished, mirror ready, VM status) instead of polling, while the test guest
writes; the verifier finds every acknowledged write on the destination
chain.  Then ``vdsm-lsm-client --stomp move-disk`` moves a writing guest's
disk the same way: our own CLI over STOMP, waiting on events.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from contrib.guest import verifier
from tests.vdsm_lsm import stomp_env
from tests.vdsm_lsm.stomp_env import BLANK, new_id
from tests.virt.conftest import domains, guest_files, vm_params, workdir  # noqa: F401
from vdsm_lsm import api_schema, client_errors

TOP = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def site(daemon_factory: Any, workdir: str, domains: list[str]) -> Iterator[stomp_env.Site]:  # noqa: F811
    s = stomp_env.Site(daemon_factory({"sanlock": {"cluster_lock": "local"}}), workdir)
    try:
        yield s
    finally:
        s.cleanup(list(domains))


def test_live_storage_migration_over_stomp_with_vdsm_params(site, vm_params):  # noqa: F811
    rpc = site.rpc
    img, base, leaf = new_id(), new_id(), new_id()
    site.create_volume(img, base, "RAW")
    site.create_volume(img, leaf, "COW", parent=base)
    vm = site.start_guest(vm_params, img, leaf)

    # 1. Live snapshot: a new leaf (Volume.create), then VM.snapshot onto it.
    snap = new_id()
    site.create_volume(img, snap, "COW", parent=leaf)
    assert rpc.call("VM.snapshot", vmID=vm.vm_id, snapDrives=[
        {"domainID": site.src_sd, "imageID": img, "baseVolumeID": leaf, "volumeID": snap}],
        frozen=False, jobUUID=new_id(), timeout=30, freeze_timeout=8) is True
    stats = rpc.call("VM.getStats", vmID=vm.vm_id)
    assert isinstance(stats, list) and len(stats) == 1
    assert stats[0]["disks"]["vda"]["volumeID"] == snap and stats[0]["statusTime"].isdigit()
    vm.wait_acks(vm.acks() + 10)

    # 2. The image's structure on the destination (empty, ILLEGAL).
    rpc.wait_task(rpc.call("Image.cloneStructure", imageID=img, storagepoolID=site.pool_id,
                           storagedomainID=site.src_sd, dstSdUUID=site.dst_sd))

    # 3. Mirror the leaf: the mirror's readiness is pushed.
    src = site.drive(site.src_sd, img, snap)
    dst = site.drive(site.dst_sd, img, snap)
    mark = rpc.mark()
    assert rpc.call("VM.diskReplicateStart", vmID=vm.vm_id, srcDisk=src, dstDisk=dst,
                    needExtend=False) is True

    # 4. Copy the internal volumes while the mirror runs.
    event = rpc.wait_task(rpc.call("Image.syncData", imageID=img, storagepoolID=site.pool_id,
                                   storagedomainID=site.src_sd, dstSdUUID=site.dst_sd,
                                   syncType="INTERNAL"))
    assert (event["taskResult"], event["code"]) == ("success", 0)
    ready = rpc.wait_event(f"|virt|VM_replication|{vm.vm_id}", after=mark)
    assert ready["drive"] == "vda" and ready["state"] == "ready", ready
    vm.wait_acks(vm.acks() + 10)

    # 5. Pivot once the mirror caught up (unavail: not yet, retry).
    def pivoted() -> bool:
        replicate = rpc.call("VM.getStats", vmID=vm.vm_id)[0]["disks"]["vda"]["replicate"]
        if replicate["state"] != "ready" or replicate["cur"] != replicate["end"]:
            return False
        try:
            return rpc.call("VM.diskReplicateFinish", vmID=vm.vm_id, srcDisk=src, dstDisk=dst)
        except client_errors.ClientError as e:
            if e.code != api_schema.code_of("unavail"):
                raise
            return False

    stomp_env.wait_for(pivoted, 120, "the pivot")
    assert rpc.call("Volume.setLegality", storagepoolID=site.pool_id,
                    storagedomainID=site.dst_sd, imageID=img, volumeID=snap,
                    legality="LEGAL") is True
    disk = rpc.call("VM.getStats", vmID=vm.vm_id)[0]["disks"]["vda"]
    assert disk["domainID"] == site.dst_sd and "replicate" not in disk
    assert [v["volumeID"] for v in disk["volumeChain"]] == [base, leaf, snap]
    for vol in (base, leaf, snap):
        info = rpc.call("Volume.getInfo", storagepoolID=site.pool_id,
                        storagedomainID=site.dst_sd, imageID=img, volumeID=vol)
        assert info["legality"] == "LEGAL", (vol, info)
    vm.wait_acks(vm.acks() + 20)

    # 6. The source image goes (VDSM's postZero/force/discard accepted).
    rpc.wait_task(rpc.call("Image.delete", imageID=img, storagepoolID=site.pool_id,
                           storagedomainID=site.src_sd, postZero=False, force=False,
                           discard=False))
    assert rpc.call("StorageDomain.getImages", storagedomainID=site.src_sd) == []
    listed = rpc.call("Host.getVMList")
    assert [(v["vmId"], v["status"]) for v in listed] == [(vm.vm_id, "Up")]
    assert listed[0]["statusTime"].isdigit()

    mark = rpc.mark()
    assert rpc.call("VM.destroy", vmID=vm.vm_id, gracefulAttempts=1) is True
    down = rpc.wait_event(f"|virt|VM_status|{vm.vm_id}", after=mark)
    assert down[vm.vm_id]["status"] == "Down"
    result = verifier.verify(vm.serial_log, site.volume_path(site.dst_sd, img, snap),
                             image_format="qcow2")
    assert result.ok and result.lost == 0, str(result)
    assert rpc.errors.empty()


def test_move_disk_over_stomp_waits_on_events(site, vm_params):  # noqa: F811
    img, base, leaf = new_id(), new_id(), new_id()
    site.create_volume(img, base, "RAW")
    site.create_volume(img, leaf, "COW", parent=base)
    vm = site.start_guest(vm_params, img, leaf)
    assert BLANK not in (img, base, leaf)

    argv = [sys.executable, "-m", "vdsm_lsm.cli", "--stomp", "-a", "127.0.0.1", "-p",
            str(site.daemon.port), "move-disk", vm.vm_id, site.dst_sd, "--delete-source",
            "--timeout", "300"]
    proc = subprocess.run(argv, cwd=TOP, capture_output=True, text=True, timeout=600)
    print(f"$ {' '.join(argv)}\nrc={proc.returncode}\n{proc.stdout}\n{proc.stderr}")

    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert (summary["srcDomainID"], summary["dstDomainID"]) == (site.src_sd, site.dst_sd)
    chain = summary["volumeChain"]
    assert chain[:2] == [base, leaf] and len(chain) == 3
    # The daemon served the move over STOMP (no HTTP request since the VM
    # started); the CLI subscribed to the events as well as the test's client.
    log = site.daemon.log().split("Created vm=")[-1]
    assert "Reading request client=" not in log
    assert "destination=jms.queue.events" in log
    disk = site.rpc.call("VM.getStats", vmID=vm.vm_id)[0]["disks"]["vda"]
    assert disk["domainID"] == site.dst_sd and "replicate" not in disk
    vm.wait_acks(vm.acks() + 20)

    site.rpc.call("VM.destroy", vmID=vm.vm_id)
    result = verifier.verify(vm.serial_log, site.volume_path(site.dst_sd, img, chain[-1]),
                             image_format="qcow2")
    assert result.ok and result.lost == 0, str(result)
