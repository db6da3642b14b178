"""Fault matrix, case 1 (issue 13): the daemon killed with kill -9 at each step of the flow.

One real daemon (local lock, SPM), a pool of a file domain and a thin block
domain on a loop-device VG (tests/faults/site.py), ONE writing test guest
whose disk ping-pongs between them: each case below is one ``move-disk``
in the other direction.  At each step of DESIGN section 1 the flow is
stopped by move-disk's journal hook (``STOP_AFTER``) and move-disk is
killed (SIGKILL), the daemon is killed with SIGKILL at the point the case
names, then the daemon is started again, the pool connected and made SPM
as an engine does (``StoragePool.connect`` if needed, ``spmStart``), and
``move-disk`` is run again: it must resume and finish, the VM on the
destination with nothing left behind (:meth:`FaultSite.assert_clean`: no
task, journal, ILLEGAL volume, stray LV, loop device, prepare link, block
job, domain or qemu-img).  The exact kill points:

==========================  =====================================================
after the snapshot          move-disk stopped after its ``snapshot`` step (the VM
                            writes to the new leaf); the daemon killed there
during the clone            the clone's ``qemu-img create`` of the first COW
                            volume on the destination held (the LVs before it
                            made, this one's active); the daemon killed with the
                            task running.  The restarted daemon kills that orphan
                            (storage/leftovers.py), spmStart rolls the task back
                            (TaskInterrupted), move-disk makes the clone again
after diskReplicateStart    move-disk stopped after ``mirror_started``: the mirror
                            runs; the daemon killed (recovery must adopt it)
during syncData             the sync's ``qemu-img convert`` of the base held; the
                            daemon killed with the task running (the copy dies
                            with it); after spmStart the task re-runs and
                            succeeds before move-disk is run again
at ready                    move-disk stopped after ``synced``; the daemon killed
                            once VM.getStats says the mirror is ``ready``
right after the pivot,      move-disk stopped after ``synced``, the mirror ready;
before the metadata         the daemon frozen (SIGSTOP), the pivot done behind its
is written                  back with libvirt's ``blockJobAbort(PIVOT)`` (what
                            virt/pivot.py ``_complete`` calls), then the daemon
                            killed: exactly the state of a daemon killed between
                            the pivot and ``persist``: the live XML on the replica,
                            the VM's metadata still on the source with a replica,
                            the destination leaf ILLEGAL, the source chain still
                            prepared.  Race-free: a SIGKILL cannot be timed
                            inside the daemon's own diskReplicateFinish
==========================  =====================================================

The disk goes file -> block first (see CASES for the order): the clone is
made on the block domain, the pivot case runs both ways.  At the end the
VM is destroyed (its volumes' loop devices go, the special LVs' stay), the
verifier finds every acknowledged write on the chain it ended on, the pool
is destroyed and both domains formatted, and no loop device over the block
domain's PV is left attached.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import libvirt
import pytest

from storage import block_manifest
from tests.faults import site as site_mod
from tests.storage import conftest as storage_conftest
from tests.virt import conftest as virt_conftest

pytestmark = [storage_conftest.requires_root, pytest.mark.timeout(900)]


class Moving:
    """The guest whose disk ping-pongs, and where its disk is now."""

    def __init__(self, site: site_mod.FaultSite) -> None:
        self.site = site
        self.img, (base, leaf) = site.create_image(site.file_sd)
        self.base = base
        self.vm = site.start_guest(self.img, leaf, site.file_sd)
        self.on = site.file_sd
        self.timings: dict[str, float] = {}


@pytest.fixture(scope="module")
def moving(fault_site: site_mod.FaultSite) -> Iterator[Moving]:
    yield Moving(fault_site)


# The cases: kill what each names; return what to check after the restart.

Check = Callable[[], None]


def after_snapshot(m: Moving, args: tuple[str, ...]) -> Check | None:
    m.site.move_disk_killed_after("snapshot", *args)
    m.site.kill9_daemon()
    return None


def during_clone(m: Moving, args: tuple[str, ...]) -> Check | None:
    site = m.site
    # The clone's first qemu-img create that names the base: the COW volume
    # over it (a block base is an LV, no qemu-img), never the snapshot's.
    site.qemu_img.hold("create", m.base)
    site.move_disk_killed_after("clone_submitted", *args)
    held = site.qemu_img.wait_held()
    task_id = site.journal_record(m.vm)["tasks"]["clone_submitted"]
    status = site.call("Task.getStatus", taskID=task_id)
    assert status["taskState"] == "running", status
    site.kill9_daemon()

    def check() -> None:
        # The restarted daemon killed the orphaned qemu-img; the task was
        # rolled back at spmStart (DESIGN section 6) and says so.
        assert not site_mod.process_alive(held)
        status = site.call("Task.getStatus", taskID=task_id)
        assert status["taskState"] == "finished", status
        assert (status["taskResult"], status["error"]) == ("cleanFailure", "TaskInterrupted")
        assert m.img not in site.call("StorageDomain.getImages",
                                      storagedomainID=site.other(m.on))
    return check


def after_replicate_start(m: Moving, args: tuple[str, ...]) -> Check | None:
    m.site.move_disk_killed_after("mirror_started", *args)
    m.site.kill9_daemon()

    def check() -> None:
        disk = m.site.disk(m.vm)
        assert disk["domainID"] == m.on and disk["replicate"]["dstDisk"]["domainID"] == \
            m.site.other(m.on), disk
    return check


def during_sync(m: Moving, args: tuple[str, ...]) -> Check | None:
    site = m.site
    site.qemu_img.hold("convert", m.base)
    site.move_disk_killed_after("sync_submitted", *args)
    held = site.qemu_img.wait_held()
    task_id = site.journal_record(m.vm)["tasks"]["sync_submitted"]
    assert site.call("Task.getStatus", taskID=task_id)["taskState"] == "running"
    site.kill9_daemon()

    def check() -> None:
        assert not site_mod.process_alive(held)
        # The sync task runs again after spmStart and succeeds.
        deadline = time.monotonic() + site_mod.WAIT
        while (status := site.call("Task.getStatus", taskID=task_id))["taskState"] != \
                "finished":
            assert time.monotonic() < deadline, status
            time.sleep(0.1)
        assert status["taskResult"] == "success", status
    return check


def at_ready(m: Moving, args: tuple[str, ...]) -> Check | None:
    m.site.move_disk_killed_after("synced", *args)
    m.site.wait_replica(m.vm, "ready")
    m.site.kill9_daemon()
    return None


def after_pivot(m: Moving, args: tuple[str, ...]) -> Check | None:
    site = m.site
    to = site.other(m.on)
    site.move_disk_killed_after("synced", *args)
    site.wait_replica(m.vm, "ready")
    site.freeze_daemon()
    conn, dom = site.domain(m.vm)
    try:
        dom.blockJobAbort("vda", libvirt.VIR_DOMAIN_BLOCK_JOB_ABORT_PIVOT)
        virt_conftest.wait_for(lambda: not dom.blockJobInfo("vda", 0), 60, "the job's end")
        assert to in site_mod.live_source(dom.XMLDesc(0))
    finally:
        conn.close()
    site.kill9_daemon()

    def check() -> None:
        # The restarted daemon runs the VM on what QEMU runs: the replica.
        disk = site.disk(m.vm)
        assert disk["domainID"] == to and "replicate" not in disk, disk
    return check


# In this order the disk goes file -> block first, and every case in turn
# the other way: the clone is made on the block domain (LVs, activations),
# the pivot case runs both ways (from block: the dead daemon's source chain
# is still mapped; onto block, last, as measured in the issue: the final
# format then follows a recovered daemon's block chain).
CASES: list[tuple[str, Callable[[Moving, tuple[str, ...]], Check | None]]] = [
    ("after-snapshot", after_snapshot),  # file -> block
    ("after-pivot-from-block", after_pivot),  # block -> file
    ("during-clone", during_clone),  # file -> block
    ("after-replicate-start", after_replicate_start),  # block -> file
    ("during-sync", during_sync),  # file -> block
    ("at-ready", at_ready),  # block -> file
    ("after-pivot", after_pivot),  # file -> block
]


@pytest.mark.parametrize("name,kill", CASES, ids=[name for name, _ in CASES])
def test_daemon_killed_then_move_disk_run_again_finishes(
    moving: Moving, name: str, kill: Callable[[Moving, tuple[str, ...]], Check | None]
) -> None:
    site, vm = moving.site, moving.vm
    start = time.monotonic()
    to = site.other(moving.on)
    args = site.move_args(vm, to)

    check = kill(moving, args)
    site.restart_daemon()
    site.wait_up(vm)
    if check is not None:
        check()
    proc = site.move_disk(*args)

    assert proc.returncode == 0, (name, proc.stderr)
    summary: dict[str, Any] = json.loads(proc.stdout)
    assert summary["resumed"] is True and summary["dstDomainID"] == to, summary
    moving.on = to
    site.assert_clean(vm, moving.img, to)
    vm.wait_acks(vm.acks() + 5)
    moving.timings[name] = time.monotonic() - start
    print(f"case {name}: {moving.timings[name]:.1f}s")


def test_at_the_end_no_write_is_lost_and_no_loop_device_is_left(moving: Moving) -> None:
    site, vm = moving.site, moving.vm
    site.assert_clean(vm, moving.img, moving.on)
    leaf = site.chain(vm)[-1]
    site.call("VM.destroy", vmID=vm.vm_id)
    # The destroyed VM's volumes are torn down: only the special LVs stay
    # active (mapped by loop devices over the PV).
    after_destroy = site.stacked_loops()
    assert len(after_destroy) == len(block_manifest.SPECIAL_LVS), after_destroy

    result = site.verify(vm, moving.img, moving.on, leaf)

    assert result.ok and result.lost == 0, str(result)
    assert site.teardown_storage() == []
    assert site.stacked_loops() == []
    print(f"timings: {moving.timings}")

