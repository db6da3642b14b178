"""Benchmark: extending a block volume in loop activation mode, and copying
one layer of a chain.

Extension: ``lvextend`` into the following extents (SPM side) plus the
loop device's size-limit raise (HSM side, ``Activation.refresh``), on a real
VG over a loop device, as the watermark monitor triggers it.  The baseline
measured in the same run is one read-only lvm2 command (``lvs`` of the LV),
the floor of any LVM metadata operation.

Layer copy: ``qemuimg_copy.copy_layer`` of a chain's top (a quarter allocated)
against the baseline ``qemu-img convert`` of the whole chain collapsed.

    .venv/bin/python -m contrib.bench.bench_extend [--runs N]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable

from storage import activation, commands, lvm, lvm_model, qemuimg, qemuimg_copy

MiB = 1024**2


def timed(fn: Callable[..., object], *args: object, **kwargs: object) -> float:
    start = time.monotonic()
    fn(*args, **kwargs)
    return time.monotonic() - start


def bench_extension(workdir: str, runs: int) -> list[tuple[str, float]]:
    image = os.path.join(workdir, "pv.img")
    with open(image, "wb") as f:
        f.truncate(4 * 1024 * MiB)
    pv = commands.run(["losetup", "--find", "--show", image]).stdout.decode().strip()
    vg = f"bench-{uuid.uuid4().hex[:8]}"
    lvm_ = lvm.LVM([pv], activation=False)
    act = activation.open("loop", lvm_, os.path.join(workdir, "run"))
    try:
        lvm_.pvcreate([pv])
        lvm_.vgcreate(vg, [pv], extent_size_mb=4)
        reservation = lvm_.find_free_range(vg, 4 * runs + 1)
        first = reservation.first_pe
        lvm_.lvcreate(vg, "vol", 1, pv_range=lvm_model.pv_range(pv, first, first))
        dev = act.activate(vg, "vol")
        fd = os.open(dev, os.O_RDONLY)  # a holder, like QEMU
        baseline: list[float] = []
        extend: list[float] = []
        refresh: list[float] = []
        total: list[float] = []

        def grow(extents: int) -> None:
            last = first + extents - 1
            lvm_.lvextend(vg, "vol", extents, pv_range=lvm_model.pv_range(pv, last, last))

        def grow_and_refresh(extents: int) -> None:
            grow(extents)
            act.refresh(vg, "vol")

        def check(extents: int) -> None:
            size = os.lseek(fd, 0, os.SEEK_END)
            assert size == extents * 4 * MiB, (size, extents)

        extents = 1
        try:
            for _ in range(runs):
                baseline.append(timed(lvm_.lv_info, vg, "vol"))
                extents += 1
                extend.append(timed(grow, extents))
                refresh.append(timed(act.refresh, vg, "vol"))
                check(extents)
                extents += 1
                total.append(timed(grow_and_refresh, extents))
                check(extents)
        finally:
            os.close(fd)
            act.deactivate(vg, "vol")
        return [
            ("lvs (baseline)", statistics.median(baseline)),
            ("lvextend", statistics.median(extend)),
            ("refresh (loop size limit)", statistics.median(refresh)),
            ("lvextend + refresh", statistics.median(total)),
        ]
    finally:
        env = {"LVM_SUPPRESS_FD_WARNINGS": "1"}
        commands.run(
            ["lvm", "vgremove", "--config", lvm_.config(), "-ff", vg], env=env, check=False
        )
        commands.run(
            ["lvm", "pvremove", "--config", lvm_.config(), "-ff", "-y", pv], env=env, check=False
        )
        commands.run(["losetup", "--detach", pv], check=False)


def bench_copy(workdir: str, runs: int) -> list[tuple[str, float]]:
    size = 512 * MiB
    src = os.path.join(workdir, "src")
    os.makedirs(src)
    base = os.path.join(src, "base")
    top = os.path.join(src, "top")
    qemuimg.create(base, qemuimg.QCOW2, size=size)
    commands.run(["qemu-io", "-f", "qcow2", "-c", f"write -P 1 0 {size}", base])
    qemuimg.create(top, qemuimg.QCOW2, backing="base", backing_fmt=qemuimg.QCOW2)
    ops = [f"write -P 2 {off} 1M" for off in range(0, size, 4 * MiB)]
    commands.run(["qemu-io", "-f", "qcow2", *[x for op in ops for x in ("-c", op)], top])
    collapsed, layer = [], []
    for i in range(runs):
        out = os.path.join(workdir, f"collapsed{i}")
        collapsed.append(
            timed(qemuimg_copy.convert, top, out, qemuimg.QCOW2, qemuimg.QCOW2, create=True)
        )
        os.unlink(out)
        dst = os.path.join(workdir, f"dst{i}")
        os.makedirs(dst)
        qemuimg.create(os.path.join(dst, "base"), qemuimg.QCOW2, size=size)
        qemuimg.create(
            os.path.join(dst, "top"), qemuimg.QCOW2, backing="base", backing_fmt=qemuimg.QCOW2
        )
        layer.append(timed(qemuimg_copy.copy_layer, top, os.path.join(dst, "top"), qemuimg.QCOW2))
        shutil.rmtree(dst)
    return [
        ("convert whole chain (baseline)", statistics.median(collapsed)),
        ("copy_layer of the top", statistics.median(layer)),
    ]


def report(title: str, rows: list[tuple[str, float]]) -> None:
    base = rows[0][1]
    print(title)
    print(f"  {'operation':32} {'median ms':>10} {'ratio':>7}")
    for name, seconds in rows:
        print(f"  {name:32} {seconds * 1000:10.1f} {seconds / base:7.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=9)
    args = parser.parse_args()
    workdir = tempfile.mkdtemp(prefix="vdsm-lsm-bench-", dir="/var/tmp")
    try:
        report(
            f"Block volume extension, loop mode ({args.runs} runs)",
            bench_extension(workdir, args.runs),
        )
        report(
            f"Layer copy, 512 MiB chain, top 25% allocated ({min(args.runs, 5)} runs)",
            bench_copy(workdir, min(args.runs, 5)),
        )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
