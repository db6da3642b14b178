"""Benchmark: thin volume extension across hosts through the storage mailbox.

Two storage providers in this process are two hosts on the same storage:
host 1 (SPM) owns a pool of two block domains on loop devices (loop
activation; the master is a block domain, so the mailbox is in its
``inbox``/``outbox`` LVs), host 2 connects to it as an HSM.  Nothing but
the storage lies between them: host 2's extensions go through the mailbox
(storage/mailbox*.py) with the daemon's default timing.

- **latency**: the test guest (TCG, machine's libvirtd) writes sequentially
  over a thin COW volume (8 MiB chunks, watermark 50%); from the
  BLOCK_THRESHOLD event to the volume extended on the SPM and refreshed on
  the VM's host, per extension: first with the VM on host 1 (the SPM:
  in-process, the baseline), then on host 2 (the mailbox).  The mailbox
  part is split as host 2's log of each request tells it: SPM poll wait,
  the SPM's work (lvs + lvextend + lvs), reply wait; and host 2's refresh.
- **pauses**: the guest on host 2 writing flat out (``lsm.rate=0``) while
  its disk is mirrored to the other block domain, 32 MiB chunks, watermark
  75%: ENOSPC pauses across at least 10 extensions (replica first, then
  source, each through the mailbox).
- **scale**: 64 and 250 simulated hosts (processes, each running some
  hosts' real :class:`storage.mailbox_hsm.HsmMailbox` with in-process
  direct I/O, two requests out per host at any time) against one SPM (a
  real provider, its real mailbox thread) on a **file** domain, whose
  extension is a no-op answering the volume's size: what is measured is
  the mailbox itself (real lvextend costs ~50 ms per request and would
  measure lvm2).  Extensions served per second and latency p50/p99.  All
  processes share this machine's cores with the SPM.

    .venv/bin/python -m contrib.bench.bench_mailbox [--extensions N] [--scale-seconds S]
        [--skip-guest] [--skip-scale]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from typing import Any

from contrib import guest
from contrib.guest import verifier
from storage import api as storage_api
from storage import mailbox, mailbox_hsm, sd
from tests.storage import domain_helpers
from tests.virt import lsm_env, storage_env
from virt import api as virt_api
from virt import connection, thinp

MiB = 1024**2
URI = "qemu:///system"
BOOT_TIMEOUT = 180.0
BLANK = sd.BLANK_UUID
TOP = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]


def row(name: str, values: list[float]) -> str:
    ms = [v * 1000 for v in values]
    if not ms:
        return f"  {name:<44} {0:>4}"
    return (f"  {name:<44} {len(ms):>4} {statistics.median(ms):>8.1f} {pct(ms, 99):>8.1f} "
            f"{max(ms):>8.1f}")


# The guest phases.


class Timed:
    """A provider as virt's storage; times extend and refresh."""

    def __init__(self, provider: storage_api.StorageAPI) -> None:
        self._provider = provider
        self._lock = threading.Lock()
        self._started: dict[str, float] = {}
        self.done: list[tuple[float, str, str]] = []  # (monotonic, sd_id, vol_id)
        self.extend_s: list[float] = []
        self.refresh_s: list[float] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._provider, name)

    def extend(self, pool_id: str, sd_id: str, img_id: str, vol_id: str, new_size: int) -> int:
        start = time.monotonic()
        size = self._provider.extend(pool_id, sd_id, img_id, vol_id, new_size)
        with self._lock:
            self.extend_s.append(time.monotonic() - start)
            self._started[sd_id + vol_id] = time.monotonic()
        return size

    def refresh(self, pool_id: str, sd_id: str, img_id: str, vol_id: str) -> int:
        size = self._provider.refresh(pool_id, sd_id, img_id, vol_id)
        now = time.monotonic()
        with self._lock:
            start = self._started.pop(sd_id + vol_id, None)
            if start is not None:
                self.refresh_s.append(now - start)
                self.done.append((now, sd_id, vol_id))
        return size


class MailboxLog(logging.Handler):
    """host 2's "Mailbox extension done" lines, as numbers."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[dict[str, float]] = []

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if "Mailbox extension done" in text:
            fields = dict(re.findall(r"(\w+)=([0-9.]+)\b", text))
            self.lines.append({k: float(v) for k, v in fields.items()
                               if k in ("total", "spm_wait", "spm_work", "reply_wait")})


def run_guest(env: lsm_env.LsmEnv, provider: storage_api.StorageAPI, art: guest.Artifacts,
              work: str, extensions: int, rate: int) -> tuple[list[float], Timed]:
    """A guest on provider's host writing over a thin volume; the latency
    of each extension from its threshold event."""
    storage = Timed(provider)
    config = virt_api.Config(
        libvirt_uri=URI, accel="tcg", drive_root=provider.images.root,
        thinp=thinp.Config(interval=2.0, utilization_percent=50, chunk_mb=8))
    api = virt_api.API(storage, config)
    crossed: list[float] = []

    def on_threshold(vm: Any, d: Any, dev: str, *args: Any) -> None:
        if dev == d.name:
            crossed.append(time.monotonic())

    api.events.threshold_hooks.insert(0, on_threshold)
    api.start()
    span = 8 * (extensions + 2)
    img, vol = env.new_image((span + 32) * MiB)
    vm_id = str(uuid.uuid4())
    params = vm_params(art, work, vm_id, env.drive(img, vol), span_mb=span, rate=rate)
    try:
        api.vm_create(vm_id, params)
        verifier.wait_for_acks(params["serialLog"], 1, timeout=BOOT_TIMEOUT)
        deadline = time.monotonic() + 600
        while len(storage.done) < extensions:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(storage.done)} extensions only")
            time.sleep(0.2)
    finally:
        try:
            api.vm_destroy(vm_id)
        finally:
            api.stop()
    latencies = []
    prev = 0.0
    for done, _, _ in storage.done:
        since = [t for t in crossed if prev <= t <= done]
        if since:
            latencies.append(done - min(since))
        prev = done
    return latencies, storage


def vm_params(art: guest.Artifacts, work: str, vm_id: str, drive: dict[str, Any],
              **writer: Any) -> dict[str, Any]:
    return {
        "vmName": f"lsmbench-mailbox-{vm_id[:8]}", "memSize": 128, "smp": 1, "accel": "tcg",
        "kernel": art.kernel, "initrd": art.initrd,
        "kernelArgs": guest.kernel_args(pattern="seq", **writer),
        "serialLog": os.path.join(work, f"{vm_id[:8]}.log"), "drives": [drive],
    }


def run_mirror_pauses(env: lsm_env.LsmEnv, provider: storage_api.StorageAPI,
                      art: guest.Artifacts, work: str, extensions: int) -> tuple[int, int, int]:
    """(pauses, source extensions, replica extensions) while mirroring a
    guest that writes flat out on host 2."""
    storage = Timed(provider)
    config = virt_api.Config(
        libvirt_uri=URI, accel="tcg", drive_root=provider.images.root,
        thinp=thinp.Config(interval=2.0, utilization_percent=75, chunk_mb=32))
    api = virt_api.API(storage, config)
    pauses = [0]
    mirroring = threading.Event()

    def on_io_error(vm: Any, d: Any, reason: str) -> None:
        if mirroring.is_set():
            pauses[0] += 1

    api.events.io_error_hooks.insert(0, on_io_error)
    api.start()
    span = 32 * (extensions + 3)
    img, vol = env.new_image((span + 64) * MiB, initial_size=64 * MiB)
    vm_id = str(uuid.uuid4())
    params = vm_params(art, work, vm_id, env.drive(img, vol), span_mb=span, rate=0)
    src, dst = env.disk(img, vol), env.disk(img, vol, dst=True)
    try:
        api.vm_create(vm_id, params)
        verifier.wait_for_acks(params["serialLog"], 20, timeout=BOOT_TIMEOUT)
        env.clone(img)
        mirroring.set()
        started = len(storage.done)
        api.vm_disk_replicate_start(vm_id, src, dst)
        deadline = time.monotonic() + 300

        def counts() -> tuple[int, int]:
            during = storage.done[started:]
            return (sum(1 for _, s, _ in during if s == env.sd_id),
                    sum(1 for _, s, _ in during if s == env.dst_sd_id))

        while counts()[0] < extensions:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{counts()} extensions only")
            time.sleep(0.2)
        mirroring.clear()
        api.vm_disk_replicate_finish(vm_id, src, src)
    finally:
        try:
            api.vm_destroy(vm_id)
        finally:
            api.stop()
    env.delete_image(env.dst_sd_id, img)
    source, replica = counts()
    return pauses[0], source, replica


def idle_latency(env: lsm_env.LsmEnv, hsm: storage_api.StorageAPI, samples: int,
                 gap: float) -> list[float]:
    """Host 2 extends a volume (no VM: extend + refresh) after the SPM has
    been idle for gap seconds (past its busy_linger): the first request of
    a burst, which waits for the SPM's idle poll."""
    img, vol = env.new_image(256 * MiB)
    ids = (env.pool_id, env.sd_id, img, vol)
    hsm.prepare(*ids)
    out = []
    try:
        size = hsm.refresh(*ids)
        for _ in range(samples):
            time.sleep(gap)
            start = time.monotonic()
            hsm.extend(*ids, size + 8 * MiB)
            size = hsm.refresh(*ids)
            out.append(time.monotonic() - start)
    finally:
        hsm.teardown(*ids)
    return out


def guest_phases(art: guest.Artifacts, extensions: int) -> None:
    connection.start_event_loop()
    work = tempfile.mkdtemp(prefix="bench-mailbox-", dir="/var/tmp")
    env, cleanup = lsm_env.make_lsm_env(work, sd.BLOCK, sd.BLOCK)
    mb_log = MailboxLog()
    logging.getLogger("storage.mailbox").addHandler(mb_log)
    logging.getLogger("storage.mailbox").setLevel(logging.INFO)
    try:
        hsm = storage_api.StorageAPI(os.path.join(work, "run-host2"),
                                     **storage_env.PROVIDER_OPTIONS)
        env.providers.append(hsm)
        for dev in env.devices:
            hsm.storage_pool_connect_storage_server(
                BLANK, "block", [{"id": str(uuid.uuid4()), "connection": dev}])
        hsm.storage_pool_connect(env.pool_id, 2, env.sd_id)
        local, local_storage = run_guest(env, env.provider, art, work, extensions, rate=120)
        remote, remote_storage = run_guest(env, hsm, art, work, extensions, rate=120)
        lines = mb_log.lines[:len(remote_storage.extend_s)]
        first = len(mb_log.lines)
        idle = idle_latency(env, hsm, 10, mailbox.Settings().busy_linger + 0.5)
        idle_lines = mb_log.lines[first:]
        pauses, source, replica = run_mirror_pauses(env, hsm, art, work, 10)
    finally:
        logging.getLogger("storage.mailbox").removeHandler(mb_log)
        cleanup()
        shutil.rmtree(work, ignore_errors=True)
    print("Extension latency, threshold event -> extended on the SPM -> refreshed on the "
          "VM's host (block domain, loop activation, 8 MiB chunks, guest 7.5 MiB/s)")
    print(f"  {'metric (ms)':<44} {'n':>4} {'p50':>8} {'p99':>8} {'max':>8}")
    print(row("VM on the SPM (in-process): total", local))
    print(row("  extend (SPM: lvs + lvextend + lvs)", local_storage.extend_s))
    print(row("  refresh", local_storage.refresh_s))
    print(row("VM on host 2 (storage mailbox): total", remote))
    print(row("  request -> reply (mailbox round trip)", [d["total"] for d in lines]))
    print(row("    SPM poll wait", [d["spm_wait"] for d in lines]))
    print(row("    SPM work (queue + lvs + lvextend + lvs)", [d["spm_work"] for d in lines]))
    print(row("    reply wait (HSM poll)", [d["reply_wait"] for d in lines]))
    print(row("  refresh on host 2", remote_storage.refresh_s))
    print(row("host 2 after the SPM idled: extend + refresh", idle))
    print(row("    SPM poll wait (idle interval)", [d["spm_wait"] for d in idle_lines]))
    ratio = statistics.median(remote) / statistics.median(local) if local and remote else 0
    print(f"  ratio mailbox / in-process (p50): {ratio:.2f}; goal p50 <= 300 ms, p99 <= 1000 ms")
    print(f"Mirror of a guest writing flat out on host 2 (32 MiB chunks, watermark 75%): "
          f"{pauses} ENOSPC pauses across {source} source and {replica} replica extensions "
          "(goal: 0)")


# The scale phase.


def simulate(args: argparse.Namespace) -> int:
    """A child process: hosts first..last asking for extensions until the end time."""
    logging.getLogger("storage").setLevel(logging.ERROR)  # resends are counted, not logged
    settings = mailbox.Settings()
    ops = mailbox.local_ops()
    vols = [v.split(":") for v in args.volumes.split(",")]
    clients = [mailbox_hsm.HsmMailbox(args.pool, h, mailbox.Box(args.inbox, ops, 10.0),
                                      mailbox.Box(args.outbox, ops, 10.0), settings).start()
               for h in range(args.first, args.last + 1)]
    # (done, seconds, attempts, SPM poll wait, SPM work, reply wait)
    results: list[tuple[float, float, int, float, float, float]] = []
    errors = [0]
    lock = threading.Lock()

    def loop(client: mailbox_hsm.HsmMailbox) -> None:
        rnd = random.Random()
        time.sleep(max(args.start - time.time(), 0) + rnd.random() * 0.05)
        while time.time() < args.end:
            sd_id, img_id, vol_id = rnd.choice(vols)
            try:
                r = client.extend_timed(sd_id, img_id, vol_id, MiB)
            except Exception:
                with lock:
                    errors[0] += 1
                continue
            with lock:
                results.append((r.received, r.total, r.attempts, r.spm_wait, r.spm_work,
                                r.reply_wait))

    threads = [threading.Thread(target=loop, args=(c,), daemon=True)
               for c in clients for _ in range(args.per_host)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for c in clients:
        c.stop()
    cpu = os.times()
    with open(args.out, "w") as f:
        json.dump({"results": results, "errors": errors[0], "cpu": cpu.user + cpu.system}, f)
    return 0


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU of processes, from /proc (0 for those gone)."""
    total = 0.0
    tick = os.sysconf("SC_CLK_TCK")
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / tick
    return total


def scale_run(root: str, spm: storage_api.StorageAPI, pool_id: str, sd_id: str,
              vols: list[tuple[str, str, str]], hosts: int, seconds: float,
              processes: int) -> dict[str, Any]:
    dom = spm.domain(pool_id, sd_id)
    inbox, outbox = dom.mailbox_paths()
    ids = list(range(2, hosts + 1))  # host 1 is the SPM's own (connected, idle)
    start = time.time() + 3.0  # the children are up by then
    end = start + seconds
    procs = []
    for n, (first, last) in enumerate(_ranges(ids, processes)):
        out = os.path.join(root, f"sim-{hosts}-{n}.json")
        argv = [sys.executable, "-m", "contrib.bench.bench_mailbox", "--simulate",
                "--pool", pool_id, "--inbox", inbox, "--outbox", outbox,
                "--first", str(first), "--last", str(last), "--per-host", "2",
                "--volumes", ",".join(":".join(v) for v in vols),
                "--start", repr(start), "--end", repr(end), "--out", out]
        procs.append((subprocess.Popen(argv, cwd=TOP), out))
    p = spm._pool
    assert p is not None and p.mailbox.spm is not None
    box = p.mailbox.spm
    served_before = box.served
    time.sleep(max(start - time.time(), 0))
    helpers = spm.oop.pids() + box.inbox.ops.pids()  # type: ignore[attr-defined]
    cpu_before = os.times()
    helpers_before = cpu_seconds(helpers)
    for proc, _ in procs:
        proc.wait(timeout=seconds + 120)
    cpu = os.times()
    helpers_cpu = cpu_seconds(helpers) - helpers_before
    results: list[list[float]] = []
    errors = 0
    sim_cpu = 0.0
    for _, out in procs:
        with open(out) as f:
            data = json.load(f)
        results.extend(data["results"])
        errors += data["errors"]
        sim_cpu += data["cpu"]
    window = [r for r in results if start + 1.0 <= r[0] <= end]  # warmed up
    latencies = [r[1] for r in window]
    return {
        "hosts": hosts,
        "rate": len(window) / (seconds - 1.0),
        "p50": pct(latencies, 50), "p99": pct(latencies, 99),
        "max": max(latencies, default=0.0),
        "resent": sum(1 for r in window if r[2] > 1),
        "errors": errors, "served": box.served - served_before,
        "spm_cpu": (cpu.user - cpu_before.user) + (cpu.system - cpu_before.system)
        + helpers_cpu,
        "sim_cpu": sim_cpu, "seconds": seconds,
        "wait": pct([r[3] for r in window], 50), "work": pct([r[4] for r in window], 50),
        "reply": pct([r[5] for r in window], 50),
    }


def _ranges(ids: list[int], parts: int) -> list[tuple[int, int]]:
    size = -(-len(ids) // parts)
    return [(ids[i], ids[min(i + size, len(ids)) - 1]) for i in range(0, len(ids), size)]


def scale_phase(seconds: float) -> None:
    logging.getLogger("storage").setLevel(logging.WARNING)
    root = tempfile.mkdtemp(prefix="bench-mailbox-scale-", dir="/var/tmp")
    spm = storage_api.StorageAPI(os.path.join(root, "run"), **storage_env.PROVIDER_OPTIONS)
    try:
        path = os.path.join(root, "mnt")
        os.makedirs(path)
        sd_id = str(uuid.uuid4())
        spm.storage_domain_create(sd_id, sd.FILE, {"path": path}, "bench-scale")
        pool_id = domain_helpers.make_pool(spm, sd_id)
        vols = []
        for _ in range(16):
            img, vol = str(uuid.uuid4()), str(uuid.uuid4())
            domain_helpers.create_volume(spm, pool_id, sd_id, img, vol, 64 * MiB)
            vols.append((sd_id, img, vol))
        figures = [scale_run(root, spm, pool_id, sd_id, vols, hosts, seconds, processes)
                   for hosts, processes in ((64, 4), (250, 8))]
    finally:
        storage_env.release([spm], [], [])
        shutil.rmtree(root, ignore_errors=True)
    print(f"Scale: simulated hosts against one SPM, file domain (the extension answers the "
          f"size: the mailbox alone), daemon defaults, {seconds:g} s each, 2 requests out "
          "per host")
    print(f"  {'hosts':>5} {'ext/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} "
          f"{'resent':>7} {'errors':>7} {'SPM CPU':>8} {'hosts CPU':>9}  p50 of: poll wait, "
          "SPM work, reply wait (ms)")
    for f in figures:
        print(f"  {f['hosts']:>5} {f['rate']:>8.0f} {f['p50'] * 1000:>8.1f} "
              f"{f['p99'] * 1000:>8.1f} {f['max'] * 1000:>8.1f} {f['resent']:>7} "
              f"{f['errors']:>7} {f['spm_cpu'] / f['seconds']:>8.2f} "
              f"{f['sim_cpu'] / f['seconds']:>9.2f}  {f['wait'] * 1000:.1f}, "
              f"{f['work'] * 1000:.1f}, {f['reply'] * 1000:.1f}")
    print("  CPU: cores busy (SPM: its process and oop helpers; hosts: the simulating "
          "processes)")
    print("  goal with 64 hosts: >= 500 ext/s, p99 <= 1000 ms")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--extensions", type=int, default=24, help="per latency run (>= 20)")
    parser.add_argument("--scale-seconds", type=float, default=10.0)
    parser.add_argument("--skip-guest", action="store_true")
    parser.add_argument("--skip-scale", action="store_true")
    # A simulated hosts' process (internal).
    parser.add_argument("--simulate", action="store_true", help=argparse.SUPPRESS)
    for name in ("--pool", "--inbox", "--outbox", "--volumes", "--out"):
        parser.add_argument(name, help=argparse.SUPPRESS)
    for name in ("--first", "--last", "--per-host"):
        parser.add_argument(name, type=int, help=argparse.SUPPRESS)
    for name in ("--start", "--end"):
        parser.add_argument(name, type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.simulate:
        return simulate(args)
    logging.basicConfig(level=logging.WARNING)
    for handler in logging.getLogger().handlers:  # the mailbox's INFO lines are parsed
        handler.setLevel(logging.WARNING)
    if not args.skip_guest:
        guest_phases(guest.ensure_built(), args.extensions)
    if not args.skip_scale:
        scale_phase(args.scale_seconds)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
