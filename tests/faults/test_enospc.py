"""Fault matrix, case 4 (issue 13): the destination block domain runs out of space.

A writing guest's disk moves from the file domain to the thin block domain
(tests/faults/site.py: 16 MiB chunks, extended at 50% of a chunk: 8 MiB of
watermark); the replica (the destination leaf, an LV of one chunk) must
grow during the mirror as the guest fills the new leaf.  Once the mirror
runs, the block domain's VG is filled with a plain ``lvcreate`` of every
free extent, so the replica's next extension fails.

What QEMU does on its own: the mirror's target error policy is ``report``
(libvirt sets no other), so a replica written past its end fails the block
job (BLOCK_JOB_2 FAILED) while the guest runs on, its source (a file) taking
every write.  DESIGN section 1 wants the VM paused with ENOSPC and the
replica kept: the watermark monitor (virt/thinp.py) suspends the VM itself
when the replica's extension fails once the guest's allocation crossed the
replica's watermark, before the replica fills.  Then ``move-disk``
(vdsm_lsm/move_mirror.py) does not pivot onto a replica without room: the
VM stayed paused out of space, so it fails with ``NoSpaceLeftOnDomain`` and
rolls back (the mirror aborted, the destination image deleted), and the
monitor resumes the VM on its source, the replication being over.

The flow runs in-process (tests/faults/enospc_util.py ``FlowRun``: the
same MoveDisk the CLI runs, with its journal) so the fault comes at known
steps: the VG is filled right after ``VM.diskReplicateStart`` returns, and
``Image.syncData`` is sent once the VM is seen paused (no pivot can race
the fault).  The monitor's and the flow's decisions are unit-tested on
fakes first.

Then the same pause across a daemon restart: the monitor's pause is a plain
suspend (libvirt: "paused by the user"), so the daemon records its pause
code in the domain's metadata (virt/thinp_pause.py).  ``move-disk`` is
stopped after the mirror started (and killed), the VG filled, the VM seen
paused out of space, the daemon killed with ``kill -9``, the filler removed,
the daemon started again (connect, spmStart): it recovers the VM Paused with
ENOSPC (not NOERR: nobody would resume it), its monitor extends the replica
and resumes the guest, and ``move-disk`` run again finishes the move.  A VM
paused by hand is recovered NOERR and left paused:
tests/virt/test_recovery_pause.py.

Both real cases share the module's daemon and writing guest (its disk back
on the file domain after the first, on the block domain after the second);
the last test destroys it and finds every acknowledged write.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator
from typing import Any

import pytest

from tests.faults import enospc_util
from tests.faults import site as site_mod
from tests.storage import conftest as storage_conftest
from tests.vdsm_lsm import test_move_disk
from tests.virt import test_thinp
from vdsm_lsm import client_errors, move_disk
from virt import drive as drive_mod
from virt import thinp
from virt import vm as vm_mod

MiB = 1024**2
CHUNK_MB = 16
NO_SPACE = "NoSpaceLeftOnDomain"


def code(name: str) -> int:
    return test_move_disk.code(name)


# The watermark monitor, on fakes (tests/virt/test_thinp.py's)


class SuspendableDomain(test_thinp.FakeDomain):
    def __init__(self, capacity: int, allocation: int, physical: int) -> None:
        super().__init__(capacity, allocation, physical)
        self.suspended = 0

    def suspend(self) -> int:
        self.suspended += 1
        return 0


def file_source_mirrored(tmp_path: Any, allocation: int) -> tuple[Any, ...]:
    """A VM whose COW leaf is a file, mirrored to a 16 MiB thin block replica."""
    replica = tmp_path / "replica"
    replica.write_bytes(b"")
    os.truncate(replica, 16 * MiB)
    dom = SuspendableDomain(64 * MiB, allocation, allocation)
    vm = test_thinp.fake_vm(dom, str(replica))
    vm.drives[0].disk_type = drive_mod.FILE
    storage: Any = test_thinp.FakeStorage(dom, str(replica))
    mon = thinp.Monitor(storage, storage, lambda: [vm], thinp.Config(1, 50, CHUNK_MB))
    return dom, vm, storage, mon, replica


def test_a_replica_that_cannot_grow_pauses_the_vm_until_it_can(tmp_path):
    # 9 MiB allocated: past the replica's watermark (16 - 8 MiB).
    dom, vm, storage, mon, replica = file_source_mirrored(tmp_path, 9 * MiB)
    storage.fail = True

    mon.check_all()

    assert [c for c in storage.calls if c[0] == "extend"] == [("extend", "dst", 32 * MiB)]
    assert (dom.suspended, vm.status, vm.pause_code) == (1, vm_mod.PAUSED, vm_mod.ENOSPC)
    assert vm.drive("vda").replica is not None  # the replica is kept
    mon.check_all()  # still failing: paused once, retried, not resumed
    assert (dom.suspended, dom.resumed, vm.status) == (1, 0, vm_mod.PAUSED)
    assert len([c for c in storage.calls if c[0] == "extend"]) == 2

    storage.fail = False
    mon.check_all()

    assert os.path.getsize(replica) == 32 * MiB
    assert (vm.status, dom.resumed) == (vm_mod.UP, 1)


def test_a_vm_paused_for_its_replica_runs_again_once_the_replication_ends(tmp_path):
    dom, vm, storage, mon, _ = file_source_mirrored(tmp_path, 9 * MiB)
    storage.fail = True
    mon.check_all()
    assert vm.status == vm_mod.PAUSED

    vm.drive("vda").replica = None  # aborted: the file source has room
    mon.check_all()

    assert (vm.status, vm.pause_code, dom.resumed) == (vm_mod.UP, vm_mod.NOERR, 1)


def test_a_failed_extension_below_the_watermark_does_not_pause(tmp_path):
    # The replica (6 MiB) lags its thin source (8 MiB), but far from the 1 MiB
    # written (4 MiB of watermark): its failed catch-up leaves the VM running.
    replica = tmp_path / "replica"
    replica.write_bytes(b"")
    os.truncate(replica, 6 * MiB)
    dom = SuspendableDomain(64 * MiB, 1 * MiB, 8 * MiB)
    vm = test_thinp.fake_vm(dom, str(replica))
    storage = test_thinp.FakeStorage(dom, str(replica))
    storage.fail = True

    test_thinp.monitor(storage, [vm]).check_all()  # 8 MiB chunks at 50%

    assert [c for c in storage.calls if c[0] == "extend"] == [("extend", "dst", 8 * MiB)]
    assert (dom.suspended, vm.status) == (0, vm_mod.UP)


# The flow, on fake transports (tests/vdsm_lsm/test_move_disk.py's)


def test_flow_does_not_pivot_a_vm_paused_out_of_space_and_rolls_back():
    paused = dict(test_move_disk.disk_stats("src", {"state": "ready", "cur": 5, "end": 5}),
                  status="Paused", pauseCode="ENOSPC")
    spm = {k: v for k, v in test_move_disk.spm_host().answers.items()
           if k != "StoragePool.getSpmStatus"}
    host = test_move_disk.vm_host(test_move_disk.spm_status("SPM", 1), **spm, **{
        "VM.getStats": [test_move_disk.disk_stats("src"), paused]})
    flow = move_disk.MoveDisk(host, "vm", "dst", poll_interval=0.01)
    flow.enospc_timeout = 0.2

    with pytest.raises(client_errors.ClientError) as e:
        flow.run()

    assert e.value.code == code(NO_SPACE)
    assert "ENOSPC" in e.value.message and "dst" in e.value.message
    finishes = [p for m, p in host.params if m == "VM.diskReplicateFinish"]
    assert len(finishes) == 1 and finishes[0]["dstDisk"] == finishes[0]["srcDisk"]  # abort
    assert "Image.delete" in host.calls and "Volume.setLegality" not in host.calls


# Real components


@pytest.fixture(scope="module")
def site(fault_site_factory: Any) -> Iterator[site_mod.FaultSite]:
    yield fault_site_factory(chunk_mb=CHUNK_MB, config={"irs": {"volume_utilization_percent": 50}})


@dataclasses.dataclass
class Guest:
    """The module's writing guest, its image, and the domain its disk is on."""

    img: str
    vm: Any
    on: str


@pytest.fixture(scope="module")
def guest(site: site_mod.FaultSite) -> Guest:
    img, (_, leaf) = site.create_image(site.file_sd)
    # 25 blocks of 64 KiB a second over 48 MiB: the new leaf (and so the
    # replica) grows past one chunk within seconds, ~1.6 MiB/s at most,
    # so the 8 MiB of watermark leave the monitor seconds to pause the VM.
    vm = site.start_guest(img, leaf, site.file_sd, span_mb=48, rate=25)
    return Guest(img, vm, site.file_sd)


@storage_conftest.requires_root
@pytest.mark.timeout(600)
def test_destination_out_of_space_pauses_the_vm_and_the_move_rolls_back(site, guest):
    img, vm = guest.img, guest.vm
    assert guest.on == site.file_sd
    run = enospc_util.FlowRun(site, vm, site.block_sd)
    run.flow.enospc_timeout = 5.0
    seen: dict[str, Any] = {}

    def fill(params: dict[str, Any]) -> None:
        seen["filler_extents"] = enospc_util.fill_vg(site)

    def wait_paused(params: dict[str, Any]) -> None:
        # The replica could not grow: the monitor paused the VM, the mirror runs on.
        seen["paused"] = enospc_util.wait_status(site, vm, "Paused", "ENOSPC")
        seen["job"] = site.block_job(vm)
        seen["replicate"] = site.disk(vm).get("replicate")

    run.rpc.after["VM.diskReplicateStart"] = fill
    run.rpc.before["Image.syncData"] = wait_paused
    try:
        error = run.fails()
    finally:
        enospc_util.remove_filler(site)

    assert seen["job"], "the mirror job was gone while the VM was paused"
    assert seen["replicate"]["state"] in ("copying", "ready"), seen["replicate"]
    assert error.code == code(NO_SPACE), (error.code, error.message)
    assert "ENOSPC" in error.message and site.block_sd in error.message
    assert run.rpc.calls.count("VM.diskReplicateFinish") == 1  # the abort, never a pivot
    log = site.daemon.log()
    assert "cannot be extended" in log and "Paused vm=" in log
    # The mirror aborted, the monitor resumes the VM on its source.
    enospc_util.wait_status(site, vm, "Up")
    vm.wait_acks(vm.acks() + 20)
    site.assert_clean(vm, img, site.file_sd)


@storage_conftest.requires_root
@pytest.mark.timeout(600)
def test_a_vm_paused_out_of_space_is_resumed_after_a_daemon_restart(site, guest):
    img, vm = guest.img, guest.vm
    assert guest.on == site.file_sd
    args = site.move_args(vm, site.block_sd)
    site.move_disk_killed_after("mirror_started", *args)
    enospc_util.fill_vg(site)
    try:
        # The replica cannot grow: the monitor pauses the VM (recording why).
        enospc_util.wait_status(site, vm, "Paused", "ENOSPC")
        assert site.block_job(vm), "the mirror job was gone while the VM was paused"
        site.kill9_daemon()
    finally:
        enospc_util.remove_filler(site)
    acks = vm.acks()
    log_start = len(site.daemon.log())

    site.restart_daemon()

    stats = site.stats(vm)
    assert (stats["status"], stats["pauseCode"]) in (
        ("Paused", "ENOSPC"), ("Up", "NOERR")), stats  # Up: the monitor was quick
    log = site.daemon.log()[log_start:]
    recovered = [line for line in log.splitlines() if f"Recovered vm={vm.vm_id}" in line]
    assert len(recovered) == 1 and "status=Paused pause_code=ENOSPC" in recovered[0], recovered
    # Its replica extended now that there is room, the monitor resumes it.
    enospc_util.wait_status(site, vm, "Up")
    vm.wait_acks(acks + 20)
    assert f"Resumed vm={vm.vm_id}: its thin drives have room" in site.daemon.log()[log_start:]
    assert site.disk(vm)["replicate"]["state"] in ("copying", "ready")

    proc = site.move_disk(*args)  # run again: it resumes from its journal

    assert proc.returncode == 0, proc.stderr
    summary: dict[str, Any] = json.loads(proc.stdout)
    assert summary["resumed"] is True and summary["dstDomainID"] == site.block_sd, summary
    guest.on = site.block_sd
    site.assert_clean(vm, img, site.block_sd)
    vm.wait_acks(vm.acks() + 5)


@storage_conftest.requires_root
def test_at_the_end_no_acknowledged_write_is_lost(site, guest):
    vm = guest.vm
    site.assert_clean(vm, guest.img, guest.on)
    leaf = site.chain(vm)[-1]
    site.call("VM.destroy", vmID=vm.vm_id)

    result = site.verify(vm, guest.img, guest.on, leaf)

    assert result.ok and result.lost == 0, str(result)
