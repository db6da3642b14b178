"""virt/thinp.py: the watermark monitor extends thin block volumes of running VMs.

The decision logic and the replica-first order are tested on fakes; then with
real everything: a TCG guest writing to a thin COW volume on a block domain
(loop activation), the monitor extending it chunk by chunk (8 MiB), during a
replication to a block destination, and with extensions failing (fault
injection around storage's extend).
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import libvirt
import pytest

from common import sizes
from contrib.guest import verifier
from storage import sd
from tests.virt import conftest, lsm_env
from virt import api as virt_api
from virt import connection, errors, events, thinp, thinp_rules
from virt import drive as drive_mod
from virt import vm as vm_mod

MiB = conftest.MiB
CHUNK_MB = 8  # as the storage of the tests (storage_env.PROVIDER_OPTIONS)
INTERVAL = 0.5


# Decision logic


def test_watermark_is_a_share_of_the_chunk():
    assert thinp_rules.watermark(2560 * MiB, 20) == 512 * MiB
    assert thinp_rules.watermark(8 * MiB, 50) == 4 * MiB


def test_needs_extension_when_free_space_below_watermark():
    mark = 2 * MiB
    assert not thinp_rules.needs_extension(64 * MiB, 5 * MiB, 8 * MiB, mark)
    assert thinp_rules.needs_extension(64 * MiB, 6 * MiB, 8 * MiB, mark)
    assert thinp_rules.needs_extension(64 * MiB, 8 * MiB, 8 * MiB, mark)
    # At its maximum size (capacity * 1.1) nothing more can be given.
    assert not thinp_rules.needs_extension(64 * MiB, 70 * MiB, sizes.cow_max_size(64 * MiB), mark)


def test_next_size_grows_by_a_chunk_up_to_the_maximum():
    assert thinp_rules.next_size(64 * MiB, 8 * MiB, 8 * MiB) == 16 * MiB
    assert thinp_rules.next_size(64 * MiB, 64 * MiB, 8 * MiB) == sizes.cow_max_size(64 * MiB)
    assert thinp_rules.threshold(16 * MiB, 4 * MiB) == 12 * MiB
    assert thinp_rules.threshold(2 * MiB, 4 * MiB) == 0


def test_plan_extends_the_replica_first_to_the_same_size():
    assert thinp_rules.extension_plan(64 * MiB, 8 * MiB, 8 * MiB, 8 * MiB) == [
        ("replica", 16 * MiB),
        ("source", 16 * MiB),
    ]
    # A replica already big enough is left alone; no replica, only the source.
    assert thinp_rules.extension_plan(64 * MiB, 8 * MiB, 24 * MiB, 8 * MiB) == [
        ("source", 16 * MiB)]
    assert thinp_rules.extension_plan(64 * MiB, 8 * MiB, None, 8 * MiB) == [("source", 16 * MiB)]


def test_replica_of_a_file_source_grows_a_chunk_past_its_data():
    assert thinp_rules.replica_size(64 * MiB, 5 * MiB, 8 * MiB, 8 * MiB) == 16 * MiB
    assert thinp_rules.replica_size(64 * MiB, 20 * MiB, 8 * MiB, 8 * MiB) == 28 * MiB
    assert thinp_rules.replica_size(64 * MiB, 69 * MiB, 8 * MiB, 8 * MiB) == sizes.cow_max_size(
        64 * MiB)


# The monitor on fakes: a libvirt domain and storage that record calls.


class FakeDomain:
    def __init__(self, capacity: int, allocation: int, physical: int) -> None:
        self.info = [capacity, allocation, physical]
        self.thresholds: list[int] = []
        self.resumed = 0
        # Raised by setBlockThreshold when set (a QEMU without block thresholds).
        self.threshold_error: libvirt.libvirtError | None = None
        # Our metadata element as setMetadata got it (the monitor records its pauses).
        self.metadata_xml: str | None = None

    def UUIDString(self) -> str:  # noqa: N802
        return "fake"

    def setMetadata(self, kind: int, text: str, prefix: str, uri: str,  # noqa: N802
                    flags: int = 0) -> int:
        self.metadata_xml = text
        return 0

    def blockInfo(self, dev: str, flags: int = 0) -> list[int]:  # noqa: N802 (libvirt's name)
        return list(self.info)

    def setBlockThreshold(self, dev: str, value: int, flags: int = 0) -> int:  # noqa: N802
        if self.threshold_error is not None:
            raise self.threshold_error
        self.thresholds.append(value)
        return 0

    def resume(self) -> int:
        self.resumed += 1
        return 0


class FakeConnection(connection.Connection):
    def __init__(self, dom: FakeDomain) -> None:
        super().__init__()
        self.dom = dom

    def call(self, fn: Callable[[Any], Any], retry: bool = True) -> Any:
        return fn(self)

    def lookupByUUIDString(self, vm_id: str) -> FakeDomain:  # noqa: N802
        return self.dom

    def lookup(self, vm_id: str) -> Any:
        return self.dom


class FakeStorage:
    """extend/refresh of block volumes backed by files (the replica's is real)."""

    def __init__(self, dom: FakeDomain, replica_path: str | None = None) -> None:
        self.dom = dom
        self.replica_path = replica_path
        self.calls: list[tuple[str, str, int]] = []
        self.fail = False

    def extend(self, pool_id: str, sd_id: str, img_id: str, vol_id: str, new_size: int) -> int:
        self.calls.append(("extend", sd_id, new_size))
        if self.fail:
            raise OSError("injected extension failure")
        if sd_id == "dst":
            assert self.replica_path
            os.truncate(self.replica_path, new_size)
        else:
            self.dom.info[2] = new_size
        return new_size

    def refresh(self, pool_id: str, sd_id: str, img_id: str, vol_id: str) -> int:
        self.calls.append(("refresh", sd_id, 0))
        if sd_id == "dst":
            assert self.replica_path
            return os.path.getsize(self.replica_path)
        return self.dom.info[2]


def fake_vm(dom: FakeDomain, replica_path: str | None = None) -> vm_mod.VM:
    d = drive_mod.Drive(
        name="vda",
        pool_id="pool",
        domain_id="src",
        image_id="img",
        volume_id="leaf",
        format="cow",
        chain=[drive_mod.Volume("leaf", "/dev/null", "COW")],
        disk_type=drive_mod.BLOCK,
    )
    if replica_path:
        d.replica = drive_mod.Replica(
            "pool", "dst", "img", "leaf", [drive_mod.Volume("leaf", replica_path, "COW")],
            disk_type=drive_mod.BLOCK,
        )
    return vm_mod.VM(str(uuid.uuid4()), "vm", [d], FakeConnection(dom), status=vm_mod.UP)


def monitor(storage: Any, vms: list[vm_mod.VM]) -> thinp.Monitor:
    return thinp.Monitor(storage, storage, lambda: vms, thinp.Config(1, 50, CHUNK_MB))


def test_sets_threshold_below_watermark():
    dom = FakeDomain(64 * MiB, 1 * MiB, 8 * MiB)
    vm = fake_vm(dom)
    storage = FakeStorage(dom)
    mon = monitor(storage, [vm])

    mon.check_all()

    assert storage.calls == []
    assert dom.thresholds == [4 * MiB]
    assert vm.stats()["disks"]["vda"]["threshold"] == 4 * MiB
    mon.check_all()
    assert dom.thresholds == [4 * MiB]  # set once


def test_extends_replica_first_then_source(tmp_path):
    replica = tmp_path / "replica"
    replica.write_bytes(b"")
    os.truncate(replica, 8 * MiB)
    dom = FakeDomain(64 * MiB, 5 * MiB, 8 * MiB)
    vm = fake_vm(dom, str(replica))
    storage = FakeStorage(dom, str(replica))
    mon = monitor(storage, [vm])

    mon.check_all()

    extends = [c for c in storage.calls if c[0] == "extend"]
    assert extends == [("extend", "dst", 16 * MiB), ("extend", "src", 16 * MiB)]
    assert os.path.getsize(replica) == 16 * MiB
    assert dom.thresholds == [12 * MiB]


def test_small_replica_catches_up_with_the_source(tmp_path):
    replica = tmp_path / "replica"
    replica.write_bytes(b"")
    os.truncate(replica, 8 * MiB)
    dom = FakeDomain(64 * MiB, 1 * MiB, 24 * MiB)
    vm = fake_vm(dom, str(replica))
    storage = FakeStorage(dom, str(replica))

    monitor(storage, [vm]).check_all()

    assert [c for c in storage.calls if c[0] == "extend"] == [("extend", "dst", 24 * MiB)]


def test_enospc_failure_keeps_vm_paused_then_resumes(tmp_path):
    replica = tmp_path / "replica"
    replica.write_bytes(b"")
    os.truncate(replica, 8 * MiB)
    dom = FakeDomain(64 * MiB, 8 * MiB, 8 * MiB)
    vm = fake_vm(dom, str(replica))
    storage = FakeStorage(dom, str(replica))
    mon = monitor(storage, [vm])
    vm.set_status(vm_mod.PAUSED, vm_mod.ENOSPC)
    mon.on_io_error(vm, vm.drive("vda"), "enospc")
    storage.fail = True

    mon.check_all()

    # The replica's extension failed: the source was not extended.
    assert [c for c in storage.calls if c[0] == "extend"] == [("extend", "dst", 16 * MiB)]
    assert (vm.status, vm.pause_code, dom.resumed) == (vm_mod.PAUSED, vm_mod.ENOSPC, 0)
    assert vm.drive("vda").replica is not None

    storage.fail = False
    mon.check_all()

    assert (vm.status, dom.resumed) == (vm_mod.UP, 1)
    assert dom.info[2] == 16 * MiB and os.path.getsize(replica) == 16 * MiB


def test_file_drives_are_not_watched():
    dom = FakeDomain(64 * MiB, 64 * MiB, 64 * MiB)
    vm = fake_vm(dom)
    vm.drives[0].disk_type = drive_mod.FILE
    vm.set_status(vm_mod.PAUSED, vm_mod.ENOSPC)
    storage = FakeStorage(dom)

    monitor(storage, [vm]).check_all()

    assert storage.calls == [] and dom.thresholds == [] and dom.resumed == 0


def test_a_vm_paused_by_its_thin_source_resumes_once_pivoted_onto_a_file(tmp_path):
    # QEMU reports the ENOSPC of a mirrored drive on its mirror filter node:
    # no drive named.  The mirror then pivots onto a file domain before any
    # extension came: the volume that ran out is no longer used.
    dom = FakeDomain(64 * MiB, 16 * MiB, 16 * MiB)
    vm = fake_vm(dom)
    storage = FakeStorage(dom)
    storage.fail = True
    mon = monitor(storage, [vm])
    vm.set_status(vm_mod.PAUSED, vm_mod.ENOSPC)
    mon.on_io_error(vm, None, "enospc")
    mon.check_all()
    assert (vm.status, dom.resumed) == (vm_mod.PAUSED, 0)

    vm.drives[0].disk_type = drive_mod.FILE  # what a pivot onto a file domain leaves
    mon.check_all()

    assert (vm.status, dom.resumed) == (vm_mod.UP, 1)


def test_a_vm_paused_on_a_file_drive_is_not_resumed():
    dom = FakeDomain(64 * MiB, 64 * MiB, 64 * MiB)
    vm = fake_vm(dom)
    vm.drives[0].disk_type = drive_mod.FILE
    vm.set_status(vm_mod.PAUSED, vm_mod.ENOSPC)
    mon = monitor(FakeStorage(dom), [vm])
    mon.on_io_error(vm, None, "enospc")

    mon.check_all()

    assert (vm.status, dom.resumed) == (vm_mod.PAUSED, 0)


def test_threshold_event_extends_without_waiting_for_the_poll():
    dom = FakeDomain(64 * MiB, 1 * MiB, 8 * MiB)
    vm = fake_vm(dom)
    storage = FakeStorage(dom)
    # A poll interval far beyond the test: only the event can wake the monitor.
    config = thinp.Config(interval=600, utilization_percent=50, chunk_mb=CHUNK_MB)
    mon = thinp.Monitor(storage, storage, lambda: [vm], config)
    disp = events.Dispatcher({vm.id: vm}.get)
    disp.threshold_hooks.append(mon.on_threshold)
    mon.start()
    try:
        conftest.wait_for(lambda: dom.thresholds == [4 * MiB], 10, "first threshold set")
        dom.info[1] = 5 * MiB  # the guest wrote past it; libvirt fires once
        disp(connection.BLOCK_THRESHOLD, vm.id, ("vda", "/dev/null", 4 * MiB, 1 * MiB))
        conftest.wait_for(lambda: dom.thresholds[-1] == 12 * MiB, 10, "extended on the event")
    finally:
        mon.stop()

    assert [c for c in storage.calls if c[0] == "extend"] == [("extend", "src", 16 * MiB)]
    assert dom.info[2] == 16 * MiB and vm.drive("vda").threshold == 12 * MiB


def test_without_block_thresholds_the_poll_still_extends():
    dom = FakeDomain(64 * MiB, 1 * MiB, 8 * MiB)
    error = libvirt.libvirtError("block threshold not supported")
    error.err = (libvirt.VIR_ERR_OPERATION_UNSUPPORTED, libvirt.VIR_FROM_QEMU,
                 "block threshold not supported", libvirt.VIR_ERR_ERROR, None, None, None, 0, 0)
    dom.threshold_error = error
    vm = fake_vm(dom)
    storage = FakeStorage(dom)
    mon = monitor(storage, [vm])

    mon.check_all()
    assert storage.calls == [] and vm.drive("vda").threshold == 0

    dom.info[1] = 5 * MiB
    mon.check_all()

    assert [c for c in storage.calls if c[0] == "extend"] == [("extend", "src", 16 * MiB)]
    assert dom.info[2] == 16 * MiB and dom.thresholds == []


# Real guests


class RecordingStorage:
    """The test env as virt's storage, with extend/refresh through the
    provider, every extension logged, and failures injected on demand."""

    def __init__(self, env: Any) -> None:
        self._env = env
        self.extends: list[tuple[str, str, int]] = []  # (sd_id, vol_id, size)
        self.fail = threading.Event()
        self.failures = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._env, name)

    def extend(self, pool_id: str, sd_id: str, img_id: str, vol_id: str, new_size: int) -> int:
        if self.fail.is_set():
            self.failures += 1
            raise OSError("injected extension failure")
        size = self._env.provider.extend(pool_id, sd_id, img_id, vol_id, new_size)
        self.extends.append((sd_id, vol_id, new_size))
        return size

    def refresh(self, pool_id: str, sd_id: str, img_id: str, vol_id: str) -> int:
        return self._env.provider.refresh(pool_id, sd_id, img_id, vol_id)


@pytest.fixture
def make_thin_api(domains: list[str]) -> Iterator[Callable[[Any], virt_api.API]]:
    """Started virt APIs with a fast watermark monitor (8 MiB chunks)."""
    apis: list[virt_api.API] = []

    def make(storage: Any) -> virt_api.API:
        config = virt_api.Config(
            libvirt_uri=conftest.URI,
            accel="tcg",
            thinp=thinp.Config(interval=INTERVAL, utilization_percent=50, chunk_mb=CHUNK_MB),
        )
        a = virt_api.API(storage, config)
        a.start()
        apis.append(a)
        return a

    try:
        yield make
    finally:
        conftest.destroy_domains(domains)
        for a in apis:
            a.stop()


@pytest.fixture
def block_lsm(workdir: str, domains: list[str]) -> Iterator[lsm_env.LsmEnv]:
    env, cleanup = lsm_env.make_lsm_env(workdir, sd.BLOCK, sd.BLOCK)
    try:
        yield env
    finally:
        conftest.destroy_domains(domains)
        cleanup()


def disk_stats(api: virt_api.API, vm_id: str) -> dict[str, Any]:
    return api.vm_get_stats(vm_id)[0]["disks"]["vda"]


def wait_physical(api: virt_api.API, vm_id: str, size: int, timeout: float = 120) -> None:
    def grown() -> bool:
        return disk_stats(api, vm_id)["apparentsize"] >= size

    conftest.wait_for(grown, timeout, f"the volume grown to {size}")


def wait_up(api: virt_api.API, vm_id: str, timeout: float = 60) -> None:
    conftest.wait_for(lambda: api.get_vm(vm_id).status == vm_mod.UP, timeout, "VM up")


def pivot(api: virt_api.API, vm_id: str, src: dict, dst: dict, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            api.vm_disk_replicate_finish(vm_id, src, dst)
            return
        except errors.ReplicaNotReadyError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


@pytest.mark.root
@pytest.mark.libvirt
@pytest.mark.guest
def test_writing_guest_volume_is_extended(make_thin_api, block_env, vm_params):
    env = block_env
    storage = RecordingStorage(env)
    img, vol = env.new_image(64 * MiB)
    api = make_thin_api(storage)
    g = vm_params([env.drive(img, vol)], span_mb=40, pattern="seq")
    api.vm_create(g.vm_id, g.params)

    # 40 MiB written sequentially (then again) onto a volume that started at 8 MiB.
    wait_physical(api, g.vm_id, 40 * MiB)
    wait_up(api, g.vm_id)
    acks = g.acks()
    g.wait_acks(acks + 20)

    assert storage.extends and all(s == env.sd_id for s, _, _ in storage.extends)
    info = env.provider.volume_get_info(env.pool_id, env.sd_id, img, vol)
    assert int(info["apparentsize"]) >= 40 * MiB
    # Once the guest rewrites its span the volume stops growing; the threshold
    # waits a watermark (4 MiB) below the end.
    def threshold_set() -> bool:
        stats = disk_stats(api, g.vm_id)
        return stats["threshold"] == stats["apparentsize"] - 4 * MiB

    conftest.wait_for(threshold_set, 30, "the threshold set below the end")
    assert api.get_vm(g.vm_id).status == vm_mod.UP
    api.vm_destroy(g.vm_id)
    with env.prepared(img, vol) as path:
        res = verifier.verify(g.serial_log, path, "qcow2")
    assert res.lost == 0, res.details[:5]
    assert res.verified > 0


def start_replication(env, api, vm_params, **writer):
    img, vol = env.new_image(64 * MiB)
    writer.setdefault("rate", 50)
    g = vm_params([env.drive(img, vol)], span_mb=40, pattern="seq", **writer)
    api.vm_create(g.vm_id, g.params)
    g.wait_acks(20)
    src, dst = env.disk(img, vol), env.disk(img, vol, dst=True)
    env.clone(img)
    api.vm_disk_replicate_start(g.vm_id, src, dst)
    return g, img, vol, src, dst


@pytest.mark.root
@pytest.mark.libvirt
@pytest.mark.guest
def test_replica_extended_before_source(make_thin_api, block_lsm, vm_params):
    env = block_lsm
    storage = RecordingStorage(env)
    api = make_thin_api(storage)
    g, img, vol, src, dst = start_replication(env, api, vm_params)
    started = len(storage.extends)

    wait_physical(api, g.vm_id, 32 * MiB)
    rep = disk_stats(api, g.vm_id)["replicate"]
    assert rep["state"] in ("copying", "ready")
    # Every extension of the source during the mirror came after one of the
    # replica to at least the same size.
    during = storage.extends[started:]
    src_sizes = [(i, size) for i, (s, _, size) in enumerate(during) if s == env.sd_id]
    assert src_sizes, storage.extends
    for i, size in src_sizes:
        assert any(s == env.dst_sd_id and n >= size for s, _, n in during[:i]), during
    # The replica (prepared by the replication) never has less room than the source.
    replica_size = sizes.device_size(env.dst_link_path(img, vol))
    assert replica_size >= disk_stats(api, g.vm_id)["apparentsize"] - CHUNK_MB * MiB

    env.sync(img, "INTERNAL")
    pivot(api, g.vm_id, src, dst)
    assert disk_stats(api, g.vm_id)["domainID"] == env.dst_sd_id
    g.wait_acks(g.acks() + 20)
    assert api.get_vm(g.vm_id).status == vm_mod.UP
    api.vm_destroy(g.vm_id)
    with env.dst_prepared(img, vol) as path:
        res = verifier.verify(g.serial_log, path, "qcow2")
    assert res.lost == 0, res.details[:5]
    assert res.verified > 0


@pytest.mark.root
@pytest.mark.libvirt
@pytest.mark.guest
def test_failed_extension_pauses_until_retry_succeeds(make_thin_api, block_lsm, vm_params):
    env = block_lsm
    storage = RecordingStorage(env)
    api = make_thin_api(storage)
    g, img, vol, src, dst = start_replication(env, api, vm_params, rate=0)
    storage.fail.set()

    def paused_after_failure() -> bool:
        vm = api.get_vm(g.vm_id)
        return vm.status == vm_mod.PAUSED and storage.failures > 0

    conftest.wait_for(paused_after_failure, 120, "VM paused on a full disk, extension failed")
    stats = api.vm_get_stats(g.vm_id)[0]
    assert (stats["status"], stats["pauseCode"]) == (vm_mod.PAUSED, vm_mod.ENOSPC)
    failures = storage.failures
    conftest.wait_for(lambda: storage.failures > failures, 30, "the monitor retrying")
    # The mirror goes on, the VM stays paused.
    stats = api.vm_get_stats(g.vm_id)[0]
    assert stats["status"] == vm_mod.PAUSED
    assert stats["disks"]["vda"]["replicate"]["state"] in ("copying", "ready")
    assert api.get_vm(g.vm_id).call(lambda dom: dom.blockJobInfo("vda", 0))

    storage.fail.clear()
    wait_up(api, g.vm_id)
    acks = g.acks()
    g.wait_acks(acks + 20)
    assert disk_stats(api, g.vm_id)["replicate"]["state"] in ("copying", "ready")

    # Abort: the VM stays on the source, which holds every acknowledged write.
    api.vm_disk_replicate_finish(g.vm_id, src, src)
    api.vm_destroy(g.vm_id)
    with env.prepared(img, vol) as path:
        res = verifier.verify(g.serial_log, path, "qcow2")
    assert res.lost == 0, res.details[:5]

