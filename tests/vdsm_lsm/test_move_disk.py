"""The move-disk flow (vdsm_lsm/move_disk.py) against the real daemon and a real guest.

``vdsm-lsm-client move-disk`` runs as a subprocess, as an operator would run
it: a writing guest's disk moves file -> file and the verifier finds every
acknowledged write on the destination chain; a destination without room for
the internal volumes fails the move after the mirror started, and the flow
rolls back to the source. The flow's refusals and phases are unit-tested against
a small fake transport (the progress computation: test_move_progress.py).
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
from storage import commands
from tests.virt.conftest import domains, guest_files, vm_params, workdir  # noqa: F401
from vdsm_lsm import api_schema, client_errors, move_disk, move_progress

MiB = 1024**2
BLANK = "00000000-0000-0000-0000-000000000000"
TOP = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def new_id() -> str:
    return str(uuid.uuid4())


def code(name: str) -> int:
    return api_schema.code_of(name)


class Site:
    """A daemon with a pool of two file domains (source, destination); SPM here."""

    def __init__(self, daemon: Any, src_path: str, dst_path: str) -> None:
        self.daemon = daemon
        self.pool_id, self.src_sd, self.dst_sd = new_id(), new_id(), new_id()
        self.src_path, self.dst_path = src_path, dst_path
        self.formatted: list[str] = []
        for sd_id, path, name in ((self.src_sd, src_path, "src"), (self.dst_sd, dst_path, "dst")):
            os.makedirs(path, exist_ok=True)
            self.call("StorageDomain.create", storagedomainID=sd_id, domainType="file",
                      typeArgs={"path": path}, name=f"movedisk-{name}")
            self.formatted.append(sd_id)
        self.call("StoragePool.create", storagepoolID=self.pool_id, name="movedisk",
                  masterSdUUID=self.src_sd, domainList=[self.src_sd, self.dst_sd])
        self.call("StoragePool.connect", storagepoolID=self.pool_id, hostID=1,
                  masterSdUUID=self.src_sd)
        self.call("StoragePool.spmStart", storagepoolID=self.pool_id)

    def call(self, method: str, **params: Any) -> Any:
        rpc = self.daemon.unix(timeout=120)
        try:
            return rpc.call(method, **params)
        finally:
            rpc.close()

    def wait_task(self, task_id: str) -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            status = self.call("Task.getStatus", taskID=task_id)
            if status["taskState"] == "finished":
                break
            time.sleep(0.1)
        assert status["taskResult"] == "success", status
        self.call("Task.clear", taskID=task_id)

    def create_volume(self, img_id: str, vol_id: str, fmt: str, parent: str = BLANK) -> None:
        self.wait_task(self.call(
            "Volume.create", storagepoolID=self.pool_id, storagedomainID=self.src_sd,
            imageID=img_id, volumeID=vol_id, size=64 * MiB, volFormat=fmt,
            preallocate="SPARSE", desc="", srcImgUUID=img_id if parent != BLANK else BLANK,
            srcVolUUID=parent,
        ))

    def volume_path(self, sd_id: str, img_id: str, vol_id: str) -> str:
        root = self.src_path if sd_id == self.src_sd else self.dst_path
        return os.path.join(root, sd_id, "images", img_id, vol_id)

    def move_disk(self, *args: str) -> subprocess.CompletedProcess[str]:
        """vdsm-lsm-client move-disk, as a subprocess; stderr is a file (not a TTY)."""
        argv = [sys.executable, "-m", "vdsm_lsm.cli", "--socket", self.daemon.socket_path,
                "move-disk", *args]
        proc = subprocess.run(argv, cwd=TOP, capture_output=True, text=True, timeout=600)
        print(f"$ {' '.join(argv)}\nrc={proc.returncode}\n{proc.stdout}\n{proc.stderr}")
        return proc

    def cleanup(self) -> None:
        if self.daemon.proc is None:
            return
        for method, params in [("StoragePool.destroy", {"storagepoolID": self.pool_id})] + [
            ("StorageDomain.format", {"storagedomainID": sd_id}) for sd_id in self.formatted
        ]:
            try:
                self.call(method, **params)
            except (client_errors.ClientError, OSError) as e:
                print(f"clean-up {method}: {e}")


@pytest.fixture
def small_fs(workdir: str) -> Iterator[str]:  # noqa: F811
    """A 32 MiB ext4 file system, mounted: a destination without much room."""
    image = os.path.join(workdir, "small-fs.img")
    mountpoint = os.path.join(workdir, "small")
    with open(image, "wb") as f:
        f.truncate(32 * MiB)
    commands.run(["mkfs.ext4", "-q", "-F", image], timeout=60)
    os.mkdir(mountpoint)
    commands.run(["mount", "-o", "loop", image, mountpoint], timeout=60)
    try:
        yield mountpoint
    finally:
        commands.run(["umount", mountpoint], timeout=60, check=False)


def make_site(daemon_factory: Any, domains: list[str], src: str, dst: str) -> Iterator[Site]:  # noqa: F811
    d = daemon_factory({"sanlock": {"cluster_lock": "local"}})
    s = Site(d, src, dst)
    try:
        yield s
    finally:
        for vm_id in list(domains):
            try:
                s.call("VM.destroy", vmID=vm_id)
            except (client_errors.ClientError, OSError):
                pass
        s.cleanup()


@pytest.fixture
def site(daemon_factory: Any, workdir: str, domains: list[str]) -> Iterator[Site]:  # noqa: F811
    yield from make_site(daemon_factory, domains, os.path.join(workdir, "src"),
                         os.path.join(workdir, "dst"))


@pytest.fixture
def full_site(
    daemon_factory: Any, workdir: str, domains: list[str], small_fs: str  # noqa: F811
) -> Iterator[Site]:
    yield from make_site(daemon_factory, domains, os.path.join(workdir, "src"), small_fs)


def start_guest(site: Site, vm_params: Any, img: str, leaf: str) -> Any:  # noqa: F811
    drive = {"poolID": site.pool_id, "domainID": site.src_sd, "imageID": img,
             "volumeID": leaf, "format": "cow"}
    vm = vm_params([drive], rate=50)
    site.call("VM.create", vmID=vm.vm_id, vmParams=vm.params)
    vm.wait_acks(30)
    return vm


def test_move_disk_moves_a_writing_guest_to_the_destination(site, vm_params):  # noqa: F811
    img, base, leaf = new_id(), new_id(), new_id()
    site.create_volume(img, base, "RAW")
    site.create_volume(img, leaf, "COW", parent=base)
    vm = start_guest(site, vm_params, img, leaf)

    proc = site.move_disk(vm.vm_id, site.dst_sd, "--drive", "vda", "--delete-source",
                          "--bandwidth", "256", "--timeout", "300")

    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["vmID"] == vm.vm_id and summary["drive"] == "vda"
    assert (summary["srcDomainID"], summary["dstDomainID"]) == (site.src_sd, site.dst_sd)
    chain = summary["volumeChain"]
    assert chain[:2] == [base, leaf] and len(chain) == 3  # + the live snapshot's leaf
    # Progress went to stderr as plain lines (not a TTY), through every phase.
    lines = proc.stderr.splitlines()
    for phase in ("snapshot", "clone", "sync", "mirror", "pivot", "delete-source"):
        assert any(line.endswith(phase) or f"% {phase} " in line for line in lines), phase
    assert lines[-1].endswith("100.0% done")
    assert "\r" not in proc.stderr

    stats = site.call("VM.getStats", vmID=vm.vm_id)
    disk = stats["disks"]["vda"]
    assert stats["status"] == "Up"
    assert disk["domainID"] == site.dst_sd and "replicate" not in disk
    assert [v["volumeID"] for v in disk["volumeChain"]] == chain
    assert site.call("StorageDomain.getImages", storagedomainID=site.src_sd) == []
    vm.wait_acks(vm.acks() + 30)

    site.call("VM.destroy", vmID=vm.vm_id)
    result = verifier.verify(vm.serial_log, site.volume_path(site.dst_sd, img, chain[-1]),
                             image_format="qcow2")
    assert result.ok and result.lost == 0, str(result)


def test_move_disk_onto_a_full_domain_rolls_back_to_the_source(full_site, vm_params):  # noqa: F811
    site = full_site
    img, base, leaf = new_id(), new_id(), new_id()
    site.create_volume(img, base, "RAW")
    site.create_volume(img, leaf, "COW", parent=base)
    # 48 MiB of data in the base: syncData can't copy it into a 32 MiB file
    # system, so the move fails at step 4, after the mirror started.
    with open(site.volume_path(site.src_sd, img, base), "r+b") as f:
        for _ in range(48):
            f.write(os.urandom(MiB))
    vm = start_guest(site, vm_params, img, leaf)

    proc = site.move_disk(vm.vm_id, site.dst_sd, "--timeout", "300")

    assert proc.returncode == 1, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error "), proc.stderr
    failure = int(last.split()[1].rstrip(":"))
    assert failure not in (0, code("GeneralException"), code("unavail"))
    # The mirror ran before the failure (the rollback had something to abort).
    assert "% replicate" in proc.stderr and "Aborting the mirror" in proc.stderr

    stats = site.call("VM.getStats", vmID=vm.vm_id)
    disk = stats["disks"]["vda"]
    assert stats["status"] == "Up" and stats["pauseCode"] == "NOERR"
    assert disk["domainID"] == site.src_sd and "replicate" not in disk
    chain = [v["volumeID"] for v in disk["volumeChain"]]
    assert chain[:2] == [base, leaf] and len(chain) == 3
    assert site.call("StorageDomain.getImages", storagedomainID=site.dst_sd) == []
    assert os.listdir(os.path.join(site.dst_path, site.dst_sd, "images")) == []
    assert site.call("Host.getAllTasksInfo") == {}
    vm.wait_acks(vm.acks() + 30)

    # A destination that is no domain of the pool: refused before any change.
    proc = site.move_disk(vm.vm_id, new_id())
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error {code('StorageDomainNotInPool')}:"), proc.stderr
    disk = site.call("VM.getStats", vmID=vm.vm_id)["disks"]["vda"]
    assert [v["volumeID"] for v in disk["volumeChain"]] == chain
    vm.wait_acks(vm.acks() + 10)

    site.call("VM.destroy", vmID=vm.vm_id)
    result = verifier.verify(vm.serial_log, site.volume_path(site.src_sd, img, chain[-1]),
                             image_format="qcow2")
    assert result.ok and result.lost == 0, str(result)


# The flow, against a fake transport


class FakeTransport:
    """Answers each verb from its list in turn, the last answer from then on; raises errors."""

    def __init__(self, answers: dict[str, list[Any]]) -> None:
        self.answers = answers
        self.calls: list[str] = []

    def call(self, method: str, **params: Any) -> Any:
        self.calls.append(method)
        queue = self.answers[method]
        answer = queue.pop(0) if len(queue) > 1 else queue[0]
        if isinstance(answer, Exception):
            raise answer
        return answer


def stats(sd_id: str) -> dict[str, Any]:
    return {"disks": {"vda": {"poolID": "pool", "domainID": sd_id, "imageID": "img",
                              "volumeID": "leaf"}}}


def test_flow_refuses_a_move_onto_its_own_domain_before_any_change():
    rpc = FakeTransport({"VM.getStats": [stats("sd")]})
    with pytest.raises(client_errors.ClientError) as e:
        move_disk.MoveDisk(rpc, "vm", "sd").run()
    assert e.value.code == code("SameSourceAndDestination")
    assert rpc.calls == ["VM.getStats"]


def test_flow_retries_unavail_then_refuses_a_domain_outside_the_pool():
    busy = client_errors.ClientError(code("unavail"), "busy")
    rpc = FakeTransport({"VM.getStats": [busy, stats("src")],
                         "StoragePool.getInfo": [{"dominfo": {"src": {}}}]})
    with pytest.raises(client_errors.ClientError) as e:
        move_disk.MoveDisk(rpc, "vm", "dst", poll_interval=0).run()
    assert e.value.code == code("StorageDomainNotInPool")
    assert rpc.calls == ["VM.getStats", "VM.getStats", "StoragePool.getInfo"]


def test_progress_of_the_flow_skips_delete_unless_asked():
    with_delete = move_disk.MoveDisk(None, "vm", "sd", delete_source=True)  # type: ignore[arg-type]
    without = move_disk.MoveDisk(None, "vm", "sd")  # type: ignore[arg-type]
    assert move_progress.DELETE in with_delete.progress.phases
    assert move_progress.DELETE not in without.progress.phases
    assert without.progress.percent(move_progress.PIVOT, 1.0) == 100
    assert with_delete.progress.percent(move_progress.PIVOT, 1.0) < 100
