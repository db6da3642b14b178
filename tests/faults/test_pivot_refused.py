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
(d) the pivot asked of libvirt and the job force-cancelled in QEMU, both
    behind the daemon's back (what a daemon killed between its own forced
    cancel and closing the replica leaves), then the move fails: the
    rollback's abort finds no job and still closes the replica's nodes;
(a) paused just before the pivot and, once libvirt shows the pivot
    pending, GROW_MB written through the guest's disk, more than the thin
    block replica has room for; resumed once the watermark monitor extended
    the replica (at least 2 s later), while Finish waits: the pending pivot
    completes, the move finishes on the block domain.  Finish holds the
    VM's lock while it waits, which the monitor's cycles skip: the
    extension comes from the wait itself (Monitor.checker), or the resumed
    job overflows the replica and fails.  Its daemon waits up to LONG_STALL
    for a job without progress, not the default 10 s the others use: the
    pause it tolerates must not be a race with the machine's load;

(b), (c) and (d) run onto the block domain first (the guest stays on the file
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

import contextlib
import os
import re
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from typing import Any

import libvirt
import pytest

from tests import daemon as daemon_mod
from tests.faults import enospc_util
from tests.faults import site as site_mod
from tests.storage import conftest as storage_conftest
from tests.vdsm_lsm import test_move_disk
from tests.virt import test_thinp
from vdsm_lsm import client_errors
from vdsm_lsm import config as config_mod
from virt import pivot, thinp

MiB = 1024**2

pytestmark = pytest.mark.timeout(600)
real = storage_conftest.requires_root

# (a): how long the job stays paused at least once its pivot is pending, and
# how long its daemon (restarted for it, then with the default again) waits
# for a job that makes no progress: with the default 10 s, a resume that a
# loaded machine delays by 8 s (a new libvirt connection, the domain's job
# lock, QMP) loses to the stall detection, which cancels the job: PivotImpossible.
# Below [replication] job_end_timeout (60 s), after which a pending pivot is
# changeDisk.
RESUME_AFTER = 2.0
SPAN_MB = 8
# (a): what is written past the guest's span while the pivot waits (at
# GROW_AT_MB: the image is 64 MiB): more than the replica's room (at most a
# chunk, 16 MiB, past the leaf's SPAN_MB), so the replica needs extending;
# and how long the monitor gets to do it before the job resumes.
GROW_MB = 24
GROW_AT_MB = 32
EXTENDED_WITHIN = 15.0
LONG_STALL = 45.0
STALL_DROP_IN = "test-pivot-refused.conf"


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


class BusyJob(EndingJob):
    """A job libvirt cannot report on for a while (its job lock held), then gone."""

    def blockJobInfo(self, disk: str, flags: int = 0) -> dict[str, int]:  # noqa: N802
        if 2 <= self.reads + 1 <= 4:
            self.reads += 1
            raise libvirt.libvirtError("cannot acquire state change lock")
        return super().blockJobInfo(disk, flags)


def test_a_job_libvirt_cannot_report_on_is_not_taken_for_ended():
    dom = BusyJob(moves=True, gone_after=6)
    vm = test_thinp.fake_vm(dom)

    assert pivot._wait_end(vm, vm.drives[0], pivot.Timeouts(job_stall=60, job_end=60)) \
        == pivot.ENDED
    assert dom.reads == 6  # waited through the errors, until the job was gone


def test_the_watermark_check_runs_while_a_job_is_waited_for(monkeypatch):
    """A pivot waited for holds the VM's lock, which the monitor's cycles skip:
    its check runs from the wait instead, at most once an interval."""
    checked: list[str] = []
    monkeypatch.setattr(thinp.Monitor, "check_vm", lambda self, v: checked.append(v.id))
    for interval, expected in ((0.0, 7), (3600.0, 0)):
        checked.clear()
        vm = test_thinp.fake_vm(EndingJob(moves=True, gone_after=8))
        mon = thinp.Monitor(None, None, list,  # type: ignore[arg-type]
                            thinp.Config(interval=interval))
        timeouts = pivot.Timeouts(job_stall=60, job_end=60, while_waiting=mon.checker(vm))
        with vm.lock:
            assert pivot._wait_end(vm, vm.drives[0], timeouts) == pivot.ENDED
        # Seven looks at a job still running, each followed by a check
        # (interval 0); none within an interval of the wait's start.
        assert checked == [vm.id] * expected


class Moving:
    """The guest whose disk moves, and where its disk is now.

    It writes over SPAN_MB only: a leaf's data then never reaches a thin
    replica's watermark (a chunk, 16 MiB, less 20 %), so no replica needs
    extending, but in (a), which writes more through QEMU while a pivot
    is waited for."""

    def __init__(self, site: site_mod.FaultSite) -> None:
        self.site = site
        self.img, (_, leaf) = site.create_image(site.file_sd)
        self.vm = site.start_guest(self.img, leaf, site.file_sd, span_mb=SPAN_MB)
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


def cancelled_behind_our_back(moving: Moving, to: str) -> None:
    """(d) onto to: the pivot asked of libvirt and the job force-cancelled in
    QEMU, neither by the daemon (as a daemon killed between its forced cancel
    and the release leaves it); then the move fails and rolls back: the
    abort finds no job, and still closes the replica's nodes libvirt opened."""
    site = moving.site
    since = len(site.daemon.log())
    run = moving.flow(to)
    injected = client_errors.ClientError(code("ImageIsNotLegalChain"), "injected failure")

    def pivot_and_cancel(params: dict[str, Any]) -> None:
        if not is_pivot(params):
            return
        job = moving.pause_job()
        _, dom = site.domain(moving.vm)
        dom.blockJobAbort("vda", libvirt.VIR_DOMAIN_BLOCK_JOB_ABORT_PIVOT
                          | libvirt.VIR_DOMAIN_BLOCK_JOB_ABORT_ASYNC)
        enospc_util.qmp(site, moving.vm, "block-job-cancel", device=job, force=True)
        deadline = time.monotonic() + 30
        while site.block_job(moving.vm) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not site.block_job(moving.vm)
        raise injected

    run.rpc.before["VM.diskReplicateFinish"] = pivot_and_cancel

    assert run.fails() is injected
    log = site.daemon.log()[since:]
    assert "No block job left to abort" in log
    assert "Closed the replica's nodes libvirt left open" in log
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
def test_a_job_cancelled_behind_the_daemon_has_its_replica_released_by_the_abort(moving):
    assert moving.on == moving.site.file_sd
    cancelled_behind_our_back(moving, moving.site.block_sd)


def restart_with_stall(moving: Moving, stall: float | None) -> None:
    """The site's daemon restarted with ``[replication] job_stall_timeout``
    stall (a conf.d drop-in; None: the default again), SPM again, its VM Up."""
    site = moving.site
    path = os.path.join(os.path.dirname(site.daemon.conf_path), "conf.d", STALL_DROP_IN)
    if stall is None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    else:
        daemon_mod.write_config(path, {"replication": {"job_stall_timeout": stall}})
    effective = config_mod.load(site.daemon.conf_path).replication.job_stall_timeout
    assert effective == (stall or pivot.DEFAULT.job_stall), effective
    site.restart_daemon()
    site.wait_up(moving.vm)


@pytest.fixture
def long_stall(moving: Moving) -> Iterator[None]:
    """(a)'s daemon: a pivot's job that makes no progress is waited for
    LONG_STALL seconds; the module's default again afterwards."""
    restart_with_stall(moving, LONG_STALL)
    try:
        yield
    finally:
        restart_with_stall(moving, None)


def mirror_ready(domain_xml: str) -> str | None:
    """vda's ``<mirror ready=...>`` in the live XML ("pivot": a pivot pending)."""
    disk = ET.fromstring(domain_xml).find("./devices/disk/target[@dev='vda']/..")
    found = None if disk is None else disk.find("mirror")
    return None if found is None else found.get("ready", "")


def grow_disk(moving: Moving) -> None:
    """GROW_MB written into vda at GROW_AT_MB, past the guest's span, by QEMU
    through the guest's device (HMP qemu-io): as a guest writing more would,
    through the mirror (its dirty bitmap while the job is paused)."""
    site, vm = moving.site, moving.vm
    devices = [b["qdev"] for b in enospc_util.qmp(site, vm, "query-block") if "inserted" in b]
    assert len(devices) == 1, devices
    device = devices[0]
    command = f'qemu-io -d {device} "write -P 0x6c {GROW_AT_MB}M {GROW_MB}M"'
    out = enospc_util.qmp(site, vm, "human-monitor-command", **{"command-line": command})
    assert out == "", out  # qemu-io's own output goes to QEMU's stdout; errors come here


def replica_extended(log: str) -> int:
    """Where the monitor's first extension of a replica is in log (-1: none)."""
    found = re.search(r"Extended vm=\S+ drive=vda which=replica .*(?<!\(before mirroring\))$",
                      log, re.MULTILINE)
    return -1 if found is None else found.start()


class Resumer(threading.Thread):
    """(a)'s operator, beside the Finish: once libvirt shows the pivot
    pending on the job paused in QEMU, it grows the disk (grow_disk), leaves
    the job paused until the replica was extended (EXTENDED_WITHIN at most)
    and RESUME_AFTER seconds at least, and resumes it.  What it saw and any
    error are kept for the test (an exception would end with the thread)."""

    def __init__(self, moving: Moving, job: str, finishing: threading.Event) -> None:
        super().__init__(name="resumer", daemon=True)
        self.moving, self.job, self.finishing = moving, job, finishing
        self.seen: dict[str, Any] = {}
        self.error: BaseException | None = None

    def run(self) -> None:
        site, vm = self.moving.site, self.moving.vm
        conn, dom = site.domain(vm)
        try:
            while mirror_ready(dom.XMLDesc(0)) != "pivot":
                assert self.finishing.is_set(), "Finish returned, its pivot never pending"
                time.sleep(site_mod.POLL)
            pending = time.monotonic()
            self.seen["paused"] = enospc_util.mirror_job(site, vm)["paused"]
            since = len(site.daemon.log())
            try:
                grow_disk(self.moving)
                while (replica_extended(site.daemon.log()[since:]) < 0
                       and time.monotonic() < pending + EXTENDED_WITHIN):
                    time.sleep(site_mod.POLL)
            finally:  # resumed also if that failed: no wait for the stall
                time.sleep(max(0.0, pending + RESUME_AFTER - time.monotonic()))
                self.seen["finishing"] = self.finishing.is_set()
                enospc_util.qmp(site, vm, "block-job-resume", device=self.job)
        except BaseException as e:
            self.error = e
        finally:
            conn.close()


@real
def test_a_pivot_paused_then_resumed_finishes_its_replica_extended_meanwhile(
        moving, long_stall):
    site = moving.site
    since = len(site.daemon.log())
    run = moving.flow(site.block_sd)
    finishing = threading.Event()  # the pivot's Finish is in flight
    resumers: list[Resumer] = []

    def pause(params: dict[str, Any]) -> None:
        if not is_pivot(params) or resumers:
            return
        assert site.disk(moving.vm)["replicate"]["state"] == "ready"
        finishing.set()
        resumers.append(Resumer(moving, moving.pause_job(), finishing))
        resumers[0].start()

    run.rpc.before["VM.diskReplicateFinish"] = pause
    run.rpc.after["VM.diskReplicateFinish"] = lambda params: finishing.clear()
    try:
        summary = run.run()
    finally:
        finishing.clear()
        for resumer in resumers:
            resumer.join()

    assert len(resumers) == 1 and resumers[0].error is None, resumers[0].error
    assert summary["dstDomainID"] == site.block_sd
    # QEMU took the pivot while the job was paused, and the job was resumed
    # while that Finish waited for it: one call.
    assert resumers[0].seen == {"paused": True, "finishing": True}
    assert run.rpc.calls.count("VM.diskReplicateFinish") == 1
    # The replica was extended by the monitor while Finish waited (the VM's
    # lock held), between its pivot and the pivot's end.
    log = site.daemon.log()[since:]
    pivoting = log.index("Pivoting vm=")
    extended = replica_extended(log[pivoting:])
    assert extended >= 0, "no extension of the replica while the pivot was waited for"
    assert "Pivot done vm=" in log[pivoting + extended:]
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
