"""Fault matrix, case 6 (issue 13): the pivot refused by QEMU, injected for real.

The fault: the mirror's QEMU job paused behind libvirt's and the daemon's
back (``block-job-pause`` through the QEMU monitor) just before the pivot,
once libvirt calls the mirror ready.  What libvirt 9.0 and QEMU 7.2 really
do with a paused job (found here, and what virt/pivot.py is built on):

- libvirt does not refuse the pivot itself: it still calls the job ready
  (it ignores QEMU's ``standby``), sends ``job-complete``, and QEMU accepts
  it too (a standby job takes the ``complete`` verb), then waits to be
  resumed.  libvirt's *synchronous* ``blockJobAbort(PIVOT)`` waits for the
  job's end holding the domain's job lock: it would hang for ever, and
  every other call on the domain with it (``blockJobInfo``, even the QEMU
  monitor pass-through that could resume the job: "cannot acquire state
  change lock").  The daemon pivots asynchronously and waits itself;
- while that pivot is pending, libvirt refuses both a new pivot and an
  abort ("block job on disk 'vda' is still being ended", error 55), and it
  refuses to abort a paused job at all (QEMU's soft ``block-job-cancel``:
  "is currently paused").  A job that makes no progress for
  ``[replication] job_stall_timeout`` seconds is therefore cancelled in QEMU
  (``block-job-cancel force``), the VM staying on the source.

One daemon, one writing guest, starting on the file domain:

(b) paused just before the pivot and left paused: Finish answers
    ``PivotImpossible`` (abort-only: the stuck job was cancelled in QEMU),
    move-disk rolls back, the VM stays on the source;
(c) paused during the mirror, then the move fails (an injected syncData
    failure): the rollback's abort, which libvirt refuses for a paused job,
    is done in QEMU; the VM stays on the source;
(a) paused just before the pivot, resumed 2 s later, while Finish waits:
    the pending pivot completes, the move finishes on the block domain;

(b) and (c) run onto the block domain first (the guest stays on the file
domain), then, after (a), onto the file domain: no extra move.  (b) onto
block found a leak: libvirt opens a reused shallow copy's backing chain
only at the pivot, and when that job ends without switching it closes the
replica's leaf only, so QEMU kept the replica's internal volumes open, and
with them their LVs' loop devices (virt/mirror.py ``release_target`` closes
them now).  So :meth:`Moving.check` also asks QEMU that no node of the
other domain is open.

Each ends with nothing left behind (FaultSite.assert_clean); the verifier
finds every acknowledged write on the chain the VM ends on.  The flow runs
in-process (tests/faults/enospc_util.py ``FlowRun``, the CLI's MoveDisk and
journal) so that the pause comes exactly before the call it targets.  The
bounded wait itself (ended / stalled / still copying) is unit-tested on a
fake domain first.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest

from tests.faults import enospc_util
from tests.faults import site as site_mod
from tests.storage import conftest as storage_conftest
from tests.vdsm_lsm import test_move_disk
from tests.virt import test_thinp
from vdsm_lsm import client_errors
from virt import pivot

MiB = 1024**2

pytestmark = pytest.mark.timeout(600)
real = storage_conftest.requires_root

RESUME_AFTER = 2.0


def code(name: str) -> int:
    return test_move_disk.code(name)


# Waiting for a job asked to end (virt/pivot.py _wait_end), on a fake domain


class EndingJob(test_thinp.FakeDomain):
    """blockJobInfo of a job that copies on (cur grows), stands still, or is gone."""

    def __init__(self, moves: bool, gone_after: int = -1) -> None:
        super().__init__(64 * MiB, 0, 64 * MiB)
        self.moves, self.gone_after, self.reads = moves, gone_after, 0

    def blockJobInfo(self, disk: str, flags: int = 0) -> dict[str, int]:  # noqa: N802
        self.reads += 1
        if self.reads == self.gone_after:
            return {}
        return {"type": 2, "cur": self.reads if self.moves else 1, "end": 100}


@pytest.mark.parametrize("moves, gone_after, ended", [
    (True, 2, pivot.ENDED), (False, -1, pivot.STALLED), (True, -1, pivot.SLOW)])
def test_a_job_asked_to_end_is_waited_for_boundedly(moves, gone_after, ended):
    vm = test_thinp.fake_vm(EndingJob(moves, gone_after))
    timeouts = pivot.Timeouts(job_stall=0.6, job_end=1.5)

    assert pivot._wait_end(vm, vm.drives[0], timeouts) == ended


class Moving:
    """The guest whose disk moves, and where its disk is now."""

    def __init__(self, site: site_mod.FaultSite) -> None:
        self.site = site
        self.img, (_, leaf) = site.create_image(site.file_sd)
        self.vm = site.start_guest(self.img, leaf, site.file_sd)
        self.on = site.file_sd

    def flow(self, to: str) -> enospc_util.FlowRun:
        return enospc_util.FlowRun(self.site, self.vm, to, delete_source=True)

    def pause_job(self) -> str:
        """block-job-pause of the mirror in QEMU; its job id."""
        job = enospc_util.mirror_job(self.site, self.vm)["device"]
        enospc_util.qmp(self.site, self.vm, "block-job-pause", device=job)
        paused = enospc_util.mirror_job(self.site, self.vm)
        assert paused["paused"] is True, paused
        return str(job)

    def check(self) -> None:
        self.site.assert_clean(self.vm, self.img, self.on)
        # Nothing of the other domain open in QEMU (libvirt leaves a replica's
        # backing chain open after a pivot that ended without switching).
        nodes = enospc_util.qmp(self.site, self.vm, "query-named-block-nodes", flat=True)
        other = self.site.other(self.on)
        assert [n["node-name"] for n in nodes if other in n["file"]] == [], nodes
        self.vm.wait_acks(self.vm.acks() + 10)


@pytest.fixture(scope="module")
def moving(fault_site: site_mod.FaultSite) -> Iterator[Moving]:
    yield Moving(fault_site)


def is_pivot(params: dict[str, Any]) -> bool:
    return bool(params["dstDisk"]["domainID"] != params["srcDisk"]["domainID"])


def left_paused(moving: Moving, to: str) -> None:
    """(b) onto to: the pivot's job paused in QEMU and left so; the move rolls back."""
    site = moving.site
    since = len(site.daemon.log())
    run = moving.flow(to)
    paused: list[str] = []

    def pause(params: dict[str, Any]) -> None:
        if is_pivot(params) and not paused:
            paused.append(moving.pause_job())

    run.rpc.before["VM.diskReplicateFinish"] = pause

    error = run.fails()

    assert paused
    assert error.code == code("PivotImpossible"), (error.code, error.message)
    assert "no progress" in error.message and "cancelled" in error.message
    # Abort-only: no retry of the pivot, then the rollback's abort.
    finishes = run.rpc.calls.count("VM.diskReplicateFinish")
    assert finishes == 2, run.rpc.calls
    assert "Cancelling the mirror job in QEMU" in site.daemon.log()[since:]
    assert site.stats(moving.vm)["status"] == "Up"
    moving.check()
    # libvirt left the replica's backing chain open in QEMU: closed by the daemon.
    assert "Closed the replica's nodes libvirt left open" in site.daemon.log()[since:]


def paused_then_failed(moving: Moving, to: str) -> None:
    """(c) onto to: the mirror paused in QEMU, then the move fails; rolled back."""
    site = moving.site
    since = len(site.daemon.log())
    run = moving.flow(to)
    injected = client_errors.ClientError(code("ImageIsNotLegalChain"), "injected sync failure")

    def pause_then_fail(params: dict[str, Any]) -> None:
        moving.pause_job()
        raise injected

    run.rpc.before["Image.syncData"] = pause_then_fail

    error = run.fails()

    assert error is injected
    assert site.daemon.log()[since:].count("libvirt cannot abort the mirror") == 1
    assert site.stats(moving.vm)["status"] == "Up"
    moving.check()


# Onto the block domain first (the guest starts on the file domain and stays
# there), then (a) moves it there, then the same onto the file domain.


@real
def test_a_pivot_onto_block_left_paused_is_cancelled_and_its_replica_released(moving):
    assert moving.on == moving.site.file_sd
    left_paused(moving, moving.site.block_sd)


@real
def test_a_paused_mirror_onto_block_is_aborted_in_qemu_and_its_replica_released(moving):
    assert moving.on == moving.site.file_sd
    paused_then_failed(moving, moving.site.block_sd)


@real
def test_a_pivot_paused_then_resumed_finishes(moving):
    site = moving.site
    run = moving.flow(site.block_sd)
    state: dict[str, Any] = {"in_flight": False}

    def resume(job: str) -> None:
        state["resumed_in_flight"] = state["in_flight"]
        enospc_util.qmp(site, moving.vm, "block-job-resume", device=job)

    def pause(params: dict[str, Any]) -> None:
        if not is_pivot(params) or "timer" in state:
            return
        assert site.disk(moving.vm)["replicate"]["state"] == "ready"
        state["timer"] = threading.Timer(RESUME_AFTER, resume, [moving.pause_job()])
        state["timer"].start()
        state["in_flight"] = True

    def done(params: dict[str, Any]) -> None:
        state["in_flight"] = False

    run.rpc.before["VM.diskReplicateFinish"] = pause
    run.rpc.after["VM.diskReplicateFinish"] = done
    try:
        summary = run.run()
    finally:
        if "timer" in state:
            state["timer"].join()

    assert summary["dstDomainID"] == site.block_sd
    # The job was resumed while the pivot's Finish waited for it: one call.
    assert state["resumed_in_flight"] is True
    assert run.rpc.calls.count("VM.diskReplicateFinish") == 1
    moving.on = site.block_sd
    moving.check()


@real
def test_a_pivot_left_paused_is_cancelled_and_the_move_rolls_back(moving):
    assert moving.on == moving.site.block_sd
    left_paused(moving, moving.site.file_sd)


@real
def test_a_paused_mirror_is_aborted_in_qemu_when_the_move_fails(moving):
    site = moving.site
    assert moving.on == site.block_sd
    paused_then_failed(moving, site.file_sd)

    chain = site.chain(moving.vm)
    site.call("VM.destroy", vmID=moving.vm.vm_id)
    result = site.verify(moving.vm, moving.img, moving.on, chain[-1])
    assert result.ok and result.lost == 0, str(result)
