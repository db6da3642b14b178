"""Failover: the SPM's daemon is killed (kill -9) in the middle of an
``Image.syncData``; the other host becomes SPM, finds the unfinished task on
the master domain, runs it again and it finishes; the destination then
reads like the source.

With sanlock the dead process's lease is released at once by its host's
sanlock daemon (still running), and with the local lock the kernel drops
the dead process's fcntl lock, so host 2 takes over at once in both.  The
sync is kept long by ``[irs] copy_rate_limit_mb`` on host 1.  The times are
printed (``-s``): killed -> host 2 SPM -> the task running again -> done.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import pytest

from storage import qemuimg
from tests.cluster import conftest, hosts, spm_util
from tests.storage import image_env

pytestmark = [pytest.mark.root, conftest.requires_root, pytest.mark.timeout(400)]

MiB = 1024**2
CAPACITY = 64 * MiB
RATE_MB = 4  # host 1's copy rate: the base's 48 MiB take about 12 s
POLL = 0.05
WAIT = 120.0


def wait_status(host: hosts.ClusterHost, task_id: str, done: Any) -> dict[str, Any]:
    deadline = time.monotonic() + WAIT
    while True:
        status: dict[str, Any] = host.call("Task.getStatus", taskID=task_id)
        if done(status):
            return status
        assert time.monotonic() < deadline, status
        time.sleep(POLL)


def kill_orphans(host: hosts.ClusterHost) -> None:
    """A killed daemon's qemu-img goes on copying: end it (its arguments
    name the host's run dir)."""
    deadline = time.monotonic() + WAIT
    while pids := image_env.qemu_img_pids(host.run_dir):
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        assert time.monotonic() < deadline, pids
        time.sleep(POLL)


def prepare(host: hosts.ClusterHost, ids: hosts.PoolIds, sd_id: str, img_id: str,
            vol_id: str) -> dict[str, Any]:
    answer: dict[str, Any] = host.call("Image.prepare", storagepoolID=ids.pool_id,
                                       storagedomainID=sd_id, imageID=img_id, volumeID=vol_id)
    return answer


def teardown(host: hosts.ClusterHost, ids: hosts.PoolIds, sd_id: str, img_id: str,
             vol_id: str) -> None:
    host.call("Image.teardown", storagepoolID=ids.pool_id, storagedomainID=sd_id,
              imageID=img_id, volumeID=vol_id)


@pytest.mark.parametrize("lock", [hosts.SANLOCK, hosts.LOCAL])
def test_spm_killed_during_sync_the_other_host_finishes_it(
    cluster: hosts.Cluster, lock: str,
) -> None:
    """Lock: as parametrized (both hosts the same)."""
    h1 = cluster.add_host(lock, config={"irs": {"copy_rate_limit_mb": RATE_MB}})
    h2 = cluster.add_host(lock)
    ids = cluster.create_pool()  # host 1 SPM
    dst = hosts.new_id()
    dst_dir = spm_util.file_dir(cluster, dst)
    os.makedirs(dst_dir)
    h1.call("StorageDomain.create", storagedomainID=dst, domainType="file",
            typeArgs={"path": dst_dir}, name="failover-dst")
    h1.call("StoragePool.attachStorageDomain", storagepoolID=ids.pool_id, storagedomainID=dst)
    cons = spm_util.join(cluster, h2, ids, file_sds=[dst])
    joined = {h2: cons}
    try:
        # A RAW base with 48 MiB of data and a COW leaf, on the master.
        img = hosts.new_id()
        base, leaf = hosts.new_id(), hosts.new_id()
        src = ids.master
        assert spm_util.create_volume(h1, ids, src, img, base, CAPACITY)["taskResult"] == "success"
        task_id = h1.call("Volume.create", storagepoolID=ids.pool_id, storagedomainID=src,
                          imageID=img, volumeID=leaf, size=CAPACITY, volFormat="COW",
                          preallocate="SPARSE", srcImgUUID=img, srcVolUUID=base)
        assert h1.wait_task(task_id)["taskResult"] == "success"
        for vol_id, fmt, ops in ((base, "raw", ["write -P 0x5a 0 48M"]),
                                 (leaf, "qcow2", ["write -P 0xa5 8M 4M"])):
            path = prepare(h1, ids, src, img, vol_id)["path"]
            try:
                image_env.qemu_io(path, fmt, *ops)
            finally:
                teardown(h1, ids, src, img, vol_id)
        clone = h1.call("Image.cloneStructure", imageID=img, storagepoolID=ids.pool_id,
                        storagedomainID=src, dstSdUUID=dst)
        assert h1.wait_task(clone)["taskResult"] == "success"

        sync = h1.call("Image.syncData", imageID=img, storagepoolID=ids.pool_id,
                       storagedomainID=src, dstSdUUID=dst, syncType="ALL")
        wait_status(h1, sync, lambda s: s["taskState"] == "running" and s["progress"] > 0)
        assert image_env.qemu_img_pids(h1.run_dir), "the copy is not running on host 1"
        spm_util.wait_host_id(h2, ids)  # joined: what is measured is the takeover alone
        killed = time.monotonic()
        h1.kill9()
        kill_orphans(h1)

        attempts = spm_util.wait_spm_start(h2, ids, timeout=WAIT)
        spm = time.monotonic()
        rerun = wait_status(h2, sync, lambda s: s["taskState"] in ("running", "finished"))
        restarted = time.monotonic()
        status = h2.wait_task(sync)
        done = time.monotonic()
        print(f"\n{lock}: killed -> host 2 SPM {spm - killed:.2f}s ({attempts} spmStart) "
              f"-> task re-run {restarted - killed:.2f}s -> done {done - killed:.2f}s; "
              f"re-run seen as {rerun['taskState']}")
        assert status["taskResult"] == "success", status
        assert spm_util.spm_status(h2, ids)["spmId"] == 2
        ids.host = h2  # the SPM destroys the pool at the end (no leave for it)
        del joined[h2]

        for vol_id in (base, leaf):
            info = h2.call("Volume.getInfo", storagepoolID=ids.pool_id, storagedomainID=dst,
                           imageID=img, volumeID=vol_id)
            assert info["legality"] == "LEGAL", info
        src_chain = prepare(h2, ids, src, img, leaf)["chain"]
        try:
            dst_chain = prepare(h2, ids, dst, img, leaf)["chain"]
            try:
                for s, d in zip(src_chain, dst_chain, strict=True):
                    fmt = "raw" if s["format"] == "RAW" else "qcow2"
                    assert qemuimg.compare(s["path"], d["path"], fmt, fmt), s["volumeID"]
            finally:
                teardown(h2, ids, dst, img, leaf)
        finally:
            teardown(h2, ids, src, img, leaf)
        for task in (clone, sync):
            h2.call("Task.clear", taskID=task)

        # Host 1 comes back as an HSM (its loop devices found again), then leaves.
        h1.restart()
        joined[h1] = None
        assert spm_util.spm_status(h1, ids)["spmStatus"] == "Free"
    finally:
        for h, connections in joined.items():
            spm_util.leave(h, ids, connections)
