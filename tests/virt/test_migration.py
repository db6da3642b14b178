"""Unit tests of live migration to another host (virt/migration*.py), with the
fake libvirt of tests/virt/fake_libvirt.py and a fake destination daemon.

The real thing (two libvirtds, the guest, the verifier) is
tests/cluster/test_migration.py; here the faults: a refusal, a failure, a
cancel, a destination daemon that stops answering, a domain that arrives or
vanishes on the destination.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from typing import Any, cast

import libvirt
import pytest

from common import errors as common_errors
from tests.virt import fake_libvirt
from virt import domxml, errors, metadata, migration, migration_dest, migration_job, vmparams
from virt import drive as drive_mod
from virt import vm as vm_mod

POOL, SRC, DST, IMG, BASE, LEAF = (str(uuid.uuid4()) for _ in range(6))
FAST = migration_job.Config(libvirt_uri="qemu+unix:///system?socket=/b/libvirt-sock",
                            destination_timeout=1.0, peer_timeout=0.3, poll_interval=0.02)


def wait_for(predicate: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def make_drive(sd_id: str = SRC) -> drive_mod.Drive:
    return drive_mod.Drive(
        name="vda", pool_id=POOL, domain_id=sd_id, image_id=IMG, volume_id=LEAF, format="cow",
        chain=[drive_mod.Volume(BASE, f"/run/x/{sd_id}/{IMG}/{BASE}", "RAW"),
               drive_mod.Volume(LEAF, f"/run/x/{sd_id}/{IMG}/{LEAF}", "COW")],
        prepared=[LEAF])


def dst_disk(**changes: str) -> dict[str, str]:
    return dict({"poolID": POOL, "domainID": DST, "imageID": IMG, "volumeID": LEAF}, **changes)


def mapping(**changes: str) -> dict[str, Any]:
    return {"srcDisk": dst_disk(domainID=SRC), "dstDisk": dst_disk(**changes)}


class Domain(fake_libvirt.Domain):
    """A source domain: XMLDesc, jobStats, and a migration that blocks until released."""

    def __init__(self, uuid_: str, xml: str) -> None:
        super().__init__(uuid_)
        self.xml = xml
        self.release = threading.Event()
        self.result: libvirt.libvirtError | None = None
        self.migrated: tuple[str, dict[str, Any], int] | None = None
        self.stats: dict[str, Any] = {"type": libvirt.VIR_DOMAIN_JOB_UNBOUNDED,
                                      "disk_total": 100, "disk_processed": 40,
                                      "data_processed": 40, "data_remaining": 60}
        self.conn: fake_libvirt.Connection | None = None

    def XMLDesc(self, flags: int = 0) -> str:  # noqa: N802
        return self.xml

    def jobStats(self, flags: int = 0) -> dict[str, Any]:  # noqa: N802
        self._call("jobStats")
        return dict(self.stats)

    def abortJob(self) -> int:  # noqa: N802
        self._call("abortJob")
        self.result = fake_libvirt.error(libvirt.VIR_ERR_OPERATION_ABORTED, "canceled by client")
        self.release.set()
        return 0

    def migrateToURI3(self, uri: str, params: dict[str, Any], flags: int) -> int:  # noqa: N802
        self._call("migrateToURI3")
        self.migrated = (uri, params, flags)
        assert self.release.wait(10)
        if self.result is not None:
            raise self.result
        assert self.conn is not None
        del self.conn.domains[self.uuid]  # it left
        return 0


class Peer:
    """The destination daemon: answers, or raises what the test set."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.errors: dict[str, BaseException] = {}
        self.answer: dict[str, Any] = {"vmId": "", "status": "Migration Destination",
                                       "domainXml": "<domain/>", "libvirtUri": "qemu+x://b",
                                       "migrateUri": "unix:///s/m", "disksUri": "unix:///s/n"}

    def connect(self, address: str, timeout: float) -> Peer:
        if address == "bad":
            raise ValueError("bad address")
        return self

    def call(self, method: str, **params: Any) -> Any:
        self.calls.append((method, params))
        if method in self.errors:
            raise self.errors[method]
        return self.answer if method == "VM.migrationCreate" else True

    def close(self) -> None:
        pass

    def methods(self) -> list[str]:
        return [m for m, _ in self.calls if m != "Host.ping2"]


class Spm:
    def __init__(self, spm: bool = True) -> None:
        self.spm = spm
        self.legal: list[str] = []

    def is_spm(self, pool_id: str) -> bool:
        return self.spm

    def set_volume_legality(self, pool_id: str, sd_id: str, img_id: str, vol_id: str,
                            legal: bool) -> None:
        self.legal.append(f"{sd_id}/{vol_id}")


class PeerError(common_errors.Error):
    def __init__(self, name: str) -> None:
        super().__init__("refused")
        self.name = name


@pytest.fixture
def source(tmp_path: Any) -> Any:
    kernel = tmp_path / "vmlinuz"
    kernel.write_text("k")
    d = make_drive()
    vm_id = str(uuid.uuid4())
    spec = domxml.DomainSpec(vm_id=vm_id, name="lsmtest-mig", memory_mib=256, vcpus=2,
                             domain_type="qemu", kernel=str(kernel), cmdline="console=ttyS0",
                             serial_log=str(tmp_path / "a.log"))
    dom = Domain(vm_id, domxml.build(spec, [d], metadata.to_element([d])))
    conn = fake_libvirt.Connection(dom)
    dom.conn = conn
    vm = vm_mod.VM(vm_id, "lsmtest-mig", [d], conn, status=vm_mod.UP)
    peer, spm = Peer(), Spm()
    done: list[vm_mod.VM] = []
    out = migration.Outgoing(peer.connect, FAST, cast(Any, spm), done.append)
    return vm, dom, peer, spm, done, out


def test_destination_params_are_the_live_vm_with_the_drives_mapped(source: Any) -> None:
    vm, _, _, _, _, _ = source
    m = migration.check_mappings(vm, [mapping()])
    params = migration.destination_params(vm, m, serial_log="/var/tmp/b.log")
    assert (params["memSize"], params["smp"], params["accel"]) == (256, 2, "tcg")
    assert params["kernelArgs"] == "console=ttyS0" and params["serialLog"] == "/var/tmp/b.log"
    assert params["drives"] == [dict(dst_disk(), device="disk", iface="virtio", format="cow",
                                     propagateErrors="off")]
    assert vmparams.parse(vm.id, params, "kvm").drives[0].domain_id == DST
    unmapped = migration.destination_params(vm, [])
    assert unmapped["drives"][0]["domainID"] == SRC
    assert unmapped["serialLog"].endswith("a.log")


@pytest.mark.parametrize("bad, name", [
    (mapping(domainID=SRC), "migrateErr"),
    (mapping(volumeID=BASE), "migrateErr"),
    (mapping(poolID=DST), "migrateErr"),
    ({"srcDisk": dst_disk(), "dstDisk": dst_disk()}, "imageErr"),
])
def test_bad_mappings_are_refused(source: Any, bad: dict[str, Any], name: str) -> None:
    vm, _, peer, _, _, out = source
    with pytest.raises(errors.Error) as e:
        out.migrate(vm, {"dst": "unix:/b", "diskMappings": [bad]})
    assert e.value.name == name
    assert peer.calls == [] and out.status(vm.id) is None


def test_a_drive_mapped_twice_or_being_replicated_is_refused(source: Any) -> None:
    vm, _, _, _, _, _ = source
    with pytest.raises(errors.MigrationError, match="twice"):
        migration.check_mappings(vm, [mapping(), mapping()])
    vm.drives[0].replica = drive_mod.Replica(POOL, DST, IMG, LEAF)
    with pytest.raises(errors.MigrationError, match="replicated"):
        migration.check_mappings(vm, [mapping()])


def test_migration_done_releases_the_source_and_marks_the_leaf_legal(source: Any) -> None:
    vm, dom, peer, spm, done, out = source
    out.migrate(vm, {"dst": "unix:/b", "diskMappings": [mapping()], "maxBandwidth": 5})
    wait_for(lambda: out.status(vm.id)["progress"] > 0)
    assert out.status(vm.id)["phase"] == "copying-disks"
    assert out.status(vm.id)["dataRemaining"] == 60
    dom.release.set()
    assert out.wait(vm.id, 5)
    assert out.status(vm.id)["phase"] == "done" and done == [vm]
    uri, params, flags = dom.migrated or ("", {}, 0)
    assert uri == "qemu+x://b"
    assert params[libvirt.VIR_MIGRATE_PARAM_MIGRATE_DISKS] == ["vda"]
    assert params[libvirt.VIR_MIGRATE_PARAM_DISKS_URI] == "unix:///s/n"
    assert params[libvirt.VIR_MIGRATE_PARAM_BANDWIDTH] == 5
    assert flags & libvirt.VIR_MIGRATE_NON_SHARED_INC and flags & libvirt.VIR_MIGRATE_PEER2PEER
    assert spm.legal == [f"{DST}/{LEAF}"]
    created = [p for m, p in peer.calls if m == "VM.migrationCreate"][0]
    assert created["params"]["drives"][0]["domainID"] == DST
    assert "VM.destroy" not in peer.methods()


def test_failed_migration_keeps_the_vm_and_releases_the_destination(source: Any) -> None:
    vm, dom, peer, spm, done, out = source
    out.migrate(vm, {"dst": "unix:/b", "diskMappings": [mapping()]})
    with pytest.raises(errors.MigrationInProgressError):
        out.migrate(vm, {"dst": "unix:/b", "diskMappings": [mapping()]})
    dom.result = fake_libvirt.error(libvirt.VIR_ERR_OPERATION_FAILED, "NBD broke")
    dom.release.set()
    assert out.wait(vm.id, 5)
    status = out.status(vm.id)
    assert (status["phase"], status["error"]) == ("failed", "migrateErr")
    assert "NBD broke" in status["message"]
    assert done == [] and spm.legal == []
    assert peer.methods() == ["VM.migrationCreate", "VM.destroy"]


def test_cancel_aborts_the_job(source: Any) -> None:
    vm, dom, peer, _, done, out = source
    with pytest.raises(errors.MigrationNotInProgressError):
        out.cancel(vm.id)
    out.migrate(vm, {"dst": "unix:/b", "diskMappings": [mapping()]})
    out.cancel(vm.id)
    assert out.wait(vm.id, 5)
    status = out.status(vm.id)
    assert (status["phase"], status["error"]) == ("canceled", "migrateErr")
    assert "abortJob" in dom.calls and done == []
    assert peer.methods()[-1] == "VM.destroy"
    with pytest.raises(errors.MigrationNotInProgressError):
        out.cancel(vm.id)


def test_a_destination_daemon_that_stops_answering_aborts_the_migration(source: Any) -> None:
    vm, dom, peer, _, done, out = source
    out.migrate(vm, {"dst": "unix:/b", "diskMappings": [mapping()]})
    peer.errors["Host.ping2"] = ConnectionRefusedError("gone")
    assert out.wait(vm.id, 5)
    status = out.status(vm.id)
    assert (status["phase"], status["error"]) == ("failed", "noConPeer")
    assert "abortJob" in dom.calls and done == []


@pytest.mark.parametrize("dst, fault, name", [
    ("bad", None, "noConPeer"),
    ("unix:/b", ConnectionRefusedError("no daemon"), "noConPeer"),
    ("unix:/b", PeerError("DestinationChainNotSynced"), "DestinationChainNotSynced"),
])
def test_refusals_before_anything_moves(source: Any, dst: str, fault: Any, name: str) -> None:
    vm, dom, peer, _, _, out = source
    if fault is not None:
        peer.errors["VM.migrationCreate"] = fault
    with pytest.raises(common_errors.Error) as e:
        out.migrate(vm, {"dst": dst, "diskMappings": [mapping()]})
    assert e.value.name == name
    assert out.status(vm.id) is None and "migrateToURI3" not in dom.calls


def test_an_answer_without_a_libvirt_uri_is_refused_and_released(source: Any) -> None:
    vm, _, peer, _, _, out = source
    peer.answer["libvirtUri"] = ""
    with pytest.raises(errors.MigrationError, match="migration_uri"):
        out.migrate(vm, {"dst": "unix:/b", "diskMappings": [mapping()]})
    assert peer.methods() == ["VM.migrationCreate", "VM.destroy"]
    assert migration.default_libvirt_uri("b.example:54321") == "qemu+tls://b.example/system"
    assert migration.default_libvirt_uri("[::1]:54321") == "qemu+tls://[::1]/system"


def test_job_progress() -> None:
    disks = {"disk_total": 200, "disk_processed": 100, "memory_total": 0}
    assert migration_job.job_progress(disks, True) == ("copying-disks", 24)
    memory = {"disk_total": 200, "memory_total": 100, "memory_remaining": 50}
    assert migration_job.job_progress(memory, True) == ("memory", 74)
    assert migration_job.job_progress(memory, False) == ("memory", 49)


# The destination side


class Storage:
    def __init__(self, unsynced: list[dict[str, str]] | None = None) -> None:
        self.unsynced = unsynced or []

    def unsynced_volumes(self, *ids: str) -> list[dict[str, str]]:
        return self.unsynced


@pytest.fixture
def dest(tmp_path: Any) -> Any:
    kernel = tmp_path / "vmlinuz"
    kernel.write_text("k")
    conn = fake_libvirt.Connection()
    prepared: list[str] = []
    torn: list[str] = []
    adopted: list[vm_mod.VM] = []

    def prepare(vm_id: str, index: int, spec: vmparams.DriveSpec,
                allow_illegal: bool) -> drive_mod.Drive:
        assert allow_illegal
        prepared.append(spec.volume_id)
        return make_drive(spec.domain_id)

    def make(unsynced: list[dict[str, str]] | None = None) -> migration_dest.Incoming:
        config = migration_job.Config(libvirt_uri="qemu+unix:///b", socket_dir=str(tmp_path),
                                      destination_timeout=0.5)
        return migration_dest.Incoming(conn, cast(Any, Storage(unsynced)),
                                       cast(Any, Spm(spm=False)), config, "tcg",
                                       prepare, lambda vm_id, d: torn.append(d.volume_id),
                                       adopted.append)

    params = {"vmName": "lsmtest-in", "memSize": 256, "kernel": str(kernel), "accel": "tcg",
              "serialLog": str(tmp_path / "b.log"),
              "drives": [dict(dst_disk(), format="cow", iface="virtio", device="disk")]}
    return make, conn, params, prepared, torn, adopted, tmp_path


def test_expected_vm_is_adopted_when_it_arrives(dest: Any) -> None:
    make, conn, params, prepared, torn, adopted, tmp = dest
    incoming = make()
    vm_id = str(uuid.uuid4())
    answer = incoming.create(vm_id, params)
    assert answer["status"] == "Migration Destination" and prepared == [LEAF]
    assert answer["migrateUri"] == f"unix://{tmp}/{vm_id}.migration.sock"
    assert answer["libvirtUri"] == "qemu+unix:///b"
    assert f"/run/x/{DST}/{IMG}/{LEAF}" in answer["domainXml"]
    dom = fake_libvirt.Domain(vm_id, (libvirt.VIR_DOMAIN_PAUSED,
                                      libvirt.VIR_DOMAIN_PAUSED_MIGRATION))
    conn.domains[vm_id] = dom
    time.sleep(0.5)
    assert adopted == [] and incoming.get(vm_id) is not None
    dom.domain_state = (libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_RUNNING_MIGRATED)
    wait_for(lambda: adopted)
    assert adopted[0].id == vm_id and adopted[0].status == vm_mod.UP
    assert incoming.get(vm_id) is None and torn == []


def test_expected_vm_whose_domain_vanishes_is_released(dest: Any) -> None:
    make, conn, params, _, torn, adopted, _ = dest
    incoming = make()
    vm_id = str(uuid.uuid4())
    incoming.create(vm_id, params)
    conn.domains[vm_id] = fake_libvirt.Domain(
        vm_id, (libvirt.VIR_DOMAIN_PAUSED, libvirt.VIR_DOMAIN_PAUSED_MIGRATION))
    time.sleep(0.5)
    del conn.domains[vm_id]  # libvirt destroyed it: the migration failed
    wait_for(lambda: torn)
    assert torn == [LEAF] and adopted == [] and incoming.vm_ids() == []


def test_expected_vm_that_never_arrives_is_released(dest: Any) -> None:
    make, _, params, _, torn, _, tmp = dest
    incoming = make()
    vm_id = str(uuid.uuid4())
    incoming.create(vm_id, params)
    wait_for(lambda: torn)
    assert incoming.vm_ids() == []
    assert not any(name.endswith(".sock") for name in os.listdir(tmp))


def test_destroy_of_an_expected_vm_releases_it(dest: Any) -> None:
    make, conn, params, _, torn, _, _ = dest
    incoming = make()
    vm_id = str(uuid.uuid4())
    incoming.create(vm_id, params)
    dom = fake_libvirt.Domain(vm_id, (libvirt.VIR_DOMAIN_PAUSED,
                                      libvirt.VIR_DOMAIN_PAUSED_MIGRATION))
    conn.domains[vm_id] = dom
    incoming.abort(vm_id)
    assert torn == [LEAF] and "destroy" in dom.calls
    with pytest.raises(errors.NoVMError):
        incoming.abort(vm_id)


def test_unsynced_destination_chain_is_refused(dest: Any) -> None:
    make, _, params, prepared, torn, _, _ = dest
    incoming = make(unsynced=[{"volumeID": BASE, "legality": "ILLEGAL"}])
    with pytest.raises(errors.DestinationNotSyncedError):
        incoming.create(str(uuid.uuid4()), params)
    assert prepared == [LEAF] and torn == [LEAF] and incoming.vm_ids() == []
