"""The demo's flow: what a management engine asks a vdsm-lsm host, step by step.

Runs against a live daemon (``--socket``) with real storage on this host:
two file domains in one pool, an image (RAW base + COW leaf) that a running
test guest writes to, then a complete live storage migration onto the second
domain by the move-disk flow (:class:`vdsm_lsm.move_disk.MoveDisk`, DESIGN
section 1, with its progress bar): live snapshot, ``Image.cloneStructure``,
``VM.diskReplicateStart`` (the mirror), ``Image.syncData(INTERNAL)``, wait
for the mirror to be ready, ``VM.diskReplicateFinish`` (the pivot), and
``Image.delete`` of the source.  At the end the verifier proves every write
the guest acknowledged, before and after the pivot, is on the destination
chain, and everything is removed.

    python -m contrib.demo_flow --socket PATH --workdir DIR
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import uuid
from typing import Any

from contrib import guest
from contrib.guest import verifier
from vdsm_lsm import client, move_disk, move_progress

MiB = 1024**2
BLANK = "00000000-0000-0000-0000-000000000000"


def new_id() -> str:
    return str(uuid.uuid4())


class Flow:
    def __init__(self, rpc: client.Client, workdir: str) -> None:
        self.rpc = rpc
        self.workdir = workdir
        self.step = 0

    def say(self, text: str) -> None:
        self.step += 1
        print(f"\n== {self.step}. {text}", flush=True)

    def call(self, method: str, quiet: bool = False, **params: Any) -> Any:
        shown = " ".join(f"{k}={json.dumps(v) if not isinstance(v, str) else v}"
                         for k, v in params.items())
        print(f"$ vdsm-lsm-client {method.replace('.', ' ')} {shown}".rstrip(), flush=True)
        result = self.rpc.call(method, **params)
        if not quiet:
            print(json.dumps(result, indent=2, sort_keys=True))
        return result

    def wait_task(self, task_id: str, what: str) -> dict[str, Any]:
        last = -1
        while True:
            status = self.rpc.call("Task.getStatus", taskID=task_id)
            if status["progress"] != last:
                last = status["progress"]
                print(f"   {what}: {status['taskState']} {last}%", flush=True)
            if status["taskState"] == "finished":
                break
            time.sleep(0.2)
        if status["taskResult"] != "success":
            raise RuntimeError(f"{what} failed: {status}")
        self.rpc.call("Task.clear", taskID=task_id)
        return status


def run(rpc: client.Client, workdir: str) -> int:
    flow = Flow(rpc, workdir)
    pool_id, src_sd, dst_sd = new_id(), new_id(), new_id()
    img_id, base_id, leaf_id = new_id(), new_id(), new_id()
    vm_id = new_id()
    serial_log = os.path.join(workdir, "guest-serial.log")
    artifacts = guest.ensure_built()
    created_pool = vm_running = False
    try:
        flow.say("The host: versions and modes in effect")
        flow.call("Host.getCapabilities")

        flow.say("Two file domains and a pool; this host becomes SPM")
        for sd_id, name in ((src_sd, "src"), (dst_sd, "dst")):
            path = os.path.join(workdir, name)
            os.makedirs(path, exist_ok=True)
            flow.call("StorageDomain.create", storagedomainID=sd_id, domainType="file",
                      typeArgs={"path": path}, name=f"demo-{name}")
        flow.call("StoragePool.create", storagepoolID=pool_id, name="demo",
                  masterSdUUID=src_sd, domainList=[src_sd, dst_sd])
        created_pool = True
        flow.call("StoragePool.connect", storagepoolID=pool_id, hostID=1, masterSdUUID=src_sd)
        flow.call("StoragePool.spmStart", storagepoolID=pool_id)
        flow.call("StoragePool.getSpmStatus", storagepoolID=pool_id)

        flow.say("An image: RAW base + COW leaf (SPM tasks)")
        common = {"storagepoolID": pool_id, "storagedomainID": src_sd, "imageID": img_id}
        size = 128 * MiB
        task = flow.call("Volume.create", **common, volumeID=base_id, size=size,
                         volFormat="RAW", preallocate="SPARSE", desc="base")
        flow.wait_task(task, "create base")
        task = flow.call("Volume.create", **common, volumeID=leaf_id, size=size,
                         volFormat="COW", preallocate="SPARSE", desc="leaf",
                         srcImgUUID=img_id, srcVolUUID=base_id)
        flow.wait_task(task, "create leaf")

        flow.say("A running VM (TCG) whose guest writes checksummed blocks to its disk")
        drive = {"poolID": pool_id, "domainID": src_sd, "imageID": img_id,
                 "volumeID": leaf_id, "format": "cow"}
        flow.call("VM.create", vmID=vm_id, vmParams={
            "vmName": "lsm-demo", "memSize": 192, "smp": 1, "accel": "tcg",
            "kernel": artifacts.kernel, "initrd": artifacts.initrd,
            "kernelArgs": guest.kernel_args(span_mb=32, rate=50),
            "serialLog": serial_log, "drives": [drive]})
        vm_running = True
        serial = verifier.wait_for_acks(serial_log, 50, timeout=180)
        print(f"   guest acknowledged {len(serial.acks)} writes so far")

        flow.say("Move the disk to the destination domain while the guest writes "
                 "(vdsm_lsm.move_disk: live snapshot, cloneStructure, diskReplicateStart, "
                 "syncData INTERNAL, wait for the mirror, diskReplicateFinish, "
                 "Image.delete of the source)")
        print(f"$ vdsm-lsm-client move-disk {vm_id} {dst_sd} --drive vda --delete-source",
              flush=True)
        mover = move_disk.MoveDisk(rpc, vm_id, dst_sd, drive="vda", delete_source=True,
                                   progress=move_progress.ProgressBar(sys.stdout))
        summary = mover.run()
        print(json.dumps(summary, indent=2, sort_keys=True))
        snap_id = summary["volumeChain"][-1]
        disk = flow.call("VM.getStats", vmID=vm_id, quiet=True)["disks"]["vda"]
        print(f"   vda domain: {disk['domainID']} (destination {dst_sd})")
        for v in disk["volumeChain"]:
            print(f"   {v['volumeID'][:8]} {v['path']}")
        if disk["domainID"] != dst_sd or "replicate" in disk:
            print("   the VM is not on the destination")
            return 1
        show_destination(rpc, pool_id, dst_sd, img_id, tuple(summary["volumeChain"]))
        flow.call("StorageDomain.getImages", storagedomainID=src_sd)
        flow.call("StorageDomain.getImages", storagedomainID=dst_sd)
        acks = len(verifier.parse_log(serial_log).acks)
        serial = verifier.wait_for_acks(serial_log, acks + 100, timeout=180)
        print(f"   guest acknowledged {len(serial.acks)} writes so far "
              f"({len(serial.acks) - acks} since the move)")

        flow.say("Stop the VM; prove every acknowledged write is on the DESTINATION chain")
        flow.call("VM.destroy", vmID=vm_id)
        vm_running = False
        leaf_path = os.path.join(workdir, "dst", dst_sd, "images", img_id, snap_id)
        result = verifier.verify(serial_log, leaf_path, image_format="qcow2")
        print(f"   verified {result.verified} blocks, {result.lost} lost ({leaf_path})")
        if not result.ok:
            return 1

        return 0
    finally:
        print("\n== Clean-up", flush=True)
        _cleanup(rpc, vm_running, created_pool, vm_id, pool_id, img_id, src_sd, dst_sd)


def show_destination(rpc: client.Client, pool_id: str, sd_id: str, img_id: str,
                     vols: tuple[str, ...]) -> None:
    for vol in vols:
        info = rpc.call("Volume.getInfo", storagepoolID=pool_id, storagedomainID=sd_id,
                        imageID=img_id, volumeID=vol)
        print(f"   destination {vol[:8]} {info['voltype']:<8} {info['legality']}")


def _cleanup(rpc: client.Client, vm_running: bool, created_pool: bool, vm_id: str,
             pool_id: str, img_id: str, src_sd: str, dst_sd: str) -> None:
    def quiet(method: str, **params: Any) -> Any:
        try:
            return rpc.call(method, **params)
        except client.ClientError as e:
            print(f"   {method}: error {e.code}: {e.message}")
            return None

    if vm_running:
        quiet("VM.destroy", vmID=vm_id)
    if created_pool:
        for sd_id in (dst_sd, src_sd):
            if img_id not in (quiet("StorageDomain.getImages", storagedomainID=sd_id) or []):
                continue
            task = quiet("Image.delete", imageID=img_id, storagepoolID=pool_id,
                         storagedomainID=sd_id)
            while task:
                status = quiet("Task.getStatus", taskID=task)
                if not status or status["taskState"] == "finished":
                    break
                time.sleep(0.2)
        quiet("StoragePool.destroy", storagepoolID=pool_id)
    for sd_id in (src_sd, dst_sd):
        quiet("StorageDomain.format", storagedomainID=sd_id)
    print("   done")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--socket", required=True)
    parser.add_argument("--workdir", required=True)
    args = parser.parse_args(argv)
    return run(client.Client(socket_path=args.socket), args.workdir)


if __name__ == "__main__":
    sys.exit(main())
