"""A daemon restart while a VM is paused: by the watermark monitor (ENOSPC,
recorded in the domain's metadata) or by hand (nothing recorded).

On fakes: a libvirt domain (tests/virt/fake_libvirt.py) whose suspend is
libvirt's "paused by the user" whoever asked, a file COW source mirrored to
a thin block replica (a real file, as tests/faults/test_enospc.py's), and
storage whose extensions fail on demand (tests/virt/test_thinp.py's).  A
"restart" is what the new daemon does: :func:`recovery.recover_domain` on
the running domain, then its monitor's cycles.  The real daemon killed with
a paused guest: tests/faults/test_enospc.py.
"""

from __future__ import annotations

import os
import uuid
from typing import Any

import libvirt

from tests.virt import fake_libvirt, test_thinp
from virt import domxml, metadata, recovery, thinp
from virt import drive as drive_mod
from virt import vm as vm_mod

MiB = 1024**2
PAUSED_USER = (libvirt.VIR_DOMAIN_PAUSED, libvirt.VIR_DOMAIN_PAUSED_USER)


class Domain(fake_libvirt.Domain):
    """A running domain with its XML, a mirror job and block thresholds."""

    def __init__(self, uuid_: str, xml: str) -> None:
        super().__init__(uuid_)
        self.xml = xml
        self.suspended = 0

    def XMLDesc(self, flags: int = 0) -> str:  # noqa: N802
        return self.xml

    def suspend(self) -> int:
        self._call("suspend")
        self.suspended += 1
        self.domain_state = PAUSED_USER
        return 0

    def setBlockThreshold(self, dev: str, value: int, flags: int = 0) -> int:  # noqa: N802
        return 0


class Storage(test_thinp.FakeStorage):
    """Extensions of the replica file (failing while ``fail``); prepares recorded."""

    def __init__(self, replica_path: str) -> None:
        super().__init__(None, replica_path)  # no source domain: the source is a file
        self.prepared: list[str] = []

    def prepare(self, pool_id: str, sd_id: str, img_id: str, vol_id: str,
                allow_illegal: bool = False) -> dict[str, Any]:
        self.prepared.append(vol_id)
        return {}


def mirrored(tmp_path: Any) -> tuple[Domain, fake_libvirt.Connection, Storage, vm_mod.VM]:
    """A VM whose file COW leaf (9 MiB written: past the 16 MiB replica's
    8 MiB watermark) is mirrored to a thin block replica; the VM as the
    daemon that started the replication has it (metadata written)."""
    replica = tmp_path / "replica"
    replica.write_bytes(b"")
    os.truncate(replica, 16 * MiB)
    d = drive_mod.Drive(
        name="vda", pool_id="pool", domain_id="src", image_id="img", volume_id="leaf",
        format="cow", chain=[drive_mod.Volume("leaf", str(tmp_path / "leaf"), "COW")],
        disk_type=drive_mod.FILE, prepared=["leaf"],
    )
    d.replica = drive_mod.Replica(
        "pool", "dst", "img", "leaf", [drive_mod.Volume("leaf", str(replica), "COW")],
        disk_type=drive_mod.BLOCK,
    )
    vm_id = str(uuid.uuid4())
    spec = domxml.DomainSpec(vm_id=vm_id, name="lsmtest-pause", memory_mib=128, vcpus=1,
                             domain_type="qemu", kernel="/nonexistent/vmlinuz")
    dom = Domain(vm_id, domxml.build(spec, [d], metadata.to_element([d])))
    dom.block_info["vda"] = [64 * MiB, 9 * MiB, 9 * MiB]
    dom.block_jobs["vda"] = {"type": libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_COPY, "cur": 1, "end": 2}
    conn = fake_libvirt.Connection(dom)
    vm = vm_mod.VM(vm_id, dom.name(), [d], conn, status=vm_mod.UP)
    vm.persist()
    return dom, conn, Storage(str(replica)), vm


def monitor(storage: Storage, vm: vm_mod.VM) -> thinp.Monitor:
    return thinp.Monitor(storage, storage, lambda: [vm], thinp.Config(1, 50, 16))


def restart(dom: Domain, conn: fake_libvirt.Connection, storage: Storage) -> vm_mod.VM:
    """What a restarted daemon makes of the running domain."""
    vm = recovery.recover_domain(conn, storage, storage, dom)
    assert vm is not None
    return vm


def recorded(dom: Domain) -> str | None:
    record = metadata.read_record(dom)
    assert record is not None
    return record.pause_code


def test_a_vm_the_monitor_paused_is_recovered_out_of_space_and_resumed_once_there_is_room(
        tmp_path):
    dom, conn, storage, vm = mirrored(tmp_path)
    storage.fail = True  # the destination VG is full
    monitor(storage, vm).check_all()
    assert (vm.status, vm.pause_code, dom.domain_state) == (vm_mod.PAUSED, vm_mod.ENOSPC,
                                                           PAUSED_USER)
    # Recorded before the suspend, with the drives (the replica kept).
    assert dom.calls.index("setMetadata", 1) < dom.calls.index("suspend")
    assert recorded(dom) == vm_mod.ENOSPC
    assert metadata.from_xml(dom.metadata_xml or "")[0].replica is not None

    # The daemon is killed; space is freed; a new daemon starts.
    storage.fail = False
    back = restart(dom, conn, storage)

    assert (back.status, back.pause_code) == (vm_mod.PAUSED, vm_mod.ENOSPC)
    assert back.recorded_pause == vm_mod.ENOSPC
    assert back.drive("vda").replica is not None and "resume" not in dom.calls

    monitor(storage, back).check_all()

    assert os.path.getsize(storage.replica_path or "") == 32 * MiB
    assert (back.status, back.pause_code, dom.calls.count("resume")) == (vm_mod.UP,
                                                                        vm_mod.NOERR, 1)
    assert dom.domain_state[0] == libvirt.VIR_DOMAIN_RUNNING
    assert back.recorded_pause is None and recorded(dom) is None


def test_a_vm_paused_by_hand_is_recovered_paused_noerr_and_stays_paused(tmp_path):
    dom, conn, storage, _ = mirrored(tmp_path)
    dom.suspend()  # virsh suspend: the daemon recorded nothing

    back = restart(dom, conn, storage)
    assert (back.status, back.pause_code) == (vm_mod.PAUSED, vm_mod.NOERR)
    mon = monitor(storage, back)
    mon.check_all()
    mon.check_all()

    # Its replica is extended as any (the VM is ours), but it is not resumed.
    assert os.path.getsize(storage.replica_path or "") == 32 * MiB
    assert "resume" not in dom.calls and dom.domain_state == PAUSED_USER
    assert (back.status, back.pause_code) == (vm_mod.PAUSED, vm_mod.NOERR)
    assert recorded(dom) is None


def test_a_record_left_on_a_running_vm_is_cleared_then_a_pause_by_hand_is_noerr(tmp_path):
    # The daemon died between its record and its suspend (or the VM was
    # resumed behind its back).
    dom, conn, storage, vm = mirrored(tmp_path)
    vm.record_pause(vm_mod.ENOSPC)

    back = restart(dom, conn, storage)
    assert (back.status, back.recorded_pause) == (vm_mod.UP, vm_mod.ENOSPC)
    monitor(storage, back).check_all()

    assert back.recorded_pause is None and recorded(dom) is None
    assert "suspend" not in dom.calls
    dom.suspend()
    back.refresh_state()
    assert (back.status, back.pause_code) == (vm_mod.PAUSED, vm_mod.NOERR)


def test_a_pause_that_cannot_be_recorded_still_pauses(tmp_path):
    # The replica must not overflow: without a record the VM is paused all
    # the same (a restarted daemon then sees a pause by hand).
    dom, conn, storage, vm = mirrored(tmp_path)
    dom.failures["setMetadata"] = fake_libvirt.error(libvirt.VIR_ERR_OPERATION_INVALID)
    storage.fail = True

    monitor(storage, vm).check_all()

    assert (vm.status, vm.pause_code, dom.suspended) == (vm_mod.PAUSED, vm_mod.ENOSPC, 1)
    assert vm.recorded_pause is None
    del dom.failures["setMetadata"]
    assert restart(dom, conn, storage).pause_code == vm_mod.NOERR


def test_a_failed_suspend_clears_its_record(tmp_path):
    dom, conn, storage, vm = mirrored(tmp_path)
    dom.failures["suspend"] = fake_libvirt.error(libvirt.VIR_ERR_OPERATION_INVALID)
    storage.fail = True

    monitor(storage, vm).check_all()

    assert vm.status == vm_mod.UP and vm.recorded_pause is None and recorded(dom) is None


def test_a_vm_paused_for_a_replication_gone_since_is_resumed(tmp_path):
    # The daemon died after the monitor's pause, and the mirror ended before
    # the restart (say the abort of a rollback was done, its metadata not
    # written): the recovered VM has no replica left to make room in.
    dom, conn, storage, vm = mirrored(tmp_path)
    storage.fail = True
    monitor(storage, vm).check_all()
    assert (vm.status, recorded(dom)) == (vm_mod.PAUSED, vm_mod.ENOSPC)
    dom.block_jobs.clear()

    back = restart(dom, conn, storage)
    assert back.drive("vda").replica is None
    assert (back.status, back.pause_code) == (vm_mod.PAUSED, vm_mod.ENOSPC)
    monitor(storage, back).check_all()

    assert (back.status, dom.calls.count("resume")) == (vm_mod.UP, 1)
    assert recorded(dom) is None
