"""Thin volumes across hosts: the storage mailbox between real daemons.

Host 1 creates the pool (file master: the mailbox is its ``dom_md/inbox``
and ``outbox``; a block domain for thin volumes) and is SPM; host 2 joins
and runs the test guest, whose watermark monitor extends through the
mailbox (storage/mailbox*.py).  Every host uses the local lock
(``cluster_lock="local"``: these tests are not about the lock) and the
machine's libvirtd (only host 2 runs a VM).  The chunk is small (16 MiB,
32 MiB while mirroring a guest writing flat out) so extensions happen.

- the guest on host 2 fills a thin COW volume: every extension runs on
  host 1 (its log has the lvextend and the mailbox reply), host 2 runs no
  lvextend, the VM never pauses, the verifier loses nothing;
- live storage migration to a block domain with the guest writing flat
  out (``lsm.rate=0``) on host 2, ``move-disk --spm`` host 1: from a file
  domain (only the replica, the destination leaf, needs room: it grows
  through the mailbox as the source's data does) and from another block
  domain (the replica first, then the source, to the same size, each time:
  the order of the SPM's log); 0 pauses, 0 lost;
- host 1 killed (kill -9) while host 2's requests wait: host 3 becomes SPM
  and serves the very requests that were waiting (host 2 resent them, the
  same request ids); the guest, paused on ENOSPC meanwhile, is resumed;
- a corrupt (torn) message in a slot: the SPM logs and ignores it, nothing
  is extended, and the sender's resend is served.  The sender is this test
  process as host 9, with the product's client (HsmMailbox) over the
  master's files and its first write torn on purpose.

The latencies host 2 measured are printed (``-s``).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from contrib.guest import verifier
from storage import mailbox, mailbox_hsm
from tests.cluster import conftest, hosts, spm_util
from tests.storage import image_env
from tests.virt.conftest import domains, guest_files, vm_params, workdir  # noqa: F401
from vdsm_lsm import client

pytestmark = [pytest.mark.root, pytest.mark.libvirt, pytest.mark.guest,
              conftest.requires_root, pytest.mark.timeout(600)]

MiB = 1024**2
BLANK = "00000000-0000-0000-0000-000000000000"
TOP = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WAIT = 120.0
CONFIG = {"irs": {"volume_utilization_chunk_mb": 16, "volume_utilization_percent": 50}}
# Mirroring a guest that writes flat out (30-40 MiB/s under TCG): a 32 MiB
# watermark (a whole chunk) covers the ~0.45 s of a replica + source pair
# with room for a monitor delayed by the machine's load (24 MiB was too
# tight: twice in full runs on a briefly busy machine the guest filled its
# leaf first and paused).  Host 1 copies the base at 8 MiB/s, so the mirror
# lasts the ~6 s syncData takes.
LSM_CONFIG = {"irs": {"volume_utilization_chunk_mb": 32, "volume_utilization_percent": 100}}
COPY_RATE = {"irs": {"copy_rate_limit_mb": 8}}
BASE_DATA = "write -P 0x5a 0 48M"
PAUSED = "VM paused on I/O error"


def new_id() -> str:
    return hosts.new_id()


def read_log(host: hosts.ClusterHost) -> str:
    with open(host.daemon.log_path, errors="replace") as f:
        return f.read()


def wait_until(predicate: Any, what: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def done_lines(host: hosts.ClusterHost, vol_id: str) -> list[dict[str, str]]:
    """host's "Mailbox extension done" lines for vol_id, as key=value dicts."""
    found = []
    for line in read_log(host).splitlines():
        if "Mailbox extension done" in line and f"vol={vol_id}" in line:
            found.append(dict(re.findall(r"(\w+)=(\S+)", line)))
    return found


def spm_replies(host: hosts.ClusterHost, vol_id: str) -> list[tuple[str, int]]:
    """(sd, requested size) of the SPM's mailbox replies for vol_id, in order."""
    found = []
    for line in read_log(host).splitlines():
        if "Mailbox reply" in line and f"vol={vol_id}" in line and "status=ok" in line:
            fields = dict(re.findall(r"(\w+)=(\S+)", line))
            found.append((fields["sd"], int(fields["requested"])))
    return found


def report(title: str, lines: list[dict[str, str]]) -> None:
    totals = sorted(float(d["total"]) for d in lines)
    if totals:
        print(f"\n{title}: {len(totals)} extensions through the mailbox, total "
              f"p50 {totals[len(totals) // 2]:.3f}s max {totals[-1]:.3f}s; "
              + "; ".join(f"{d['total']}s (wait {d['spm_wait']} spm {d['spm_work']} "
                          f"reply {d['reply_wait']})" for d in lines))


def merge(config: dict[str, dict[str, Any]],
          extra: dict[str, dict[str, Any]] | None) -> dict[str, dict[str, Any]]:
    merged = {s: dict(v) for s, v in config.items()}
    for section, values in (extra or {}).items():
        merged.setdefault(section, {}).update(values)
    return merged


class Site:
    """Host 1 (pool, SPM), host 2 (joined, runs the VM), optional host 3."""

    def __init__(self, cluster: hosts.Cluster, config: dict[str, dict[str, Any]],
                 hsm_config: dict[str, dict[str, Any]] | None = None, third: bool = False,
                 spm_config: dict[str, dict[str, Any]] | None = None,
                 second_block: bool = False) -> None:
        self.cluster = cluster
        self.spm = cluster.add_host(hosts.LOCAL, config=merge(config, spm_config))
        self.hsm = cluster.add_host(hosts.LOCAL, config=merge(config, hsm_config))
        self.third = cluster.add_host(hosts.LOCAL, config=config) if third else None
        self.ids = cluster.create_pool(self.spm)
        self.extra_block = ""
        if second_block:  # a second block domain, attached before the others join
            self.extra_block = new_id()
            self.spm.call("StorageDomain.create", storagedomainID=self.extra_block,
                          domainType="block", typeArgs={"devices": [cluster.block_device()]},
                          name="mailbox-block-2")
            self.spm.call("StoragePool.attachStorageDomain", storagepoolID=self.pool_id,
                          storagedomainID=self.extra_block)
        self.joined: dict[hosts.ClusterHost, spm_util.Connections] = {}
        for host in (self.hsm, self.third):
            if host is not None:
                self.joined[host] = spm_util.join(cluster, host, self.ids)
        self.vms: list[str] = []

    @property
    def pool_id(self) -> str:
        return self.ids.pool_id

    def create_volume(self, sd_id: str, img_id: str, vol_id: str, fmt: str, size: int,
                      parent: str = BLANK) -> None:
        block = sd_id != self.ids.file_sd
        task = self.spm.call(
            "Volume.create", storagepoolID=self.pool_id, storagedomainID=sd_id, imageID=img_id,
            volumeID=vol_id, size=size, volFormat=fmt,
            preallocate="PREALLOCATED" if fmt == "RAW" and block else "SPARSE",
            desc="mailbox", srcImgUUID=img_id if parent != BLANK else BLANK, srcVolUUID=parent)
        assert self.spm.wait_task(task)["taskResult"] == "success"
        self.spm.call("Task.clear", taskID=task)

    def start_guest(self, vm_params: Any, sd_id: str, img_id: str, vol_id: str,  # noqa: F811
                    **writer: Any) -> Any:
        drive = {"poolID": self.pool_id, "domainID": sd_id, "imageID": img_id,
                 "volumeID": vol_id, "format": "cow"}
        vm = vm_params([drive], **writer)
        self.hsm.call("VM.create", vmID=vm.vm_id, vmParams=vm.params)
        self.vms.append(vm.vm_id)
        vm.wait_acks(10)
        return vm

    def disk(self) -> dict[str, Any]:
        stats = self.hsm.call("VM.getStats", vmID=self.vms[-1])
        stats = stats[0] if isinstance(stats, list) else stats
        return dict(stats["disks"]["vda"], status=stats["status"], pauseCode=stats["pauseCode"])

    def write(self, sd_id: str, img_id: str, vol_id: str, op: str) -> None:
        """qemu-io on a RAW volume, prepared on the SPM."""
        args = {"storagepoolID": self.pool_id, "storagedomainID": sd_id, "imageID": img_id,
                "volumeID": vol_id}
        path = self.spm.call("Image.prepare", **args)["path"]
        try:
            image_env.qemu_io(path, "raw", op)
        finally:
            self.spm.call("Image.teardown", **args)

    def size(self, host: hosts.ClusterHost, sd_id: str, img_id: str, vol_id: str) -> int:
        info = host.call("Volume.getInfo", storagepoolID=self.pool_id, storagedomainID=sd_id,
                         imageID=img_id, volumeID=vol_id)
        return int(info["apparentsize"])

    def verify(self, host: hosts.ClusterHost, vm: Any, sd_id: str, img_id: str,
               vol_id: str) -> verifier.Result:
        prep = host.call("Image.prepare", storagepoolID=self.pool_id, storagedomainID=sd_id,
                         imageID=img_id, volumeID=vol_id)
        try:
            return verifier.verify(vm.serial_log, prep["path"], image_format="qcow2")
        finally:
            host.call("Image.teardown", storagepoolID=self.pool_id, storagedomainID=sd_id,
                      imageID=img_id, volumeID=vol_id)

    def destroy_vms(self) -> None:
        for vm_id in self.vms:
            try:
                self.hsm.call("VM.destroy", vmID=vm_id)
            except (client.ClientError, OSError):
                pass
        self.vms.clear()

    def close(self) -> None:
        """VMs destroyed, joined hosts gone, the second block domain detached
        and formatted (the cluster destroys the pool and formats its own)."""
        self.destroy_vms()
        for host, connections in self.joined.items():
            spm_util.leave(host, self.ids, connections)
        self.joined.clear()
        if self.extra_block:
            for method, params in (
                    ("StoragePool.detachStorageDomain", {"storagepoolID": self.pool_id,
                                                         "storagedomainID": self.extra_block}),
                    ("StorageDomain.format", {"storagedomainID": self.extra_block})):
                try:
                    self.spm.call(method, **params)
                except (client.ClientError, OSError) as e:
                    print(f"clean-up {method}: {e}")


@pytest.fixture
def site_factory(cluster: hosts.Cluster, domains: list[str]  # noqa: F811
                 ) -> Iterator[Any]:
    made: list[Site] = []

    def make(*args: Any, **kw: Any) -> Site:
        s = Site(cluster, *args, **kw)
        made.append(s)
        return s

    try:
        yield make
    finally:
        for s in made:
            s.close()


def test_guest_on_host2_fills_a_thin_volume_extended_through_the_mailbox(
    site_factory: Any, vm_params: Any,  # noqa: F811
) -> None:
    """Lock: local."""
    site = site_factory(CONFIG)
    block, img, vol = site.ids.block_sd, new_id(), new_id()
    site.create_volume(block, img, vol, "COW", 64 * MiB)
    start = site.size(site.spm, block, img, vol)
    vm = site.start_guest(vm_params, block, img, vol, rate=150, span_mb=56, pattern="seq")

    wait_until(lambda: site.disk()["apparentsize"] >= 64 * MiB, "the volume grown to 64 MiB")
    vm.wait_acks(vm.acks() + 20)
    disk = site.disk()
    assert (disk["status"], disk["pauseCode"]) == ("Up", "NOERR")
    site.destroy_vms()

    hsm_log, spm_log = read_log(site.hsm), read_log(site.spm)
    done = done_lines(site.hsm, vol)
    report("thin volume on host 2", done)
    assert len(done) >= 3 and all(d["attempts"] == "1" for d in done)
    # Every extension ran on host 1: its lvextend, its mailbox reply.
    assert len(spm_replies(site.spm, vol)) == len(done)
    assert f"Extending volume sd={block} img={img} vol={vol}" in spm_log
    assert f"vol={vol}" not in "\n".join(
        line for line in hsm_log.splitlines() if "Extending volume" in line)
    # Host 2 refreshed its own device after each reply; the VM never paused.
    assert hsm_log.count(f"which=source sd={block} img={img} vol={vol}") >= len(done)
    assert PAUSED not in hsm_log
    assert site.size(site.spm, block, img, vol) >= 64 * MiB > start
    result = site.verify(site.spm, vm, block, img, vol)
    assert result.ok and result.lost == 0 and result.verified > 0, str(result)


@pytest.mark.parametrize("src_kind", ["file", "block"], ids=["file-block", "block-block"])
def test_lsm_to_block_with_the_guest_writing_flat_out_on_host2(
    site_factory: Any, vm_params: Any, src_kind: str,  # noqa: F811
) -> None:
    """Lock: local.  move-disk against host 2 with --spm host 1; the
    replica on a block domain grows through the mailbox while QEMU mirrors
    into it, from a file leaf (only the replica grows) or from a thin block
    leaf (replica first, then the source, each time)."""
    site = site_factory(LSM_CONFIG, spm_config=COPY_RATE, second_block=src_kind == "block")
    if src_kind == "file":
        src, dst = site.ids.file_sd, site.ids.block_sd
    else:
        src, dst = site.ids.block_sd, site.extra_block
    img, base, leaf = new_id(), new_id(), new_id()
    site.create_volume(src, img, base, "RAW", 256 * MiB)
    site.write(src, img, base, BASE_DATA)
    site.create_volume(src, img, leaf, "COW", 256 * MiB, parent=base)
    vm = site.start_guest(vm_params, src, img, leaf, rate=0, span_mb=224, pattern="seq")

    argv = [sys.executable, "-m", "vdsm_lsm.cli", "--socket", site.hsm.socket_path,
            "move-disk", vm.vm_id, dst, "--timeout", "300", "--spm", site.spm.socket_path]
    proc = subprocess.run(argv, cwd=TOP, capture_output=True, text=True, timeout=600)
    print(f"$ {' '.join(argv)}\nrc={proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    assert proc.returncode == 0, proc.stderr
    disk = site.disk()
    assert disk["domainID"] == dst and "replicate" not in disk
    new_leaf = disk["volumeID"]
    assert [v["volumeID"] for v in disk["volumeChain"]] == [base, leaf, new_leaf]
    vm.wait_acks(vm.acks() + 30)
    disk = site.disk()
    assert (disk["status"], disk["pauseCode"]) == ("Up", "NOERR")
    site.destroy_vms()

    hsm_log = read_log(site.hsm)
    replicas = [line for line in hsm_log.splitlines()
                if "Extended vm=" in line and "which=replica" in line and f"vol={new_leaf}" in line]
    done = done_lines(site.hsm, new_leaf)
    replies = spm_replies(site.spm, new_leaf)  # the SPM's order
    report(f"{src_kind} -> block, flat out", done)
    print(f"{len(replicas)} replica extensions; the SPM's order: "
          + ", ".join(f"{'replica' if sd == dst else 'source'} {size // MiB}M"
                      for sd, size in replies))
    assert len(replicas) >= 4, replicas
    assert len(replies) == len(done) >= len(replicas)
    first = [sd for sd, _ in replies].index(dst)  # the mirror starts
    if src_kind == "file":
        # The source (a file) needs no extension: every one is the replica's.
        assert {sd for sd, _ in replies[first:]} == {dst}
        assert [s for _, s in replies] == sorted(s for _, s in replies)
    else:
        # Each extension of the source while mirroring came after one of the
        # replica to at least the same size.
        during = [(i, size) for i, (sd, size) in enumerate(replies) if sd == src and i > first]
        assert during, replies
        for i, size in during:
            assert any(sd == dst and n >= size for sd, n in replies[first:i]), replies
    assert PAUSED not in hsm_log
    result = site.verify(site.spm, vm, dst, img, new_leaf)
    assert result.ok and result.lost == 0 and result.verified > 0, str(result)


def test_spm_killed_with_requests_waiting_the_new_spm_serves_them(
    cluster: hosts.Cluster, site_factory: Any, vm_params: Any,  # noqa: F811
) -> None:
    """Lock: local (the kernel drops a dead process's fcntl lock: host 3
    takes over at once)."""
    site = site_factory(CONFIG, hsm_config={"mailbox": {"request_timeout": 90}}, third=True)
    h1, h2, h3 = site.spm, site.hsm, site.third
    assert h3 is not None
    block, img, vol = site.ids.block_sd, new_id(), new_id()
    site.create_volume(block, img, vol, "COW", 128 * MiB)
    vm = site.start_guest(vm_params, block, img, vol, rate=0, span_mb=120, pattern="seq")
    wait_until(lambda: done_lines(h2, vol), "a first extension through host 1")

    killed_at = len(read_log(h2))
    h1.kill9()
    # Host 2's next request waits: written, resent, unanswered.
    wait_until(lambda: "No reply from the SPM yet, resending" in read_log(h2)[killed_at:],
               "a request of host 2 waiting for an SPM")
    waiting = re.findall(r"resending pool=\S+ host=2 slot=\d+ id=(\S+)", read_log(h2)[killed_at:])
    attempts = spm_util.wait_spm_start(h3, site.ids, timeout=WAIT)
    site.ids.host = h3  # the SPM destroys the pool at the end
    del site.joined[h3]

    wait_until(lambda: f"id={waiting[0]}" in read_log(h3), "host 3 reading the waiting request")
    wait_until(lambda: site.disk()["apparentsize"] >= 120 * MiB, "the volume grown on host 3")
    wait_until(lambda: site.disk()["status"] == "Up", "the VM up")
    vm.wait_acks(vm.acks() + 20)
    h3_log, h2_log = read_log(h3), read_log(h2)[killed_at:]
    served = [d for d in done_lines(h2, vol) if int(d["attempts"]) > 1]
    report("after host 1 was killed", served)
    print(f"spmStart on host 3: {attempts} attempt(s); waiting request ids {waiting}")
    assert served, "no request was served after being resent"
    assert re.search(rf"Mailbox reply pool=\S+ host=2 slot=\d+ id={waiting[0]} ", h3_log)
    if PAUSED in h2_log:  # out of room meanwhile: resumed once extended
        assert "Resumed vm=" in h2_log
    site.destroy_vms()
    result = site.verify(h3, vm, block, img, vol)
    assert result.ok and result.lost == 0, str(result)
    # Host 1 comes back as an HSM (its devices found again), then leaves.
    h1.restart()
    site.joined[h1] = []
    assert spm_util.spm_status(h1, site.ids)["spmStatus"] == "Free"


class TornFirstRequest(mailbox.Box):
    """The first write carrying a request keeps only the first 64 bytes of
    the request's sector (the rest stays zeros): a torn write."""

    torn = threading.Event()

    def write(self, first: int, data: bytes) -> None:
        if not self.torn.is_set() and mailbox.slot_of(data, 1) != mailbox.EMPTY:
            self.torn.set()
            region = bytearray(data)
            start = mailbox.SLOT_SIZE + 64
            region[start:2 * mailbox.SLOT_SIZE] = bytes(2 * mailbox.SLOT_SIZE - start)
            data = bytes(region)
        super().write(first, data)


def test_corrupt_message_is_ignored_and_the_resend_served(cluster: hosts.Cluster) -> None:
    """Lock: local.  Host 1 is SPM; host 9 is this process (the product's
    client over the master's dom_md/inbox and outbox)."""
    h1 = cluster.add_host(hosts.LOCAL, config=CONFIG)
    ids = cluster.create_pool(h1)
    img, vol = new_id(), new_id()
    task = h1.call("Volume.create", storagepoolID=ids.pool_id, storagedomainID=ids.block_sd,
                   imageID=img, volumeID=vol, size=64 * MiB, volFormat="COW",
                   preallocate="SPARSE", desc="", srcImgUUID=BLANK, srcVolUUID=BLANK)
    assert h1.wait_task(task)["taskResult"] == "success"

    def size() -> int:
        return int(h1.call("Volume.getInfo", storagepoolID=ids.pool_id,
                           storagedomainID=ids.block_sd, imageID=img,
                           volumeID=vol)["apparentsize"])

    before = size()
    md = spm_util.master_md(cluster, ids)
    ops = mailbox.local_ops()
    settings = mailbox.Settings(retry_interval=3.0, request_timeout=30.0)
    sender = mailbox_hsm.HsmMailbox(
        ids.pool_id, 9, TornFirstRequest(os.path.join(md, "inbox"), ops, 10.0),
        mailbox.Box(os.path.join(md, "outbox"), ops, 10.0), settings).start()
    out: list[Any] = []
    try:
        thread = threading.Thread(target=lambda: out.append(sender.extend_timed(
            ids.block_sd, img, vol, before + 16 * MiB)), daemon=True)
        thread.start()
        wait_until(lambda: "Ignoring corrupt mailbox message" in read_log(h1),
                   "the SPM ignoring the torn request", timeout=10)
        # Read, logged, not acted on: no request, no extension.
        log = read_log(h1)
        assert re.search(r"Ignoring corrupt mailbox message pool=\S+: host=9 slot=1: "
                         r"bad checksum", log), log[-2000:]
        assert "host=9" not in "".join(
            line for line in log.splitlines() if "Mailbox request" in line)
        assert size() == before and not out
        thread.join(WAIT)
    finally:
        sender.stop()
    result = out[0]
    assert isinstance(result, mailbox_hsm.Result), result
    assert result.attempts == 2 and result.size == before + 16 * MiB
    assert size() == before + 16 * MiB
    log = read_log(h1)
    assert log.count("Ignoring corrupt mailbox message") == 1
    assert re.search(rf"Mailbox reply pool=\S+ host=9 slot=1 id=\S+ sd={ids.block_sd} "
                     rf"img={img} vol={vol} requested={before + 16 * MiB} ", log)
