"""``move-disk --to-host``: live storage migration without shared storage.

The VM's host (A, ``rpc``) cannot see the destination domain; the host
given with ``--to-host`` (B, ``dest``) can, and the pool's SPM sees both.
The VM moves to B and its leaf travels with it (DESIGN section 1, second
table)::

    step                            A                      SPM                    B
    1. live snapshot                VM.snapshot            Volume.create
    2. clone the structure                                 Image.cloneStructure
    3. copy the internal volumes                           Image.syncData(INTERNAL)
    4. migrate, leaf over NBD       VM.migrate, then                              VM.migrationCreate
                                    VM.getMigrationStatus                         (called by A)
    5. the VM runs on B                                                           VM.getStats
    6. the destination leaf LEGAL                          Volume.setLegality
    7. optionally delete the source                        Image.verify, Image.delete

Before anything changes the flow checks the drive, the destination domain
(in the pool, not the drive's own) and that B's daemon answers.  A failure
after the snapshot rolls back: a running migration is canceled
(``VM.migrateCancel``) and waited for, B is told to let go of the VM
(``VM.destroy``: ``noVM`` when it holds nothing), and the destination image
is deleted on the SPM.  The VM stays on A, on the new snapshot leaf; the
error keeps its code (a failed migration's is in its status: ``noConPeer``
when B's daemon went away, ``migrateErr`` for libvirt's errors).

The steps, tasks and progress bar are :mod:`vdsm_lsm.move_base`'s, as for
the shared-storage flow (:mod:`vdsm_lsm.move_disk`); there is no journal
here: a killed client cannot resume (A's migration runs on and ends by
itself; a destination image left behind is deleted with ``Image.delete``).
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from typing import Any

from vdsm_lsm import client_errors, move_base, move_progress

log = logging.getLogger("vdsm_lsm.move_vm")

MIGRATE = "migrate"
PHASES = (move_progress.SNAPSHOT, move_progress.CLONE, move_progress.SYNC, MIGRATE)
WEIGHTS = {move_progress.SNAPSHOT: 5, move_progress.CLONE: 10, move_progress.SYNC: 35,
           MIGRATE: 45, move_progress.DELETE: 5}
FINAL = ("done", "failed", "canceled")
ARRIVE_TIMEOUT = 60.0
NOT_VERIFIED = "CopyNotVerified"
MiB = 1024**2


class MoveVM(move_base.FlowBase):
    """Moves one drive of a running VM to dst_domain, and the VM to dest.

    rpc: the VM's host; dest: the destination host's daemon, reachable by
    the VM's host at dst_address ("HOST:PORT" or "unix:PATH"); spm: the
    pool's SPM (None: rpc, if it is the SPM).
    """

    def __init__(
        self,
        rpc: move_base.Transport,
        dest: move_base.Transport,
        dst_address: str,
        vm_id: str,
        dst_domain: str,
        drive: str = "vda",
        pool_id: str | None = None,
        delete_source: bool = False,
        bandwidth: int = 0,
        timeout: float = move_base.DEFAULT_TIMEOUT,
        progress: move_progress.ProgressBar | None = None,
        poll_interval: float = 0.5,
        spm: move_base.Transport | None = None,
        serial_log: str | None = None,
    ) -> None:
        phases = list(PHASES) + ([move_progress.DELETE] if delete_source else [])
        super().__init__(rpc, spm=spm, timeout=timeout, progress=progress,
                         poll_interval=poll_interval)
        self.progress = move_progress.Progress(phases, WEIGHTS)
        self.phase = phases[0]
        self.dest = dest
        if dst_address.startswith("unix:"):
            dst_address = "unix:" + os.path.abspath(dst_address[len("unix:"):])
        self.dst_address = dst_address
        self.vm_id = vm_id
        self.dst_domain = dst_domain
        self.drive = drive
        self.pool_id = pool_id
        self.delete_source = delete_source
        self.bandwidth = bandwidth
        self.serial_log = serial_log
        self._cloned = False
        self._migrating = False
        self.migration: dict[str, Any] = {}

    def run(self) -> dict[str, Any]:
        """Run the whole flow; return a summary; raise ClientError on failure."""
        started = time.monotonic()
        self._deadline = started + self.timeout
        disk = self._disk(self.rpc)
        pool_id = self.pool_id or disk.get("poolID")
        if not pool_id:
            raise move_base.error("InvalidParams", "the drive's stats name no pool: pass --pool")
        src_sd, img_id, parent = disk["domainID"], disk["imageID"], disk["volumeID"]
        if src_sd == self.dst_domain:
            raise move_base.error("SameSourceAndDestination",
                                  f"drive {self.drive} is on {src_sd} already")
        if "replicate" in disk:
            raise move_base.error("replicaErr", f"drive {self.drive} is being replicated")
        spm = self.find_spm(pool_id)
        dominfo = self._call(spm, "StoragePool.getInfo", storagepoolID=pool_id)["dominfo"]
        if self.dst_domain not in dominfo:
            raise move_base.error("StorageDomainNotInPool",
                                  f"domain {self.dst_domain} is not in pool {pool_id}")
        self._call(self.dest, "Host.ping2")  # OSError: the destination cannot be reached
        log.info("Moving vm=%s drive=%s img=%s from sd=%s to sd=%s on %s", self.vm_id,
                 self.drive, img_id, src_sd, self.dst_domain, self.dst_address)
        leaf = self._snapshot(pool_id, src_sd, img_id, parent)
        src = {"poolID": pool_id, "domainID": src_sd, "imageID": img_id, "volumeID": leaf}
        dst = dict(src, domainID=self.dst_domain)
        try:
            self._set_phase(move_progress.CLONE)
            task = self._call(spm, "Image.cloneStructure", imageID=img_id,
                              storagepoolID=pool_id, storagedomainID=src_sd,
                              dstSdUUID=self.dst_domain)
            self._cloned = True
            self._wait_task(task, "cloneStructure")
            self._set_phase(move_progress.SYNC)
            self._wait_task(self._call(
                spm, "Image.syncData", imageID=img_id, storagepoolID=pool_id,
                storagedomainID=src_sd, dstSdUUID=self.dst_domain, syncType="INTERNAL"),
                "syncData")
            self._migrate(src, dst)
        except BaseException as e:
            log.warning("Move failed in phase %s, rolling back: the VM stays on its host "
                        "vm=%s: %s", self.phase, self.vm_id, e)
            self._rollback(pool_id, img_id)
            raise
        # The VM runs on the destination now: nothing below rolls back.
        disk = self._arrived()
        self._mark_legal(dst)
        if self.delete_source:
            self._set_phase(move_progress.DELETE)
            self._verify(pool_id, src_sd, img_id, leaf, disk)
            self._wait_task(self._call(spm, "Image.delete", imageID=img_id,
                                       storagepoolID=pool_id, storagedomainID=src_sd),
                            "delete source")
        self._set_phase(move_progress.DONE)
        if self.bar is not None:
            self.bar.close()
        return {
            "vmID": self.vm_id, "drive": self.drive, "poolID": pool_id, "imageID": img_id,
            "srcDomainID": src_sd, "dstDomainID": self.dst_domain, "host": self.dst_address,
            "volumeChain": [v["volumeID"] for v in disk["volumeChain"]],
            "sourceDeleted": self.delete_source,
            "migrationSeconds": self.migration.get("elapsed"),
            "seconds": round(time.monotonic() - started, 1),
        }

    # Steps

    def _snapshot(self, pool_id: str, sd_id: str, img_id: str, parent: str) -> str:
        spm = self._spm()
        self._set_phase(move_progress.SNAPSHOT)
        info = self._call(spm, "Volume.getInfo", storagepoolID=pool_id, storagedomainID=sd_id,
                          imageID=img_id, volumeID=parent)
        leaf = str(uuid.uuid4())
        self._wait_task(self._call(
            spm, "Volume.create", storagepoolID=pool_id, storagedomainID=sd_id, imageID=img_id,
            volumeID=leaf, size=info["capacity"], volFormat="COW", preallocate="SPARSE",
            desc=f"move-disk snapshot of {self.drive}", srcImgUUID=img_id, srcVolUUID=parent),
            "create snapshot leaf")
        try:
            self._call(self.rpc, "VM.snapshot", vmID=self.vm_id, snapDrives=[
                {"domainID": sd_id, "imageID": img_id, "baseVolumeID": parent,
                 "volumeID": leaf}])
        except client_errors.ClientError:
            task = self._quietly(spm, "Volume.delete", storagepoolID=pool_id,
                                 storagedomainID=sd_id, imageID=img_id, volumeID=leaf)
            if task:
                self._deadline = time.monotonic() + move_base.ROLLBACK_TIMEOUT
                try:
                    self._wait_task(task, "delete snapshot leaf", show=False)
                except client_errors.ClientError as e:
                    log.error("Cannot delete the snapshot leaf %s: %s", leaf, e)
            raise
        log.info("Snapshot done vm=%s drive=%s leaf=%s", self.vm_id, self.drive, leaf)
        return leaf

    def _migrate(self, src: dict[str, Any], dst: dict[str, Any]) -> None:
        self._set_phase(MIGRATE)
        params: dict[str, Any] = {"dst": self.dst_address, "maxBandwidth": self.bandwidth,
                                  "diskMappings": [{"srcDisk": src, "dstDisk": dst}]}
        if self.serial_log:
            params["serialLog"] = self.serial_log
        self._migrating = True
        self._call(self.rpc, "VM.migrate", vmID=self.vm_id, params=params)
        status = self._wait_migration()
        if status["phase"] != "done":
            raise client_errors.ClientError(
                status["code"], f"the migration {status['phase']}: {status['message']}")

    def _wait_migration(self) -> dict[str, Any]:
        while True:
            status = dict(self._call(self.rpc, "VM.getMigrationStatus", vmID=self.vm_id))
            self.migration = status
            self._show(status["progress"] / 100.0, migration_detail(status))
            if status["phase"] in FINAL:
                return status
            self._check_deadline("the migration")
            self._sleep(self.poll_interval)

    def _arrived(self) -> dict[str, Any]:
        """The drive's stats on the destination, once it runs the VM there."""
        deadline = time.monotonic() + ARRIVE_TIMEOUT
        while True:
            try:
                stats = move_base.vm_stats(self._call(self.dest, "VM.getStats", vmID=self.vm_id))
                disk = dict(stats["disks"].get(self.drive) or {})
                if disk.get("domainID") == self.dst_domain and stats["status"] != "Down":
                    return disk
            except client_errors.ClientError as e:
                if not move_base.is_error(e, "noVM") or time.monotonic() > deadline:
                    raise
            if time.monotonic() > deadline:
                raise move_base.error("migrateErr", f"the VM left its host, but the "
                                      f"destination does not run drive {self.drive} on "
                                      f"{self.dst_domain}")
            self._sleep(self.poll_interval)

    def _mark_legal(self, dst: dict[str, Any]) -> None:
        """The SPM marks the destination leaf LEGAL (a no-op if a host did)."""
        try:
            self._call(self._spm(), "Volume.setLegality", storagepoolID=dst["poolID"],
                       storagedomainID=dst["domainID"], imageID=dst["imageID"],
                       volumeID=dst["volumeID"], legality="LEGAL")
        except client_errors.ClientError as e:
            raise client_errors.ClientError(
                e.code, f"the VM runs on the destination, but marking its leaf "
                f"{dst['volumeID']} LEGAL failed: {e.message}") from e

    def _verify(self, pool_id: str, src_sd: str, img_id: str, leaf: str,
                disk: dict[str, Any]) -> None:
        """Before deleting the source: the VM runs the moved chain, and the SPM
        proves its internal volumes equal the source's (as move-disk does)."""
        chain = [v["volumeID"] for v in disk.get("volumeChain", [])]
        if disk.get("imageID") != img_id or not chain or chain[-1] != leaf:
            raise move_base.error(NOT_VERIFIED, f"drive {self.drive} does not run the moved "
                                  f"chain (chain {chain}): the source is kept")
        answer = self._call(self._spm(), "Image.verify", imageID=img_id, storagepoolID=pool_id,
                            storagedomainID=src_sd, dstSdUUID=self.dst_domain)
        if not answer.get("equal"):
            raise move_base.error(NOT_VERIFIED, f"the destination's volumes differ from the "
                                  f"source's: the source is kept ({answer.get('volumes')})")

    def _rollback(self, pool_id: str, img_id: str) -> None:
        """Cancel the migration, let the destination go, delete the destination image."""
        self._deadline = time.monotonic() + move_base.ROLLBACK_TIMEOUT
        if self.bar is not None:
            self.bar.close()
        if self._migrating:
            status = self._quietly(self.rpc, "VM.getMigrationStatus", vmID=self.vm_id)
            if status is not None and status["phase"] not in FINAL:
                log.warning("Canceling the migration of vm=%s", self.vm_id)
                self._quietly(self.rpc, "VM.migrateCancel", vmID=self.vm_id)
                while status is not None and status["phase"] not in FINAL:
                    if time.monotonic() > self._deadline:
                        log.error("The migration of vm=%s did not end", self.vm_id)
                        return
                    self._sleep(self.poll_interval)
                    status = self._quietly(self.rpc, "VM.getMigrationStatus", vmID=self.vm_id)
            if status is not None and status["phase"] == "done":
                log.error("The VM moved to %s after all: nothing is rolled back", self.dst_address)
                return
            self._quietly(self.dest, "VM.destroy", vmID=self.vm_id)
        if not self._cloned:
            return
        spm = self._spm()
        images = self._quietly(spm, "StorageDomain.getImages", storagedomainID=self.dst_domain)
        if images and img_id in images:
            log.warning("Deleting the destination image sd=%s img=%s", self.dst_domain, img_id)
            try:
                self._wait_task(self._call(spm, "Image.delete", imageID=img_id,
                                           storagepoolID=pool_id,
                                           storagedomainID=self.dst_domain),
                                "delete destination", show=False)
            except (client_errors.ClientError, OSError) as e:
                log.error("Cannot delete the destination image sd=%s img=%s: %s",
                          self.dst_domain, img_id, e)

    def _disk(self, rpc: move_base.Transport) -> dict[str, Any]:
        stats = move_base.vm_stats(self._call(rpc, "VM.getStats", vmID=self.vm_id))
        try:
            return dict(stats["disks"][self.drive])
        except (KeyError, TypeError):
            raise move_base.error("imageErr",
                                  f"VM {self.vm_id} has no drive {self.drive}") from None


def migration_detail(status: dict[str, Any]) -> str:
    """The progress line's detail during the migration: phase, bytes left, rate."""
    return (f"{status['phase']}, {status.get('dataRemaining', 0) / MiB:.1f} MiB left, "
            f"{status.get('rate', 0) / MiB:.1f} MiB/s")
