"""virt/events.py: libvirt events change the VM they belong to."""

from __future__ import annotations

import uuid

import libvirt
import pytest

from tests.virt import conftest
from virt import connection, events
from virt import drive as drive_mod
from virt import vm as vm_mod

MiB = conftest.MiB


def make_vm() -> vm_mod.VM:
    d = drive_mod.Drive(
        name="vda",
        pool_id=str(uuid.uuid4()),
        domain_id=str(uuid.uuid4()),
        image_id=str(uuid.uuid4()),
        volume_id="leaf",
        format="cow",
        chain=[drive_mod.Volume("leaf", "/run/vdsm-lsm/storage/sd/img/leaf", "COW")],
    )
    return vm_mod.VM(str(uuid.uuid4()), "vm", [d], connection.Connection(), status=vm_mod.UP)


class TestDispatcher:
    # The dispatcher alone, fed the values libvirt passes to its callbacks.

    def test_io_error_enospc_pauses_with_code(self):
        vm = make_vm()
        seen = []
        disp = events.Dispatcher({vm.id: vm}.get)
        disp.io_error_hooks.append(lambda v, d, reason: seen.append((v, d.name, reason)))

        disp(
            connection.IO_ERROR,
            vm.id,
            ("/some/path", "ua-vda", libvirt.VIR_DOMAIN_EVENT_IO_ERROR_PAUSE, "enospc"),
        )
        disp(
            connection.LIFECYCLE,
            vm.id,
            (libvirt.VIR_DOMAIN_EVENT_SUSPENDED, libvirt.VIR_DOMAIN_EVENT_SUSPENDED_IOERROR),
        )

        assert (vm.status, vm.pause_code) == (vm_mod.PAUSED, vm_mod.ENOSPC)
        assert seen == [(vm, "vda", "enospc")]

    @pytest.mark.parametrize("reason,code", [("eio", vm_mod.EIO), ("eperm", vm_mod.EOTHER)])
    def test_io_error_other_reasons(self, reason, code):
        vm = make_vm()
        disp = events.Dispatcher({vm.id: vm}.get)
        disp(
            connection.IO_ERROR,
            vm.id,
            ("/p", "ua-vda", libvirt.VIR_DOMAIN_EVENT_IO_ERROR_PAUSE, reason),
        )
        assert (vm.status, vm.pause_code) == (vm_mod.PAUSED, code)

    def test_io_error_reported_to_guest_does_not_pause(self):
        vm = make_vm()
        disp = events.Dispatcher({vm.id: vm}.get)
        disp(
            connection.IO_ERROR,
            vm.id,
            ("/p", "ua-vda", libvirt.VIR_DOMAIN_EVENT_IO_ERROR_REPORT, "eio"),
        )
        assert (vm.status, vm.pause_code) == (vm_mod.UP, vm_mod.NOERR)

    def test_resume_clears_pause_code(self):
        vm = make_vm()
        vm.set_status(vm_mod.PAUSED, vm_mod.ENOSPC)
        disp = events.Dispatcher({vm.id: vm}.get)
        disp(
            connection.LIFECYCLE,
            vm.id,
            (libvirt.VIR_DOMAIN_EVENT_RESUMED, libvirt.VIR_DOMAIN_EVENT_RESUMED_UNPAUSED),
        )
        assert (vm.status, vm.pause_code) == (vm_mod.UP, vm_mod.NOERR)

    def test_stopped_is_down(self):
        vm = make_vm()
        disp = events.Dispatcher({vm.id: vm}.get)
        disp(
            connection.LIFECYCLE,
            vm.id,
            (libvirt.VIR_DOMAIN_EVENT_STOPPED, libvirt.VIR_DOMAIN_EVENT_STOPPED_SHUTDOWN),
        )
        assert vm.status == vm_mod.DOWN

    def test_block_job_moves_replica_state(self):
        vm = make_vm()
        d = vm.drive("vda")
        d.replica = drive_mod.Replica("p", "sd2", "img", "leaf")
        seen = []
        disp = events.Dispatcher({vm.id: vm}.get)
        disp.block_job_hooks.append(lambda v, dr, t, s: seen.append((dr.name, t, s)))
        copy = libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_COPY

        disp(connection.BLOCK_JOB, vm.id, ("vda", copy, libvirt.VIR_DOMAIN_BLOCK_JOB_READY))

        assert d.replica.state == drive_mod.READY
        assert d.wait_job(lambda ev: ev == (copy, libvirt.VIR_DOMAIN_BLOCK_JOB_READY), 0)
        assert seen == [("vda", copy, libvirt.VIR_DOMAIN_BLOCK_JOB_READY)]
        disp(connection.BLOCK_JOB, vm.id, ("vda", copy, libvirt.VIR_DOMAIN_BLOCK_JOB_FAILED))
        assert d.replica.state == drive_mod.FAILED

    def test_threshold_goes_to_hooks(self):
        vm = make_vm()
        d = vm.drive("vda")
        d.threshold = 1000
        seen = []
        disp = events.Dispatcher({vm.id: vm}.get)
        disp.threshold_hooks.append(lambda *args: seen.append(args))
        disp.threshold_hooks.insert(0, lambda *args: 1 / 0)  # a failing hook is contained

        disp(connection.BLOCK_THRESHOLD, vm.id, ("vda", "/p", 1000, 5))

        assert d.threshold == 0
        assert seen == [(vm, d, "vda", "/p", 1000, 5)]

    def test_events_of_an_unknown_vm_change_no_vm_and_reach_no_hook(self):
        vm = make_vm()
        vm.drive("vda").threshold = 1000
        seen = []
        disp = events.Dispatcher({vm.id: vm}.get)
        disp.io_error_hooks.append(lambda *args: seen.append(("io_error", args)))
        disp.block_job_hooks.append(lambda *args: seen.append(("block_job", args)))
        disp.threshold_hooks.append(lambda *args: seen.append(("threshold", args)))
        other = str(uuid.uuid4())
        copy = libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_COPY

        disp(connection.LIFECYCLE, other, (libvirt.VIR_DOMAIN_EVENT_STOPPED, 0))
        disp(
            connection.IO_ERROR,
            other,
            ("/p", "ua-vda", libvirt.VIR_DOMAIN_EVENT_IO_ERROR_PAUSE, "enospc"),
        )
        disp(connection.BLOCK_JOB, other, ("vda", copy, libvirt.VIR_DOMAIN_BLOCK_JOB_READY))
        disp(connection.BLOCK_THRESHOLD, other, ("vda", "/p", 1000, 5))

        assert (vm.status, vm.pause_code) == (vm_mod.UP, vm_mod.NOERR)
        assert vm.drive("vda").threshold == 1000
        assert vm.drive("vda").last_job_event is None
        assert seen == []

    def test_events_of_an_unknown_drive_reach_no_hook(self):
        vm = make_vm()
        vm.drive("vda").threshold = 1000
        seen = []
        disp = events.Dispatcher({vm.id: vm}.get)
        disp.block_job_hooks.append(lambda *args: seen.append(("block_job", args)))
        disp.threshold_hooks.append(lambda *args: seen.append(("threshold", args)))
        copy = libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_COPY

        disp(connection.BLOCK_JOB, vm.id, ("vdz", copy, libvirt.VIR_DOMAIN_BLOCK_JOB_READY))
        disp(connection.BLOCK_THRESHOLD, vm.id, ("vdz", "/p", 1000, 5))

        assert vm.drive("vda").threshold == 1000 and seen == []

    def test_threshold_of_a_backing_node_keeps_the_leaf_threshold(self):
        # "vda[3]" is a node below the leaf: the leaf's threshold is not spent.
        vm = make_vm()
        vm.drive("vda").threshold = 1000
        seen = []
        disp = events.Dispatcher({vm.id: vm}.get)
        disp.threshold_hooks.append(lambda v, d, dev, *rest: seen.append(dev))

        disp(connection.BLOCK_THRESHOLD, vm.id, ("vda[3]", "/p", 500, 1))

        assert vm.drive("vda").threshold == 1000 and seen == ["vda[3]"]


@pytest.mark.root
@pytest.mark.libvirt
@pytest.mark.guest
def test_full_disk_pauses_with_enospc_then_cont(make_api, block_env, vm_params):
    # A thin COW volume on a block domain starts at one chunk (8 MiB here) of
    # its 64 MiB: the writing guest runs out of space, error_policy='stop'
    # pauses the VM and the IO_ERROR_REASON event says ENOSPC. Nothing
    # extends it automatically yet (the watermark monitor's job): the test
    # extends the volume through storage and resumes the VM.
    env = block_env
    img, vol = env.new_image(64 * MiB)
    api = make_api(env)
    g = vm_params([env.drive(img, vol)], span_mb=48, pattern="seq")
    api.vm_create(g.vm_id, g.params)

    conftest.wait_for(
        lambda: api.get_vm(g.vm_id).status == vm_mod.PAUSED, 120, "VM paused on a full disk"
    )
    stats = api.vm_get_stats(g.vm_id)[0]
    assert (stats["status"], stats["pauseCode"]) == (vm_mod.PAUSED, vm_mod.ENOSPC)
    physical = stats["disks"]["vda"]["apparentsize"]
    assert physical < 64 * MiB

    # A restarted daemon sees the same pause (state reason + disk errors).
    api.stop()
    env2 = env.restart(spm=True)
    recovered = make_api(env2)
    stats = recovered.vm_get_stats(g.vm_id)[0]
    assert (stats["status"], stats["pauseCode"]) == (vm_mod.PAUSED, vm_mod.ENOSPC)

    acks = g.acks()
    ids = (env2.pool_id, env2.sd_id, img, vol)
    env2.provider.extend(*ids, 72 * MiB)
    env2.provider.refresh(*ids)
    recovered.vm_cont(g.vm_id)

    vm = recovered.get_vm(g.vm_id)
    assert (vm.status, vm.pause_code) == (vm_mod.UP, vm_mod.NOERR)
    g.wait_acks(acks + 20)
    assert vm.status == vm_mod.UP
    assert recovered.vm_get_stats(g.vm_id)[0]["disks"]["vda"]["apparentsize"] > physical
