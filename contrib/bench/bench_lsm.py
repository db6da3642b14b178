"""Benchmark: live storage migration with move-disk, file <-> thin block, a writing guest.

One real daemon, SPM of a pool of a file domain and a thin block domain
(loop activation over a loop device), the test guest under TCG writing
64 KiB blocks (O_DIRECT + fdatasync each); see :mod:`contrib.bench.lsm_site`.
Every figure has a baseline measured in the same run:

1. **time to ready**: from ``VM.diskReplicateStart`` to libvirt calling
   the mirror ready (``VM.getStats`` polled every 50 ms) of the guest's
   leaf (``--prefill-mb`` MiB, the span the guest rewrites) mirrored to a
   clone of its image on the block domain, at several guest write rates,
   background mirror vs ``syncWrites`` (write-blocking); then aborted.
   Baseline: an idle guest's background mirror.  A mirror not ready within
   ``--timeout`` is counted apart.
2. **the guest's I/O gap at the pivot** (ACK timestamps, guest clock) over
   ``--pivots`` moves back and forth at 100 writes/s, the first pivot onto
   the block domain apart; then ``--delayed`` pivots made ``--delay`` s
   after the mirror was ready, the guest writing flat out over 384 MiB (a
   slow pivot: what the mirror wrote meanwhile must be flushed).
   Baseline: the guest's own jitter (largest gap in as many ACKs before).
3. **leaf mirror / raw copy**: a leaf holding ``--leaf-mb`` MiB mirrored
   (shallow) from the file domain to the block domain, to ready, against
   ``dd`` of as many bytes from the leaf's file to a preallocated volume
   of the block domain (direct I/O both sides).

    .venv/bin/python -m contrib.bench.bench_lsm [--reps N] [--pivots N] [--quick]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable

from contrib.bench import lsm_site

MiB = lsm_site.MiB
KiB64 = 64 * 1024
Move = lsm_site.Move
# (label, guest writes/s of 64 KiB; None: idle, 0: flat out)
RATES: list[tuple[str, int | None]] = [
    ("idle", None), ("5 MiB/s", 80), ("20 MiB/s", 320), ("flat out", 0)]
MODES = [("background", "off"), ("syncWrites", "on")]
PIVOT_RATE = 100  # writes/s in section 2: a 10 ms write interval
# Section 2's slow pivots: a guest writing flat out, sequentially over a
# span larger than what the mirror copies before the pivot is called.
SLOW_DISK_MB = 512
SLOW_SPAN_MB = 384


def p50(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def fmt(value: float, width: int = 8, digits: int = 2) -> str:
    return f"{value:>{width}.{digits}f}" if value == value else f"{'-':>{width}}"


def ratio(value: float, base: float) -> str:
    return fmt(value / base if base and value == value else float("nan"), 6)


# 1. Time to ready


class Ready:
    """One mirror of the guest's leaf: seconds to ready (None: not within the
    timeout) and the guest's write rate meanwhile (MiB/s)."""

    def __init__(self, seconds: float | None, write_rate: float, copied: int) -> None:
        self.seconds, self.write_rate, self.copied = seconds, write_rate, copied


def bench_ready(site: lsm_site.Site, reps: int, prefill_mb: int, timeout: float
                ) -> dict[tuple[str, str], list[Ready]]:
    """The guest's leaf holds prefill_mb MiB (its span); the guest rewrites it at
    each rate while the leaf is mirrored file -> block, background or write-blocking."""
    results: dict[tuple[str, str], list[Ready]] = {}
    for label, rate in RATES:
        writer = {"span_mb": prefill_mb, "prefill_mb": prefill_mb, "size": 2 * prefill_mb * MiB}
        if rate is None:  # idle: 50 writes at boot, then nothing
            g = site.boot(0, count=50, **writer)
        else:
            g = site.boot(rate, **writer)
        try:
            for _ in range(reps):
                for mode, sync_writes in MODES:
                    results.setdefault((label, mode), []).append(
                        mirror_leaf(site, g, sync_writes == "on", timeout))
        finally:
            site.destroy(g)
    return results


def print_ready(results: dict[tuple[str, str], list[Ready]], prefill_mb: int,
                timeout: float) -> None:
    base = p50([r.seconds for r in results[("idle", "background")] if r.seconds is not None])
    print(f"\n1. time to mirror ready (diskReplicateStart -> ready): the guest's leaf "
          f"({prefill_mb} MiB, rewritten by the guest) file -> block; baseline: idle guest, "
          "background mirror")
    print(f"{'guest writes':<12} {'mirror':<11} {'n':>3} {'p50 s':>8} {'min':>8} {'max':>8} "
          f"{'base s':>8} {'ratio':>6} {'guest MiB/s':>11} {'not ready':>9}")
    for (label, mode), runs in results.items():
        ready = [r.seconds for r in runs if r.seconds is not None]
        rates = [r.write_rate for r in runs]
        print(f"{label:<12} {mode:<11} {len(runs):>3} {fmt(p50(ready))} "
              f"{fmt(min(ready) if ready else float('nan'))} "
              f"{fmt(max(ready) if ready else float('nan'))} {fmt(base)} {ratio(p50(ready), base)} "
              f"{fmt(p50(rates), 11, 1)} {len(runs) - len(ready):>9}")
    print(f"   (guest MiB/s: its acknowledged writes while mirrored; not ready: not within "
          f"{timeout:.0f} s)")


def mirror_leaf(site: lsm_site.Site, g: lsm_site.Guest, sync_writes: bool,
                timeout: float = 600.0) -> Ready:
    """Mirror g's leaf (shallow) to a clone of its image on the block domain,
    until ready; then abort and delete the clone."""
    ids = site.ids
    src = {"poolID": ids.pool_id, "domainID": ids.file_sd, "imageID": g.img, "volumeID": g.leaf}
    dst = dict(src, domainID=ids.block_sd)
    site.task(site.call("Image.cloneStructure", imageID=g.img, storagepoolID=ids.pool_id,
                        storagedomainID=ids.file_sd, dstSdUUID=ids.block_sd))
    try:
        watch = lsm_site.ReadyWatch(site.host.socket_path, g.vm_id)
        try:
            acks = len(g.acks())
            start = time.monotonic()
            site.call("VM.diskReplicateStart", vmID=g.vm_id, srcDisk=src, dstDisk=dst,
                      syncWrites=sync_writes)
            deadline = start + timeout
            while watch.ready_after(start) is None and time.monotonic() < deadline:
                time.sleep(lsm_site.POLL)
            seconds = watch.ready_after(start)
            elapsed = time.monotonic() - start
            rate = (len(g.acks()) - acks) * KiB64 / MiB / elapsed
        finally:
            watch.close()
        stats = site.call("VM.getStats", vmID=g.vm_id)[0]
        copied = int(stats["disks"]["vda"]["replicate"].get("end", 0))
        site.call("VM.diskReplicateFinish", vmID=g.vm_id, srcDisk=src, dstDisk=src)
    finally:
        site.delete_image(ids.block_sd, g.img)
    return Ready(seconds, rate, copied)


# 2. The guest's I/O gap at the pivot


def bench_pivots(site: lsm_site.Site, pivots: int, delayed: int, delay: float
                 ) -> tuple[list[Move], list[Move]]:
    """pivots moves back and forth at PIVOT_RATE writes/s; then delayed moves of
    a guest writing flat out over SLOW_SPAN_MB, each pivot delay s after ready."""
    natural: list[Move] = []
    if pivots:
        g = site.boot(PIVOT_RATE)
        try:
            natural = [site.move(g) for _ in range(pivots)]
        finally:
            site.destroy(g)
    slow: list[Move] = []
    if delayed:
        g = site.boot(0, size=SLOW_DISK_MB * MiB, span_mb=SLOW_SPAN_MB, pattern="seq")
        try:
            slow = [site.move(g, pivot_delay=delay) for _ in range(delayed)]
        finally:
            site.destroy(g)
    return natural, slow


def print_pivots(natural: list[Move], slow: list[Move], delay: float) -> None:
    print(f"\n2. the guest's I/O gap at the pivot (ms, guest clock), {PIVOT_RATE} writes/s "
          f"({1000 // PIVOT_RATE} ms apart); baseline: the guest's jitter just before")
    print(f"{'pivots':<34} {'n':>3} {'p50 ms':>8} {'max':>8} {'jitter':>8} {'ratio':>6}")

    def row(name: str, moves: list[Move]) -> None:
        moves = [m for m in moves if m.gap >= 0]
        if not moves:
            print(f"{name:<34} {0:>3}")
            return
        gaps = [float(m.gap) for m in moves]
        jitter = p50([float(m.jitter) for m in moves])
        print(f"{name:<34} {len(gaps):>3} {fmt(p50(gaps), 8, 0)} {fmt(max(gaps), 8, 0)} "
              f"{fmt(jitter, 8, 0)} {ratio(p50(gaps), jitter)}")

    to_block = [m for m in natural if m.dst == "block"]
    row("first pivot onto block", to_block[:1])
    row("later file -> block", to_block[1:])
    row("block -> file", [m for m in natural if m.dst == "file"])
    row("all", natural)
    print(f"pivot {delay:.0f} s after ready, the guest writing flat out, sequentially over "
          f"{SLOW_SPAN_MB} MiB:")
    row("  file -> block", [m for m in slow if m.dst == "block"])
    row("  block -> file", [m for m in slow if m.dst == "file"])


# 3. Leaf mirror vs raw copy


def bench_leaf(site: lsm_site.Site, leaf_mb: int, reps: int
               ) -> tuple[list[tuple[float, int]], list[tuple[float, int]]]:
    """(seconds, bytes) of each leaf mirror to ready, and of each dd of as many bytes."""
    g = site.boot(0, size=2 * leaf_mb * MiB, prefill_mb=leaf_mb, count=50)
    mirrors: list[tuple[float, int]] = []
    copies: list[tuple[float, int]] = []
    try:
        for _ in range(reps):
            r = mirror_leaf(site, g, sync_writes=False)
            if r.seconds is None:
                raise TimeoutError("the leaf mirror never got ready")
            mirrors.append((r.seconds, r.copied))
            copies.append(_dd(site, g, r.copied))
    finally:
        site.destroy(g)
    return mirrors, copies


def _dd(site: lsm_site.Site, g: lsm_site.Guest, nbytes: int) -> tuple[float, int]:
    """dd of nbytes of the leaf's file into a new preallocated volume of the block domain."""
    ids = site.ids
    mb = max(1, -(-nbytes // MiB))
    img, vol = lsm_site.new_id(), lsm_site.new_id()
    site.create_volume(ids.block_sd, img, vol, mb * MiB, "RAW", preallocate="PREALLOCATED")
    try:
        path = site.call("Image.prepare", storagepoolID=ids.pool_id, storagedomainID=ids.block_sd,
                         imageID=img, volumeID=vol)["path"]
        try:
            start = time.monotonic()
            subprocess.run(["dd", f"if={site.file_path(g.img, g.leaf)}", f"of={path}", "bs=1M",
                            f"count={mb}", "iflag=direct", "oflag=direct", "conv=fsync",
                            "status=none"], check=True, timeout=600)
            seconds = time.monotonic() - start
        finally:
            site.call("Image.teardown", storagepoolID=ids.pool_id, storagedomainID=ids.block_sd,
                      imageID=img, volumeID=vol)
    finally:
        site.delete_image(ids.block_sd, img)
    return seconds, mb * MiB


def print_leaf(mirrors: list[tuple[float, int]], copies: list[tuple[float, int]],
               leaf_mb: int) -> None:
    print(f"\n3. a leaf of {leaf_mb} MiB mirrored (shallow) file -> block, to ready; "
          "baseline: dd of as many bytes, leaf file -> block volume, direct I/O")
    print(f"{'copy':<28} {'n':>3} {'p50 s':>8} {'min':>8} {'max':>8} {'MiB':>6} {'MiB/s':>8} "
          f"{'ratio':>6}")
    base = p50([s for s, _ in copies])
    for name, runs in (("leaf mirror to ready", mirrors), ("dd (baseline)", copies)):
        secs = [s for s, _ in runs]
        size = p50([float(b) for _, b in runs]) / MiB
        print(f"{name:<28} {len(secs):>3} {fmt(p50(secs))} {fmt(min(secs))} {fmt(max(secs))} "
              f"{size:>6.0f} {fmt(size / p50(secs) if p50(secs) else float('nan'), 8, 1)} "
              f"{ratio(p50(secs), base)}")


def load() -> str:
    one, five, _ = os.getloadavg()
    return f"load {one:.1f}/{five:.1f} on {os.cpu_count()} CPUs"


def main(argv: list[str] | None = None,
         make: Callable[[str], lsm_site.Site] = lsm_site.Site) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=3, help="moves per rate and mirror mode")
    parser.add_argument("--pivots", type=int, default=12, help="pivots back and forth")
    parser.add_argument("--delayed", type=int, default=4, help="pivots made --delay s late")
    parser.add_argument("--delay", type=float, default=10.0)
    parser.add_argument("--prefill-mb", type=int, default=48,
                        help="section 1: data in the leaf, the span the guest rewrites")
    parser.add_argument("--leaf-mb", type=int, default=128, help="section 3: data in the leaf")
    parser.add_argument("--timeout", type=float, default=60.0,
                        help="section 1: a mirror not ready by then is given up")
    parser.add_argument("--quick", action="store_true", help="1 rep, 4 pivots, 32 MiB leaf")
    parser.add_argument("--only", choices=["ready", "pivot", "leaf"], action="append")
    args = parser.parse_args(argv)
    if args.quick:
        args.reps, args.pivots, args.delayed, args.leaf_mb, args.prefill_mb = 1, 4, 2, 32, 16
    only = set(args.only or ["ready", "pivot", "leaf"])
    work = tempfile.mkdtemp(prefix="bench-lsm-", dir="/var/tmp")
    site: lsm_site.Site | None = None
    started = load()
    try:
        site = make(work)
        ready = (bench_ready(site, args.reps, args.prefill_mb, args.timeout)
                 if "ready" in only else None)
        pivots = (bench_pivots(site, args.pivots, args.delayed, args.delay)
                  if "pivot" in only else None)
        leaf = bench_leaf(site, args.leaf_mb, args.reps) if "leaf" in only else None
    finally:
        if site is not None:
            site.close()
        shutil.rmtree(work, ignore_errors=True)
    print(f"live storage migration, one daemon, file <-> thin block (loop activation), "
          f"TCG guest; {started} at the start, {load()} at the end")
    if ready is not None:
        print_ready(ready, args.prefill_mb, args.timeout)
    if pivots is not None:
        print_pivots(*pivots, args.delay)
    if leaf is not None:
        print_leaf(*leaf, args.leaf_mb)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
