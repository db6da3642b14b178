"""Live storage migration without shared storage: the VM moves to a host that
sees the destination (issue 12; DESIGN section 1, second table).

Three hosts, each its own daemon (lock: local on all; these tests are not
about the lock):

- host 1, the SPM: creates the pool (master file domain, a block domain,
  and a second file domain) and sees every domain; it runs no VM;
- host 2, "A": the machine's libvirtd; runs the test guest; sees the master
  and the *source* domain only (StoragePool.connectStorageServer of those);
- host 3, "B": its own libvirtd in its own mount namespace (``own_libvirtd``);
  sees the master and the *destination* domain only; ``[libvirt]
  migration_uri`` tells A how to reach its libvirtd from outside, and
  ``migration_socket_dir`` (a directory under the test's storage dir, seen
  by both namespaces) is where the memory and NBD streams listen.

Every host sees the master: it holds the pool's metadata, and a host must
read it to connect to the pool at all.  "Cannot see" is by connection: all
the storage is on this one machine.

The guest writes throughout; the verifier reads A's and then B's serial log
(the console moved with the VM) and finds every acknowledged write on the
chain the VM ends on.  A chunk of 128 MiB, above a 64 MiB volume's maximum
size, means no thin volume is extended (no watermark work mid-migration).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from contrib.guest import verifier
from tests import daemon as daemon_mod
from tests.cluster import conftest, guests, hosts, joining
from tests.virt.conftest import domains, guest_files, vm_params, workdir  # noqa: F401
from vdsm_lsm import api_schema, client

pytestmark = [pytest.mark.root, pytest.mark.libvirt, pytest.mark.guest,
              conftest.requires_root, pytest.mark.timeout(900)]

MiB = 1024**2
BLANK = "00000000-0000-0000-0000-000000000000"
TOP = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CHUNK_MB = 128
SIZE = 64 * MiB
PEER_TIMEOUT = 3
FILE, BLOCK = "file", "block"
CONFIG = {"irs": {"volume_utilization_chunk_mb": CHUNK_MB},
          "vm": {"migration_peer_timeout": PEER_TIMEOUT}}


def new_id() -> str:
    return str(uuid.uuid4())


def code(name: str) -> int:
    return api_schema.code_of(name)


def stats_of(host: hosts.ClusterHost, vm_id: str) -> dict[str, Any]:
    answer = host.call("VM.getStats", vmID=vm_id)
    return dict(answer[0] if isinstance(answer, list) else answer)


class Trio:
    """The SPM, A (runs the VM, sees the source) and B (sees the destination)."""

    def __init__(self, cluster: hosts.Cluster, src_kind: str, dst_kind: str) -> None:
        self.cluster = cluster
        self.spm = cluster.add_host(hosts.LOCAL, config=CONFIG)
        self.a = cluster.add_host(hosts.LOCAL, config=CONFIG)
        self.socket_dir = os.path.join(cluster.storage_dir, "migration-sockets")
        self.b = cluster.add_host(hosts.LOCAL, own_libvirtd=True, config=CONFIG, start=False)
        assert self.b.libvirt is not None
        self.b.config.setdefault("libvirt", {}).update(
            migration_uri=self.b.libvirt.uri, migration_socket_dir=self.socket_dir)
        daemon_mod.write_config(self.b.daemon.conf_path, self.b.config)
        self.b.start()
        self.ids = cluster.create_pool(self.spm)
        self.pool_id = self.ids.pool_id
        # A second file domain: source or destination, apart from the master.
        self.file_sd = new_id()
        self.file_dir = os.path.join(cluster.file_dir, self.file_sd[:8])
        os.makedirs(self.file_dir)
        self.spm.call("StorageDomain.create", storagedomainID=self.file_sd, domainType="file",
                      typeArgs={"path": self.file_dir}, name="cluster-file-2")
        self.spm.call("StoragePool.attachStorageDomain", storagepoolID=self.pool_id,
                      storagedomainID=self.file_sd)
        self.src_sd, self.dst_sd = self.domain(src_kind), self.domain(dst_kind)
        self.connections: dict[str, dict[str, list[dict[str, str]]]] = {}
        self.vms: list[str] = []
        self.join(self.a, src_kind)
        self.join(self.b, dst_kind)

    def domain(self, kind: str) -> str:
        return self.file_sd if kind == FILE else self.ids.block_sd

    def join(self, host: hosts.ClusterHost, kind: str) -> None:
        """host connects the master's directory and one data domain's storage only."""
        master = {"id": new_id(), "connection": joining.file_dir(self.cluster, self.ids)}
        cons: dict[str, list[dict[str, str]]] = {FILE: [master]}
        if kind == FILE:
            cons[FILE].append({"id": new_id(), "connection": self.file_dir})
        else:
            cons[BLOCK] = [{"id": new_id(), "connection": d} for d in self.cluster.block_devices]
        for domain_type, params in cons.items():
            result = host.call("StoragePool.connectStorageServer", storagepoolID=self.pool_id,
                               domainType=domain_type, connectionParams=params)
            assert [r["status"] for r in result] == [0] * len(params), result
        assert host.call("StoragePool.connect", storagepoolID=self.pool_id,
                         hostID=host.host_id, masterSdUUID=self.ids.master) is True
        self.connections[host.name] = cons

    def create_volume(self, sd_id: str, img_id: str, vol_id: str, fmt: str,
                      parent: str = BLANK) -> None:
        guests.create_volume(self.spm, self.ids, sd_id, img_id, vol_id, fmt, parent,
                             desc="cluster migration", size=SIZE)

    def wait(self, task: str) -> None:
        status = self.spm.wait_task(task)
        assert status["taskResult"] == "success", status
        self.spm.call("Task.clear", taskID=task)

    def image(self) -> tuple[str, str, str]:
        """A base (RAW) and a leaf (COW) on the source domain."""
        img, base, leaf = new_id(), new_id(), new_id()
        self.create_volume(self.src_sd, img, base, "RAW")
        self.create_volume(self.src_sd, img, leaf, "COW", parent=base)
        return img, base, leaf

    def start_guest(self, vm_params: Any, img: str, leaf: str) -> Any:  # noqa: F811
        return guests.start_guest(self.a, vm_params, self.vms, self.pool_id, self.src_sd, img,
                                  leaf, memSize=256)

    def move(self, vm: Any, *args: str, wait: bool = True) -> Any:
        """vdsm-lsm-client move-disk --to-host B against A, as a subprocess."""
        argv = [sys.executable, "-m", "vdsm_lsm.cli", "--socket", self.a.socket_path,
                "move-disk", vm.vm_id, self.dst_sd, "--spm", self.spm.socket_path,
                "--serial-log", b_log(vm), "--timeout", "300", *args]
        if not wait:
            return subprocess.Popen(argv, cwd=TOP, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True)
        proc = subprocess.run(argv, cwd=TOP, capture_output=True, text=True, timeout=600)
        print(f"$ {' '.join(argv)}\nrc={proc.returncode}\n{proc.stdout}\n{proc.stderr}")
        return proc

    def to_b(self) -> list[str]:
        return ["--to-host", self.b.socket_path]

    def migrate(self, vm_id: str, dst: str, img: str, leaf: str) -> int:
        """VM.migrate on A of the drive img/leaf to the destination domain; its error code."""
        src = {"poolID": self.pool_id, "domainID": self.src_sd, "imageID": img,
               "volumeID": leaf}
        params = {"dst": dst, "diskMappings": [{"srcDisk": src,
                                                "dstDisk": dict(src, domainID=self.dst_sd)}]}
        return self.a.error_code("VM.migrate", vmID=vm_id, params=params)

    def migration_status(self, vm_id: str) -> dict[str, Any]:
        return dict(self.a.call("VM.getMigrationStatus", vmID=vm_id))

    def wait_phase(self, vm_id: str, phases: tuple[str, ...], timeout: float = 120) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            try:
                status = self.migration_status(vm_id)
            except client.ClientError as e:
                if e.code != code("migNotInProgress"):
                    raise
                status = {}
            if status.get("phase") in phases:
                return status
            assert time.monotonic() < deadline, f"migration never reached {phases}: {status}"
            time.sleep(0.2)

    def chain_on(self, host: hosts.ClusterHost, vm_id: str) -> list[str]:
        disk = stats_of(host, vm_id)["disks"]["vda"]
        return [v["volumeID"] for v in disk["volumeChain"]]

    def b_holds_nothing(self, img: str) -> None:
        """No VM, no libvirt domain, no prepare link of img on B."""
        assert self.b.call("Host.getVMList") == []
        assert self.b.libvirt is not None
        res = subprocess.run(["virsh", "-c", self.b.libvirt.uri, "list", "--all", "--name"],
                             capture_output=True, text=True, timeout=60, check=True)
        assert res.stdout.split() == []
        assert [p for p in joining.host_storage_files(self.b) if img in p] == []

    def images(self, sd_id: str) -> list[str]:
        return list(self.spm.call("StorageDomain.getImages", storagedomainID=sd_id))

    def legality(self, sd_id: str, img: str, vol: str) -> str:
        info = self.spm.call("Volume.getInfo", storagepoolID=self.pool_id,
                             storagedomainID=sd_id, imageID=img, volumeID=vol)
        return str(info["legality"])

    def verify(self, logs: list[str], sd_id: str, img: str, leaf: str) -> verifier.Result:
        """Every acknowledged write on the chain (prepared read-only on the SPM)."""
        prepared = self.spm.call("Image.prepare", storagepoolID=self.pool_id,
                                 storagedomainID=sd_id, imageID=img, volumeID=leaf)
        try:
            return verifier.verify([p for p in logs if os.path.exists(p)], prepared["path"],
                                   image_format="qcow2")
        finally:
            self.spm.call("Image.teardown", storagepoolID=self.pool_id, storagedomainID=sd_id,
                          imageID=img, volumeID=leaf)

    def close(self) -> None:
        """A and B let go of their VMs and the pool; the extra domain is formatted."""
        for host in (self.b, self.a):
            if host.daemon.proc is None:
                continue
            for vm_id in self.vms:
                try:
                    host.call("VM.destroy", vmID=vm_id)
                except (client.ClientError, OSError):
                    pass
            try:
                host.call("StoragePool.disconnect", storagepoolID=self.pool_id,
                          hostID=host.host_id, masterSdUUID=self.ids.master)
                for domain_type, params in self.connections.get(host.name, {}).items():
                    host.call("StoragePool.disconnectStorageServer",
                              storagepoolID=self.pool_id, domainType=domain_type,
                              connectionParams=params)
            except (client.ClientError, OSError) as e:
                print(f"clean-up {host.name}: {e}")
        try:
            for img in self.images(self.file_sd):
                self.wait(self.spm.call("Image.delete", imageID=img,
                                        storagepoolID=self.pool_id,
                                        storagedomainID=self.file_sd))
            self.spm.call("StoragePool.detachStorageDomain", storagepoolID=self.pool_id,
                          storagedomainID=self.file_sd)
            self.spm.call("StorageDomain.format", storagedomainID=self.file_sd)
        except (client.ClientError, OSError, AssertionError) as e:
            print(f"clean-up of {self.file_sd}: {e}")


def b_log(vm: Any) -> str:
    """B's serial console file: a file of its own (the same path would be
    truncated by B's QEMU while A's still writes it: one machine here)."""
    return str(vm.serial_log) + ".b"


@pytest.fixture
def trio(request: pytest.FixtureRequest, cluster: hosts.Cluster,
         domains: list[str]) -> Iterator[Trio]:  # noqa: F811
    src_kind, dst_kind = getattr(request, "param", (FILE, BLOCK))
    t = Trio(cluster, src_kind, dst_kind)
    try:
        yield t
    finally:
        t.close()


@pytest.mark.parametrize("trio", [(FILE, BLOCK), (BLOCK, FILE)], indirect=True,
                         ids=["file-block", "block-file"])
def test_move_vm_to_the_host_that_sees_the_destination(trio: Trio,
                                                       vm_params: Any) -> None:  # noqa: F811
    """Lock: local.  move-disk --to-host: snapshot on A, clone and sync on the
    SPM, VM.migrate on A (which calls B's VM.migrationCreate), the leaf over
    NBD; the VM ends on B on the destination chain, every write on it."""
    img, base, leaf = trio.image()
    vm = trio.start_guest(vm_params, img, leaf)
    # A cannot see the destination domain, B cannot see the source.
    assert trio.a.error_code("StorageDomain.getInfo", storagedomainID=trio.dst_sd) == code(
        "StorageDomainDoesNotExist")
    assert trio.b.error_code("StorageDomain.getInfo", storagedomainID=trio.src_sd) == code(
        "StorageDomainDoesNotExist")

    proc = trio.move(vm, *trio.to_b(), "--delete-source")

    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert (summary["srcDomainID"], summary["dstDomainID"]) == (trio.src_sd, trio.dst_sd)
    assert summary["host"] == f"unix:{trio.b.socket_path}"
    chain = summary["volumeChain"]
    assert chain[:2] == [base, leaf] and len(chain) == 3  # + the live snapshot's leaf
    assert "% migrate done, 0.0 MiB left" in proc.stderr  # the same progress bar
    # A forgot the VM; its status says done.
    assert trio.a.error_code("VM.getStats", vmID=vm.vm_id) == code("noVM")
    assert trio.a.call("Host.getVMList") == []
    status = trio.migration_status(vm.vm_id)
    assert (status["phase"], status["progress"], status["code"]) == ("done", 100, 0)
    assert [p for p in joining.host_storage_files(trio.a) if img in p] == []
    # B runs it on the destination chain, all LEGAL; the source image is gone.
    stats = stats_of(trio.b, vm.vm_id)
    assert stats["status"] == "Up" and stats["disks"]["vda"]["domainID"] == trio.dst_sd
    assert trio.chain_on(trio.b, vm.vm_id) == chain
    assert [trio.legality(trio.dst_sd, img, v) for v in chain] == ["LEGAL"] * 3
    assert img not in trio.images(trio.src_sd)
    assert trio.spm.call("Host.getAllTasksInfo") == {}
    # The guest writes on B now.
    acks = len(verifier.parse_log(b_log(vm)).acks)
    verifier.wait_for_acks(b_log(vm), acks + 30, timeout=60)

    trio.b.call("VM.destroy", vmID=vm.vm_id)
    result = trio.verify([vm.serial_log, b_log(vm)], trio.dst_sd, img, chain[-1])
    assert result.ok and result.lost == 0, str(result)
    assert result.acks > 30


def test_migration_refused_before_anything_moves_then_canceled(
        trio: Trio, vm_params: Any) -> None:  # noqa: F811
    """Lock: local.  file -> block.  Bad input is refused with a code and
    changes nothing; a migration canceled mid-copy leaves the VM on A (no
    write lost), B holding nothing and no destination image."""
    img, base, leaf = trio.image()
    vm = trio.start_guest(vm_params, img, leaf)
    b = f"unix:{trio.b.socket_path}"

    # Unknown destination: no daemon there.
    assert trio.migrate(vm.vm_id, "unix:/nonexistent/api.sock", img, leaf) == code("noConPeer")
    assert trio.migrate(vm.vm_id, "127.0.0.1:1", img, leaf) == code("noConPeer")
    assert trio.migrate(vm.vm_id, "no-such-address", img, leaf) == code("noConPeer")
    # The destination chain not cloned: B refuses (its prepare), A answers B's code.
    assert trio.migrate(vm.vm_id, b, img, leaf) == code("ImageDoesNotExistInSD")
    trio.b_holds_nothing(img)
    # Cloned but not synced: B refuses to run on a chain of garbage.
    trio.wait(trio.spm.call("Image.cloneStructure", imageID=img, storagepoolID=trio.pool_id,
                            storagedomainID=trio.src_sd, dstSdUUID=trio.dst_sd))
    assert trio.migrate(vm.vm_id, b, img, leaf) == code("DestinationChainNotSynced")
    trio.b_holds_nothing(img)
    trio.wait(trio.spm.call("Image.delete", imageID=img, storagepoolID=trio.pool_id,
                            storagedomainID=trio.dst_sd))
    # No migration was started by any of these.
    assert trio.a.error_code("VM.getMigrationStatus", vmID=vm.vm_id) == code(
        "migNotInProgress")
    assert trio.a.error_code("VM.migrateCancel", vmID=vm.vm_id) == code("migNotInProgress")
    # The flow refuses an unreachable destination before its snapshot.
    proc = trio.move(vm, "--to-host", "unix:/nonexistent/api.sock")
    assert proc.returncode == 3, proc.stderr
    assert "the destination host" in proc.stderr
    assert trio.chain_on(trio.a, vm.vm_id) == [base, leaf]

    # Canceled mid-copy: at 1 MiB/s the leaf copy never catches up with the guest.
    flow = trio.move(vm, *trio.to_b(), "--bandwidth", "1", wait=False)
    try:
        status = trio.wait_phase(vm.vm_id, ("copying-disks",))
        assert trio.a.call("Host.getVMList")[0]["vmId"] == vm.vm_id
        time.sleep(2)
        assert trio.a.call("VM.migrateCancel", vmID=vm.vm_id) is True
        out, err = flow.communicate(timeout=300)
    finally:
        if flow.poll() is None:
            flow.kill()
    print(f"rc={flow.returncode}\n{out}\n{err}")
    assert flow.returncode == 1, err
    assert err.strip().splitlines()[-1].startswith(f"error {code('migrateErr')}:"), err
    status = trio.migration_status(vm.vm_id)
    assert status["phase"] == "canceled" and status["code"] == code("migrateErr"), status
    stats = stats_of(trio.a, vm.vm_id)
    assert stats["status"] == "Up" and stats["migration"]["phase"] == "canceled"
    chain = trio.chain_on(trio.a, vm.vm_id)
    assert chain[:2] == [base, leaf] and len(chain) == 3
    trio.b_holds_nothing(img)
    assert img not in trio.images(trio.dst_sd)
    vm.wait_acks(vm.acks() + 30)

    trio.a.call("VM.destroy", vmID=vm.vm_id)
    result = trio.verify([vm.serial_log], trio.src_sd, img, chain[-1])
    assert result.ok and result.lost == 0, str(result)


def test_destination_daemon_killed_during_the_migration(
        trio: Trio, vm_params: Any) -> None:  # noqa: F811
    """Lock: local.  file -> block.  B's daemon is killed (kill -9) mid-copy:
    B's libvirtd would go on, but A stops hearing B's daemon, aborts the
    migration after [vm] migration_peer_timeout (noConPeer): the VM stays on
    A, the flow deletes the destination image; B, restarted, holds nothing."""
    img, base, leaf = trio.image()
    vm = trio.start_guest(vm_params, img, leaf)
    flow = trio.move(vm, *trio.to_b(), "--bandwidth", "1", wait=False)
    try:
        trio.wait_phase(vm.vm_id, ("copying-disks",))
        time.sleep(2)
        trio.b.kill9()
        out, err = flow.communicate(timeout=300)
    finally:
        if flow.poll() is None:
            flow.kill()
    print(f"rc={flow.returncode}\n{out}\n{err}")
    assert flow.returncode == 1, err
    assert err.strip().splitlines()[-1].startswith(f"error {code('noConPeer')}:"), err
    status = trio.migration_status(vm.vm_id)
    assert (status["phase"], status["code"]) == ("failed", code("noConPeer")), status
    stats = stats_of(trio.a, vm.vm_id)
    assert stats["status"] == "Up"
    chain = trio.chain_on(trio.a, vm.vm_id)
    assert chain[:2] == [base, leaf] and len(chain) == 3
    assert img not in trio.images(trio.dst_sd)
    vm.wait_acks(vm.acks() + 30)

    trio.b.start()  # recovery: nothing of the VM survives on B
    trio.b_holds_nothing(img)

    trio.a.call("VM.destroy", vmID=vm.vm_id)
    result = trio.verify([vm.serial_log], trio.src_sd, img, chain[-1])
    assert result.ok and result.lost == 0, str(result)
