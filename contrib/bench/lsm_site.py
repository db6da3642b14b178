"""What contrib/bench/bench_lsm.py runs on: one daemon, a file and a thin block domain,
the writing test guest, and move-disk timed from the guest's side.

:class:`Site` is one vdsm-lsm daemon (:mod:`tests.cluster.hosts`: local
lock, loop activation) that is the SPM of a pool of a file domain (the
master) and a thin block domain on a loop device over a sparse file of its
own.  :meth:`Site.boot` runs the test guest (TCG) on a new image (RAW base
+ COW leaf) of the file domain; :meth:`Site.move` moves its drive to the
other domain with :class:`vdsm_lsm.move_disk.MoveDisk` (``delete_source``:
the image can move back) through a :class:`TimedRPC`.  A
:class:`ReadyWatch` polls ``VM.getStats`` for the moment libvirt calls a
mirror ready.

The guest's I/O gap at the pivot is the largest interval between
consecutive ACKs (guest clock, :func:`contrib.guest.verifier.largest_gap_ms`)
from :data:`MARGIN` ACKs before ``VM.diskReplicateFinish`` was called to
:data:`MARGIN` after it returned; the guest's own jitter, the baseline, is
the largest gap in as many ACKs just before that window.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import threading
import time
import uuid
from typing import Any

from contrib import guest
from contrib.guest import verifier
from tests.cluster import hosts
from vdsm_lsm import client, client_errors, move_disk

MiB = 1024**2
GiB = 1024**3
BLANK = "00000000-0000-0000-0000-000000000000"
BOOT_TIMEOUT = 180.0
MARGIN = 3  # ACKs before the pivot call and after it returns counted in its window
PV_SIZE = 8 * GiB
POLL = 0.05  # ReadyWatch's VM.getStats period
# A thin COW volume starts at min(chunk, 1.1 * capacity): no extension on
# these disks (extension is bench_thinp's subject).
CONFIG: dict[str, dict[str, Any]] = {"irs": {"volume_utilization_chunk_mb": 1024}}


def new_id() -> str:
    return str(uuid.uuid4())


@dataclasses.dataclass
class Guest:
    vm_id: str
    serial_log: str
    img: str
    leaf: str
    sd: str  # the domain its drive runs on now

    def acks(self) -> list[verifier.Ack]:
        return verifier.parse_log(self.serial_log).acks


@dataclasses.dataclass
class Move:
    """One move-disk, as seen from the caller and from the guest."""

    src: str  # "file" or "block"
    dst: str
    gap: int  # the guest's largest ACK gap around the pivot (ms); -1: no pivot
    jitter: int  # the same over as many ACKs just before (ms)
    sync_writes: bool
    error: str = ""  # why the move failed (it rolled back)


class TimedRPC:
    """A transport that notes the guest's ACKs around the pivot call.

    pivot_delay: seconds to wait before the pivot call (a flow slow to pivot).
    """

    def __init__(self, rpc: move_disk.Transport, serial_log: str, pivot_delay: float = 0.0):
        self._rpc = rpc
        self._serial_log = serial_log
        self.pivot_delay = pivot_delay
        self.pivot: tuple[int, int] | None = None  # ACKs before, after

    def _acks(self) -> int:
        return len(verifier.parse_log(self._serial_log).acks)

    def call(self, method: str, **params: Any) -> Any:
        pivot = (method == "VM.diskReplicateFinish"
                 and params["dstDisk"]["domainID"] != params["srcDisk"]["domainID"])
        if pivot and self.pivot_delay:
            time.sleep(self.pivot_delay)
        before = self._acks() if pivot else 0
        result = self._rpc.call(method, **params)
        if pivot:
            self.pivot = (before, self._acks())
        return result


class ReadyWatch:
    """Polls VM.getStats: when did the drive's mirror last become ready."""

    def __init__(self, socket_path: str, vm_id: str, drive: str = "vda") -> None:
        self._rpc = client.Client(socket_path=socket_path, timeout=60)
        self._vm_id, self._drive = vm_id, drive
        self._stop = threading.Event()
        self.samples: list[tuple[float, str]] = []  # (monotonic, state or "")
        self._thread = threading.Thread(target=self._run, name="ready-watch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                stats = self._rpc.call("VM.getStats", vmID=self._vm_id)[0]
                rep = stats["disks"][self._drive].get("replicate") or {}
                self.samples.append((time.monotonic(), rep.get("state", "")))
            except (client_errors.ClientError, OSError, KeyError):
                pass
            self._stop.wait(POLL)

    def ready_after(self, start: float) -> float | None:
        """Seconds from start to the first sample saying ready, None if none did."""
        for t, state in self.samples:
            if t >= start and state == "ready":
                return t - start
        return None

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self._rpc.close()


class Site:
    def __init__(self, work: str, config: dict[str, dict[str, Any]] | None = None) -> None:
        self.work = work
        self.loops: list[str] = []
        self.vms: list[str] = []
        self.art = guest.ensure_built()
        self.cluster = hosts.Cluster(work, self._loop_device, self._no_shim)
        self.host = self.cluster.add_host(hosts.LOCAL, config=config or CONFIG)
        self.ids = self.cluster.create_pool(self.host)
        self.names = {self.ids.file_sd: "file", self.ids.block_sd: "block"}

    def _loop_device(self) -> str:
        path = os.path.join(self.work, f"pv-{len(self.loops)}.img")
        with open(path, "wb") as f:
            f.truncate(PV_SIZE)
        dev = subprocess.run(["losetup", "--find", "--show", path], check=True,
                             capture_output=True, text=True, timeout=60).stdout.strip()
        self.loops.append(dev)
        return dev

    def _no_shim(self) -> str:
        raise RuntimeError("no sanlock here: the host uses the local lock")

    def call(self, method: str, **params: Any) -> Any:
        return self.host.call(method, **params)

    def task(self, task_id: str) -> None:
        status = self.host.wait_task(task_id, timeout=600)
        assert status["taskResult"] == "success", status
        self.call("Task.clear", taskID=task_id)

    def create_volume(self, sd: str, img: str, vol: str, size: int, fmt: str,
                      parent: str = BLANK, preallocate: str = "SPARSE") -> None:
        self.task(self.call(
            "Volume.create", storagepoolID=self.ids.pool_id, storagedomainID=sd, imageID=img,
            volumeID=vol, size=size, volFormat=fmt, preallocate=preallocate, desc="bench",
            srcImgUUID=img if parent != BLANK else BLANK, srcVolUUID=parent))

    def delete_image(self, sd: str, img: str) -> None:
        self.task(self.call("Image.delete", imageID=img, storagepoolID=self.ids.pool_id,
                            storagedomainID=sd))

    def file_path(self, img: str, vol: str) -> str:
        """A volume of the file domain, as the daemon keeps it."""
        return os.path.join(self.cluster.file_dir, self.ids.file_sd[:8], self.ids.file_sd,
                            "images", img, vol)

    def boot(self, rate: int, size: int = 64 * MiB, wait_acks: int = 50, prefill_mb: int = 0,
             **writer: Any) -> Guest:
        """The test guest on a new image of the file domain, writing rate/s (0: flat out).

        prefill_mb: the leaf holds that much data (from its start) before the guest boots.
        """
        img, base, leaf = new_id(), new_id(), new_id()
        self.create_volume(self.ids.file_sd, img, base, size, "RAW")
        self.create_volume(self.ids.file_sd, img, leaf, size, "COW", parent=base)
        if prefill_mb:
            subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -P 0x5a 0 {prefill_mb}M",
                            self.file_path(img, leaf)], check=True, capture_output=True,
                           timeout=300)
        vm_id = new_id()
        serial_log = os.path.join(self.work, f"serial-{vm_id[:8]}.log")
        writer.setdefault("span_mb", 16)
        params = {
            "vmName": f"lsmbench-lsm-{vm_id[:8]}", "memSize": 128, "smp": 1, "accel": "tcg",
            "kernel": self.art.kernel, "initrd": self.art.initrd,
            "kernelArgs": guest.kernel_args(rate=rate, **writer), "serialLog": serial_log,
            "drives": [{"poolID": self.ids.pool_id, "domainID": self.ids.file_sd,
                        "imageID": img, "volumeID": leaf, "format": "cow"}],
        }
        self.call("VM.create", vmID=vm_id, vmParams=params)
        self.vms.append(vm_id)
        verifier.wait_for_acks(serial_log, wait_acks, timeout=BOOT_TIMEOUT)
        return Guest(vm_id, serial_log, img, leaf, self.ids.file_sd)

    def other(self, sd: str) -> str:
        return self.ids.block_sd if sd == self.ids.file_sd else self.ids.file_sd

    def move(self, g: Guest, sync_writes: str = "auto", timeout: float = 600.0,
             pivot_delay: float = 0.0) -> Move:
        """Move g's drive to the other domain (deleting the source); the
        guest's ACK gap at the pivot.  A move that fails rolls back: the VM
        stays where it was, the Move says why."""
        dst = self.other(g.sd)
        rpc = self.host.rpc(timeout=300)
        timed = TimedRPC(rpc, g.serial_log, pivot_delay)
        error = ""
        try:
            summary = move_disk.MoveDisk(
                timed, g.vm_id, dst, delete_source=True, timeout=timeout, poll_interval=0.1,
                sync_writes=sync_writes).run()
        except client_errors.ClientError as e:
            error, summary = f"{e.code}: {e.message}", {}
        finally:
            rpc.close()
        src = self.names[g.sd]
        gap = jitter = -1
        if timed.pivot is not None and not error:
            g.sd = dst
            gap, jitter = self.pivot_gap(g, *timed.pivot)
        return Move(src, self.names[dst], gap, jitter,
                    bool(summary.get("syncWrites", sync_writes == "on")), error)

    def pivot_gap(self, g: Guest, before: int, after: int) -> tuple[int, int]:
        """The largest ACK gap around the pivot call, and the guest's jitter before it."""
        acks = verifier.wait_for_acks(g.serial_log, after + MARGIN + 1, timeout=60).acks
        lo, hi = max(before - MARGIN, 1), after + MARGIN + 1
        width = hi - lo + 1
        return (verifier.largest_gap_ms(acks[lo - 1: hi]),
                verifier.largest_gap_ms(acks[max(lo - width, 0): lo]))

    def destroy(self, g: Guest) -> None:
        self.call("VM.destroy", vmID=g.vm_id)
        self.vms.remove(g.vm_id)
        self.delete_image(g.sd, g.img)

    def close(self) -> None:
        for vm_id in self.vms:
            try:
                self.call("VM.destroy", vmID=vm_id)
            except (client_errors.ClientError, OSError) as e:
                print(f"clean-up: cannot destroy {vm_id}: {e}")
        self.cluster.close()
        for dev in self.loops:
            subprocess.run(["losetup", "-d", dev], capture_output=True, timeout=60)
