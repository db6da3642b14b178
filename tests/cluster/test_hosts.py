"""Several vdsm-lsm daemons as separate hosts on this machine (tests/cluster/hosts.py).

Each test says which cluster lock its hosts use: ``local`` (the fcntl lock;
no namespace) or ``sanlock`` (each host in its own mount namespace with its
own real sanlock daemon, which its vdsm-lsm daemon talks to).
"""

from __future__ import annotations

import os
import time

import pytest

from storage import clusterlock
from tests.cluster import conftest, hosts, namespaces

pytestmark = [pytest.mark.root, pytest.mark.libvirt, conftest.requires_root,
              pytest.mark.timeout(300)]


def assert_separate(h1: hosts.ClusterHost, h2: hosts.ClusterHost) -> None:
    assert (h1.host_id, h2.host_id) == (1, 2)
    assert h1.socket_path != h2.socket_path
    assert h1.run_dir != h2.run_dir
    assert h1.config["irs"]["state_dir"] != h2.config["irs"]["state_dir"]
    assert h1.daemon.port != h2.daemon.port


def test_two_local_hosts_answer_and_stop_cleanly(cluster: hosts.Cluster) -> None:
    """Lock: local (both hosts)."""
    h1, h2 = cluster.add_host(hosts.LOCAL), cluster.add_host(hosts.LOCAL)
    assert_separate(h1, h2)
    for h in (h1, h2):
        assert h.call("Host.ping2") is True
        caps = h.capabilities()
        assert caps["clusterLock"] == "local"
        assert caps["activation"] == "loop"
        assert h.ns is None and h.sanlock is None
    assert h1.stop() == 0
    assert h2.call("Host.ping2") is True, "host 2 does not depend on host 1"
    assert h2.stop() == 0


def test_two_sanlock_hosts_talk_to_their_own_sanlock_daemons(cluster: hosts.Cluster) -> None:
    """Lock: sanlock (both hosts); host 2 is configured "auto", which picks
    sanlock because its own daemon answers in its namespace."""
    h1 = cluster.add_host(hosts.SANLOCK)
    h2 = cluster.add_host(hosts.SANLOCK, config={"sanlock": {"cluster_lock": "auto"}})
    assert_separate(h1, h2)
    for h in (h1, h2):
        assert h.ns is not None and h.sanlock is not None and h.daemon.proc is not None
        assert h.call("Host.ping2") is True
        assert h.capabilities()["clusterLock"] == "sanlock"
        # The vdsm-lsm daemon runs in the host's namespace, beside its sanlock.
        assert namespaces.mount_ns(h.daemon.proc.pid) == h.ns.ns
        assert namespaces.mount_ns(h.sanlock.pid) == h.ns.ns
        assert h.daemon.proc.pid in h.ns.pids()
    assert h1.ns is not None and h2.ns is not None and h1.ns.ns != h2.ns.ns
    assert h1.sanlock is not None and h2.sanlock is not None
    assert h1.sanlock.pid != h2.sanlock.pid
    for h in (h1, h2):
        assert h.stop() == 0


def test_a_pool_with_a_file_and_a_block_domain_on_host1(cluster: hosts.Cluster) -> None:
    """Lock: local.  create_pool: host 1 connected and SPM; host 2 runs
    beside it and sees the shared storage (joining the pool comes with
    StoragePool.connectStorageServer)."""
    h1, h2 = cluster.add_host(hosts.LOCAL), cluster.add_host(hosts.LOCAL)
    ids = cluster.create_pool()
    assert ids.host is h1 and ids.master == ids.file_sd
    info = h1.call("StoragePool.getInfo", storagepoolID=ids.pool_id)
    assert set(info["dominfo"]) == {ids.file_sd, ids.block_sd}
    spm = h1.call("StoragePool.getSpmStatus", storagepoolID=ids.pool_id)
    assert (spm["spmStatus"], spm["spmId"]) == ("SPM", 1)
    # The shared storage: the file domain's directory and the block domain's device.
    assert os.path.isdir(os.path.join(cluster.file_dir, ids.file_sd[:8], ids.file_sd))
    assert len(cluster.block_devices) == 1
    assert h2.call("Host.ping2") is True


def test_spm_of_a_pool_on_the_real_sanlock(cluster: hosts.Cluster) -> None:
    """Lock: sanlock.  Host 1 becomes SPM through its own sanlock daemon (its
    host id a delta lease in the master domain's ids, the SPM lease a paxos
    lease in its leases); host 2's sanlock, reading the same files, sees host
    1 as the owner."""
    h1, h2 = cluster.add_host(hosts.SANLOCK), cluster.add_host(hosts.SANLOCK)
    ids = cluster.create_pool(spm=False)
    start = time.monotonic()
    assert h1.call("StoragePool.spmStart", storagepoolID=ids.pool_id) is True
    print(f"\nspmStart on sanlock: {time.monotonic() - start:.1f}s")
    spm = h1.call("StoragePool.getSpmStatus", storagepoolID=ids.pool_id)
    assert (spm["spmStatus"], spm["spmId"]) == ("SPM", 1)
    assert h1.sanlock is not None
    assert ids.master in h1.sanlock.status()
    md = os.path.join(cluster.file_dir, ids.file_sd[:8], ids.file_sd, "dom_md")
    lease = {"lockspace": ids.master, "resource": clusterlock.SDM_RESOURCE,
             "path": os.path.join(md, "leases"), "offset": clusterlock.SDM_LEASE_OFFSET}
    c2 = h2.lease_client()
    try:
        owners = c2.call("read_resource_owners", **lease)
    finally:
        c2.close()
    assert [o["host_id"] for o in owners] == [1]
