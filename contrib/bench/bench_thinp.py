"""Benchmark: the watermark monitor, from threshold crossing to extension done.

Real libvirtd, the test guest under TCG writing sequentially (``--rate``
writes of 64 KiB per second) over 48 MiB of a thin COW volume on a block
domain (loop activation) that starts at one 8 MiB chunk; the monitor
(virt/thinp.py) extends it chunk by chunk.

- **threshold -> extended**: from the BLOCK_THRESHOLD event (seen by a hook
  ahead of the monitor's) to the end of the source's extension (storage's
  ``refresh`` returned), per extension.
- **extend + refresh**: storage's own time for those calls: the baseline,
  the part of the latency the monitor cannot save.
- the same with the threshold events ignored by the monitor (periodic
  polling only, every ``--interval`` s): what the events buy.
- ENOSPC pauses: how often the guest outran the extensions.

    .venv/bin/python -m contrib.bench.bench_thinp [--rate N] [--interval S]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import threading
import time
import uuid
from typing import Any

from contrib import guest
from contrib.guest import verifier
from tests.virt import storage_env
from virt import api as virt_api
from virt import connection, thinp
from virt import vm as vm_mod

MiB = 1024**2
URI = "qemu:///system"
BOOT_TIMEOUT = 180.0
SPAN_MB = 48
CHUNK_MB = 8  # storage_env.PROVIDER_OPTIONS


class TimedStorage:
    """The env as virt's storage; times the source's extensions."""

    def __init__(self, env: storage_env.StorageEnv) -> None:
        self._env = env
        self.lock = threading.Lock()
        self.done: list[float] = []  # monotonic time each extension finished
        self.costs: list[float] = []  # extend + refresh, seconds
        self._started = 0.0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._env, name)

    def extend(self, pool_id: str, sd_id: str, img_id: str, vol_id: str, new_size: int) -> int:
        self._started = time.monotonic()
        return self._env.provider.extend(pool_id, sd_id, img_id, vol_id, new_size)

    def refresh(self, pool_id: str, sd_id: str, img_id: str, vol_id: str) -> int:
        size = self._env.provider.refresh(pool_id, sd_id, img_id, vol_id)
        now = time.monotonic()
        with self.lock:
            self.done.append(now)
            self.costs.append(now - self._started)
        return size


def run(
    env: storage_env.StorageEnv, art: guest.Artifacts, work: str, rate: int, interval: float,
    events: bool,
) -> tuple[list[float], list[float], int]:
    storage = TimedStorage(env)
    config = virt_api.Config(
        libvirt_uri=URI, accel="tcg",
        thinp=thinp.Config(interval=interval, utilization_percent=50, chunk_mb=CHUNK_MB),
    )
    api = virt_api.API(storage, config)
    crossed: list[float] = []
    pauses = [0]

    def on_threshold(vm: Any, d: Any, dev: str, *args: Any) -> None:
        if dev == d.name:
            crossed.append(time.monotonic())

    def on_io_error(vm: Any, d: Any, reason: str) -> None:
        pauses[0] += 1

    api.events.threshold_hooks.insert(0, on_threshold)
    api.events.io_error_hooks.insert(0, on_io_error)
    if not events and api.thinp is not None:
        api.events.threshold_hooks.remove(api.thinp.on_threshold)
    api.start()
    img, vol = env.new_image(64 * MiB)
    vm_id = str(uuid.uuid4())
    serial_log = os.path.join(work, f"{vm_id[:8]}.log")
    params = {
        "vmName": f"lsmbench-thinp-{vm_id[:8]}",
        "memSize": 128,
        "smp": 1,
        "accel": "tcg",
        "kernel": art.kernel,
        "initrd": art.initrd,
        "kernelArgs": guest.kernel_args(span_mb=SPAN_MB, rate=rate, pattern="seq"),
        "serialLog": serial_log,
        "drives": [env.drive(img, vol)],
    }
    try:
        api.vm_create(vm_id, params)
        verifier.wait_for_acks(serial_log, 1, timeout=BOOT_TIMEOUT)
        deadline = time.monotonic() + 300
        while api.vm_get_stats(vm_id)[0]["disks"]["vda"]["apparentsize"] < SPAN_MB * MiB:
            if time.monotonic() > deadline:
                raise TimeoutError("the volume did not grow")
            time.sleep(0.2)
        deadline = time.monotonic() + 30
        while api.get_vm(vm_id).status != vm_mod.UP and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        try:
            api.vm_destroy(vm_id)
        finally:
            api.stop()
    # Each extension against the first crossing since the previous one ended.
    latencies = []
    prev = 0.0
    for done in storage.done:
        since = [t for t in crossed if prev <= t <= done]
        if since:
            latencies.append(done - min(since))
        prev = done
    return latencies, storage.costs, pauses[0]


def row(name: str, values: list[float]) -> str:
    if not values:
        return f"{name:<34} {0:>4}"
    ms = [v * 1000 for v in values]
    return (
        f"{name:<34} {len(ms):>4} {statistics.median(ms):>8.1f} {min(ms):>8.1f} {max(ms):>8.1f}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rate", type=int, default=50, help="guest writes/s (64 KiB each)")
    parser.add_argument("--interval", type=float, default=2.0, help="monitor_interval, s")
    args = parser.parse_args(argv)
    art = guest.ensure_built()
    connection.start_event_loop()
    work = tempfile.mkdtemp(prefix="bench-thinp-", dir="/var/tmp")
    env, cleanup = storage_env.make_env(work, "block")
    try:
        ev = run(env, art, work, args.rate, args.interval, events=True)
        poll = run(env, art, work, args.rate, args.interval, events=False)
    finally:
        cleanup()
        shutil.rmtree(work, ignore_errors=True)
    print(
        f"watermark monitor on a block domain (loop activation), TCG guest writing "
        f"{args.rate * 64 // 1024} MiB/s, chunk {CHUNK_MB} MiB, watermark 50%, "
        f"interval {args.interval}s"
    )
    print(f"{'metric (ms)':<34} {'n':>4} {'median':>8} {'min':>8} {'max':>8}")
    print(row("events: threshold -> extended", ev[0]))
    print(row("events: extend + refresh", ev[1]))
    print(row("polling only: threshold -> extended", poll[0]))
    print(row("polling only: extend + refresh", poll[1]))
    print(f"ENOSPC pauses: events {ev[2]}, polling only {poll[2]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
