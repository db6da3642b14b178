"""The move-disk flow: live storage migration of one drive, as an engine runs it.

:class:`MoveDisk` drives two daemons, each through a :class:`Transport`
(any object with ``call(method, **params)``, such as
:class:`vdsm_lsm.client.Client`; DESIGN sections 1 and 9), to move a
running VM's drive to another domain of the same pool: the **VM's host**
gets the VM verbs, the pool's **SPM** the storage verbs (one daemon may be
both)::

    step                                   VM host                 SPM
    1. live snapshot                       VM.snapshot             Volume.create (new COW leaf)
    2. clone the structure                                         Image.cloneStructure
    3. mirror the leaf                     VM.diskReplicateStart
    4. copy the internal volumes                                   Image.syncData(INTERNAL)
    5. wait for the mirror to be ready     VM.getStats
    6. pivot                               VM.diskReplicateFinish
    7. the destination leaf LEGAL                                  Volume.setLegality
    8. optionally delete the source        VM.getStats             Image.verify, Image.delete

Tasks (``Task.getStatus`` / ``clear`` / ``stop``) are the SPM's.  Without
an SPM transport the VM host is asked ``StoragePool.getSpmStatus``: if it
is the SPM it serves both; if not, the move is refused before any change
(``SpmStatusError``, naming the SPM's host id).  A given SPM transport is
checked the same way.

The mirror, its convergence (restarted write-blocking when it does not
converge, ``sync_writes="auto"``) and the pivot are
:mod:`vdsm_lsm.move_mirror`'s.  The source is deleted only once the VM runs
on the destination (``VM.getStats``) and ``Image.verify`` proved the
destination's internal volumes equal to the source's (``CopyNotVerified``
otherwise: the source is kept).

**Rollback.**  A failure once the destination image exists rolls back: the
mirror is aborted on the VM host (``diskReplicateFinish(src, src)``) and
the destination image deleted on the SPM, so the VM stays on its source;
the error keeps its code.  After the pivot nothing is rolled back: a
failure to mark the destination leaf LEGAL is reported with its code (the
VM runs on the destination; the operator retries ``Volume.setLegality``).

**Resume.**  Every step is written to a :class:`vdsm_lsm.journal.Journal`
before and after it runs.  A run that finds a journal for its drive (the
previous one was killed) reads where the drive really is and finishes:

- the VM runs on the destination: the pivot happened; the steps after it;
- a rollback had begun: it is finished, then the move starts again;
- the snapshot is not in place: its leaf is deleted, the move starts again;
- otherwise it goes on from the first step not recorded as done: a task
  the killed run submitted is waited for (one whose id it could not write
  down is waited for by verb), an unfinished clone is deleted and made
  again, a mirror that is gone is started again, and the sync re-runs.

So a killed move-disk, run again, leaves the VM on the destination or on
the source, and no destination image without a mirror or a journal.

Pool, domain, image and leaf come from ``VM.getStats(vmID).disks[drive]``.
The phases and their display are :mod:`vdsm_lsm.move_progress`'s; the
command line (``vdsm-lsm-client move-disk``) is :mod:`vdsm_lsm.cli`'s.
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any

from vdsm_lsm import client_errors, move_base, move_mirror, move_progress, move_undo
from vdsm_lsm import journal as journal_mod

log = logging.getLogger("vdsm_lsm.move_disk")

# The names callers know from here (they are move_base's and move_mirror's).
Transport = move_base.Transport
Events = move_base.Events
vm_stats = move_base.vm_stats
error = move_base.error
DEFAULT_TIMEOUT = move_base.DEFAULT_TIMEOUT
ROLLBACK_TIMEOUT = move_base.ROLLBACK_TIMEOUT
TASK_FINISHED = move_base.TASK_FINISHED
VM_REPLICATION = move_base.VM_REPLICATION
PIVOT_RETRIES = move_mirror.PIVOT_RETRIES
STALL_TIMEOUT = move_mirror.STALL_TIMEOUT
ENOSPC_TIMEOUT = move_mirror.ENOSPC_TIMEOUT
SYNC_WRITES_MODES = move_mirror.SYNC_WRITES_MODES
NOT_VERIFIED = "CopyNotVerified"


class MoveDisk(move_undo.UndoSteps):
    """Moves one drive of a running VM to dst_domain (same pool).

    rpc: the VM's host; spm: the pool's SPM (None: rpc, if it is the SPM).
    sync_writes: "auto" (background, write-blocking if it does not
    converge within stall_timeout), "on" or "off".  journal: where the steps
    are written (default: memory only, no resume).
    """

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
        spm: Transport | None = None,
        events: Events | None = None,
        spm_events: Events | None = None,
        sync_writes: str = "auto",
        journal: journal_mod.Journal | None = None,
        stall_timeout: float = STALL_TIMEOUT,
        enospc_timeout: float = ENOSPC_TIMEOUT,
    ) -> None:
        """events, spm_events: the VM host's and the SPM's pushed events (None:
        poll; without spm, the VM host's serve both)."""
        if sync_writes not in SYNC_WRITES_MODES:
            raise ValueError(f"sync_writes must be one of {SYNC_WRITES_MODES}")
        phases = list(move_progress.PHASES)
        if delete_source:
            phases.append(move_progress.DELETE)
        super().__init__(rpc, spm=spm, timeout=timeout, progress=progress,
                         poll_interval=poll_interval, events=events, spm_events=spm_events,
                         phases=phases)
        self.vm_id = vm_id
        self.dst_domain = dst_domain
        self.drive = drive
        self.pool_id = pool_id
        self.delete_source = delete_source
        self.bandwidth = bandwidth
        self.sync_writes = sync_writes
        self.stall_timeout = stall_timeout
        self.enospc_timeout = enospc_timeout
        self.journal = journal if journal is not None else journal_mod.MemoryJournal(vm_id, drive)
        self._inherited: set[str] = set()  # task steps a killed run left in the journal
        self._resumed = False
        self._started = 0.0

    # Public

    def run(self) -> dict[str, Any]:
        """Run (or resume) the whole flow; return a summary; raise ClientError on failure."""
        self._started = time.monotonic()
        self._deadline = self._started + self.timeout
        try:
            self.journal.lock()
        except journal_mod.Busy as e:
            raise error("AcquireLockFailure", str(e)) from None
        try:
            if self.journal.exists():
                return self._resume()
            return self._fresh()
        finally:
            self.journal.unlock()

    # A new move

    def _fresh(self) -> dict[str, Any]:
        self._inherited = set()
        disk = self._disk()
        pool_id = self.pool_id or disk.get("poolID")
        if not pool_id:
            raise error("InvalidParams", "the drive's stats name no pool: pass --pool")
        src_sd, img_id, parent = disk["domainID"], disk["imageID"], disk["volumeID"]
        if src_sd == self.dst_domain:
            raise error("SameSourceAndDestination", f"drive {self.drive} is on {src_sd} already")
        log.info(
            "Moving disk vm=%s drive=%s img=%s src_sd=%s dst_sd=%s",
            self.vm_id, self.drive, img_id, src_sd, self.dst_domain,
        )
        dominfo = self._call(self.rpc, "StoragePool.getInfo", storagepoolID=pool_id)["dominfo"]
        if self.dst_domain not in dominfo:
            raise error("StorageDomainNotInPool",
                        f"domain {self.dst_domain} is not in pool {pool_id}")
        if "replicate" in disk:
            raise error("replicaErr", f"drive {self.drive} is being replicated already")
        self.find_spm(pool_id)
        self.journal.begin(
            poolID=pool_id, srcDomainID=src_sd, dstDomainID=self.dst_domain, imageID=img_id,
            parentVolumeID=parent, leafVolumeID=str(uuid.uuid4()),
            options={"deleteSource": self.delete_source, "bandwidth": self.bandwidth,
                     "syncWrites": self.sync_writes},
        )
        self.journal.step("started")
        self._snapshot()
        return self._forward(mirror_running=False)

    def _snapshot(self) -> None:
        rec = self.journal.record
        pool_id, sd_id, img_id = rec["poolID"], rec["srcDomainID"], rec["imageID"]
        parent, leaf = rec["parentVolumeID"], rec["leafVolumeID"]
        spm = self._spm()
        self._set_phase(move_progress.SNAPSHOT)
        info = self._call(spm, "Volume.getInfo", storagepoolID=pool_id, storagedomainID=sd_id,
                          imageID=img_id, volumeID=parent)
        try:
            self._task_step("leaf", "Volume.create", "create snapshot leaf", lambda: self._call(
                spm, "Volume.create", storagepoolID=pool_id, storagedomainID=sd_id,
                imageID=img_id, volumeID=leaf, size=info["capacity"], volFormat="COW",
                preallocate="SPARSE", desc=f"move-disk snapshot of {self.drive}",
                srcImgUUID=img_id, srcVolUUID=parent))
        except client_errors.ClientError:
            self.journal.remove()  # the failed task removed what it made
            raise
        try:
            self._call(self.rpc, "VM.snapshot", vmID=self.vm_id, snapDrives=[
                {"domainID": sd_id, "imageID": img_id, "baseVolumeID": parent,
                 "volumeID": leaf}])
        except client_errors.ClientError:
            self._undo_leaf()
            raise
        self.journal.step("snapshot")
        log.info("Snapshot done vm=%s drive=%s leaf=%s", self.vm_id, self.drive, leaf)

    def _forward(self, mirror_running: bool) -> dict[str, Any]:
        """Steps 2-6 from the first not done, rolling back on failure; then the rest."""
        j = self.journal
        src, dst = self._specs()
        try:
            if not j.done("cloned"):
                self._clone()
            if not mirror_running:
                wanted = self.sync_writes == "on" or bool(j.record.get("syncWrites"))
                self._start_mirror(src, dst, sync_writes=wanted)
            if not j.done("synced"):
                self._sync()
            self._mirror_and_pivot(src, dst)
        except BaseException as e:
            log.warning("Move failed in phase %s, rolling back: the VM stays on the source "
                        "vm=%s drive=%s sd=%s", self.phase, self.vm_id, self.drive,
                        src["domainID"])
            log.debug("Move failure vm=%s: %s", self.vm_id, e)
            self._rollback()
            raise
        return self._after_pivot()

    def _clone(self) -> None:
        rec = self.journal.record
        self._set_phase(move_progress.CLONE)

        def redo() -> bool:
            # What a clone left (unfinished, rolled back, or done but not
            # recorded) is deleted and made again.
            self._delete_destination()
            return False

        self._task_step("clone", "Image.cloneStructure", "cloneStructure", lambda: self._call(
            self._spm(), "Image.cloneStructure", imageID=rec["imageID"],
            storagepoolID=rec["poolID"], storagedomainID=rec["srcDomainID"],
            dstSdUUID=rec["dstDomainID"]), redo=redo)
        self.journal.step("cloned")

    def _sync(self) -> None:
        rec = self.journal.record
        self._set_phase(move_progress.SYNC)
        self._task_step("sync", "Image.syncData", "syncData", lambda: self._call(
            self._spm(), "Image.syncData", imageID=rec["imageID"], storagepoolID=rec["poolID"],
            storagedomainID=rec["srcDomainID"], dstSdUUID=rec["dstDomainID"],
            syncType="INTERNAL"))
        self.journal.step("synced")

    # After the pivot

    def _after_pivot(self) -> dict[str, Any]:
        """The VM runs on the destination now: nothing below rolls back."""
        j = self.journal
        rec = j.record
        src, dst = self._specs()
        if not j.done("legal"):
            self._mark_legal(dst)
            j.step("legal")
        disk = self._disk()
        if disk["domainID"] != self.dst_domain:
            raise error("replicaErr", f"drive {self.drive} still runs on {disk['domainID']}")
        if self.delete_source:
            self._set_phase(move_progress.DELETE)
            if not j.done("verified"):
                self._verify(disk)
                j.step("verified")
            self._delete_source()
        j.remove()
        self._set_phase(move_progress.DONE)
        if self.bar is not None:
            self.bar.close()
        return {
            "vmID": self.vm_id,
            "drive": self.drive,
            "poolID": rec["poolID"],
            "imageID": rec["imageID"],
            "srcDomainID": rec["srcDomainID"],
            "dstDomainID": self.dst_domain,
            "volumeChain": [v["volumeID"] for v in disk["volumeChain"]],
            "sourceDeleted": self.delete_source,
            "verified": self.delete_source,
            "syncWrites": bool(rec.get("syncWrites")),
            "resumed": self._resumed,
            "seconds": round(time.monotonic() - self._started, 1),
        }

    def _mark_legal(self, dst: dict[str, Any]) -> None:
        """After the pivot: the SPM marks the destination leaf LEGAL (DESIGN
        section 1; a no-op when the VM's host is the SPM and did it itself)."""
        try:
            self._call(self._spm(), "Volume.setLegality", storagepoolID=dst["poolID"],
                       storagedomainID=dst["domainID"], imageID=dst["imageID"],
                       volumeID=dst["volumeID"], legality="LEGAL")
        except client_errors.ClientError as e:
            log.error("The VM runs on the destination, but its leaf is not marked LEGAL: "
                      "call Volume.setLegality on the SPM sd=%s img=%s vol=%s",
                      dst["domainID"], dst["imageID"], dst["volumeID"])
            raise client_errors.ClientError(
                e.code, f"the pivot is done, but marking the destination leaf "
                f"{dst['volumeID']} LEGAL failed: {e.message}") from e
        log.info("Destination leaf LEGAL sd=%s vol=%s", dst["domainID"], dst["volumeID"])

    def _verify(self, disk: dict[str, Any]) -> None:
        """Before deleting the source: the VM runs on the destination's chain,
        and the SPM proves its internal volumes equal the source's."""
        rec = self.journal.record
        chain = [v["volumeID"] for v in disk.get("volumeChain", [])]
        if (disk["imageID"] != rec["imageID"] or not chain
                or chain[-1] != rec["leafVolumeID"] or disk["volumeID"] != chain[-1]):
            raise error(NOT_VERIFIED, f"drive {self.drive} does not run the moved chain "
                        f"(leaf {disk['volumeID']}, chain {chain}): the source is kept")
        answer = self._call(self._spm(), "Image.verify", imageID=rec["imageID"],
                            storagepoolID=rec["poolID"], storagedomainID=rec["srcDomainID"],
                            dstSdUUID=rec["dstDomainID"])
        if not answer.get("equal"):
            bad = [v["volumeID"] for v in answer.get("volumes", [])
                   if not v.get("equal") or v.get("legality") != "LEGAL"]
            raise error(NOT_VERIFIED, f"the destination's volumes {bad} differ from the "
                        f"source's (or are not LEGAL): the source is kept")
        log.info("Verified the copy img=%s volumes=%d", rec["imageID"],
                 len(answer.get("volumes", [])))

    def _delete_source(self) -> None:
        rec = self.journal.record

        def gone() -> bool:
            images = self._call(self._spm(), "StorageDomain.getImages",
                                storagedomainID=rec["srcDomainID"])
            return rec["imageID"] not in images

        self._task_step("delete", "Image.delete", "delete source", lambda: self._call(
            self._spm(), "Image.delete", imageID=rec["imageID"], storagepoolID=rec["poolID"],
            storagedomainID=rec["srcDomainID"]), redo=gone)

    # Resume

    def _resume(self) -> dict[str, Any]:
        j = self.journal
        rec = j.load()
        if rec.get("dstDomainID") != self.dst_domain:
            raise error("replicaErr", f"an unfinished move of {self.vm_id} {self.drive} to "
                        f"{rec.get('dstDomainID')} is in the journal {j.path}: run move-disk "
                        "with that destination to finish it")
        log.warning("Resuming the move of vm=%s drive=%s to %s from %s (steps: %s)",
                    self.vm_id, self.drive, self.dst_domain, j.path, ", ".join(rec["steps"]))
        self._inherited = set(rec.get("tasks", {}))
        self._resumed = True
        self.pool_id = rec["poolID"]
        self.find_spm(rec["poolID"])
        try:
            disk = self._disk()
        except client_errors.ClientError as e:
            if not move_base.is_error(e, "noVM"):
                raise
            return self._resume_without_vm(e)
        if disk["domainID"] == self.dst_domain and disk["imageID"] == rec["imageID"]:
            log.warning("The pivot had happened: finishing after it")
            j.step("pivoted")
            return self._after_pivot()
        if rec.get("rollingBack"):
            log.warning("A rollback had begun: finishing it, then moving again")
            self._rollback()
            return self._fresh()
        if disk["volumeID"] != rec["leafVolumeID"]:
            log.warning("The snapshot is not in place: starting again")
            self._undo_leaf()
            return self._fresh()
        j.step("snapshot")
        mirror = disk.get("replicate")
        running = mirror is not None
        if mirror is not None and mirror["dstDisk"]["domainID"] != self.dst_domain:
            raise error("replicaErr", f"drive {self.drive} is replicated to "
                        f"{mirror['dstDisk']['domainID']}, not by this move")
        if not running and j.done("mirror_started"):
            j.forget("mirror_started")
        return self._forward(mirror_running=running)

    def _resume_without_vm(self, e: client_errors.ClientError) -> dict[str, Any]:
        j = self.journal
        if j.done("pivoted") or j.record.get("pivoting"):
            # The destination may hold the newest data: keep both images.
            raise client_errors.ClientError(e.code, (
                f"VM {self.vm_id} is gone after its pivot began: both images are kept "
                f"(journal {j.path}); {e.message}"))
        log.warning("VM %s is gone: rolling back the storage of its move", self.vm_id)
        self._rollback(vm_gone=True)
        raise e
