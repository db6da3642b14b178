"""What the SPM and failover tests share: joining a pool from a second host,
leaving it, SPM status and election, reading the lockspace on disk.

:func:`join` connects a host to the pool's storage
(``StoragePool.connectStorageServer``: each file domain's directory, the
block domain's device) and then to the pool.  :func:`leave` disconnects it
again (its block domain's special LVs are deactivated, so no loop device
is left over the shared device).
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import Any

from storage import clusterlock
from tests.cluster import hosts
from vdsm_lsm import app, client

POLL = 0.1
BLANK = "00000000-0000-0000-0000-000000000000"


def code(name: str) -> int:
    return app.load_schema().code_of(name)


def file_dir(cluster: hosts.Cluster, sd_id: str) -> str:
    """The directory a file domain of the cluster was created in."""
    return os.path.join(cluster.file_dir, sd_id[:8])


def master_md(cluster: hosts.Cluster, ids: hosts.PoolIds) -> str:
    """The master (file) domain's dom_md directory: ids, leases, metadata."""
    return os.path.join(file_dir(cluster, ids.master), ids.master, "dom_md")


def lockspace_io_timeout(cluster: hosts.Cluster, ids: hosts.PoolIds) -> int:
    """The io_timeout written in the master's lockspace (host id 1's record)."""
    spec = clusterlock.lockspace_spec(ids.master, 1, os.path.join(master_md(cluster, ids), "ids"),
                                      clusterlock.LOCKSPACE_OFFSET)
    return int(clusterlock.direct_read_leader(spec, lockspace=True)["io_timeout"])


Connections = list[tuple[str, list[dict[str, str]]]]  # (domainType, connectionParams)


def join(cluster: hosts.Cluster, host: hosts.ClusterHost, ids: hosts.PoolIds,
         file_sds: Sequence[str] = ()) -> Connections:
    """host connects to the storage of the pool's domains (the cluster's
    file domain(s) and block device) and to the pool, with its host id;
    the connections made (for :func:`leave`)."""
    dirs = [file_dir(cluster, sd_id) for sd_id in (ids.file_sd, *file_sds)]
    made: Connections = []
    for domain_type, paths in (("file", dirs), ("block", cluster.block_devices)):
        params = [{"id": hosts.new_id(), "connection": p} for p in paths]
        answer = host.call("StoragePool.connectStorageServer", storagepoolID=BLANK,
                           domainType=domain_type, connectionParams=params)
        assert [a["status"] for a in answer] == [0] * len(params), answer
        made.append((domain_type, params))
    assert host.call("StoragePool.connect", storagepoolID=ids.pool_id, hostID=host.host_id,
                     masterSdUUID=ids.master) is True
    return made


def leave(host: hosts.ClusterHost, ids: hosts.PoolIds,
          connections: Connections | None = None) -> None:
    """Best effort: host stops being SPM, disconnects from the pool (its
    block domain's loop devices go) and from the storage."""
    try:
        host.call("StoragePool.spmStop", storagepoolID=ids.pool_id)
        host.call("StoragePool.disconnect", storagepoolID=ids.pool_id, hostID=host.host_id,
                  masterSdUUID=ids.master)
        for domain_type, params in connections or []:
            host.call("StoragePool.disconnectStorageServer", storagepoolID=BLANK,
                      domainType=domain_type, connectionParams=params)
    except (client.ClientError, OSError) as e:
        print(f"{host.name} cannot leave pool {ids.pool_id}: {e}")


def wait_host_id(host: hosts.ClusterHost, ids: hosts.PoolIds, timeout: float = 60.0) -> None:
    """Until host's sanlock holds its host id in the master's lockspace
    (a host with the local lock has none: returns at once)."""
    if host.sanlock is None:
        return
    deadline = time.monotonic() + timeout
    while not holds_host_id(host, ids):
        assert time.monotonic() < deadline, host.sanlock.status()
        time.sleep(POLL)


def holds_host_id(host: hosts.ClusterHost, ids: hosts.PoolIds) -> bool:
    """host's sanlock lists the master's lockspace with host's id, neither
    being added nor removed (``sanlock client status``: ``s LS:ID:PATH:OFF``,
    with ``ADD``/``REM`` after it while in progress)."""
    assert host.sanlock is not None
    prefix = f"s {ids.master}:{host.host_id}:"
    return any(line.startswith(prefix) and line.split()[-1] not in ("ADD", "REM")
               for line in host.sanlock.status().splitlines())


def spm_status(host: hosts.ClusterHost, ids: hosts.PoolIds) -> dict[str, Any]:
    status: dict[str, Any] = host.call("StoragePool.getSpmStatus", storagepoolID=ids.pool_id)
    return status


def spm_start_error(host: hosts.ClusterHost, ids: hosts.PoolIds) -> tuple[int, float]:
    """spmStart must be refused: (code, seconds it took)."""
    start = time.monotonic()
    err = host.error_code("StoragePool.spmStart", storagepoolID=ids.pool_id)
    return err, time.monotonic() - start


def wait_spm_start(host: hosts.ClusterHost, ids: hosts.PoolIds, timeout: float) -> int:
    """spmStart again and again until it answers true; the attempts it took.
    Only AcquireLockFailure (the lease is still held) is retried."""
    deadline = time.monotonic() + timeout
    attempts = 0
    while True:
        attempts += 1
        try:
            assert host.call("StoragePool.spmStart", storagepoolID=ids.pool_id) is True
            return attempts
        except client.ClientError as e:
            if e.code != code("AcquireLockFailure") or time.monotonic() > deadline:
                raise
        time.sleep(POLL)


def create_volume(host: hosts.ClusterHost, ids: hosts.PoolIds, sd_id: str, img_id: str,
                  vol_id: str, size: int, fmt: str = "RAW") -> dict[str, Any]:
    """Volume.create on the SPM host, waited for; its task status."""
    task_id = host.call("Volume.create", storagepoolID=ids.pool_id, storagedomainID=sd_id,
                        imageID=img_id, volumeID=vol_id, size=size, volFormat=fmt,
                        preallocate="SPARSE")
    return host.wait_task(task_id)
