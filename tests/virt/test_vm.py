"""virt/vm.py: a VM's status, pause code, drives and operations.

On a fake libvirt domain (tests/virt/fake_libvirt.py) that records calls and
fails on demand; the guest-booting tests (test_api.py, test_recovery.py)
drive the same code against a real QEMU.
"""

from __future__ import annotations

import uuid

import libvirt
import pytest

from tests.virt import fake_libvirt
from virt import drive as drive_mod
from virt import errors, metadata
from virt import vm as vm_mod

MiB = 1024**2


def make_drive(name: str = "vda", leaf: str = "leaf") -> drive_mod.Drive:
    return drive_mod.Drive(
        name=name,
        pool_id=str(uuid.uuid4()),
        domain_id=str(uuid.uuid4()),
        image_id=str(uuid.uuid4()),
        volume_id=leaf,
        format="cow",
        chain=[
            drive_mod.Volume("base", f"/run/sd/img-{name}/base", "RAW"),
            drive_mod.Volume(leaf, f"/run/sd/img-{name}/{leaf}", "COW"),
        ],
    )


def make_vm(
    *drives: drive_mod.Drive, status: str = vm_mod.UP
) -> tuple[vm_mod.VM, fake_libvirt.Domain, fake_libvirt.Connection]:
    vm_id = str(uuid.uuid4())
    dom = fake_libvirt.Domain(vm_id)
    conn = fake_libvirt.Connection(dom)
    vm = vm_mod.VM(vm_id, "vm", list(drives) or [make_drive()], conn, status=status)
    return vm, dom, conn


# Status and pause code


@pytest.mark.parametrize(
    "reason, code",
    [("enospc", vm_mod.ENOSPC), ("ENOSPC", vm_mod.ENOSPC), ("eio", vm_mod.EIO),
     ("eperm", vm_mod.EOTHER), ("", vm_mod.EOTHER)],
)
def test_pause_code_of_io_error_reason(reason, code):
    assert vm_mod.pause_code_of(reason) == code


def test_pause_code_kept_while_paused_cleared_when_up():
    vm, _, _ = make_vm()
    vm.set_status(vm_mod.PAUSED, vm_mod.ENOSPC)
    vm.set_status(vm_mod.PAUSED)  # the lifecycle event after IO_ERROR_REASON
    assert (vm.status, vm.pause_code) == (vm_mod.PAUSED, vm_mod.ENOSPC)
    vm.set_status(vm_mod.UP)
    assert (vm.status, vm.pause_code) == (vm_mod.UP, vm_mod.NOERR)


@pytest.mark.parametrize(
    "state, disk_errors, status, code",
    [
        ((libvirt.VIR_DOMAIN_RUNNING, 1), {}, vm_mod.UP, vm_mod.NOERR),
        ((libvirt.VIR_DOMAIN_PAUSED, libvirt.VIR_DOMAIN_PAUSED_USER), {}, vm_mod.PAUSED,
         vm_mod.NOERR),
        ((libvirt.VIR_DOMAIN_PAUSED, libvirt.VIR_DOMAIN_PAUSED_IOERROR),
         {"vda": libvirt.VIR_DOMAIN_DISK_ERROR_NO_SPACE}, vm_mod.PAUSED, vm_mod.ENOSPC),
        ((libvirt.VIR_DOMAIN_PAUSED, libvirt.VIR_DOMAIN_PAUSED_IOERROR),
         {"vda": libvirt.VIR_DOMAIN_DISK_ERROR_UNSPEC}, vm_mod.PAUSED, vm_mod.EOTHER),
        ((libvirt.VIR_DOMAIN_PAUSED, libvirt.VIR_DOMAIN_PAUSED_IOERROR), {}, vm_mod.PAUSED,
         vm_mod.EOTHER),
        ((libvirt.VIR_DOMAIN_SHUTOFF, 0), {}, vm_mod.DOWN, vm_mod.NOERR),
        ((libvirt.VIR_DOMAIN_CRASHED, 0), {}, vm_mod.DOWN, vm_mod.NOERR),
    ],
)
def test_refresh_state_reads_status_and_pause_code(state, disk_errors, status, code):
    vm, dom, _ = make_vm(status=vm_mod.DOWN)
    dom.domain_state = state
    dom.disk_errors = disk_errors

    vm.refresh_state()

    assert (vm.status, vm.pause_code) == (status, code)


def test_refresh_state_of_a_gone_domain_is_down():
    vm, _, conn = make_vm()
    conn.domains.clear()
    vm.refresh_state()
    assert vm.status == vm_mod.DOWN


def test_refresh_state_raises_other_libvirt_errors():
    vm, dom, _ = make_vm()
    dom.failures["state"] = fake_libvirt.error(libvirt.VIR_ERR_INTERNAL_ERROR)
    with pytest.raises(libvirt.libvirtError):
        vm.refresh_state()
    assert vm.status == vm_mod.UP


def test_every_call_looks_the_domain_up_again():
    # No virDomain is kept: it would die with a reconnected connection.
    vm, dom, conn = make_vm()
    assert vm.call(lambda d: d.UUIDString()) == vm.id
    assert vm.call(lambda d: d.UUIDString()) == vm.id
    assert conn.lookups == 2


# Drives


def test_drives_found_by_name_alias_path_and_image():
    vda, vdb = make_drive("vda"), make_drive("vdb", leaf="top")
    vdb.replica = drive_mod.Replica(
        "p", "dst", vdb.image_id, "top", [drive_mod.Volume("top", "/run/dst/top", "COW")]
    )
    vm, _, _ = make_vm(vda, vdb)

    assert vm.drive("vdb") is vdb and vm.drive("vdc") is None
    assert vm.drive_by_alias("ua-vda") is vda and vm.drive_by_alias("vda") is None
    assert vm.drive_by_path(vda.chain[0].path) is vda  # a backing volume
    assert vm.drive_by_path("/run/dst/top") is vdb  # the replica's leaf
    assert vm.drive_by_path("/elsewhere") is None
    assert vm.find_drive(vdb.domain_id, vdb.image_id) is vdb
    assert vm.find_drive(vdb.domain_id, vdb.image_id, "top") is vdb
    assert vm.find_drive(vdb.domain_id, vdb.image_id, "leaf") is None
    assert vm.find_drive(vda.domain_id, vdb.image_id) is None


def test_persist_writes_drives_recovery_reads_back():
    vm, dom, _ = make_vm(make_drive("vda"), make_drive("vdb"))
    vm.persist()
    assert dom.calls == ["setMetadata"]
    back = metadata.read(dom)
    assert back is not None
    assert [(d.name, d.image_id, d.volume_id) for d in back] == [
        (d.name, d.image_id, d.volume_id) for d in vm.drives
    ]


# A pause the daemon made, recorded in the metadata


PAUSED_USER = (libvirt.VIR_DOMAIN_PAUSED, libvirt.VIR_DOMAIN_PAUSED_USER)


@pytest.mark.parametrize(
    "recorded, state, status, code",
    [
        # Suspended by the watermark monitor: libvirt says "by the user".
        (vm_mod.ENOSPC, PAUSED_USER, vm_mod.PAUSED, vm_mod.ENOSPC),
        # Suspended by hand (virsh suspend): nothing recorded.
        (None, PAUSED_USER, vm_mod.PAUSED, vm_mod.NOERR),
        # The daemon died between the record and the suspend, or it was resumed since.
        (vm_mod.ENOSPC, (libvirt.VIR_DOMAIN_RUNNING, 1), vm_mod.UP, vm_mod.NOERR),
        # Paused for another reason than a suspend: not ours.
        (vm_mod.ENOSPC, (libvirt.VIR_DOMAIN_PAUSED, libvirt.VIR_DOMAIN_PAUSED_MIGRATION),
         vm_mod.PAUSED, vm_mod.NOERR),
        ("bogus", PAUSED_USER, vm_mod.PAUSED, vm_mod.NOERR),
    ],
)
def test_refresh_state_reads_the_recorded_pause_code(recorded, state, status, code):
    vm_id = str(uuid.uuid4())
    dom = fake_libvirt.Domain(vm_id, state)
    vm = vm_mod.VM(vm_id, "vm", [make_drive()], fake_libvirt.Connection(dom),
                   recorded_pause=recorded)

    vm.refresh_state()

    assert (vm.status, vm.pause_code) == (status, code)
    assert "setMetadata" not in dom.calls  # reading never writes


def test_a_rewrite_of_the_drives_keeps_the_recorded_pause():
    vm, dom, _ = make_vm()
    vm.record_pause(vm_mod.ENOSPC)
    vm.drives[0].volume_id = "new-leaf"  # a snapshot or a pivot, then persist

    vm.persist()

    record = metadata.read_record(dom)
    assert record is not None and record.pause_code == vm_mod.ENOSPC
    assert record.drives[0].volume_id == "new-leaf"
    vm.record_pause(None)
    record = metadata.read_record(dom)
    assert record is not None and record.pause_code is None
    assert record.drives[0].volume_id == "new-leaf"


def test_a_record_that_cannot_be_written_changes_nothing():
    vm, dom, _ = make_vm()
    dom.failures["setMetadata"] = fake_libvirt.error(libvirt.VIR_ERR_OPERATION_INVALID)
    with pytest.raises(libvirt.libvirtError):
        vm.record_pause(vm_mod.ENOSPC)
    assert vm.recorded_pause is None
    vm.forget_pause()  # nothing to clear: no write tried
    assert dom.calls == ["setMetadata"]


def test_cont_clears_the_recorded_pause():
    vm, dom, _ = make_vm()
    vm.record_pause(vm_mod.ENOSPC)
    vm.set_status(vm_mod.PAUSED, vm_mod.ENOSPC)

    vm.cont()

    assert vm.recorded_pause is None
    record = metadata.read_record(dom)
    assert record is not None and record.pause_code is None


# Operations


def test_cont_resumes_and_clears_the_pause_code():
    vm, dom, _ = make_vm()
    vm.set_status(vm_mod.PAUSED, vm_mod.ENOSPC)
    vm.cont()
    assert dom.calls == ["resume"]
    assert (vm.status, vm.pause_code) == (vm_mod.UP, vm_mod.NOERR)


def test_cont_of_a_down_vm_refused_without_libvirt():
    vm, dom, _ = make_vm(status=vm_mod.DOWN)
    with pytest.raises(errors.OperationError, match="down"):
        vm.cont()
    assert dom.calls == []


def test_cont_failure_is_an_operation_error_and_keeps_the_pause():
    vm, dom, _ = make_vm()
    vm.set_status(vm_mod.PAUSED, vm_mod.ENOSPC)
    cause = fake_libvirt.error(libvirt.VIR_ERR_OPERATION_FAILED, "resume failed")
    dom.failures["resume"] = cause
    with pytest.raises(errors.OperationError) as info:
        vm.cont()
    assert info.value.name == "VMOperationFailed" and info.value.__cause__ is cause
    assert (vm.status, vm.pause_code) == (vm_mod.PAUSED, vm_mod.ENOSPC)


def test_destroy_of_a_gone_domain_is_fine():
    vm, _, conn = make_vm()
    conn.domains.clear()
    vm.destroy_domain()
    assert vm.status == vm_mod.DOWN


def test_destroy_failure_is_an_operation_error():
    vm, dom, _ = make_vm()
    dom.failures["destroy"] = fake_libvirt.error(libvirt.VIR_ERR_OPERATION_TIMEOUT)
    with pytest.raises(errors.OperationError):
        vm.destroy_domain()
    assert vm.status == vm_mod.UP


# Stats


def test_stats_report_sizes_from_block_info():
    vm, dom, _ = make_vm()
    dom.block_info["vda"] = [64 * MiB, 5 * MiB, 8 * MiB]

    stats = vm.stats()

    assert (stats["vmId"], stats["status"], stats["pauseCode"]) == (vm.id, vm_mod.UP,
                                                                   vm_mod.NOERR)
    disk = stats["disks"]["vda"]
    assert (disk["capacity"], disk["truesize"], disk["apparentsize"]) == (64 * MiB, 5 * MiB,
                                                                          8 * MiB)
    assert [v["volumeID"] for v in disk["volumeChain"]] == ["base", "leaf"]
    assert "replicate" not in disk


def test_stats_of_a_mirrored_drive_report_the_job():
    d = make_drive()
    d.replica = drive_mod.Replica("p", "dst", d.image_id, "leaf", bandwidth=10)
    vm, dom, _ = make_vm(d)
    dom.block_info["vda"] = [64 * MiB, 5 * MiB, 8 * MiB]
    dom.block_jobs["vda"] = {"cur": 3, "end": 7}

    replicate = vm.stats()["disks"]["vda"]["replicate"]

    assert (replicate["cur"], replicate["end"], replicate["state"]) == (3, 7, drive_mod.COPYING)
    assert replicate["dstDisk"]["domainID"] == "dst" and replicate["bandwidth"] == 10


def test_stats_survive_failing_block_calls():
    d = make_drive()
    d.replica = drive_mod.Replica("p", "dst", d.image_id, "leaf")
    d.update_sizes(64 * MiB, 1 * MiB, 8 * MiB)
    vm, dom, _ = make_vm(d)
    dom.failures["blockInfo"] = fake_libvirt.error(libvirt.VIR_ERR_OPERATION_INVALID)
    dom.failures["blockJobInfo"] = fake_libvirt.error(libvirt.VIR_ERR_OPERATION_INVALID)

    disk = vm.stats()["disks"]["vda"]

    assert disk["apparentsize"] == 8 * MiB  # the last known sizes
    assert (disk["replicate"]["cur"], disk["replicate"]["end"]) == (0, 0)


def test_stats_of_a_vanished_domain_mark_the_vm_down():
    vm, _, conn = make_vm()
    conn.domains.clear()
    stats = vm.stats()
    assert stats["status"] == vm_mod.DOWN and vm.status == vm_mod.DOWN
    assert set(stats["disks"]) == {"vda"}
