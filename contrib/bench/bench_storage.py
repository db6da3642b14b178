"""Benchmark: volume create, prepare + teardown of a chain, block volume extension.

Runs the real storage provider (``storage.api.StorageAPI``) in-process, with
a pool of a file domain (a directory under /var/tmp) and a block domain (a VG
on a loop device over a sparse file), this host SPM under the local cluster
lock, activation "auto" (loop mode without device-mapper).  Each operation is
measured with a baseline in the same run, interleaved run by run, and the
table shows medians and the ratio to the baseline:

- **Volume create** (a COW SPARSE volume of a new image; ``Volume.create``
  and its SPM task, waited for) against the bare commands it wraps: file,
  ``qemu-img create``; block, ``lvcreate`` + loop attach of the new LV +
  ``qemu-img create`` on it + detach.
- **Image.prepare + Image.teardown** of a 10-volume chain against the bare
  operations: file, read the 10 ``.meta`` files, make the 10 links, then
  remove them; block, one ``lvs`` of the VG, 10 loop attaches (offsets from
  that ``lvs``) and links, then 10 unlinks and detaches.
- **Extension** of a prepared block volume held open (like QEMU holds it),
  against a bare ``lvextend`` of a scratch LV in the same VG: the SPM's
  ``StorageAPI.extend`` (which also refreshes the device here), the HSM's
  ``StorageAPI.refresh`` after another host's ``lvextend``, and both.  The
  size the holder sees is checked after each.  The LVM-level breakdown
  (``lvs``, ``lvextend``, loop size-limit raise on a bare VG) is
  ``contrib/bench/bench_extend.py``'s table.

The ``cmds`` column is the number of external commands (``commands.run``)
per operation.  Everything made (loop devices, the VG, files under /var/tmp)
is removed at the end, also on failure or SIGTERM.

    .venv/bin/python -m contrib.bench.bench_storage [--runs N]
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import statistics
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from contrib.bench.bench_extend import timed
from storage import api as storage_api
from storage import (
    block_manifest,
    block_sd,
    block_volume,
    commands,
    file_sd,
    loop,
    lvm,
    lvm_model,
    qemuimg,
    sd,
    volume,
)
from tests.storage import conftest as storage_conftest
from tests.storage import domain_fixtures, domain_helpers

log = logging.getLogger("contrib.bench.bench_storage")

MiB = 1024**2
GiB = 1024**3
BLANK = volume.BLANK_UUID
EXTENT_MB = 128  # VDSM's default block extent size
CHUNK_MB = 128  # initial size and extension step of thin block volumes
OPTIONS: dict[str, Any] = {
    "chunk_mb": CHUNK_MB,
    "cluster_lock_mode": "local",
    "activation_mode": "auto",
    "block_extent_size_mb": EXTENT_MB,
    "task_workers": 2,
}
CAPACITY = 1 * GiB  # virtual size of the created volumes
EXTEND_CAPACITY = 8 * GiB  # room for 3 extensions per run
CHAIN_LENGTH = 10
PV_SIZE = 128 * GiB  # sparse: LVM metadata and qcow2 headers only

Row = tuple[str, str, float, int, float | None]  # domain, operation, seconds, cmds, ratio


# Counting external commands.


class CommandCounter:
    """Counts commands.run calls (from any thread) while installed."""

    def __init__(self) -> None:
        self.count = 0
        self._lock = threading.Lock()
        self._real = commands.run

    def __enter__(self) -> CommandCounter:
        real = self._real

        def counting(*args: Any, **kwargs: Any) -> Any:
            with self._lock:
                self.count += 1
            return real(*args, **kwargs)

        commands.run = counting  # type: ignore[assignment]
        return self

    def __exit__(self, *exc: object) -> None:
        commands.run = self._real  # type: ignore[assignment]


class Samples:
    """Durations and command counts of one operation."""

    def __init__(self, counter: CommandCounter) -> None:
        self.counter = counter
        self.seconds: list[float] = []
        self.cmds: list[int] = []

    def measure(self, fn: Callable[..., object], *args: object) -> None:
        before = self.counter.count
        self.seconds.append(timed(fn, *args))
        self.cmds.append(self.counter.count - before)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    def row(self, domain: str, name: str, baseline: Samples | None) -> Row:
        ratio = None if baseline is None else self.median / baseline.median
        return (domain, name, self.median, round(statistics.median(self.cmds)), ratio)


# The set-up: a pool of a file and a block domain.


class Env:
    def __init__(self, workdir: str) -> None:
        self.workdir = workdir
        self.provider: storage_api.StorageAPI | None = None
        self.pv_file = os.path.join(workdir, "pv.img")
        self.pv = ""
        self.pool_id = ""
        self.file_sd = str(uuid.uuid4())
        self.block_sd = str(uuid.uuid4())
        self.bare_loops: set[str] = set()  # baseline loop devices still attached
        self.fds: list[int] = []

    def setup(self) -> None:
        self.provider = storage_api.StorageAPI(os.path.join(self.workdir, "run"), **OPTIONS)
        mnt = os.path.join(self.workdir, "mnt")
        os.makedirs(mnt)
        self.provider.storage_domain_create(self.file_sd, sd.FILE, {"path": mnt}, "bench-file")
        with open(self.pv_file, "wb") as f:
            f.truncate(PV_SIZE)
        out = commands.run(["losetup", "--find", "--show", self.pv_file]).stdout
        self.pv = out.decode().strip()
        self.provider.storage_domain_create(
            self.block_sd, sd.BLOCK, {"devices": [self.pv]}, "bench-block"
        )
        self.pool_id = domain_helpers.make_pool(
            self.provider, self.file_sd, [self.file_sd, self.block_sd]
        )

    def cleanup(self) -> None:
        for fd in self.fds:
            os.close(fd)
        for dev in sorted(self.bare_loops):
            loop.detach(dev)
        if self.provider is not None:
            try:
                domain_fixtures.cleanup(self.provider)
            except Exception:
                log.exception("Storage clean-up failed")
        if self.pv:
            for child in storage_conftest.stacked_loop_devices(self.pv):
                log.error("Loop device %s left over %s", child, self.pv)
                commands.run(["losetup", "--detach", child], check=False)
            storage_conftest.wipe_lvm([self.pv])
            commands.run(["losetup", "--detach", self.pv], check=False)

    @property
    def api(self) -> storage_api.StorageAPI:
        assert self.provider is not None
        return self.provider

    def domain(self, sd_id: str) -> sd.StorageDomain:
        return self.api.domain(self.pool_id, sd_id)

    @property
    def block(self) -> block_sd.BlockDomain:
        dom = self.domain(self.block_sd)
        assert isinstance(dom, block_sd.BlockDomain)
        return dom

    def create_volume(self, sd_id: str, img_id: str, vol_id: str, parent: str = BLANK,
                      capacity: int = CAPACITY) -> str:
        """Volume.create as the engine calls it, waited for; returns the task id."""
        task_id = self.api.volume_create(
            self.pool_id, sd_id, img_id, vol_id, capacity, volume.COW, volume.SPARSE, "",
            img_id if parent != BLANK else BLANK, parent,
        )
        status = domain_helpers.run_task(self.api, task_id)
        if status["taskResult"] != "success":
            raise RuntimeError(f"Volume.create failed: {status}")
        return task_id

    def clear(self, task_id: str) -> None:
        self.api.task_clear(task_id)

    def pe_start(self) -> int:
        return self.api_lvm().vg_info(self.block_sd).pv(self.pv).pe_start

    def api_lvm(self) -> lvm.LVM:
        return self.block.lvm

    def free_range(self, extents: int) -> lvm_model.PERange:
        """Free extents no domain volume has reserved for its growth."""
        dom = self.block
        reserved = block_volume.reserved(dom.manifest.volume_lvs())
        return dom.lvm.find_free_range(dom.vg, extents, reserved=reserved)

    def attach(self, offset: int, size: int) -> str:
        dev = loop.attach(self.pv, offset=offset, sizelimit=size, direct_io=True)
        self.bare_loops.add(dev)
        return dev

    def detach(self, dev: str) -> None:
        loop.detach(dev)
        self.bare_loops.discard(dev)


# Volume create


def bench_create(env: Env, counter: CommandCounter, runs: int) -> list[Row]:
    bare_dir = os.path.join(env.workdir, "bare-create")
    os.makedirs(bare_dir)
    file_base, file_ours = Samples(counter), Samples(counter)
    block_base, block_ours = Samples(counter), Samples(counter)
    lvm_ = env.api_lvm()
    vg = env.block_sd
    extent = EXTENT_MB * MiB
    chunk_extents = block_manifest.extents(CHUNK_MB * MiB, extent)
    pe_start = env.pe_start()
    tasks: list[str] = []

    def file_bare(path: str) -> None:
        qemuimg.create(path, qemuimg.QCOW2, size=CAPACITY)

    def block_bare(rng: lvm_model.PERange) -> None:
        lvm_.lvcreate(vg, "bare", chunk_extents, pv_range=str(rng))
        dev = env.attach(pe_start + rng.first_pe * extent, chunk_extents * extent)
        qemuimg.create(dev, qemuimg.QCOW2, size=CAPACITY)
        env.detach(dev)

    def ours(sd_id: str) -> None:
        tasks.append(env.create_volume(sd_id, str(uuid.uuid4()), str(uuid.uuid4())))

    for i in range(runs):
        path = os.path.join(bare_dir, f"vol{i}")
        file_base.measure(file_bare, path)
        os.unlink(path)
        file_ours.measure(ours, env.file_sd)
        rng = env.free_range(chunk_extents)
        block_base.measure(block_bare, rng)
        lvm_.lvremove(vg, "bare")
        block_ours.measure(ours, env.block_sd)
    for task_id in tasks:
        env.clear(task_id)
    return [
        file_base.row("file", "qemu-img create (baseline)", file_base),
        file_ours.row("file", "Volume.create (verb + task)", file_base),
        block_base.row("block", "lvcreate+attach+qemu-img create (baseline)", block_base),
        block_ours.row("block", "Volume.create (verb + task)", block_base),
    ]


# Prepare + teardown of a chain


def make_chain(env: Env, sd_id: str) -> tuple[str, list[str]]:
    img_id = str(uuid.uuid4())
    vols = [str(uuid.uuid4()) for _ in range(CHAIN_LENGTH)]
    parent = BLANK
    for vol_id in vols:
        env.clear(env.create_volume(sd_id, img_id, vol_id, parent=parent))
        parent = vol_id
    return img_id, vols


def bench_chain(env: Env, counter: CommandCounter, runs: int) -> list[Row]:
    links = os.path.join(env.workdir, "bare-links")
    rows: list[Row] = []
    chains = {sd_id: make_chain(env, sd_id) for sd_id in (env.file_sd, env.block_sd)}
    fdom = env.domain(env.file_sd)
    assert isinstance(fdom, file_sd.FileDomain)
    bdom = env.block
    extent = EXTENT_MB * MiB
    pe_start = env.pe_start()

    def file_bare(img_id: str, vols: list[str]) -> None:
        img_dir = os.path.join(links, img_id)
        os.makedirs(img_dir)
        for v in vols:
            with open(fdom.manifest.meta_path(img_id, v), "rb") as f:
                f.read()
            os.symlink(fdom.manifest.volume_path(img_id, v), os.path.join(img_dir, v))
        for v in reversed(vols):
            os.unlink(os.path.join(img_dir, v))
        os.rmdir(img_dir)

    def block_bare(img_id: str, vols: list[str]) -> None:
        lvs = {lv.name: lv for lv in bdom.lvm.lvs(bdom.vg)}
        img_dir = os.path.join(links, img_id)
        os.makedirs(img_dir)
        devs = []
        for v in vols:
            seg = lvs[v].segments[0]
            dev = env.attach(pe_start + seg.first_pe * extent, lvs[v].size)
            devs.append(dev)
            os.symlink(dev, os.path.join(img_dir, v))
        for v, dev in zip(reversed(vols), reversed(devs), strict=True):
            os.unlink(os.path.join(img_dir, v))
            env.detach(dev)
        os.rmdir(img_dir)

    def ours(sd_id: str, img_id: str, top: str, pair: Samples, prep: Samples,
             down: Samples) -> None:
        before = counter.count
        start = time.monotonic()
        result = env.api.prepare(env.pool_id, sd_id, img_id, top)
        middle = time.monotonic()
        mid_count = counter.count
        env.api.teardown(env.pool_id, sd_id, img_id, top)
        end = time.monotonic()
        assert len(result["chain"]) == CHAIN_LENGTH, result
        assert env.api.images.refs(sd_id, img_id, top) == 0
        pair.seconds.append(end - start)
        pair.cmds.append(counter.count - before)
        prep.seconds.append(middle - start)
        prep.cmds.append(mid_count - before)
        down.seconds.append(end - middle)
        down.cmds.append(counter.count - mid_count)

    samples = {
        sd_id: [Samples(counter) for _ in range(4)] for sd_id in (env.file_sd, env.block_sd)
    }
    for _ in range(runs):
        for sd_id, bare in ((env.file_sd, file_bare), (env.block_sd, block_bare)):
            img_id, vols = chains[sd_id]
            base, pair, prep, down = samples[sd_id]
            base.measure(bare, img_id, vols)
            ours(sd_id, img_id, vols[-1], pair, prep, down)
    names = {
        env.file_sd: ("file", "read .meta + link, unlink (baseline)"),
        env.block_sd: ("block", "lvs + attach + link, unlink + detach (baseline)"),
    }
    for sd_id, (domain, base_name) in names.items():
        base, pair, prep, down = samples[sd_id]
        rows += [
            base.row(domain, base_name, base),
            pair.row(domain, "Image.prepare + Image.teardown", base),
            prep.row(domain, "  of which Image.prepare", None),
            down.row(domain, "  of which Image.teardown", None),
        ]
    return rows


# Extension of a block volume


def bench_extend(env: Env, counter: CommandCounter, runs: int) -> list[Row]:
    dom = env.block
    vg = dom.vg
    extent = EXTENT_MB * MiB
    chunk = CHUNK_MB * MiB
    img_id, vol_id = str(uuid.uuid4()), str(uuid.uuid4())
    env.clear(env.create_volume(env.block_sd, img_id, vol_id, capacity=EXTEND_CAPACITY))
    path = env.api.prepare(env.pool_id, env.block_sd, img_id, vol_id)["path"]
    try:
        fd = os.open(path, os.O_RDONLY)  # a holder, like QEMU
        env.fds.append(fd)
        seg = dom.lvm.lv_info(vg, vol_id).segments[0]
        rng = env.free_range(runs + 1)
        dom.lvm.lvcreate(vg, "scratch", 1, pv_range=lvm_model.pv_range(rng.pv, rng.first_pe,
                                                                 rng.first_pe))
        base, spm, hsm, both = (Samples(counter) for _ in range(4))
        size = os.lseek(fd, 0, os.SEEK_END)
        scratch = 1

        def bare() -> None:
            last = rng.first_pe + scratch - 1
            dom.lvm.lvextend(
                vg, "scratch", scratch, pv_range=lvm_model.pv_range(rng.pv, last, last)
            )

        def check(expected: int) -> None:
            seen = os.lseek(fd, 0, os.SEEK_END)
            if seen != expected:
                raise RuntimeError(f"holder sees {seen} bytes, expected {expected}")

        def extend(new_size: int) -> None:
            got = env.api.extend(env.pool_id, env.block_sd, img_id, vol_id, new_size)
            assert got == new_size, (got, new_size)

        def refresh() -> None:
            env.api.refresh(env.pool_id, env.block_sd, img_id, vol_id)

        def extend_and_refresh(new_size: int) -> None:
            extend(new_size)
            refresh()

        for _ in range(runs):
            scratch += 1
            base.measure(bare)
            size += chunk
            spm.measure(extend, size)
            check(size)
            # Another host (the SPM) extends; this host refreshes.
            size += chunk
            total = size // extent
            last = seg.first_pe + total - 1
            dom.lvm.lvextend(vg, vol_id, total, pv_range=lvm_model.pv_range(seg.pv, last, last))
            hsm.measure(refresh)
            check(size)
            size += chunk
            both.measure(extend_and_refresh, size)
            check(size)
        dom.lvm.lvremove(vg, "scratch")
    finally:
        for fd in env.fds:
            os.close(fd)
        env.fds.clear()
        env.api.teardown(env.pool_id, env.block_sd, img_id, vol_id)
    return [
        base.row("block", "lvextend of a scratch LV (baseline)", base),
        spm.row("block", "StorageAPI.extend (SPM, refreshes here)", base),
        hsm.row("block", "StorageAPI.refresh after SPM lvextend", base),
        both.row("block", "StorageAPI.extend + refresh", base),
    ]


# Report


def report(title: str, rows: list[Row]) -> None:
    print(title)
    print(f"  {'domain':6} {'operation':48} {'median ms':>10} {'ratio':>7} {'cmds':>5}")
    for domain, name, seconds, cmds, ratio in rows:
        shown = "" if ratio is None else f"{ratio:.2f}"
        print(f"  {domain:6} {name:48} {seconds * 1000:10.1f} {shown:>7} {cmds:5}")


@contextmanager
def terminated_as_exit() -> Iterator[None]:
    """SIGTERM raises SystemExit, so clean-up runs (make bench interrupted)."""

    def handler(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    runs = args.runs
    workdir = tempfile.mkdtemp(prefix="vdsm-lsm-bench-storage-", dir="/var/tmp")
    env = Env(workdir)
    with terminated_as_exit():
        try:
            env.setup()
            mode = env.block.activation_mode
            with CommandCounter() as counter:
                create = bench_create(env, counter, runs)
                chain = bench_chain(env, counter, runs)
                extend = bench_extend(env, counter, runs)
        finally:
            env.cleanup()
            shutil.rmtree(workdir, ignore_errors=True)
    print(f"Storage provider in-process: cluster lock local, block activation {mode}, "
          f"extent {EXTENT_MB} MiB, chunk {CHUNK_MB} MiB, median of {runs} runs")
    report(f"Volume create, COW sparse {CAPACITY // GiB} GiB, new image", create)
    report(f"Image prepare + teardown, {CHAIN_LENGTH}-volume COW chain", chain)
    report("Block volume extension by one chunk, volume prepared and held open", extend)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
