"""SPM election between two hosts of one pool, on the real sanlock and on the
local lock (each test says which).

spmStart on any connected host; a second host asking while the role is
held is refused with VDSM's AcquireLockFailure (651) quickly; getSpmStatus
reports the same spmId/spmLver on every host; after spmStop the other host
can take the role.  With sanlock the host ids are delta leases in the
master's ids, acquired at connect (spmStart waits for it) and released at
disconnect, and the lockspace carries the configured [sanlock] io_timeout
(1 s here: tests/cluster/hosts.py).  A host whose sanlock daemon dies stops
being SPM at once; the other host takes over once sanlock lets it
(8 * io_timeout + 60 s).
"""

from __future__ import annotations

import os
import time
from typing import Any

import pytest

from storage import clusterlock
from tests.cluster import conftest, hosts, sanlockd, spm_util

pytestmark = [pytest.mark.root, conftest.requires_root, pytest.mark.timeout(400)]

MiB = 1024**2
# sanlock answers a held lease after about 2 s; anything near add_lockspace's
# 2 * io_timeout of a production lockspace (21 s) is a regression.
REFUSAL_MAX = 8.0


def check_same_status(h1: hosts.ClusterHost, h2: hosts.ClusterHost, ids: hosts.PoolIds,
                      spm: hosts.ClusterHost) -> dict[str, Any]:
    """Both hosts report spm as the SPM with the same lver; the SPM says
    "SPM", the other "Free"."""
    s1, s2 = spm_util.spm_status(h1, ids), spm_util.spm_status(h2, ids)
    assert (s1["spmId"], s1["spmLver"]) == (s2["spmId"], s2["spmLver"]), (s1, s2)
    assert s1["spmId"] == spm.host_id
    assert s1["spmLver"] >= 1
    for h, s in ((h1, s1), (h2, s2)):
        assert s["spmStatus"] == ("SPM" if h is spm else "Free"), (h, s)
    return s1


def contend(cluster: hosts.Cluster, lock: str) -> None:
    h1, h2 = cluster.add_host(lock), cluster.add_host(lock)
    ids = cluster.create_pool(spm=False)
    cons = spm_util.join(cluster, h2, ids)
    try:
        start = time.monotonic()
        assert h1.call("StoragePool.spmStart", storagepoolID=ids.pool_id) is True
        print(f"\n{lock}: spmStart {time.monotonic() - start:.2f}s")
        first = check_same_status(h1, h2, ids, spm=h1)

        err, took = spm_util.spm_start_error(h2, ids)
        print(f"{lock}: refusal {took:.2f}s")
        assert err == spm_util.code("AcquireLockFailure")
        assert took < REFUSAL_MAX
        check_same_status(h1, h2, ids, spm=h1)
        # The HSM changes nothing.
        assert h2.error_code("Volume.create", storagepoolID=ids.pool_id,
                             storagedomainID=ids.master, imageID=hosts.new_id(),
                             volumeID=hosts.new_id(), size=MiB, volFormat="RAW",
                             preallocate="SPARSE") == spm_util.code("SpmStatusError")

        assert h1.call("StoragePool.spmStop", storagepoolID=ids.pool_id) is True
        assert h2.call("StoragePool.spmStart", storagepoolID=ids.pool_id) is True
        second = check_same_status(h1, h2, ids, spm=h2)
        assert second["spmLver"] > first["spmLver"]
        err, took = spm_util.spm_start_error(h1, ids)
        assert err == spm_util.code("AcquireLockFailure") and took < REFUSAL_MAX

        # Back to host 1, which made the pool (and destroys it at the end).
        assert h2.call("StoragePool.spmStop", storagepoolID=ids.pool_id) is True
        assert h1.call("StoragePool.spmStart", storagepoolID=ids.pool_id) is True
        check_same_status(h1, h2, ids, spm=h1)
    finally:
        spm_util.leave(h2, ids, cons)


def test_spm_contention_on_the_real_sanlock(cluster: hosts.Cluster) -> None:
    """Lock: sanlock (both hosts, each with its own daemon)."""
    contend(cluster, hosts.SANLOCK)


def test_spm_contention_on_the_local_lock(cluster: hosts.Cluster) -> None:
    """Lock: local (both hosts on this machine's file system)."""
    contend(cluster, hosts.LOCAL)


def test_host_ids_follow_the_connection(cluster: hosts.Cluster) -> None:
    """Lock: sanlock.  The master's lockspace carries [sanlock] io_timeout;
    each connected host holds its host id there (acquired at connect, while
    spmStart waits for it), and gives it back at disconnect."""
    h1, h2 = cluster.add_host(hosts.SANLOCK), cluster.add_host(hosts.SANLOCK)
    ids = cluster.create_pool()  # host 1: connect then spmStart at once
    assert spm_util.lockspace_io_timeout(cluster, ids) == sanlockd.IO_TIMEOUT
    start = time.monotonic()
    cons = spm_util.join(cluster, h2, ids)
    print(f"\nconnect {time.monotonic() - start:.2f}s (host id in the background)")
    assert h1.sanlock is not None and h2.sanlock is not None
    assert spm_util.holds_host_id(h1, ids)
    spm_util.wait_host_id(h2, ids, timeout=10 * sanlockd.IO_TIMEOUT + 10)
    deadline = time.monotonic() + 10 * sanlockd.IO_TIMEOUT + 10
    # Both hosts see both host ids in the lockspace (once each has read the
    # other's renewals).
    for h in (h1, h2):
        assert h.sanlock is not None
        while not {"owner_id=1", "owner_id=2"} <= set(h.sanlock.host_status(ids.master).split()):
            assert time.monotonic() < deadline, h.sanlock.host_status(ids.master)
            time.sleep(0.2)
    spm_util.leave(h2, ids, cons)
    assert ids.master not in h2.sanlock.status()
    assert spm_util.holds_host_id(h1, ids)


def test_lease_loss_ends_the_spm_role_and_the_other_host_takes_over(
    cluster: hosts.Cluster,
) -> None:
    """Lock: sanlock.  Host 1's sanlock daemon is killed while it is SPM:
    within a few seconds host 1 is no longer SPM and refuses SPM verbs;
    host 2 can take the lease once host 1's host id has expired
    (8 * io_timeout + 60 s after its last renewal)."""
    h1, h2 = cluster.add_host(hosts.SANLOCK), cluster.add_host(hosts.SANLOCK)
    ids = cluster.create_pool()
    cons = spm_util.join(cluster, h2, ids)
    try:
        assert spm_util.spm_status(h1, ids)["spmStatus"] == "SPM"
        killed = time.monotonic()
        h1.kill_sanlock()
        while spm_util.spm_status(h1, ids)["spmStatus"] == "SPM":
            assert time.monotonic() - killed < 5, "host 1 still acts as SPM"
            time.sleep(0.05)
        dropped = time.monotonic() - killed
        assert h1.error_code("Volume.create", storagepoolID=ids.pool_id,
                             storagedomainID=ids.master, imageID=hosts.new_id(),
                             volumeID=hosts.new_id(), size=MiB, volFormat="RAW",
                             preallocate="SPARSE") == spm_util.code("SpmStatusError")

        expiry = 8 * sanlockd.IO_TIMEOUT + 60
        attempts = spm_util.wait_spm_start(h2, ids, timeout=expiry + 60)
        took_over = time.monotonic() - killed
        print(f"\nsanlock killed: SPM role dropped after {dropped:.2f}s, host 2 SPM after "
              f"{took_over:.1f}s ({attempts} spmStart calls; sanlock's rule {expiry}s)")
        assert took_over > 2 * sanlockd.IO_TIMEOUT, "the lease was taken before it could expire"
        status = spm_util.spm_status(h2, ids)
        assert (status["spmStatus"], status["spmId"]) == ("SPM", 2)
        ids.host = h2  # the SPM destroys the pool at the end
    finally:
        # Host 1 has no sanlock any more: it just disconnects (its block
        # domain's loop devices go).
        spm_util.leave(h1, ids)
        if ids.host is not h2:
            spm_util.leave(h2, ids, cons)


def test_a_lease_taken_away_by_sanlock_ends_the_spm_role(cluster: hosts.Cluster) -> None:
    """Lock: sanlock.  sanlock drops host 1's SPM lease while its daemon
    stays up (``sanlock client release -p PID``, as a revocation would):
    the periodic check (every io_timeout) sees it, host 1 stops being SPM,
    and host 2 takes the lease at once."""
    h1, h2 = cluster.add_host(hosts.SANLOCK), cluster.add_host(hosts.SANLOCK)
    ids = cluster.create_pool()
    cons = spm_util.join(cluster, h2, ids)
    try:
        spm_util.wait_host_id(h2, ids)
        assert h1.sanlock is not None and h1.daemon.proc is not None
        leases = os.path.join(spm_util.master_md(cluster, ids), "leases")
        resource = clusterlock.resource_spec(ids.master, clusterlock.SDM_RESOURCE, leases,
                                             clusterlock.SDM_LEASE_OFFSET)
        taken = time.monotonic()
        h1.sanlock.client("release", "-r", resource, "-p", str(h1.daemon.proc.pid))
        while spm_util.spm_status(h1, ids)["spmStatus"] == "SPM":
            assert time.monotonic() - taken < 3 * sanlockd.IO_TIMEOUT + 5, "still SPM"
            time.sleep(0.05)
        dropped = time.monotonic() - taken
        assert h1.error_code("Volume.create", storagepoolID=ids.pool_id,
                             storagedomainID=ids.master, imageID=hosts.new_id(),
                             volumeID=hosts.new_id(), size=MiB, volFormat="RAW",
                             preallocate="SPARSE") == spm_util.code("SpmStatusError")
        assert h2.call("StoragePool.spmStart", storagepoolID=ids.pool_id) is True
        print(f"\nlease released by sanlock: SPM role dropped after {dropped:.2f}s")
        check_same_status(h1, h2, ids, spm=h2)
        # Host 1 can be SPM again once host 2 lets go.
        assert h2.call("StoragePool.spmStop", storagepoolID=ids.pool_id) is True
        assert h1.call("StoragePool.spmStart", storagepoolID=ids.pool_id) is True
        check_same_status(h1, h2, ids, spm=h1)
    finally:
        spm_util.leave(h2, ids, cons)
