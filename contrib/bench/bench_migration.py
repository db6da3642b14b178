"""Benchmark: live storage migration without shared storage, beside the shared-storage flow.

Three daemons on this machine (as tests/cluster/test_migration.py): host 1
is the SPM and sees every domain; host 2 (A, the machine's libvirtd) sees
the master and a file domain; host 3 (B, its own libvirtd in its own mount
namespace) sees the master and a block domain.  The test guest (TCG, 256
MiB) writes a 64 KiB block every 10 ms on a 64 MiB disk (a RAW base and a
COW leaf) throughout.  Measured in the same run, for the same disk:

- **migration** (``move-disk --to-host``, :class:`vdsm_lsm.move_vm.MoveVM`):
  the VM on A, its disk moved file -> block while the VM moves to B, the
  leaf over NBD;
- **shared storage** (``move-disk``, :class:`vdsm_lsm.move_disk.MoveDisk`),
  the baseline: the VM on host 1, which sees both domains, its disk moved
  file -> block by mirror and pivot, the VM staying put.

Figures: the flow's wall time; for the migration also the migration itself
(VM.migrate to ``done``); the guest's I/O gap (from the ACK timestamps of
its serial log, guest clock): the largest interval between consecutive
acknowledged writes while the flow runs, and for the migration the gap at
the switch (A's last ACK to B's first).  The guest's own jitter is the
largest gap in as many ACKs just before the flow.

    .venv/bin/python -m contrib.bench.bench_migration [--runs N]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable
from typing import Any

from contrib import guest
from contrib.guest import verifier
from tests import daemon as daemon_mod
from tests.cluster import hosts, joining
from vdsm_lsm import client, move_disk, move_vm

MiB = 1024**2
GiB = 1024**3
BLANK = "00000000-0000-0000-0000-000000000000"
SIZE = 64 * MiB
RATE = 100  # writes per second asked of the guest
CONFIG = {"irs": {"volume_utilization_chunk_mb": 128}}


def new_id() -> str:
    return str(uuid.uuid4())


class Bench:
    def __init__(self, work: str) -> None:
        self.work = work
        self.loops: list[str] = []
        self.art = guest.ensure_built()
        self.cluster = hosts.Cluster(work, self._loop_device, self._no_shim)
        c = self.cluster
        self.spm = c.add_host(hosts.LOCAL, config=CONFIG)
        self.a = c.add_host(hosts.LOCAL, config=CONFIG)
        self.b = c.add_host(hosts.LOCAL, own_libvirtd=True, config=CONFIG, start=False)
        assert self.b.libvirt is not None
        self.b.config.setdefault("libvirt", {}).update(
            migration_uri=self.b.libvirt.uri,
            migration_socket_dir=os.path.join(work, "migration-sockets"))
        daemon_mod.write_config(self.b.daemon.conf_path, self.b.config)
        self.b.start()
        self.ids = c.create_pool(self.spm)
        self.file_sd = new_id()
        self.file_dir = os.path.join(c.file_dir, self.file_sd[:8])
        os.makedirs(self.file_dir)
        self.spm.call("StorageDomain.create", storagedomainID=self.file_sd, domainType="file",
                      typeArgs={"path": self.file_dir}, name="bench-file")
        self.spm.call("StoragePool.attachStorageDomain", storagepoolID=self.ids.pool_id,
                      storagedomainID=self.file_sd)
        master = {"id": new_id(), "connection": joining.file_dir(c, self.ids)}
        self._join(self.a, {"file": [master, {"id": new_id(), "connection": self.file_dir}]})
        self._join(self.b, {"file": [master], "block": [
            {"id": new_id(), "connection": d} for d in c.block_devices]})
        self.vms: list[tuple[hosts.ClusterHost, str]] = []

    def _loop_device(self) -> str:
        path = os.path.join(self.work, f"pv-{len(self.loops)}.img")
        with open(path, "wb") as f:
            f.truncate(2 * GiB)
        dev = subprocess.run(["losetup", "--find", "--show", path], check=True,
                             capture_output=True, text=True, timeout=60).stdout.strip()
        self.loops.append(dev)
        return dev

    def _no_shim(self) -> str:
        raise RuntimeError("no sanlock here: the hosts use the local lock")

    def _join(self, host: hosts.ClusterHost, cons: dict[str, list[dict[str, str]]]) -> None:
        for domain_type, params in cons.items():
            host.call("StoragePool.connectStorageServer", storagepoolID=self.ids.pool_id,
                      domainType=domain_type, connectionParams=params)
        host.call("StoragePool.connect", storagepoolID=self.ids.pool_id, hostID=host.host_id,
                  masterSdUUID=self.ids.master)

    def _task(self, task: str) -> None:
        status = self.spm.wait_task(task)
        assert status["taskResult"] == "success", status
        self.spm.call("Task.clear", taskID=task)

    def image(self) -> tuple[str, str]:
        img, base, leaf = new_id(), new_id(), new_id()
        for vol, fmt, parent in ((base, "RAW", BLANK), (leaf, "COW", base)):
            self._task(self.spm.call(
                "Volume.create", storagepoolID=self.ids.pool_id, storagedomainID=self.file_sd,
                imageID=img, volumeID=vol, size=SIZE, volFormat=fmt, preallocate="SPARSE",
                desc="bench", srcImgUUID=img if parent != BLANK else BLANK, srcVolUUID=parent))
        return img, leaf

    def boot(self, host: hosts.ClusterHost, img: str, leaf: str) -> tuple[str, str]:
        vm_id = new_id()
        serial_log = os.path.join(self.work, f"serial-{vm_id[:8]}.log")
        params = {
            "vmName": f"lsmbench-mig-{vm_id[:8]}", "memSize": 256, "smp": 1, "accel": "tcg",
            "kernel": self.art.kernel, "initrd": self.art.initrd,
            "kernelArgs": guest.kernel_args(span_mb=16, rate=RATE), "serialLog": serial_log,
            "drives": [{"poolID": self.ids.pool_id, "domainID": self.file_sd, "imageID": img,
                        "volumeID": leaf, "format": "cow"}],
        }
        host.call("VM.create", vmID=vm_id, vmParams=params)
        self.vms.append((host, vm_id))
        verifier.wait_for_acks(serial_log, 100, timeout=180)
        return vm_id, serial_log

    def run_one(self, shared: bool) -> dict[str, float]:
        """One move of a fresh disk: the flow's time and the guest's ACK gaps."""
        img, leaf = self.image()
        host = self.spm if shared else self.a
        vm_id, log_a = self.boot(host, img, leaf)
        log_b = log_a + ".b"
        before = len(verifier.parse_log(log_a).acks)
        rpc, dest = host.rpc(), self.b.rpc()
        spm = self.spm.rpc()
        flow: move_disk.MoveDisk | move_vm.MoveVM
        if shared:
            flow = move_disk.MoveDisk(rpc, vm_id, self.ids.block_sd)
        else:
            flow = move_vm.MoveVM(rpc, dest, f"unix:{self.b.socket_path}", vm_id,
                                  self.ids.block_sd, spm=spm, serial_log=log_b)
        start = time.monotonic()
        try:
            summary = flow.run()
        finally:
            for c in (rpc, dest, spm):
                c.close()
        seconds = time.monotonic() - start
        logs = [log_a] if shared else [log_a, log_b]
        after = len(verifier.parse_log(logs).acks)
        serial = verifier.wait_for_acks(logs[-1], 50, timeout=60) if not shared else None
        acks = verifier.parse_log(logs).acks
        while len(acks) < after + 20:
            time.sleep(0.2)
            acks = verifier.parse_log(logs).acks
        width = after - before + 2
        result = {
            "flow": seconds,
            "gap": float(verifier.largest_gap_ms(acks[before - 1: after + 1])),
            "jitter": float(verifier.largest_gap_ms(acks[max(before - width, 0): before])),
        }
        if serial is not None:
            # A line cut at the switch is whole only in the joined logs: look
            # at the few ACKs around where A's log ends.
            on_a = len(verifier.parse_log(log_a).acks)
            result["switch"] = float(verifier.largest_gap_ms(acks[on_a - 2: on_a + 3]))
            result["migration"] = float(summary.get("migrationSeconds") or 0.0)
        where = self.b if not shared else host
        where.call("VM.destroy", vmID=vm_id)
        self.vms.remove((host, vm_id))
        # Room on the block domain for the next run (loop mode wants contiguous extents).
        self._task(self.spm.call("Image.delete", imageID=img, storagepoolID=self.ids.pool_id,
                                 storagedomainID=self.ids.block_sd))
        return result

    def close(self) -> None:
        for host, vm_id in self.vms:
            for h in (host, self.b):
                try:
                    h.call("VM.destroy", vmID=vm_id)
                except (client.ClientError, OSError):
                    pass
        for host in (self.a, self.b):
            try:
                host.call("StoragePool.disconnect", storagepoolID=self.ids.pool_id,
                          hostID=host.host_id, masterSdUUID=self.ids.master)
            except (client.ClientError, OSError) as e:
                print(f"clean-up {host.name}: {e}")
        self.cluster.close()
        for dev in self.loops:
            subprocess.run(["losetup", "-d", dev], capture_output=True, timeout=60)


def row(name: str, unit: str, ours: list[float], base: list[float] | None,
        scale: float = 1.0) -> str:
    ours = [v * scale for v in ours]
    med = statistics.median(ours)
    text = f"{name:<34} {unit:<4} {len(ours):>4} {med:>8.1f} {min(ours):>8.1f} {max(ours):>8.1f}"
    if base:
        bmed = statistics.median([v * scale for v in base])
        text += f" {bmed:>9.1f} {med / bmed if bmed else float('inf'):>6.2f}"
    return text


def collect(results: list[dict[str, float]], key: str) -> list[float]:
    return [r[key] for r in results if key in r]


def main(argv: list[str] | None = None, make: Callable[[str], Bench] = Bench) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args(argv)
    work = tempfile.mkdtemp(prefix="bench-migration-", dir="/var/tmp")
    bench: Bench | None = None
    migrated: list[dict[str, Any]] = []
    shared: list[dict[str, Any]] = []
    try:
        bench = make(work)
        for _ in range(args.runs):
            shared.append(bench.run_one(shared=True))
            migrated.append(bench.run_one(shared=False))
    finally:
        if bench is not None:
            bench.close()
        shutil.rmtree(work, ignore_errors=True)
    print("live storage migration file -> block, 64 MiB disk, TCG guest writing every "
          f"{1000 // RATE} ms; baseline: the shared-storage flow, same run")
    print(f"{'metric':<34} {'unit':<4} {'runs':>4} {'median':>8} {'min':>8} {'max':>8} "
          f"{'shared':>9} {'ratio':>6}")
    print(row("move-disk wall time", "s", collect(migrated, "flow"), collect(shared, "flow")))
    print(row("largest ACK gap during the move", "ms", collect(migrated, "gap"),
              collect(shared, "gap")))
    print(row("migration (VM.migrate -> done)", "s", collect(migrated, "migration"), None))
    print(row("ACK gap at the switch (A -> B)", "ms", collect(migrated, "switch"), None))
    print(row("guest jitter (largest gap before)", "ms", collect(migrated, "jitter"),
              collect(shared, "jitter")))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
