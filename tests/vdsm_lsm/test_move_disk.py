"""The move-disk flow (vdsm_lsm/move_disk.py) against the real daemon and a real guest.

``vdsm-lsm-client move-disk`` runs as a subprocess, as an operator would run
it: a writing guest's disk moves file -> file and the verifier finds every
acknowledged write on the destination chain; a destination without room for
the internal volumes fails the move after the mirror started, and the flow
rolls back to the source (one daemon: the VM's host is the SPM, found with
StoragePool.getSpmStatus). The flow's refusals and phases are unit-tested against
a small fake transport, and its split across two hosts (VM verbs to the VM's host,
SPM verbs to the SPM, Volume.setLegality after the pivot, the rollback on both)
against two (the progress computation: test_move_progress.py; the real two-host
migration: tests/cluster/test_lsm.py).
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
from tests import pool_site
from tests.virt.conftest import domains, guest_files, vm_params, workdir  # noqa: F401
from vdsm_lsm import api_schema, client_errors, journal, move_disk, move_progress

MiB = 1024**2
BLANK = "00000000-0000-0000-0000-000000000000"
TOP = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def new_id() -> str:
    return str(uuid.uuid4())


def code(name: str) -> int:
    return api_schema.code_of(name)


class Site(pool_site.PoolSite):
    """A daemon with a pool of two file domains (source, destination); SPM here."""

    def __init__(self, daemon: Any, src_path: str, dst_path: str) -> None:
        super().__init__(daemon, new_id())
        self.src_sd, self.dst_sd = new_id(), new_id()
        self.src_path, self.dst_path = src_path, dst_path
        self.formatted: list[str] = []
        for sd_id, path, name in ((self.src_sd, src_path, "src"), (self.dst_sd, dst_path, "dst")):
            self.create_file_domain(sd_id, path, f"movedisk-{name}")
            self.formatted.append(sd_id)
        self.create_pool("movedisk", self.src_sd, [self.src_sd, self.dst_sd])

    def create_volume(self, img_id: str, vol_id: str, fmt: str, parent: str = BLANK) -> None:
        self.create_volume_on(self.src_sd, img_id, vol_id, fmt, parent)

    def volume_path(self, sd_id: str, img_id: str, vol_id: str) -> str:
        root = self.src_path if sd_id == self.src_sd else self.dst_path
        return os.path.join(root, sd_id, "images", img_id, vol_id)

    @property
    def state_dir(self) -> str:
        """move-disk's journals (--state-dir)."""
        return os.path.join(self.daemon.workdir, "client-state")

    def move_disk_argv(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "vdsm_lsm.cli", "--socket", self.daemon.socket_path,
                "move-disk", *args, "--state-dir", self.state_dir]

    def move_disk(self, *args: str) -> subprocess.CompletedProcess[str]:
        """vdsm-lsm-client move-disk, as a subprocess; stderr is a file (not a TTY)."""
        argv = self.move_disk_argv(*args)
        proc = subprocess.run(argv, cwd=TOP, capture_output=True, text=True, timeout=600)
        print(f"$ {' '.join(argv)}\nrc={proc.returncode}\n{proc.stdout}\n{proc.stderr}")
        return proc

    def move_disk_killed_after(self, step: str, *args: str, timeout: float = 300) -> str:
        """move-disk stopped by the journal's test hook after step, then killed
        for real (SIGKILL); its stderr."""
        err_path = os.path.join(self.daemon.workdir, f"killed-{step}.err")
        env = dict(os.environ, **{journal.STOP_AFTER_ENV: step})
        with open(err_path, "w") as err:
            proc = subprocess.Popen(self.move_disk_argv(*args), cwd=TOP, env=env,
                                    stdout=subprocess.DEVNULL, stderr=err)
        marker = f"stopped after step {step}"
        deadline = time.monotonic() + timeout
        try:
            while True:
                with open(err_path) as f:
                    text = f.read()
                if marker in text:
                    break
                assert proc.poll() is None, f"move-disk ended before {step}:\n{text}"
                assert time.monotonic() < deadline, f"move-disk never reached {step}:\n{text}"
                time.sleep(0.05)
        finally:
            proc.kill()  # SIGKILL: no rollback, no clean-up, as kill -9
            proc.wait(60)
        print(f"killed after {step}:\n{text}")
        return text

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

    stats = site.call("VM.getStats", vmID=vm.vm_id)[0]
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

    stats = site.call("VM.getStats", vmID=vm.vm_id)[0]
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
    disk = site.call("VM.getStats", vmID=vm.vm_id)[0]["disks"]["vda"]
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


# The flow across two hosts (the VM's host and the SPM), against fake transports

SPM_VERBS = {"Volume.getInfo", "Volume.create", "Volume.delete", "Image.cloneStructure",
             "Image.syncData", "Image.delete", "Volume.setLegality", "StorageDomain.getImages",
             "Task.getStatus", "Task.clear", "Task.stop"}
VM_VERBS = {"VM.getStats", "VM.snapshot", "VM.diskReplicateStart", "VM.diskReplicateFinish"}
DONE = {"taskState": "finished", "taskResult": "success", "progress": 100, "code": 0,
        "message": ""}


class Host(FakeTransport):
    """A fake daemon that also keeps each call's params."""

    def __init__(self, answers: dict[str, list[Any]]) -> None:
        super().__init__(answers)
        self.params: list[tuple[str, dict[str, Any]]] = []

    def call(self, method: str, **params: Any) -> Any:
        self.params.append((method, params))
        return super().call(method, **params)


def spm_status(status: str, spm_id: int) -> dict[str, Any]:
    return {"spmStatus": status, "spmId": spm_id, "spmLver": 1}


def disk_stats(sd_id: str, replicate: dict[str, Any] | None = None) -> dict[str, Any]:
    disk: dict[str, Any] = {"poolID": "pool", "domainID": sd_id, "imageID": "img",
                            "volumeID": "leaf", "volumeChain": [{"volumeID": "leaf"}]}
    if replicate:
        disk["replicate"] = replicate
    return {"disks": {"vda": disk}}


def vm_host(spm: dict[str, Any], **more: list[Any]) -> Host:
    answers: dict[str, list[Any]] = {
        "VM.getStats": [disk_stats("src"),
                        disk_stats("src", {"state": "ready", "cur": 5, "end": 5}),
                        disk_stats("dst")],
        "StoragePool.getInfo": [{"dominfo": {"src": {}, "dst": {}}}],
        "StoragePool.getSpmStatus": [spm],
        "VM.snapshot": [True], "VM.diskReplicateStart": [True],
        "VM.diskReplicateFinish": [True],
    }
    answers.update(more)
    return Host(answers)


def spm_host(**more: list[Any]) -> Host:
    answers: dict[str, list[Any]] = {
        "StoragePool.getSpmStatus": [spm_status("SPM", 1)],
        "Volume.getInfo": [{"capacity": 64 * MiB}],
        "Volume.create": ["t-create"], "Image.cloneStructure": ["t-clone"],
        "Image.syncData": ["t-sync"], "Image.delete": ["t-delete"],
        "Task.getStatus": [DONE], "Task.clear": [True], "Volume.setLegality": [True],
        "StorageDomain.getImages": [["img"]],
    }
    answers.update(more)
    return Host(answers)


def test_flow_sends_vm_verbs_to_the_vm_host_and_storage_verbs_to_the_spm():
    vm, spm = vm_host(spm_status("Free", 1)), spm_host()

    summary = move_disk.MoveDisk(vm, "vm", "dst", spm=spm, poll_interval=0).run()

    assert summary["dstDomainID"] == "dst"
    assert set(vm.calls) <= VM_VERBS | {"StoragePool.getInfo"}
    assert set(spm.calls) <= SPM_VERBS | {"StoragePool.getSpmStatus"}
    assert [c for c in vm.calls if c != "VM.getStats"] == [
        "StoragePool.getInfo", "VM.snapshot", "VM.diskReplicateStart",
        "VM.diskReplicateFinish"]
    assert [c for c in spm.calls if not c.startswith("Task.")] == [
        "StoragePool.getSpmStatus", "Volume.getInfo", "Volume.create", "Image.cloneStructure",
        "Image.syncData", "Volume.setLegality"]
    # After the pivot the SPM marks the destination leaf LEGAL.
    assert spm.calls.index("Volume.setLegality") > spm.calls.index("Image.syncData")
    leaf = dict(spm.params)["Volume.create"]["volumeID"]
    assert dict(spm.params)["Volume.setLegality"] == {
        "storagepoolID": "pool", "storagedomainID": "dst", "imageID": "img",
        "volumeID": leaf, "legality": "LEGAL"}
    assert dict(vm.params)["VM.diskReplicateFinish"]["dstDisk"]["volumeID"] == leaf


def test_flow_uses_the_vm_host_for_both_roles_when_it_is_the_spm():
    both = vm_host(spm_status("SPM", 2), **{k: v for k, v in spm_host().answers.items()
                                              if k != "StoragePool.getSpmStatus"})

    move_disk.MoveDisk(both, "vm", "dst", poll_interval=0).run()

    assert both.calls.count("StoragePool.getSpmStatus") == 1
    assert "Volume.setLegality" in both.calls  # harmless if the pivot marked it already


def test_flow_without_spm_refuses_when_the_vm_host_is_not_spm_naming_the_spm():
    vm = vm_host(spm_status("Free", 3))

    with pytest.raises(client_errors.ClientError) as e:
        move_disk.MoveDisk(vm, "vm", "dst", poll_interval=0).run()

    assert e.value.code == code("SpmStatusError")
    assert "host 3" in e.value.message and "--spm" in e.value.message
    assert vm.calls == ["VM.getStats", "StoragePool.getInfo", "StoragePool.getSpmStatus"]


def test_flow_refuses_a_given_spm_that_is_not_spm_before_any_change():
    vm, spm = vm_host(spm_status("Free", 1)), spm_host(
        **{"StoragePool.getSpmStatus": [spm_status("Free", -1)]})

    with pytest.raises(client_errors.ClientError) as e:
        move_disk.MoveDisk(vm, "vm", "dst", spm=spm, poll_interval=0).run()

    assert e.value.code == code("SpmStatusError") and "no host is SPM" in e.value.message
    assert spm.calls == ["StoragePool.getSpmStatus"]
    assert "VM.snapshot" not in vm.calls


def test_flow_rolls_back_on_both_hosts_when_sync_fails():
    failed = dict(DONE, taskResult="cleanFailure", code=code("ImageIsNotLegalChain"),
                  message="boom")
    vm = vm_host(spm_status("Free", 1), **{"VM.getStats": [
        disk_stats("src"), disk_stats("src", {"state": "copying", "cur": 1, "end": 5})]})
    # Snapshot and clone succeed, the sync fails, the rollback's delete succeeds.
    spm = spm_host(**{"Task.getStatus": [DONE, DONE, failed, DONE]})

    with pytest.raises(client_errors.ClientError) as e:
        move_disk.MoveDisk(vm, "vm", "dst", spm=spm, poll_interval=0).run()

    assert e.value.code == code("ImageIsNotLegalChain")
    abort = [p for m, p in vm.params if m == "VM.diskReplicateFinish"]
    assert len(abort) == 1 and abort[0]["dstDisk"] == abort[0]["srcDisk"]
    assert dict(spm.params)["Image.delete"] == {
        "imageID": "img", "storagepoolID": "pool", "storagedomainID": "dst"}
    assert "Volume.setLegality" not in spm.calls
    assert "Image.delete" not in vm.calls and "VM.diskReplicateFinish" not in spm.calls


def test_flow_retries_a_pivot_while_libvirtd_is_away_then_gives_up(monkeypatch):
    monkeypatch.setattr(move_disk.MoveDisk, "_sleep", lambda self, seconds: None)
    gone = client_errors.ClientError(code("LibvirtConnectionError"), "libvirtd away")
    # Away for two Finish calls (each waited for by the daemon): the third pivots.
    ready = disk_stats("src", {"state": "ready", "cur": 5, "end": 5})
    vm = vm_host(spm_status("Free", 1), **{
        "VM.diskReplicateFinish": [gone, gone, True],
        "VM.getStats": [disk_stats("src"), ready, ready, ready, disk_stats("dst")]})
    summary = move_disk.MoveDisk(vm, "vm", "dst", spm=spm_host(), poll_interval=0).run()
    assert summary["dstDomainID"] == "dst"
    assert vm.calls.count("VM.diskReplicateFinish") == 3

    # Away for good: PIVOT_RETRIES retries, then the move fails with 3402 and
    # rolls back (its abort is another Finish, failing the same way).
    vm = vm_host(spm_status("Free", 1), **{"VM.diskReplicateFinish": [gone],
                                           "VM.getStats": [disk_stats("src"), ready]})
    spm = spm_host()
    with pytest.raises(client_errors.ClientError) as e:
        move_disk.MoveDisk(vm, "vm", "dst", spm=spm, poll_interval=0).run()
    assert e.value.code == code("LibvirtConnectionError")
    pivots = [p for m, p in vm.params if m == "VM.diskReplicateFinish"
              and p["dstDisk"] != p["srcDisk"]]
    assert len(pivots) == move_disk.PIVOT_RETRIES + 1
    assert "Volume.setLegality" not in spm.calls


def test_flow_keeps_the_destination_when_the_rollback_cannot_abort_the_mirror(tmp_path):
    failed = dict(DONE, taskResult="cleanFailure", code=code("ImageIsNotLegalChain"),
                  message="boom")
    refused = client_errors.ClientError(code("replicaErr"), "cannot abort")
    vm = vm_host(spm_status("Free", 1), **{
        "VM.getStats": [disk_stats("src"),
                        disk_stats("src", {"state": "copying", "cur": 1, "end": 5})],
        "VM.diskReplicateFinish": [refused]})
    spm = spm_host(**{"Task.getStatus": [DONE, DONE, failed, DONE]})
    j = journal.Journal(str(tmp_path), "vm", "vda")

    with pytest.raises(client_errors.ClientError) as e:
        move_disk.MoveDisk(vm, "vm", "dst", spm=spm, poll_interval=0, journal=j).run()

    assert e.value.code == code("ImageIsNotLegalChain")
    # QEMU may still have the replica open: its image is not deleted, and
    # the journal stays for a run that can abort the mirror.
    assert "VM.diskReplicateFinish" in vm.calls and "Image.delete" not in spm.calls
    assert journal.all_records(str(tmp_path)) != []


def test_flow_reports_a_failed_set_legality_without_rolling_back_the_pivot():
    refused = client_errors.ClientError(code("SpmStatusError"), "Not SPM")
    vm, spm = vm_host(spm_status("Free", 1)), spm_host(**{"Volume.setLegality": [refused]})

    with pytest.raises(client_errors.ClientError) as e:
        move_disk.MoveDisk(vm, "vm", "dst", spm=spm, poll_interval=0).run()

    assert e.value.code == code("SpmStatusError") and "pivot is done" in e.value.message
    assert "Image.delete" not in spm.calls and "StorageDomain.getImages" not in spm.calls
    assert [p["dstDisk"]["domainID"] for m, p in vm.params
            if m == "VM.diskReplicateFinish"] == ["dst"]


# Killed for real at each step, then run again (the journal: vdsm_lsm/journal.py)

KILL_STEPS = ["started", "leaf_submitted", "snapshot", "clone_submitted", "cloned",
              "mirror_started", "sync_submitted", "synced", "pivoted", "legal", "verified",
              "delete_submitted"]


def assert_only_on(site: Site, vm: Any, img: str, sd_id: str) -> None:  # noqa: F811
    """The drive runs on sd_id, the image is there only, nothing is left behind."""
    other = site.dst_sd if sd_id == site.src_sd else site.src_sd
    stats = move_disk.vm_stats(site.call("VM.getStats", vmID=vm.vm_id))
    disk = stats["disks"]["vda"]
    assert stats["status"] == "Up" and disk["domainID"] == sd_id and "replicate" not in disk
    assert site.call("StorageDomain.getImages", storagedomainID=sd_id) == [img]
    assert site.call("StorageDomain.getImages", storagedomainID=other) == []
    vols = site.call("StorageDomain.getVolumes", storagedomainID=sd_id,
                     storagepoolID=site.pool_id, imageID=img)
    assert sorted(vols) == sorted(v["volumeID"] for v in disk["volumeChain"])
    for vol in vols:
        info = site.call("Volume.getInfo", storagepoolID=site.pool_id, storagedomainID=sd_id,
                         imageID=img, volumeID=vol)
        assert info["legality"] == "LEGAL", (vol, info)
    assert site.call("Host.getAllTasksInfo") == {}
    assert os.listdir(site.state_dir) == []  # no journal, no lock file
    links = os.path.join(site.daemon.run_dir, "storage", other, img)
    assert not os.path.exists(links) or os.listdir(links) == [], os.listdir(links)


def test_move_disk_killed_at_every_step_and_run_again_finishes(site, vm_params):  # noqa: F811
    img, base, leaf = new_id(), new_id(), new_id()
    site.create_volume(img, base, "RAW")
    site.create_volume(img, leaf, "COW", parent=base)
    vm = start_guest(site, vm_params, img, leaf)
    on = site.src_sd
    for step in KILL_STEPS:
        to = site.dst_sd if on == site.src_sd else site.src_sd
        args = (vm.vm_id, to, "--delete-source", "--timeout", "300")
        site.move_disk_killed_after(step, *args)

        proc = site.move_disk(*args)

        assert proc.returncode == 0, (step, proc.stderr)
        summary = json.loads(proc.stdout)
        assert summary["resumed"] is True and summary["dstDomainID"] == to, step
        assert_only_on(site, vm, img, to)
        on = to
        vm.wait_acks(vm.acks() + 5)

    chain = [v["volumeID"] for v in move_disk.vm_stats(
        site.call("VM.getStats", vmID=vm.vm_id))["disks"]["vda"]["volumeChain"]]
    site.call("VM.destroy", vmID=vm.vm_id)
    result = verifier.verify(vm.serial_log, site.volume_path(on, img, chain[-1]),
                             image_format="qcow2")
    assert result.ok and result.lost == 0, str(result)


def test_a_mirror_that_does_not_converge_is_restarted_write_blocking(site, vm_params):  # noqa: F811
    img, base, leaf = new_id(), new_id(), new_id()
    site.create_volume(img, base, "RAW")
    site.create_volume(img, leaf, "COW", parent=base)
    vm = start_guest(site, vm_params, img, leaf)

    # 1 MiB/s while the guest dirties ~3 MiB/s: the background mirror cannot
    # get there; after 5 s without progress it is restarted write-blocking.
    proc = site.move_disk(vm.vm_id, site.dst_sd, "--bandwidth", "1", "--stall-timeout", "5",
                          "--timeout", "300")

    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["syncWrites"] is True
    assert "not converging" in proc.stderr and "write-blocking" in proc.stderr
    assert " MiB/s" in proc.stderr  # the rate on the progress line
    vm.wait_acks(vm.acks() + 10)
    site.call("VM.destroy", vmID=vm.vm_id)
    result = verifier.verify(vm.serial_log,
                             site.volume_path(site.dst_sd, img, summary["volumeChain"][-1]),
                             image_format="qcow2")
    assert result.ok and result.lost == 0, str(result)
