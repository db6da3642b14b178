"""move-disk's mirror: start it, watch it converge, restart it write-blocking, pivot.

Steps 3, 5 and 6 of :mod:`vdsm_lsm.move_disk` (DESIGN section 1):

- :meth:`MirrorSteps._start_mirror`: ``VM.diskReplicateStart``, in the
  background (QEMU copies while the guest writes) or write-blocking
  (``syncWrites``: every guest write reaches both sides before the guest
  sees it acknowledged, so no write rate can outrun the mirror).
- :meth:`MirrorSteps._wait_ready`: polls ``VM.getStats`` until the mirror is
  ``ready`` (what libvirt says; ``cur`` and ``end`` need not be equal:
  QEMU copies the last dirty data during the pivot), showing its bytes,
  rate and ETA on the progress line.  A background mirror that does not
  converge (:class:`vdsm_lsm.move_progress.Convergence`, from its own
  readings) is warned about and, with ``--sync-writes auto`` (the
  default), restarted write-blocking: QEMU 7.2 cannot switch a running
  job, so the mirror is aborted (``diskReplicateFinish(src, src)``) and
  started again with ``syncWrites=true`` into the same replica, which an
  abort leaves reusable (virt/mirror.py).  A daemon that cannot
  (``SyncWritesUnsupported``: ``[replication] api = blockrebase``) gets the
  background mirror back and the flow keeps waiting.  A VM paused out of
  space (``pauseCode`` ENOSPC: the watermark monitor could not extend the
  replica, or the source) is not pivoted: once it stayed paused for
  :data:`ENOSPC_TIMEOUT` seconds (``--enospc-timeout``) the move fails with
  ``NoSpaceLeftOnDomain`` and rolls back (the mirror aborted, the monitor
  resumes the VM on its source).
- :meth:`MirrorSteps._mirror_and_pivot`: ``VM.diskReplicateFinish(src,
  dst)``; ``unavail`` (not ready, or a flap) waits again, ``changeDisk``
  (refused, the mirror still runs) and ``LibvirtConnectionError`` (libvirtd
  stayed away longer than the daemon waits for it) are retried
  :data:`PIVOT_RETRIES` times, anything else (``PivotImpossible``: abort-only) fails the move, which
  rolls back.

Each start, abort and the pivot is written to the journal first.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from vdsm_lsm import client_errors, journal, move_base, move_progress

log = logging.getLogger("vdsm_lsm.move_disk")

PIVOT_RETRIES = 3
PIVOT_RETRY_DELAY = 2.0
STALL_TIMEOUT = 30.0
SYNC_WRITES_MODES = ("auto", "on", "off")
SYNC_WRITES_UNSUPPORTED = "SyncWritesUnsupported"
NO_SPACE = "NoSpaceLeftOnDomain"
# How long the VM may stay paused out of space during the mirror.
ENOSPC_TIMEOUT = 30.0


def _retryable_pivot(e: client_errors.ClientError) -> bool:
    """A Finish that failed with the mirror still running: changeDisk, or
    libvirtd away for longer than the daemon waits."""
    return move_base.is_error(e, move_base.CHANGE_DISK) or move_base.is_error(
        e, move_base.LIBVIRT_GONE)


class MirrorSteps(move_base.FlowBase):
    """The mirror and pivot steps; the flow (move_disk.MoveDisk) sets the fields."""

    vm_id: str
    drive: str
    bandwidth: int
    sync_writes: str  # auto | on | off
    stall_timeout: float
    journal: journal.Journal
    enospc_timeout: float = ENOSPC_TIMEOUT
    _enospc_since: float | None = None

    def _start_mirror(self, src: dict[str, Any], dst: dict[str, Any], sync_writes: bool) -> None:
        self._set_phase(move_progress.REPLICATE)
        self.journal.update(syncWrites=sync_writes)
        try:
            self._call(self.rpc, "VM.diskReplicateStart", vmID=self.vm_id, srcDisk=src,
                       dstDisk=dst, bandwidth=self.bandwidth, syncWrites=sync_writes)
        except client_errors.ClientError as e:
            if not (sync_writes and move_base.is_error(e, SYNC_WRITES_UNSUPPORTED)):
                raise
            log.warning("The VM's host cannot mirror write-blocking (%s): mirroring in the "
                        "background", e.message)
            self.sync_writes = "off"
            self.journal.update(syncWrites=False)
            self._call(self.rpc, "VM.diskReplicateStart", vmID=self.vm_id, srcDisk=src,
                       dstDisk=dst, bandwidth=self.bandwidth, syncWrites=False)
        self.journal.step("mirror_started")
        log.info("Mirror started vm=%s drive=%s sync_writes=%s", self.vm_id, self.drive,
                 self.journal.record.get("syncWrites"))

    def _mirror_and_pivot(self, src: dict[str, Any], dst: dict[str, Any]) -> None:
        failures = 0
        while True:
            self._set_phase(move_progress.MIRROR)
            self._wait_ready(src, dst)
            self._set_phase(move_progress.PIVOT)
            self.journal.update(pivoting=True)
            try:
                self.rpc.call("VM.diskReplicateFinish", vmID=self.vm_id, srcDisk=src,
                              dstDisk=dst)
            except client_errors.ClientError as e:
                if move_base.is_error(e, move_base.UNAVAIL):
                    log.info("Pivot: mirror not ready vm=%s: %s", self.vm_id, e.message)
                elif _retryable_pivot(e) and failures < PIVOT_RETRIES:
                    failures += 1
                    log.warning("Pivot failed (%d/%d) vm=%s: %s", failures, PIVOT_RETRIES,
                                self.vm_id, e.message)
                    self._sleep(PIVOT_RETRY_DELAY)
                else:
                    raise
            else:
                self.journal.step("pivoted")
                return
            self._check_deadline("the pivot")

    def _wait_ready(self, src: dict[str, Any], dst: dict[str, Any]) -> None:
        watch = move_progress.Convergence(stall=self.stall_timeout)
        warned = False
        while True:
            stats = self._vm_stats(self.vm_id)
            down = move_progress.vm_down(stats)
            if down:  # QEMU died: its mirror with it (the daemon released the storage)
                raise move_base.error(move_base.PIVOT_IMPOSSIBLE, f"{down}: no mirror to pivot")
            replicate = stats.get("disks", {}).get(self.drive, {}).get("replicate")
            if replicate is None:
                raise move_base.error(move_base.NOT_IN_PROGRESS,
                                      f"drive {self.drive} has no replication")
            if replicate["state"] == "failed":
                raise move_base.error(move_base.PIVOT_IMPOSSIBLE,
                                      f"the mirror of {self.drive} failed")
            if self._out_of_space(stats, dst):
                self._show(move_progress.mirror_fraction(replicate), "paused: ENOSPC")
                self._check_deadline("the VM to run again")
                self._sleep(self.poll_interval)
                continue
            self._show(move_progress.mirror_fraction(replicate),
                       move_progress.mirror_detail(replicate))
            if replicate["state"] == "ready":
                return
            why = "" if replicate.get("syncWrites") else watch.update(
                int(replicate.get("cur", 0)), int(replicate.get("end", 0)))
            if why:
                if not warned:
                    log.warning("The mirror of %s is not converging: %s", self.drive, why)
                    warned = True
                if self.sync_writes == "auto":
                    self._restart_write_blocking(src, dst, why)
                    watch.reset()
                    warned = False
                    continue
            self._check_deadline("the mirror to be ready")
            self._pause(self.events, move_base.VM_REPLICATION + self.vm_id,
                        lambda e: e.get("drive") == self.drive)

    def _out_of_space(self, stats: dict[str, Any], dst: dict[str, Any]) -> bool:
        """Whether the VM is paused out of space (ENOSPC); NoSpaceLeftOnDomain
        once it stayed so for enospc_timeout seconds."""
        if stats.get("status") != "Paused" or stats.get("pauseCode") != "ENOSPC":
            self._enospc_since = None
            return False
        now = time.monotonic()
        if self._enospc_since is None:
            self._enospc_since = now
            log.warning("VM %s is paused out of space (ENOSPC) during the mirror of %s: "
                        "waiting up to %.0fs for room", self.vm_id, self.drive,
                        self.enospc_timeout)
        elif now - self._enospc_since >= self.enospc_timeout:
            raise move_base.error(NO_SPACE, (
                f"VM {self.vm_id} stayed paused out of space (ENOSPC) for "
                f"{now - self._enospc_since:.0f}s during the mirror of {self.drive}: the "
                f"destination domain {dst['domainID']} has no room for the replica (or the "
                "source none for its leaf); the move is rolled back to the source"))
        return True

    def _restart_write_blocking(self, src: dict[str, Any], dst: dict[str, Any],
                                why: str) -> None:
        log.warning("Restarting the mirror of %s write-blocking (syncWrites): %s",
                    self.drive, why)
        # Written first: a run killed between the abort and the new start
        # starts the mirror write-blocking when it resumes.
        self.journal.update(syncWrites=True)
        self._call(self.rpc, "VM.diskReplicateFinish", vmID=self.vm_id, srcDisk=src,
                   dstDisk=src)
        self.journal.forget("mirror_started")
        self._start_mirror(src, dst, sync_writes=True)
        self._set_phase(move_progress.MIRROR)

    def _disk(self) -> dict[str, Any]:
        stats = self._vm_stats(self.vm_id)
        try:
            return dict(stats["disks"][self.drive])
        except KeyError:
            raise move_base.error(
                "imageErr", f"VM {self.vm_id} has no drive {self.drive}") from None
