"""The move-disk flow: live storage migration of one drive, as an engine runs it.

:class:`MoveDisk` drives a daemon through a :class:`Transport` (any object
with ``call(method, **params)``, such as :class:`vdsm_lsm.client.Client`;
DESIGN section 1) to move a running VM's drive to another domain of the
same pool:

1. live snapshot: ``Volume.create`` a new COW leaf over the current one,
   then ``VM.snapshot`` (the VM writes only to the new leaf from now on);
2. ``Image.cloneStructure`` onto the destination (SPM task);
3. ``VM.diskReplicateStart``: QEMU mirrors the leaf;
4. ``Image.syncData(INTERNAL)``: the SPM copies the internal volumes;
5. wait until ``VM.getStats().disks[drive].replicate.state`` is ``ready``;
6. ``VM.diskReplicateFinish(src, dst)``: the pivot;
7. optionally ``Image.delete`` of the source image.

A failure once the destination image exists rolls back: the mirror is
aborted (``diskReplicateFinish(src, src)``) and the destination image
deleted, so the VM stays on its source; the error keeps its code.  While
waiting, ``unavail`` (40) is retried; a failed pivot (``changeDisk``, 41)
is retried a few times, then the move is aborted.

Pool, domain, image and leaf come from ``VM.getStats(vmID).disks[drive]``.
The phases and their display are :mod:`vdsm_lsm.move_progress`'s; the
command line (``vdsm-lsm-client move-disk``) is :mod:`vdsm_lsm.cli`'s.
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any, Protocol

from vdsm_lsm import api_schema, client_errors, move_progress

log = logging.getLogger("vdsm_lsm.move_disk")

PIVOT_RETRIES = 3
PIVOT_RETRY_DELAY = 2.0
DEFAULT_TIMEOUT = 3600.0
ROLLBACK_TIMEOUT = 300.0

# Error codes by schema name (codes are never written in Python).
UNAVAIL = "unavail"
CHANGE_DISK = "changeDisk"
NOT_IN_PROGRESS = "ReplicationNotInProgress"


class Transport(Protocol):
    """What the flow asks of its connection to the daemon.

    ``call`` returns a verb's result; it raises
    :class:`vdsm_lsm.client_errors.ClientError` for an error answer and
    :class:`OSError` when the daemon cannot be reached.
    """

    def call(self, method: str, **params: Any) -> Any: ...


def error(name: str, message: str) -> client_errors.ClientError:
    """A refusal of the flow, with the code of the schema error ``name``."""
    return client_errors.ClientError(api_schema.code_of(name), message)


# The flow


class MoveDisk:
    """Moves one drive of a running VM to dst_domain (same pool)."""

    def __init__(
        self,
        rpc: Transport,
        vm_id: str,
        dst_domain: str,
        drive: str = "vda",
        pool_id: str | None = None,
        delete_source: bool = False,
        bandwidth: int = 0,
        timeout: float = DEFAULT_TIMEOUT,
        progress: move_progress.ProgressBar | None = None,
        poll_interval: float = 0.5,
    ) -> None:
        self.rpc = rpc
        self.vm_id = vm_id
        self.dst_domain = dst_domain
        self.drive = drive
        self.pool_id = pool_id
        self.delete_source = delete_source
        self.bandwidth = bandwidth
        self.timeout = timeout
        self.bar = progress
        self.poll_interval = poll_interval
        phases = list(move_progress.PHASES)
        if delete_source:
            phases.append(move_progress.DELETE)
        self.progress = move_progress.Progress(phases)
        self.phase = move_progress.SNAPSHOT
        self._deadline = 0.0
        self._cloned = False
        self._mirrored = False

    # Public

    def run(self) -> dict[str, Any]:
        """Run the whole flow; return a summary; raise ClientError on failure."""
        started = time.monotonic()
        self._deadline = started + self.timeout
        disk = self._disk()
        pool_id = self.pool_id or disk.get("poolID")
        if not pool_id:
            raise error("InvalidParams", "the drive's stats name no pool: pass --pool")
        src_sd, img_id, old_leaf = disk["domainID"], disk["imageID"], disk["volumeID"]
        if src_sd == self.dst_domain:
            raise error("SameSourceAndDestination", f"drive {self.drive} is on {src_sd} already")
        log.info(
            "Moving disk vm=%s drive=%s img=%s src_sd=%s dst_sd=%s",
            self.vm_id, self.drive, img_id, src_sd, self.dst_domain,
        )
        dominfo = self._call("StoragePool.getInfo", storagepoolID=pool_id)["dominfo"]
        if self.dst_domain not in dominfo:
            raise error("StorageDomainNotInPool",
                        f"domain {self.dst_domain} is not in pool {pool_id}")
        if "replicate" in disk:
            raise error("replicaErr", f"drive {self.drive} is being replicated already")
        leaf = self._snapshot(pool_id, src_sd, img_id, old_leaf)
        src = {"poolID": pool_id, "domainID": src_sd, "imageID": img_id, "volumeID": leaf}
        dst = dict(src, domainID=self.dst_domain)
        # What the rollback must undo: only what this flow made.
        self._cloned = self._mirrored = False
        try:
            self._set_phase(move_progress.CLONE)
            task = self._call("Image.cloneStructure", imageID=img_id, storagepoolID=pool_id,
                              storagedomainID=src_sd, dstSdUUID=self.dst_domain)
            self._cloned = True
            self._wait_task(task, "cloneStructure")
            self._set_phase(move_progress.REPLICATE)
            self._mirrored = True
            self._call("VM.diskReplicateStart", vmID=self.vm_id, srcDisk=src, dstDisk=dst,
                       bandwidth=self.bandwidth)
            self._set_phase(move_progress.SYNC)
            self._wait_task(
                self._call("Image.syncData", imageID=img_id, storagepoolID=pool_id,
                           storagedomainID=src_sd, dstSdUUID=self.dst_domain,
                           syncType="INTERNAL"),
                "syncData",
            )
            self._pivot(src, dst)
        except BaseException as e:
            log.warning("Move failed in phase %s, rolling back: the VM stays on the source "
                        "vm=%s drive=%s sd=%s", self.phase, self.vm_id, self.drive, src_sd)
            log.debug("Move failure vm=%s: %s", self.vm_id, e)
            self._rollback(pool_id, src, img_id)
            raise
        disk = self._disk()
        if disk["domainID"] != self.dst_domain:
            raise error("replicaErr", f"drive {self.drive} still runs on {disk['domainID']}")
        if self.delete_source:
            self._set_phase(move_progress.DELETE)
            self._wait_task(
                self._call("Image.delete", imageID=img_id, storagepoolID=pool_id,
                           storagedomainID=src_sd),
                "delete source",
            )
        self._set_phase(move_progress.DONE)
        if self.bar is not None:
            self.bar.close()
        return {
            "vmID": self.vm_id,
            "drive": self.drive,
            "poolID": pool_id,
            "imageID": img_id,
            "srcDomainID": src_sd,
            "dstDomainID": self.dst_domain,
            "volumeChain": [v["volumeID"] for v in disk["volumeChain"]],
            "sourceDeleted": self.delete_source,
            "seconds": round(time.monotonic() - started, 1),
        }

    # Steps

    def _snapshot(self, pool_id: str, sd_id: str, img_id: str, parent: str) -> str:
        self._set_phase(move_progress.SNAPSHOT)
        info = self._call("Volume.getInfo", storagepoolID=pool_id, storagedomainID=sd_id,
                          imageID=img_id, volumeID=parent)
        leaf = str(uuid.uuid4())
        task = self._call(
            "Volume.create", storagepoolID=pool_id, storagedomainID=sd_id, imageID=img_id,
            volumeID=leaf, size=info["capacity"], volFormat="COW", preallocate="SPARSE",
            desc=f"move-disk snapshot of {self.drive}", srcImgUUID=img_id, srcVolUUID=parent,
        )
        self._wait_task(task, "create snapshot leaf")
        try:
            self._call("VM.snapshot", vmID=self.vm_id, snapDrives=[
                {"domainID": sd_id, "imageID": img_id, "baseVolumeID": parent,
                 "volumeID": leaf}])
        except client_errors.ClientError:
            task = self._quietly("Volume.delete", storagepoolID=pool_id, storagedomainID=sd_id,
                                 imageID=img_id, volumeID=leaf)
            if task:
                self._deadline = time.monotonic() + ROLLBACK_TIMEOUT
                try:
                    self._wait_task(task, "delete snapshot leaf", show=False)
                except client_errors.ClientError as e:
                    log.error("Cannot delete the snapshot leaf %s: %s", leaf, e)
            raise
        log.info("Snapshot done vm=%s drive=%s leaf=%s", self.vm_id, self.drive, leaf)
        return leaf

    def _pivot(self, src: dict[str, Any], dst: dict[str, Any]) -> None:
        failures = 0
        while True:
            self._set_phase(move_progress.MIRROR)
            self._wait_ready()
            self._set_phase(move_progress.PIVOT)
            try:
                self.rpc.call("VM.diskReplicateFinish", vmID=self.vm_id, srcDisk=src,
                              dstDisk=dst)
                return
            except client_errors.ClientError as e:
                if e.code == api_schema.code_of(UNAVAIL):
                    log.info("Pivot: mirror not ready yet vm=%s: %s", self.vm_id, e.message)
                elif e.code == api_schema.code_of(CHANGE_DISK) and failures < PIVOT_RETRIES:
                    failures += 1
                    log.warning("Pivot failed (%d/%d) vm=%s: %s", failures, PIVOT_RETRIES,
                                self.vm_id, e.message)
                    self._sleep(PIVOT_RETRY_DELAY)
                else:
                    raise
            self._check_deadline("the pivot")

    def _wait_ready(self) -> None:
        while True:
            replicate = self._disk().get("replicate")
            if replicate is None:
                raise error(NOT_IN_PROGRESS, f"drive {self.drive} has no replication")
            if replicate["state"] == "failed":
                raise error("replicaErr", f"the mirror of {self.drive} failed")
            self._show(move_progress.mirror_fraction(replicate),
                       f"{replicate.get('cur', 0)}/{replicate.get('end', 0)} bytes")
            if replicate["state"] == "ready" and replicate["cur"] == replicate["end"]:
                return
            self._check_deadline("the mirror to be ready")
            self._sleep(self.poll_interval)

    def _rollback(self, pool_id: str, src: dict[str, Any], img_id: str) -> None:
        """Abort the mirror and delete the destination image; the VM stays on src."""
        self._deadline = time.monotonic() + ROLLBACK_TIMEOUT
        if self.bar is not None:
            self.bar.close()
        stats = self._quietly("VM.getStats", vmID=self.vm_id)
        if self._mirrored and stats and "replicate" in stats["disks"].get(self.drive, {}):
            log.warning("Aborting the mirror vm=%s drive=%s", self.vm_id, self.drive)
            self._quietly("VM.diskReplicateFinish", vmID=self.vm_id, srcDisk=src, dstDisk=src)
        if not self._cloned:
            return
        images = self._quietly("StorageDomain.getImages", storagedomainID=self.dst_domain)
        if images and img_id in images:
            log.warning("Deleting the destination image sd=%s img=%s", self.dst_domain, img_id)
            try:
                self._wait_task(
                    self._call("Image.delete", imageID=img_id, storagepoolID=pool_id,
                               storagedomainID=self.dst_domain),
                    "delete destination", show=False,
                )
            except client_errors.ClientError as e:
                log.error("Cannot delete the destination image sd=%s img=%s: %s",
                          self.dst_domain, img_id, e)

    # Helpers

    def _disk(self) -> dict[str, Any]:
        stats = self._call("VM.getStats", vmID=self.vm_id)
        try:
            return dict(stats["disks"][self.drive])
        except KeyError:
            raise error("imageErr", f"VM {self.vm_id} has no drive {self.drive}") from None

    def _call(self, method: str, **params: Any) -> Any:
        """Call method, retrying while it answers unavail (40)."""
        while True:
            try:
                return self.rpc.call(method, **params)
            except client_errors.ClientError as e:
                if e.code != api_schema.code_of(UNAVAIL):
                    raise
                log.info("%s unavailable, retrying: %s", method, e.message)
            self._check_deadline(method)
            self._sleep(self.poll_interval)

    def _quietly(self, method: str, **params: Any) -> Any:
        try:
            return self.rpc.call(method, **params)
        except (client_errors.ClientError, OSError) as e:
            log.error("Rollback %s failed: %s", method, e)
            return None

    def _wait_task(self, task_id: str, what: str, show: bool = True) -> dict[str, Any]:
        while True:
            status = self._call("Task.getStatus", taskID=task_id)
            if show:
                self._show(status.get("progress", 0) / 100.0, what)
            if status["taskState"] == "finished":
                break
            if time.monotonic() > self._deadline:
                self._stop_task(task_id)
                raise error("ResourceTimeout", f"{what} did not finish in {self.timeout}s")
            self._sleep(self.poll_interval)
        self._quietly("Task.clear", taskID=task_id)
        if status["taskResult"] != "success":
            log.info("Task failed task=%s what=%s status=%s", task_id, what, status)
            raise client_errors.ClientError(status["code"], f"{what}: {status['message']}")
        return dict(status)

    def _stop_task(self, task_id: str) -> None:
        """Stop a task that ran out of time and wait (bounded) until it ends."""
        log.warning("Stopping task %s: out of time", task_id)
        self._quietly("Task.stop", taskID=task_id)
        deadline = time.monotonic() + ROLLBACK_TIMEOUT
        while time.monotonic() < deadline:
            status = self._quietly("Task.getStatus", taskID=task_id)
            if status is None or status["taskState"] == "finished":
                break
            self._sleep(self.poll_interval)
        self._quietly("Task.clear", taskID=task_id)

    def _check_deadline(self, what: str) -> None:
        if time.monotonic() > self._deadline:
            raise error("ResourceTimeout", f"gave up waiting for {what} after {self.timeout}s")

    def _set_phase(self, phase: str) -> None:
        self.phase = phase
        self._show(0.0)

    def _show(self, fraction: float, detail: str = "") -> None:
        percent = self.progress.percent(self.phase, fraction)
        if self.bar is not None:
            self.bar.update(round(percent, 1), self.phase, detail)

    def _sleep(self, seconds: float) -> None:
        time.sleep(seconds)
