"""Benchmark: Image.syncData throughput against plain qemu-img.

Runs the real storage code (StorageAPI + ImageOps, a pool with two file and
two block domains over loop devices in /var/tmp) and, as the baseline
measured in the same run on the same data, plain
``qemu-img convert -t none -T none -W -m 16`` of each layer of the same
chain into a new chain of files (``-B`` keeps the structure), as a person
would copy it by hand.

- throughput: syncData(ALL) file -> file of a 3-layer chain (RAW base +
  2 COW layers) vs the baseline, as a ratio (target >= 0.95);
- sparse: a 10 GiB image holding 100 MiB, vs the baseline copy of a fully
  allocated 100 MiB image (target <= 2x);
- MiB/s of syncData(ALL) file -> block and block -> file (the chain's data
  divided by the task's wall time).

    .venv/bin/python -m contrib.bench.bench_sync [--runs N] [--size-mb N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

from storage import commands, qemuimg, sync, volume
from tests.storage import image_env as ie

MiB = 1024**2
GiB = 1024**3
FLAGS = ["-t", "none", "-T", "none", "-W", "-m", "16"]


def timed(fn: Callable[[], object]) -> float:
    start = time.monotonic()
    fn()
    return time.monotonic() - start


def chain_layers(size: int) -> list[ie.Layer]:
    """RAW base half full, a COW layer a quarter full, a COW leaf an eighth."""
    half, quarter, eighth = size // 2, size // 4, size // 8
    return [
        ie.Layer(ie.new_id(), volume.RAW, [f"write -P 0x11 0 {half}"]),
        ie.Layer(ie.new_id(), volume.COW, [f"write -P 0x22 {half} {quarter}"]),
        ie.Layer(ie.new_id(), volume.COW, [f"write -P 0x33 {quarter} {eighth}"]),
    ]


def data_bytes(env: ie.Env, chain: ie.Chain) -> int:
    total = 0
    with env.prepared_chain(chain.sd_id, chain.img_id, chain.leaf) as paths:
        for layer, path in zip(chain.layers, paths, strict=True):
            fmt = ie.qemuimg_format(layer.format)
            total += sum(n for _, n in ie.data_extents(path, fmt))
    return total


def time_sync(env: ie.Env, chain: ie.Chain, dst: str, keep: bool = False) -> float:
    """Clone (not timed) and syncData(ALL) (timed: submit to finished)."""
    ops = env.ops()
    env.clone(ops, chain, dst)
    elapsed = timed(lambda: env.sync(ops, chain, dst, sync.ALL))
    if not keep:
        env.run(ops.image_delete(chain.img_id, env.pool_id, dst))
    return elapsed


def time_baseline(env: ie.Env, chain: ie.Chain, workdir: str) -> float:
    """Plain qemu-img convert of each layer into a new chain of files."""
    out = os.path.join(workdir, "baseline")
    os.makedirs(out, exist_ok=True)
    elapsed = 0.0
    with env.prepared_chain(chain.sd_id, chain.img_id, chain.leaf) as paths:
        for i, (layer, path) in enumerate(zip(chain.layers, paths, strict=True)):
            fmt = ie.qemuimg_format(layer.format)
            dst = os.path.join(out, layer.vol_id)
            cmd = ["qemu-img", "convert", *FLAGS, "-f", fmt, "-O", fmt]
            if i > 0:
                parent = chain.layers[i - 1]
                cluster = qemuimg.info(path, fmt=fmt)["cluster-size"]
                cmd += ["-o", f"cluster_size={cluster}", "-B", parent.vol_id,
                        "-F", ie.qemuimg_format(parent.format)]
            cmd += [path, dst]
            elapsed += timed(lambda cmd=cmd: commands.run(cmd, timeout=3600))
    for name in os.listdir(out):
        os.unlink(os.path.join(out, name))
    return elapsed


def time_plain_copy(workdir: str, size: int) -> float:
    """Baseline of the sparse case: copy a fully allocated image of size bytes."""
    src = os.path.join(workdir, "full.raw")
    dst = os.path.join(workdir, "full-copy.raw")
    if not os.path.exists(src):
        commands.run(["qemu-img", "create", "-f", "raw", src, str(size)])
        commands.run(["qemu-io", "-f", "raw", "-c", f"write -P 0x55 0 {size}", src])
    elapsed = timed(lambda: commands.run(
        ["qemu-img", "convert", *FLAGS, "-f", "raw", "-O", "raw", src, dst], timeout=3600))
    os.unlink(dst)
    return elapsed


def median(fn: Callable[[], float], runs: int) -> float:
    return statistics.median(fn() for _ in range(runs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--size-mb", type=int, default=1024, help="virtual size of the chain")
    args = parser.parse_args()
    size = args.size_mb * MiB
    rows: list[tuple[str, str, str]] = []

    with ie.real_storage() as (workdir, make_loop_device), \
            ie.make_env(workdir, make_loop_device, block_size=16 * GiB) as env:
        f1, f2, b1, b2 = (env.domains[r] for r in ("f1", "f2", "b1", "b2"))
        chain = env.make_chain(f1, chain_layers(size), capacity=size)
        data = data_bytes(env, chain)
        mib = data / MiB

        # Throughput against plain qemu-img, alternating to share the noise.
        base_times, sync_times = [], []
        for _ in range(args.runs):
            base_times.append(time_baseline(env, chain, workdir))
            sync_times.append(time_sync(env, chain, f2))
        base_t, sync_t = statistics.median(base_times), statistics.median(sync_times)
        rows.append(("qemu-img convert per layer, file->file (baseline)",
                     f"{mib / base_t:8.1f} MiB/s", f"{base_t:6.2f} s"))
        rows.append(("syncData ALL, file->file", f"{mib / sync_t:8.1f} MiB/s",
                     f"{sync_t:6.2f} s"))
        rows.append(("  throughput ratio (target >= 0.95)", f"{base_t / sync_t:8.2f}", ""))

        # Across domain types.
        fb = median(lambda: time_sync(env, chain, b1), args.runs)
        rows.append(("syncData ALL, file->block", f"{mib / fb:8.1f} MiB/s", f"{fb:6.2f} s"))
        time_sync(env, chain, b2, keep=True)
        on_block = ie.Chain(chain.img_id, b2, chain.layers)
        bf = median(lambda: time_sync(env, on_block, f2), args.runs)
        rows.append(("syncData ALL, block->file", f"{mib / bf:8.1f} MiB/s", f"{bf:6.2f} s"))
        env.run(env.ops().image_delete(chain.img_id, env.pool_id, b2))

        # Sparse: 10 GiB virtual, 100 MiB of data in 10 extents.
        sparse_size, sparse_data = 10 * GiB, 100 * MiB
        ops = [f"write -P 0x66 {i * GiB} {sparse_data // 10}" for i in range(10)]
        sparse = env.make_chain(f1, [ie.Layer(ie.new_id(), volume.RAW, ops)],
                                capacity=sparse_size)
        plain = median(lambda: time_plain_copy(workdir, sparse_data), args.runs)
        sparse_t = median(lambda: time_sync(env, sparse, f2), args.runs)
        rows.append(("qemu-img convert of 100 MiB allocated (baseline)",
                     f"{100 / plain:8.1f} MiB/s", f"{plain:6.2f} s"))
        rows.append(("syncData ALL, 10 GiB sparse / 100 MiB data, file->file", "",
                     f"{sparse_t:6.2f} s"))
        rows.append(("  sparse / baseline (target <= 2)", f"{sparse_t / plain:8.2f}", ""))
        sparse_b = median(lambda: time_sync(env, sparse, b1), 1)
        rows.append(("syncData ALL, 10 GiB sparse / 100 MiB data, file->block", "",
                     f"{sparse_b:6.2f} s"))

    print(f"chain: {args.size_mb} MiB virtual, {mib:.0f} MiB of data in 3 layers; "
          f"median of {args.runs} runs")
    width = max(len(r[0]) for r in rows)
    for name, rate, elapsed in rows:
        print(f"{name:<{width}}  {rate:>14}  {elapsed:>8}")


if __name__ == "__main__":
    main()
