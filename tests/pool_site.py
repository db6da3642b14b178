"""A real test daemon's storage, made through its own verbs: one host, SPM.

:class:`PoolSite` is what the single-daemon tests share
(tests/virt/test_daemon.py's and tests/vdsm_lsm/test_move_disk.py's
``Site``, and through the latter tests/faults/site.py's ``FaultSite``): a
JSON-RPC call over the daemon's unix socket, an SPM task waited for and
cleared, file domains, a pool of them (connected as host 1, this host its
SPM) and volumes on them.  The daemon is a :class:`tests.daemon.Daemon`
(the ``daemon_factory`` fixture's, with the ``local`` cluster lock).
"""

from __future__ import annotations

import os
import time
from typing import Any

MiB = 1024**2
BLANK = "00000000-0000-0000-0000-000000000000"
RPC_TIMEOUT = 120
TASK_TIMEOUT = 120
VOLUME_SIZE = 64 * MiB


class PoolSite:
    """A daemon and the pool it is the SPM of."""

    def __init__(self, daemon: Any, pool_id: str) -> None:
        self.daemon = daemon
        self.pool_id = pool_id

    def call(self, method: str, **params: Any) -> Any:
        rpc = self.daemon.unix(timeout=RPC_TIMEOUT)
        try:
            return rpc.call(method, **params)
        finally:
            rpc.close()

    def wait_task(self, task_id: str) -> None:
        """Until the task is finished; it must have succeeded; then Task.clear."""
        deadline = time.monotonic() + TASK_TIMEOUT
        while time.monotonic() < deadline:
            status = self.call("Task.getStatus", taskID=task_id)
            if status["taskState"] == "finished":
                break
            time.sleep(0.1)
        assert status["taskResult"] == "success", status
        self.call("Task.clear", taskID=task_id)

    def create_file_domain(self, sd_id: str, path: str, name: str) -> None:
        """StorageDomain.create of a file domain in the directory path (made if needed)."""
        os.makedirs(path, exist_ok=True)
        self.call("StorageDomain.create", storagedomainID=sd_id, domainType="file",
                  typeArgs={"path": path}, name=name)

    def create_pool(self, name: str, master: str, domains: list[str]) -> None:
        """StoragePool.create of the domains, connected as host 1, SPM here."""
        self.call("StoragePool.create", storagepoolID=self.pool_id, name=name,
                  masterSdUUID=master, domainList=domains)
        self.call("StoragePool.connect", storagepoolID=self.pool_id, hostID=1,
                  masterSdUUID=master)
        self.call("StoragePool.spmStart", storagepoolID=self.pool_id)

    def create_volume_on(self, sd_id: str, img_id: str, vol_id: str, fmt: str,
                         parent: str = BLANK) -> None:
        """Volume.create of a sparse volume of VOLUME_SIZE on sd_id (a leaf
        of parent if given), waited for."""
        self.wait_task(self.call(
            "Volume.create", storagepoolID=self.pool_id, storagedomainID=sd_id,
            imageID=img_id, volumeID=vol_id, size=VOLUME_SIZE, volFormat=fmt,
            preallocate="SPARSE", desc="", srcImgUUID=img_id if parent != BLANK else BLANK,
            srcVolUUID=parent,
        ))
