"""The cluster tests' writing guest: its image made on the SPM, the VM started on a host.

Shared by the live storage migrations across hosts: with shared storage
(tests/cluster/test_lsm.py: host 2 runs the VM, host 1 is the SPM) and
without (tests/cluster/test_migration.py: host A runs the VM).  Volumes are
made on the SPM (:func:`create_volume`): 64 MiB unless told, a RAW one on
the pool's block domain preallocated (its LV at full size), any other
sparse.  The guest (:func:`start_guest`) writes :data:`RATE` checksummed
blocks a second on its one drive, a COW leaf; it is started once it
acknowledged :data:`ACKS` writes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tests.cluster import hosts
from tests.virt import conftest as virt_conftest

MiB = 1024**2
BLANK = "00000000-0000-0000-0000-000000000000"
SIZE = 64 * MiB
RATE = 50
ACKS = 30


def create_volume(spm: hosts.ClusterHost, ids: hosts.PoolIds, sd_id: str, img_id: str,
                  vol_id: str, fmt: str, parent: str = BLANK, desc: str = "",
                  size: int = SIZE) -> None:
    """Volume.create on the SPM (a leaf of parent if given), waited for and cleared."""
    block = sd_id == ids.block_sd
    task = spm.call(
        "Volume.create", storagepoolID=ids.pool_id, storagedomainID=sd_id,
        imageID=img_id, volumeID=vol_id, size=size, volFormat=fmt,
        preallocate="PREALLOCATED" if fmt == "RAW" and block else "SPARSE",
        desc=desc, srcImgUUID=img_id if parent != BLANK else BLANK, srcVolUUID=parent)
    status = spm.wait_task(task)
    assert status["taskResult"] == "success", status
    spm.call("Task.clear", taskID=task)


def start_guest(host: hosts.ClusterHost, vm_params: Callable[..., virt_conftest.GuestVM],
                vms: list[str], pool_id: str, sd_id: str, img_id: str, leaf: str,
                **params: Any) -> virt_conftest.GuestVM:
    """VM.create on host of the writing guest on the leaf; its id appended
    to vms (for the caller's clean-up).  params: vmParams to change (memSize)."""
    drive = {"poolID": pool_id, "domainID": sd_id, "imageID": img_id, "volumeID": leaf,
             "format": "cow"}
    vm = vm_params([drive], rate=RATE)
    vm.params.update(params)
    host.call("VM.create", vmID=vm.vm_id, vmParams=vm.params)
    vms.append(vm.vm_id)
    vm.wait_acks(ACKS)
    return vm
