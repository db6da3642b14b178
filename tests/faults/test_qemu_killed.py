"""Fault matrix case 5 (issue 13): QEMU killed during the mirror.

One daemon (tests/faults/site.py: a file and a thin block domain, the
machine's libvirtd; only this test's own QEMU is killed), the test guest
writing.  ``move-disk`` (file -> block) runs as an operator runs it, its
mirror slower than the guest writes (so it is copying, never ready); once
it runs, the VM's QEMU is killed (``kill -9``).

The daemon releases the VM's storage, replica included, then reports the
VM Down with VDSM's exit info (exitCode 1, exitReason 2 "Lost connection
with qemu process") in ``VM.getStats`` and in its ``VM_status`` event
(virt/outages.py); the VM stays listed until ``VM.destroy``.  ``move-disk``
fails with PivotImpossible (not 100) and its rollback deletes the
destination image: no prepare link, LV or loop device of either side is
left, no task, no journal.  Every write the guest acknowledged before it
died is on the source chain.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from collections.abc import Callable, Iterator
from typing import Any

import libvirt
import pytest

from storage import block_manifest
from tests.faults import cluster_site
from tests.faults import site as site_mod
from tests.vdsm_lsm import test_move_disk
from tests.virt import conftest as virt_conftest
from tests.virt import test_vm
from vdsm_lsm import api_schema, stomp_client
from virt import api as virt_api
from virt import connection, errors, outages
from virt import drive as drive_mod
from virt import events as virt_events
from virt import vm as vm_mod

pytestmark = [pytest.mark.timeout(900)]

# No extension of a thin volume is needed (no watermark work in the way).
CHUNK_MB = 128
TOP = test_move_disk.TOP
VM_STATUS = "|virt|VM_status|"


@pytest.fixture(scope="module")
def site(fault_site_factory: Callable[..., site_mod.FaultSite]) -> site_mod.FaultSite:
    return fault_site_factory(chunk_mb=CHUNK_MB)


@pytest.fixture
def pushed(site: site_mod.FaultSite) -> Iterator[stomp_client.StompClient]:
    """The daemon's pushed events (a STOMP subscriber from now on)."""
    stomp = stomp_client.StompClient(socket_path=site.daemon.socket_path, timeout=60)
    try:
        assert stomp.call("Host.ping2") is True  # connected and subscribed
        yield stomp
    finally:
        stomp.close()


def image_links(site: site_mod.FaultSite, img: str) -> dict[str, list[str]]:
    """The prepare links of img left on each domain (run_dir/storage/<sd>/<img>)."""
    links = {}
    for sd_id in (site.file_sd, site.block_sd):
        path = os.path.join(site.daemon.run_dir, "storage", sd_id, img)
        links[sd_id] = sorted(os.listdir(path)) if os.path.isdir(path) else []
    return links


@pytest.mark.root
@pytest.mark.libvirt
@pytest.mark.guest
def test_qemu_killed_during_the_mirror_the_vm_is_down_and_storage_released(
        site: site_mod.FaultSite, pushed: stomp_client.StompClient) -> None:
    img, (base, leaf) = site.create_image()
    vm = site.start_guest(img, leaf)
    qemu = cluster_site.qemu_pid(vm.vm_id)

    err_path = os.path.join(site.workdir, "move-disk.err")
    with open(err_path, "w") as err_file:
        # At 1 MiB/s, background only, the mirror never catches up with the
        # guest (~3 MiB/s): QEMU dies while it copies, whatever the timing.
        argv = site.move_disk_argv(*site.move_args(vm, site.block_sd, "--bandwidth", "1",
                                                   "--sync-writes", "off"))
        flow = subprocess.Popen(argv, cwd=TOP, stdout=subprocess.PIPE, stderr=err_file,
                                text=True)
    try:
        cluster_site.wait_mirror(site, vm)
        os.kill(qemu, signal.SIGKILL)
        out, _ = flow.communicate(timeout=300)
    finally:
        if flow.poll() is None:
            flow.kill()
            flow.wait(60)
    with open(err_path) as f:
        err = f.read()
    print(f"move-disk rc={flow.returncode}\n{out}\n{err}")

    # move-disk failed with a clear code, and rolled back.
    assert flow.returncode == 1, err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"error {api_schema.code_of('PivotImpossible')}:"), err
    assert "is Down: Lost connection with qemu process (exitCode 1, exitReason 2)" in last
    # The VM is Down, with why, in VM.getStats and in its status event.
    stats = site.stats(vm)
    lost = {"exitCode": vm_mod.EXIT_ERROR, "exitReason": vm_mod.LOST_QEMU_CONNECTION,
            "exitMessage": "Lost connection with qemu process"}
    assert stats["status"] == "Down", stats
    assert {k: stats.get(k) for k in lost} == lost, stats
    assert "replicate" not in stats["disks"]["vda"]
    event = pushed.wait(VM_STATUS + vm.vm_id,
                        lambda p: p.get(vm.vm_id, {}).get("status") == "Down", timeout=30)
    assert event is not None, pushed.events()
    assert {k: event[vm.vm_id].get(k) for k in lost} == lost, event
    listed = {v["vmId"]: v["status"] for v in site.call("Host.getVMList")}
    assert listed == {vm.vm_id: "Down"}

    # Storage released: no link, LV or loop device of either side; the
    # destination image deleted; the source image whole and LEGAL.
    assert image_links(site, img) == {site.file_sd: [], site.block_sd: []}
    assert site.call("StorageDomain.getImages", storagedomainID=site.block_sd) == []
    assert site.lvs() == sorted(block_manifest.SPECIAL_LVS)
    assert len(site.stacked_loops()) == len(block_manifest.SPECIAL_LVS), site.stacked_loops()
    chain = [v["volumeID"] for v in stats["disks"]["vda"]["volumeChain"]]
    assert chain[:2] == [base, leaf] and len(chain) == 3  # + the snapshot's leaf
    assert site.call("StorageDomain.getImages", storagedomainID=site.file_sd) == [img]
    for vol in chain:
        info = site.call("Volume.getInfo", storagepoolID=site.pool_id,
                         storagedomainID=site.file_sd, imageID=img, volumeID=vol)
        assert info["legality"] == "LEGAL", (vol, info)
    assert site.call("Host.getAllTasksInfo") == {}
    assert os.listdir(site.state_dir) == []  # no journal, no lock
    assert site.qemu_img_orphans() == []
    conn = virt_conftest.libvirt_connection()
    try:
        with pytest.raises(libvirt.libvirtError) as e:
            conn.lookupByUUIDString(vm.vm_id)
        assert e.value.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN
    finally:
        conn.close()

    # VM.destroy forgets the Down VM.
    assert site.call("VM.destroy", vmID=vm.vm_id) is True
    assert site.call("Host.getVMList") == []
    # Every acknowledged write up to the kill is on the source chain.
    result = site.verify(vm, img, site.file_sd, chain[-1])
    assert result.ok and result.lost == 0 and result.acks > 0, str(result)


# The daemon's part, on a fake libvirt (tests/virt/fake_libvirt.py)

LOST = vm_mod.LOST_QEMU.info()


class Told:
    """A notifier that keeps the VM status events."""

    def __init__(self) -> None:
        self.statuses: list[tuple[str, dict[str, Any] | None]] = []
        self.changed = threading.Condition()

    def vm_status(self, vm_id: str, status: str, pause_code: str,
                  exit_info: dict[str, Any] | None = None) -> None:
        with self.changed:
            self.statuses.append((status, exit_info))
            self.changed.notify_all()

    def replication(self, vm_id: str, drive: str, state: str) -> None:
        pass

    def wait_down(self) -> dict[str, Any] | None:
        with self.changed:
            assert self.changed.wait_for(lambda: any(s == "Down" for s, _ in self.statuses), 30)
        return [info for s, info in self.statuses if s == "Down"][0]


def exited_vm() -> tuple[vm_mod.VM, Any, Told, list[tuple[str, str]], virt_events.Dispatcher]:
    """A VM with a replica, wired as virt/api.py wires it: events, releases."""
    vm, dom, conn = test_vm.make_vm()
    d = vm.drives[0]
    d.replica = drive_mod.Replica("pool", "dst", d.image_id, d.volume_id)
    told = Told()
    vm.notifier = told
    released: list[tuple[str, str]] = []

    def teardown(vm_id: str, drive: drive_mod.Drive) -> None:
        released.append((vm_id, drive.name))
        drive.replica = None

    exits = outages.Exits(lambda v: True, teardown)
    vm.on_gone = exits.gone
    dispatcher = virt_events.Dispatcher(lambda vm_id: vm)
    dispatcher.on_down = exits.on_down
    return vm, conn, told, released, dispatcher


@pytest.mark.parametrize("event, detail, reason", [
    (libvirt.VIR_DOMAIN_EVENT_STOPPED, libvirt.VIR_DOMAIN_EVENT_STOPPED_FAILED,
     vm_mod.LOST_QEMU_CONNECTION),
    (libvirt.VIR_DOMAIN_EVENT_STOPPED, libvirt.VIR_DOMAIN_EVENT_STOPPED_DESTROYED,
     vm_mod.LOST_QEMU_CONNECTION),
    (libvirt.VIR_DOMAIN_EVENT_CRASHED, 0, vm_mod.LOST_QEMU_CONNECTION),
    (libvirt.VIR_DOMAIN_EVENT_STOPPED, libvirt.VIR_DOMAIN_EVENT_STOPPED_SHUTDOWN,
     vm_mod.USER_SHUTDOWN),
    (libvirt.VIR_DOMAIN_EVENT_SHUTDOWN, 0, vm_mod.USER_SHUTDOWN),
    (libvirt.VIR_DOMAIN_EVENT_STOPPED, libvirt.VIR_DOMAIN_EVENT_STOPPED_MIGRATED,
     vm_mod.MIGRATION_SUCCEEDED),
])
def test_exit_info_of_a_stopped_domain(event: int, detail: int, reason: int) -> None:
    why = virt_events.exit_of_stop(event, detail)
    assert why.reason == reason
    assert why.code == (vm_mod.EXIT_ERROR if reason == vm_mod.LOST_QEMU_CONNECTION
                        else vm_mod.EXIT_NORMAL)


def test_qemu_gone_the_storage_is_released_before_the_vm_is_down() -> None:
    vm, _, told, released, dispatcher = exited_vm()

    dispatcher(connection.LIFECYCLE, vm.id, (libvirt.VIR_DOMAIN_EVENT_STOPPED,
                                             libvirt.VIR_DOMAIN_EVENT_STOPPED_FAILED))

    assert told.wait_down() == LOST
    assert released == [(vm.id, "vda")]
    stats = vm.stats()
    assert stats["status"] == "Down" and {k: stats[k] for k in LOST} == LOST
    assert "replicate" not in stats["disks"]["vda"]
    # Later news of the same end changes nothing.
    dispatcher(connection.LIFECYCLE, vm.id, (libvirt.VIR_DOMAIN_EVENT_STOPPED,
                                             libvirt.VIR_DOMAIN_EVENT_STOPPED_DESTROYED))
    vm.gone()
    assert released == [(vm.id, "vda")] and len(told.statuses) == 1


def test_a_domain_found_gone_is_released_before_stats_answer() -> None:
    vm, conn, told, released, _ = exited_vm()
    conn.domains.clear()  # killed, no event seen yet

    stats = vm.stats()

    assert released == [(vm.id, "vda")]
    assert stats["status"] == "Down" and stats["exitReason"] == vm_mod.LOST_QEMU_CONNECTION
    assert "replicate" not in stats["disks"]["vda"]


def test_destroyed_or_shut_down_by_the_guest_keeps_its_reason_and_storage() -> None:
    vm, _, told, released, dispatcher = exited_vm()
    vm.destroy_domain()  # VM.destroy: the API tears the drives down itself
    dispatcher(connection.LIFECYCLE, vm.id, (libvirt.VIR_DOMAIN_EVENT_STOPPED,
                                             libvirt.VIR_DOMAIN_EVENT_STOPPED_DESTROYED))
    assert told.wait_down() == vm_mod.DESTROYED.info()
    assert vm.exit == vm_mod.DESTROYED and released == []

    vm, _, told, released, dispatcher = exited_vm()
    dispatcher(connection.LIFECYCLE, vm.id, (libvirt.VIR_DOMAIN_EVENT_SHUTDOWN, 0))
    assert told.wait_down() == vm_mod.exit_of(vm_mod.USER_SHUTDOWN).info()
    assert released == []  # kept until VM.destroy, as before


def test_pivot_of_a_vm_whose_qemu_died_is_abort_only() -> None:
    vm, _, _, _, _ = exited_vm()
    api = virt_api.API(object(), virt_api.Config())  # type: ignore[call-overload]
    api._vms[vm.id] = vm
    d = vm.drives[0]
    src = {"poolID": d.pool_id, "domainID": d.domain_id, "imageID": d.image_id,
           "volumeID": d.volume_id}
    d.replica = None  # released with QEMU's end
    vm.set_status(vm_mod.DOWN, why=vm_mod.LOST_QEMU)

    with pytest.raises(errors.PivotImpossibleError) as e:
        api.vm_disk_replicate_finish(vm.id, src, dict(src, domainID="dst"))
    assert "the VM is down: Lost connection with qemu process" in str(e.value)
    with pytest.raises(errors.ReplicationNotInProgressError):
        api.vm_disk_replicate_finish(vm.id, src, src)  # an abort: nothing to abort
