"""Benchmark: SPM election and failover on the real sanlock and on the local lock.

Two simulated hosts (tests/cluster/hosts.py: each a vdsm-lsm daemon; with
sanlock each in its own mount namespace with its own sanlock daemon) share a
pool of a file domain (master) and a block domain on a loop device, plus a
second file domain for the failover's copy.  For each lock:

- ``spmStart`` right after ``StoragePool.connect`` (with sanlock it waits
  for the host id: about 2 * io_timeout + 1 s), then with the host id held,
  and the refusal a second host gets while the role is held;
- failover: host 1's daemon is killed (kill -9) during an ``Image.syncData``;
  host 2 runs ``spmStart`` until it answers true, then the task is seen
  running again on host 2.  Times from the kill.

The local lock is the baseline of the same run (ratio = sanlock / local).
Needs root (namespaces, loop devices) and gcc (the sanlock setrlimit shim).

    .venv/bin/python -m contrib.bench.bench_spm [--runs N] [--io-timeout S]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable

from tests.cluster import hosts, sanlockd, spm_util
from tests.storage import conftest as storage_conftest
from tests.storage import image_env

MiB = 1024**2
GiB = 1024**3
RATE_MB = 4
WAIT = 120.0
Results = dict[str, float]
Config = dict[str, dict[str, object]]


class Machine:
    """Loop devices over sparse files under workdir, removed by close()."""

    def __init__(self, workdir: str) -> None:
        self.workdir = workdir
        self.devices: list[str] = []

    def loop_device(self, size: int = 2 * GiB) -> str:
        path = os.path.join(self.workdir, f"disk{len(self.devices)}.img")
        with open(path, "wb") as f:
            f.truncate(size)
        dev = subprocess.run(["losetup", "--find", "--show", path], check=True, timeout=60,
                             capture_output=True, text=True).stdout.strip()
        self.devices.append(dev)
        return dev

    def close(self) -> None:
        for dev in self.devices:
            for child in storage_conftest.stacked_loop_devices(dev):
                subprocess.run(["losetup", "--detach", child], check=False, timeout=60)
        if self.devices:
            storage_conftest.wipe_lvm(self.devices)
        for dev in self.devices:
            subprocess.run(["losetup", "--detach", dev], check=False, timeout=60)


def wait_task_state(host: hosts.ClusterHost, task_id: str,
                    done: Callable[[dict[str, object]], bool]) -> None:
    deadline = time.monotonic() + WAIT
    while not done(host.call("Task.getStatus", taskID=task_id)):
        if time.monotonic() > deadline:
            raise RuntimeError(f"{host.name}: task {task_id} never got there")
        time.sleep(0.01)


def kill_orphans(host: hosts.ClusterHost) -> None:
    """The killed daemon's qemu-img goes on copying: end it."""
    while pids := image_env.qemu_img_pids(host.run_dir):
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.01)


def election(cluster: hosts.Cluster, lock: str, runs: int, config: Config) -> Results:
    h1, h2 = cluster.add_host(lock, config=config), cluster.add_host(lock, config=config)
    ids = cluster.create_pool(spm=False)
    start = time.monotonic()
    assert h1.call("StoragePool.spmStart", storagepoolID=ids.pool_id) is True
    results = {"spmStart right after connect": time.monotonic() - start}
    cons = spm_util.join(cluster, h2, ids)
    try:
        spm_util.wait_host_id(h2, ids)
        starts, refusals = [], []
        for _ in range(runs):
            code, took = spm_util.spm_start_error(h2, ids)
            assert code == spm_util.code("AcquireLockFailure"), code
            refusals.append(took)
            assert h1.call("StoragePool.spmStop", storagepoolID=ids.pool_id) is True
            start = time.monotonic()
            assert h1.call("StoragePool.spmStart", storagepoolID=ids.pool_id) is True
            starts.append(time.monotonic() - start)
        results["spmStart (host id held)"] = statistics.median(starts)
        results["spmStart refused (held elsewhere)"] = statistics.median(refusals)
    finally:
        spm_util.leave(h2, ids, cons)
    return results


def failover(cluster: hosts.Cluster, lock: str, config: Config) -> Results:
    h1 = cluster.add_host(lock, config={**config, "irs": {"copy_rate_limit_mb": RATE_MB}})
    h2 = cluster.add_host(lock, config=config)
    ids = cluster.create_pool()
    dst = hosts.new_id()
    os.makedirs(spm_util.file_dir(cluster, dst))
    h1.call("StorageDomain.create", storagedomainID=dst, domainType="file",
            typeArgs={"path": spm_util.file_dir(cluster, dst)}, name="bench-dst")
    h1.call("StoragePool.attachStorageDomain", storagepoolID=ids.pool_id, storagedomainID=dst)
    cons = spm_util.join(cluster, h2, ids, file_sds=[dst])
    left = False
    try:
        img, vol = hosts.new_id(), hosts.new_id()
        spm_util.create_volume(h1, ids, ids.master, img, vol, 64 * MiB)
        path = h1.call("Image.prepare", storagepoolID=ids.pool_id, storagedomainID=ids.master,
                       imageID=img, volumeID=vol)["path"]
        subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0x5a 0 48M", path], check=True,
                       timeout=120, capture_output=True)
        h1.call("Image.teardown", storagepoolID=ids.pool_id, storagedomainID=ids.master,
                imageID=img, volumeID=vol)
        h1.wait_task(h1.call("Image.cloneStructure", imageID=img, storagepoolID=ids.pool_id,
                             storagedomainID=ids.master, dstSdUUID=dst))
        sync = h1.call("Image.syncData", imageID=img, storagepoolID=ids.pool_id,
                       storagedomainID=ids.master, dstSdUUID=dst, syncType="ALL")
        wait_task_state(h1, sync, lambda s: s["taskState"] == "running" and s["progress"] > 0)
        spm_util.wait_host_id(h2, ids)
        killed = time.monotonic()
        h1.kill9()
        kill_orphans(h1)
        spm_util.wait_spm_start(h2, ids, timeout=WAIT)
        spm = time.monotonic() - killed
        wait_task_state(h2, sync, lambda s: s["taskState"] in ("running", "finished"))
        rerun = time.monotonic() - killed
        status = h2.wait_task(sync)
        assert status["taskResult"] == "success", status
        ids.host = h2  # destroys the pool at the end
        left = True
        h1.restart()  # back as an HSM: finds its loop devices, then leaves
        spm_util.leave(h1, ids)
    finally:
        if not left:
            spm_util.leave(h2, ids, cons)
    return {"failover: killed -> other host SPM": spm,
            "failover: killed -> task re-run": rerun}


def measure(lock: str, runs: int, io_timeout: int, workdir: str,
            shim: Callable[[], str]) -> Results:
    config: Config = {"sanlock": {"io_timeout": io_timeout}} if lock == hosts.SANLOCK else {}
    results: Results = {}
    for step in (lambda c: election(c, lock, runs, config),
                 lambda c: failover(c, lock, config)):
        machine = Machine(tempfile.mkdtemp(prefix="disks-", dir=workdir))
        cluster = hosts.Cluster(tempfile.mkdtemp(prefix=f"{lock}-", dir=workdir),
                                machine.loop_device, shim)
        try:
            results.update(step(cluster))
        finally:
            cluster.close()
            machine.close()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--io-timeout", type=int, default=sanlockd.IO_TIMEOUT,
                        help="[sanlock] io_timeout of the sanlock hosts (default: the tests')")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench_spm needs root (namespaces, loop devices)")
    workdir = tempfile.mkdtemp(prefix="bench-spm-", dir="/var/tmp")
    try:
        shim_path = sanlockd.build_shim(workdir)
        local = measure(hosts.LOCAL, args.runs, args.io_timeout, workdir, lambda: shim_path)
        sanlock = measure(hosts.SANLOCK, args.runs, args.io_timeout, workdir, lambda: shim_path)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"SPM election and failover (2 hosts, sanlock io_timeout={args.io_timeout}s, "
          f"median of {args.runs} for spmStart; ratio = sanlock / local)")
    print(f"  {'operation':36} {'local ms':>10} {'sanlock ms':>11} {'ratio':>8}")
    for name, base in local.items():
        value = sanlock[name]
        ratio = value / base if base > 0 else float("inf")
        print(f"  {name:36} {base * 1000:10.1f} {value * 1000:11.1f} {ratio:8.1f}")


if __name__ == "__main__":
    main()
