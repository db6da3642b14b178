"""Live storage migration across hosts: the VM runs on host 2, host 1 is the SPM.

End to end, as DESIGN sections 1 and 9 draw it (engine, SPM, HSM): host 1
creates the pool and is its SPM; host 2 joins it
(``StoragePool.connectStorageServer`` for the file domain's directory and
the block domain's device, then ``StoragePool.connect``) and runs the test
guest, which writes checksummed blocks. ``vdsm-lsm-client move-disk`` runs
as a subprocess against host 2 with ``--spm`` naming host 1: the SPM verbs
(Volume.create, Image.cloneStructure / syncData / delete, Task.*,
Volume.setLegality) go to host 1, the VM verbs to host 2. The disk moves
file -> block and block -> file; the verifier finds every acknowledged
write on the chain the VM ends on, and the destination leaf is LEGAL
afterwards (set by the SPM, host 2 only read legality before its pivot).

Lock: local on both hosts (``cluster_lock="local"``, the fcntl lock; these
tests are not about the lock). Both daemons use the machine's libvirtd
(no ``own_libvirtd``): only host 2 runs a VM, and with shared storage the
VM never leaves it. The chunk is 128 MiB, more than a 64 MiB volume's
maximum size (capacity * 1.1): a COW volume on the block domain starts at
its full size, so no extension is needed here; extension across hosts,
through the storage mailbox, is tested in test_mailbox.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from contrib.guest import verifier
from tests.cluster import conftest, guests, hosts
from tests.virt.conftest import domains, guest_files, vm_params, workdir  # noqa: F401
from vdsm_lsm import api_schema, client

pytestmark = [pytest.mark.root, pytest.mark.libvirt, pytest.mark.guest,
              conftest.requires_root, pytest.mark.timeout(900)]

MiB = 1024**2
BLANK = "00000000-0000-0000-0000-000000000000"
TOP = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# No extension needed: a COW volume of SIZE on block starts at one chunk (> its max size).
CHUNK_MB = 128
SIZE = 64 * MiB
CONFIG = {"irs": {"volume_utilization_chunk_mb": CHUNK_MB}}
FILE, BLOCK = "file", "block"


def new_id() -> str:
    return str(uuid.uuid4())


class Pair:
    """Host 1 (creates the pool, SPM) and host 2 (joined, runs the VM)."""

    def __init__(self, cluster: hosts.Cluster) -> None:
        self.cluster = cluster
        self.spm = cluster.add_host(hosts.LOCAL, config=CONFIG)
        self.hsm = cluster.add_host(hosts.LOCAL, config=CONFIG)
        self.ids = cluster.create_pool(self.spm)
        self.pool_id = self.ids.pool_id
        self.vms: list[str] = []
        self.connections = {
            FILE: [{"id": new_id(),
                    "connection": os.path.join(cluster.file_dir, self.ids.file_sd[:8])}],
            BLOCK: [{"id": new_id(), "connection": dev} for dev in cluster.block_devices],
        }
        for domain_type, params in self.connections.items():
            result = self.hsm.call("StoragePool.connectStorageServer",
                                   storagepoolID=self.pool_id, domainType=domain_type,
                                   connectionParams=params)
            assert [r["status"] for r in result] == [0] * len(params), result
        assert self.hsm.call("StoragePool.connect", storagepoolID=self.pool_id,
                             hostID=self.hsm.host_id, masterSdUUID=self.ids.master) is True

    def domain(self, kind: str) -> str:
        return self.ids.file_sd if kind == FILE else self.ids.block_sd

    def create_volume(self, sd_id: str, img_id: str, vol_id: str, fmt: str,
                      parent: str = BLANK) -> None:
        """Volume.create on the SPM, waited for."""
        guests.create_volume(self.spm, self.ids, sd_id, img_id, vol_id, fmt, parent,
                             desc="cluster lsm", size=SIZE)

    def start_guest(self, vm_params: Any, sd_id: str, img_id: str, leaf: str) -> Any:  # noqa: F811
        return guests.start_guest(self.hsm, vm_params, self.vms, self.pool_id, sd_id, img_id,
                                  leaf)

    def legality(self, host: hosts.ClusterHost, sd_id: str, img_id: str, vol_id: str) -> str:
        info = host.call("Volume.getInfo", storagepoolID=self.pool_id, storagedomainID=sd_id,
                         imageID=img_id, volumeID=vol_id)
        return str(info["legality"])

    def log(self, host: hosts.ClusterHost) -> str:
        with open(host.daemon.log_path, errors="replace") as f:
            return f.read()

    def move_disk(self, vm_id: str, dst_sd: str, *args: str) -> subprocess.CompletedProcess[str]:
        """vdsm-lsm-client move-disk against host 2 (the VM's host), as a subprocess."""
        argv = [sys.executable, "-m", "vdsm_lsm.cli", "--socket", self.hsm.socket_path,
                "move-disk", vm_id, dst_sd, "--timeout", "300", *args]
        proc = subprocess.run(argv, cwd=TOP, capture_output=True, text=True, timeout=600)
        print(f"$ {' '.join(argv)}\nrc={proc.returncode}\n{proc.stdout}\n{proc.stderr}")
        return proc

    def verify(self, vm: Any, sd_id: str, img_id: str, leaf: str) -> verifier.Result:
        """Every acknowledged write on the chain (prepared on the SPM, read-only)."""
        prepared = self.spm.call("Image.prepare", storagepoolID=self.pool_id,
                                 storagedomainID=sd_id, imageID=img_id, volumeID=leaf)
        try:
            return verifier.verify(vm.serial_log, prepared["path"], image_format="qcow2")
        finally:
            self.spm.call("Image.teardown", storagepoolID=self.pool_id, storagedomainID=sd_id,
                          imageID=img_id, volumeID=leaf)

    def close(self) -> None:
        """Host 2 lets go of the pool (its VMs first), so host 1 can destroy it."""
        for vm_id in self.vms:
            try:
                self.hsm.call("VM.destroy", vmID=vm_id)
            except (client.ClientError, OSError):
                pass
        for method, params in [
            ("StoragePool.disconnect", {"storagepoolID": self.pool_id,
                                        "hostID": self.hsm.host_id,
                                        "masterSdUUID": self.ids.master}),
        ] + [("StoragePool.disconnectStorageServer",
              {"storagepoolID": self.pool_id, "domainType": t, "connectionParams": p})
             for t, p in self.connections.items()]:
            try:
                self.hsm.call(method, **params)
            except (client.ClientError, OSError) as e:
                print(f"clean-up {method}: {e}")


@pytest.fixture
def pair(cluster: hosts.Cluster, domains: list[str]) -> Iterator[Pair]:  # noqa: F811
    p = Pair(cluster)
    try:
        yield p
    finally:
        p.close()


def test_host2_joined_the_pool_host1_is_its_spm(pair: Pair) -> None:
    """Lock: local.  What the migrations below stand on."""
    for host in (pair.spm, pair.hsm):
        info = host.call("StoragePool.getInfo", storagepoolID=pair.pool_id)
        assert set(info["dominfo"]) == set(pair.ids.domains), host
        status = host.call("StoragePool.getSpmStatus", storagepoolID=pair.pool_id)
        assert status["spmId"] == 1, host
    assert pair.hsm.call("StoragePool.getSpmStatus",
                         storagepoolID=pair.pool_id)["spmStatus"] != "SPM"


@pytest.mark.parametrize("src_kind, dst_kind", [(FILE, BLOCK), (BLOCK, FILE)],
                         ids=["file-block", "block-file"])
def test_move_disk_of_a_vm_on_host2_with_host1_as_spm(
    pair: Pair, vm_params: Any, src_kind: str, dst_kind: str  # noqa: F811
) -> None:
    """Lock: local.  The guest writes on host 2 throughout; move-disk sends
    the SPM verbs to host 1 (--spm) and the VM verbs to host 2."""
    src_sd, dst_sd = pair.domain(src_kind), pair.domain(dst_kind)
    img, base, leaf = new_id(), new_id(), new_id()
    pair.create_volume(src_sd, img, base, "RAW")
    pair.create_volume(src_sd, img, leaf, "COW", parent=base)
    vm = pair.start_guest(vm_params, src_sd, img, leaf)

    # Host 2 is not SPM: without --spm the move is refused before any change.
    proc = pair.move_disk(vm.vm_id, dst_sd)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error {api_schema.code_of('SpmStatusError')}:"), proc.stderr
    assert "the SPM is host 1" in last and "--spm" in last
    disk = pair.hsm.call("VM.getStats", vmID=vm.vm_id)[0]["disks"]["vda"]
    assert [v["volumeID"] for v in disk["volumeChain"]] == [base, leaf]

    # The SPM as a socket for one direction, as HOST:PORT for the other.
    spm = (pair.spm.socket_path if src_kind == FILE
           else f"127.0.0.1:{pair.spm.daemon.port}")
    proc = pair.move_disk(vm.vm_id, dst_sd, "--spm", spm, "--delete-source")

    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert (summary["srcDomainID"], summary["dstDomainID"]) == (src_sd, dst_sd)
    chain = summary["volumeChain"]
    assert chain[:2] == [base, leaf] and len(chain) == 3  # + the live snapshot's leaf
    stats = pair.hsm.call("VM.getStats", vmID=vm.vm_id)[0]
    disk = stats["disks"]["vda"]
    assert stats["status"] == "Up" and stats["pauseCode"] == "NOERR"
    assert disk["domainID"] == dst_sd and "replicate" not in disk
    assert [v["volumeID"] for v in disk["volumeChain"]] == chain
    # The whole destination chain is LEGAL, the leaf marked by the SPM after
    # the pivot; both hosts read the same metadata.
    for host in (pair.spm, pair.hsm):
        assert [pair.legality(host, dst_sd, img, v) for v in chain] == ["LEGAL"] * 3
    # Host 2 only read legality at its pivot; host 1 answered Volume.setLegality.
    assert "left to the SPM's Volume.setLegality" in pair.log(pair.hsm)
    assert "Request method=Volume.setLegality duration" in pair.log(pair.spm)
    assert "method=Volume.setLegality" not in pair.log(pair.hsm)
    # The SPM ran every task, and move-disk cleared them.
    assert pair.spm.call("StorageDomain.getImages", storagedomainID=src_sd) == []
    assert pair.spm.call("Host.getAllTasksInfo") == {}
    vm.wait_acks(vm.acks() + 30)

    pair.hsm.call("VM.destroy", vmID=vm.vm_id)
    result = pair.verify(vm, dst_sd, img, chain[-1])
    assert result.ok and result.lost == 0, str(result)
