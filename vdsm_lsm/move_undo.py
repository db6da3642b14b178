"""Undoing what a move made, and running its SPM task steps once across runs.

:class:`UndoSteps` is the part of :class:`vdsm_lsm.move_disk.MoveDisk` that
cleans up: the rollback (abort the mirror, delete the destination image,
then forget the journal; an incomplete rollback keeps the journal so the
next run finishes it), deleting a snapshot leaf the VM never switched to,
and :meth:`UndoSteps._task_step`, which runs one SPM task step so that a
run killed at any point and started again neither loses nor repeats it
(see move_disk's "Resume").
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from vdsm_lsm import client_errors, journal, move_base, move_mirror

log = logging.getLogger("vdsm_lsm.move_disk")

ROLLBACK_TIMEOUT = move_base.ROLLBACK_TIMEOUT


class UndoSteps(move_mirror.MirrorSteps):
    """Rollback and task steps; the flow (move_disk.MoveDisk) sets the fields."""

    dst_domain: str
    _inherited: set[str]

    # Rollback

    def _rollback(self, vm_gone: bool = False) -> None:
        """Abort the mirror (VM host) and delete the destination image (SPM);
        the VM stays on src.  The journal goes once nothing is left.
        vm_gone: the VM does not exist any more (no mirror to abort)."""
        j = self.journal
        self._deadline = time.monotonic() + ROLLBACK_TIMEOUT
        if self.bar is not None:
            self.bar.close()
        src, _ = self._specs()
        stats = move_base.vm_stats(self._quietly(self.rpc, "VM.getStats", vmID=self.vm_id))
        disk = stats.get("disks", {}).get(self.drive, {}) if stats else {}
        if disk.get("domainID") == self.dst_domain:
            # The pivot happened (its answer, or the journal's record of it,
            # was lost): the destination is the drive now; the next run
            # finishes the move instead.
            log.error("The drive runs on the destination already: not rolling back "
                      "(journal %s)", j.path)
            return
        try:
            j.update(rollingBack=True)
        except (OSError, journal.JournalError) as e:
            log.error("Cannot write the journal %s: %s", j.path, e)
        clean = stats is not None or vm_gone
        if "replicate" in disk:
            log.warning("Aborting the mirror vm=%s drive=%s", self.vm_id, self.drive)
            if self._quietly(self.rpc, "VM.diskReplicateFinish", vmID=self.vm_id,
                             srcDisk=src, dstDisk=src) is None:
                # The replica may still be open in QEMU (or be what it runs):
                # its image stays until a run that can abort the mirror.
                log.error("The mirror was not aborted: the destination image is kept "
                          "(journal %s)", j.path)
                log.error("The rollback is incomplete: run move-disk again to finish it "
                          "(journal %s)", j.path)
                return
        if j.done("clone_submitted") or j.record.get("pending") == "clone":
            clean = self._delete_destination(quiet=True) and clean
        if clean:
            j.remove()
        else:
            log.error("The rollback is incomplete: run move-disk again to finish it "
                      "(journal %s)", j.path)

    def _delete_destination(self, quiet: bool = False) -> bool:
        """Delete the destination image if it exists (after any clone task ends)."""
        rec = self.journal.record
        spm = self._spm()
        clone_task = self.journal.task("clone_submitted")
        if clone_task is not None:
            status = self._old_task(clone_task)
            if status and status.get("taskState") != "finished":
                self._stop_task(clone_task, "its image is being deleted")
            elif status:
                self._quietly(spm, "Task.clear", taskID=clone_task)
        else:
            self._wait_unowned("Image.cloneStructure")
        images = self._quietly(spm, "StorageDomain.getImages", storagedomainID=self.dst_domain)
        if images is None:
            return False
        if rec["imageID"] not in images:
            return True
        log.warning("Deleting the destination image sd=%s img=%s", self.dst_domain,
                    rec["imageID"])
        try:
            self._wait_task(
                self._call(spm, "Image.delete", imageID=rec["imageID"],
                           storagepoolID=rec["poolID"], storagedomainID=self.dst_domain),
                "delete destination", show=False,
            )
        except (client_errors.ClientError, OSError) as e:
            if not quiet:
                raise
            log.error("Cannot delete the destination image sd=%s img=%s: %s",
                      self.dst_domain, rec["imageID"], e)
            return False
        return True

    def _undo_leaf(self) -> None:
        """The snapshot did not happen: delete its leaf if it exists; forget the journal."""
        rec = self.journal.record
        spm = self._spm()
        leaf_task = self.journal.task("leaf_submitted")
        if leaf_task is not None:
            status = self._old_task(leaf_task)
            if status:
                self._deadline = time.monotonic() + ROLLBACK_TIMEOUT
                try:
                    self._wait_task(leaf_task, "create snapshot leaf", show=False)
                except client_errors.ClientError as e:
                    log.info("The snapshot leaf's creation failed: %s", e)
        elif self.journal.record.get("pending") == "leaf":
            self._wait_unowned("Volume.create")
        info = self._quietly(spm, "Volume.getInfo", storagepoolID=rec["poolID"],
                             storagedomainID=rec["srcDomainID"], imageID=rec["imageID"],
                             volumeID=rec["leafVolumeID"])
        if info:
            task = self._quietly(spm, "Volume.delete", storagepoolID=rec["poolID"],
                                 storagedomainID=rec["srcDomainID"], imageID=rec["imageID"],
                                 volumeID=rec["leafVolumeID"])
            if task:
                self._deadline = time.monotonic() + ROLLBACK_TIMEOUT
                try:
                    self._wait_task(task, "delete snapshot leaf", show=False)
                except client_errors.ClientError as e:
                    log.error("Cannot delete the snapshot leaf %s: %s",
                              rec["leafVolumeID"], e)
                    return
        self.journal.remove()

    # Helpers

    def _task_step(self, step: str, verb: str, what: str, submit: Callable[[], str],
                   redo: Callable[[], bool] | None = None) -> None:
        """Run an SPM task step once across runs.

        A task a killed run recorded is waited for (when its failure or its
        loss leaves things uncertain, redo() cleans up and says whether the
        step is done after all); one it may have submitted without recording
        is waited for by verb.  Then submit() runs, its task id is recorded
        (step ``<step>_submitted``) and the task waited for.
        """
        j = self.journal
        task = j.task(step + "_submitted")
        if task is not None:
            status = self._task_status(task)
            if status is not None and (step + "_submitted" not in self._inherited
                                       or status.get("taskResult") in ("", "success")):
                self._wait_task(task, what)
                return
            log.warning("The %s task %s of the previous run is %s: %s again", what, task,
                        "gone" if status is None else "failed", "checking and running it")
            if status is not None:
                self._quietly(self._spm(), "Task.clear", taskID=task)
            if redo is not None and redo():
                return
        elif j.record.get("pending") == step:
            self._wait_unowned(verb)
            if redo is not None and redo():
                return
        j.update(pending=step)
        task = submit()
        j.step(step + "_submitted", task_id=task, pending="")
        self._wait_task(task, what)

    def _old_task(self, task_id: str) -> dict[str, Any] | None:
        """The status of a task recorded earlier; None if gone or unreadable."""
        try:
            return self._task_status(task_id)
        except (client_errors.ClientError, OSError) as e:
            log.error("Cannot read task %s: %s", task_id, e)
            return None

    def _specs(self) -> tuple[dict[str, Any], dict[str, Any]]:
        rec = self.journal.record
        src = {"poolID": rec["poolID"], "domainID": rec["srcDomainID"],
               "imageID": rec["imageID"], "volumeID": rec["leafVolumeID"]}
        return src, dict(src, domainID=rec["dstDomainID"])
