"""The soak (issue 13, ``make soak``; skipped by ``make check``).

N live storage migrations (``VDSM_LSM_SOAK_N``, default 100 under
``make soak``) of one test guest's disk, back and forth between a file
domain and a thin block domain (:class:`tests.faults.site.FaultSite`: one
real daemon, local lock, lvm2 on a loop device, libvirtd, QEMU), with the
guest writing flat out.  One migration in five (``VDSM_LSM_SOAK_FAULTS``,
default 0.2) gets a fault from the fault matrix, chosen at random
(``VDSM_LSM_SOAK_SEED`` makes the run repeatable): see :data:`FAULTS`.

After every migration the VM must run on one of the two domains with
nothing left behind (:meth:`FaultSite.assert_clean`); a leftover ends the
soak.  Every move adds a volume to the chain (its live snapshot; nothing
merges them), so after :data:`GUEST_MOVES` moves the guest is retired: the
VM destroyed, every write it acknowledged verified on the chain it ended
on, its image deleted, and a new guest started on a new image.  A fault
that ends the guest (QEMU killed) retires it at once.  At the end the
storage is torn down, and no loop device may be left on the PV.

It prints one table: migrations, completed, rolled back, lost writes,
leftovers, pauses (the daemon's "VM paused" log lines), and the guest's
I/O gap at the pivot (largest interval between acknowledged writes from
just before the daemon logged ``Pivoting`` to when it logged ``Pivot
done``), p50 and max; and fails on any loss or leftover.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import random
import statistics
import subprocess
import threading
import time
from typing import Any

import pytest

from contrib.guest import verifier
from storage import block_manifest
from tests.faults import cluster_site
from tests.faults import site as site_mod
from tests.soak import faults as faults_mod
from tests.storage import conftest as storage_conftest
from tests.virt.conftest import guest_files  # noqa: F401

N_ENV = "VDSM_LSM_SOAK_N"
RATE_ENV = "VDSM_LSM_SOAK_FAULTS"
SEED_ENV = "VDSM_LSM_SOAK_SEED"
# Each new leaf (the guest writes over 48 MiB) grows past one chunk: thin
# volumes extend on every move, and a fast guest may outrun the monitor
# (an ENOSPC pause, counted, resumed once extended).
CHUNK_MB = 32
# Each move adds a volume (its live snapshot) and nothing merges them: a
# guest's disk moves this many times, then it is verified and replaced.
GUEST_MOVES = 10
VG_SIZE = 4 * 1024**3
# Bytes of serial log before the "Pivoting" moment counted in the pivot's window.
MARGIN = 256

pytestmark = [
    pytest.mark.skipif(not os.environ.get(N_ENV), reason=f"the soak runs with {N_ENV} set "
                       "(make soak)"),
    storage_conftest.requires_root,
    pytest.mark.timeout(6 * 3600),
]

FAULTS = faults_mod.FAULTS


@dataclasses.dataclass
class Tally:
    migrations: int = 0
    guests: int = 0
    completed: int = 0
    rolled_back: int = 0
    vm_down: int = 0
    lost: int = 0
    leftovers: int = 0
    pauses: int = 0
    gaps: list[int] = dataclasses.field(default_factory=list)
    faults: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    problems: list[str] = dataclasses.field(default_factory=list)

    def table(self) -> str:
        gaps = sorted(self.gaps)
        p50 = f"{statistics.median(gaps):.0f} ms" if gaps else "-"
        top = f"{gaps[-1]} ms" if gaps else "-"
        rows = [
            ("migrations", self.migrations), ("guests (each verified)", self.guests),
            ("completed", self.completed),
            ("rolled back", self.rolled_back), ("VM down (QEMU killed)", self.vm_down),
            ("lost writes", self.lost), ("leftovers", self.leftovers),
            ("pauses", self.pauses), (f"pivot gap p50 ({len(gaps)} pivots)", p50),
            ("pivot gap max", top),
            ("faults", ", ".join(f"{k} {v}" for k, v in sorted(self.faults.items())) or "-"),
        ]
        width = max(len(name) for name, _ in rows)
        lines = ["| measure | value |", "|---|---|"]
        lines += [f"| {name:<{width}} | {value} |" for name, value in rows]
        return "\n".join(lines)


class PivotWatch:
    """Notes the guest's serial log size when the daemon logs a pivot's start and end.

    A thread follows the daemon's log (appended across restarts); the ACKs
    between the two sizes (:func:`verifier.acks_between`) give the pivot's
    I/O gap.
    """

    def __init__(self, daemon_log: str) -> None:
        self.daemon_log = daemon_log
        self.vm: Any = None
        self.windows: list[tuple[int, int]] = []
        self._begin: int | None = None
        self._stop = threading.Event()
        self._offset = os.path.getsize(daemon_log) if os.path.exists(daemon_log) else 0
        self._thread = threading.Thread(target=self._run, name="pivot-watch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        pending = b""
        while not self._stop.wait(0.005):
            try:
                with open(self.daemon_log, "rb") as f:
                    f.seek(self._offset)
                    data = f.read()
            except OSError:
                continue
            self._offset += len(data)
            pending += data
            *lines, pending = pending.split(b"\n")
            vm = self.vm
            if vm is None:
                continue
            for line in lines:
                if f"Pivoting vm={vm.vm_id}".encode() in line and self._begin is None:
                    self._begin = os.path.getsize(vm.serial_log)
                elif f"Pivot done vm={vm.vm_id}".encode() in line and self._begin is not None:
                    self.windows.append((self._begin, os.path.getsize(vm.serial_log)))
                    self._begin = None

    def take(self) -> list[tuple[int, int]]:
        """The windows of the pivots done since the last call."""
        time.sleep(0.05)  # let the thread read the last lines
        windows, self.windows = self.windows, []
        self._begin = None
        return windows

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)


def count_pauses(daemon_log: str, since: int) -> tuple[int, int]:
    with open(daemon_log, "rb") as f:
        f.seek(since)
        data = f.read()
    return data.count(b"VM paused"), since + len(data)


def outcome(site: site_mod.FaultSite, m: faults_mod.Moving, to: str,
            proc: subprocess.CompletedProcess[str] | None) -> str:
    """completed, rolled back or down, from what the daemon says now."""
    try:
        stats = site.stats(m.vm)
    except Exception as e:  # noqa: BLE001 - the VM is gone: reported below
        return f"down ({e})"
    if stats.get("status") == "Down":
        return "down"
    on = stats["disks"]["vda"]["domainID"]
    if proc is not None and proc.returncode == 0:
        assert on == to, (on, to, proc.stderr[-2000:])
        return "completed"
    return "completed" if on == to else "rolled back"


def test_soak(guest_files) -> None:  # noqa: F811
    n = int(os.environ[N_ENV])
    rate = float(os.environ.get(RATE_ENV, "0.2"))
    seed = int(os.environ.get(SEED_ENV) or random.randrange(1 << 30))
    rng = random.Random(seed)
    print(f"\nsoak: {n} migrations, faults in {rate:.0%}, seed {seed}")
    tally = Tally()
    site = cluster_site.PrivateLibvirtSite.make(guest_files, chunk_mb=CHUNK_MB,
                                              vg_size=VG_SIZE)
    watch = PivotWatch(site.daemon.log_path)
    log_offset = 0
    try:
        m, moves = faults_mod.Moving.boot(site), 0
        watch.vm = m.vm
        for i in range(n):
            to = site.other(m.on)
            fault = rng.choice(sorted(FAULTS)) if rng.random() < rate else ""
            start = time.monotonic()
            proc = faults_mod.migrate(m, to, FAULTS[fault] if fault else None, rng)
            result = outcome(site, m, to, proc)
            tally.migrations += 1
            if fault:
                tally.faults[fault] += 1
            for begin, end in watch.take():
                acks = verifier.acks_between(m.vm.serial_log, max(begin - MARGIN, 0), end)
                tally.gaps.append(verifier.largest_gap_ms(acks))
            pauses, log_offset = count_pauses(site.daemon.log_path, log_offset)
            tally.pauses += pauses
            print(f"{i + 1:>4} {fault or '-':<22} -> {result:<12} "
                  f"{time.monotonic() - start:5.1f}s", flush=True)
            down = result.startswith("down")
            if down:
                tally.vm_down += 1
            elif result == "completed":
                tally.completed += 1
                m.on = to
            else:
                tally.rolled_back += 1
            moves += 1
            try:
                if not down:
                    site.wait_up(m.vm, timeout=60)  # resumed, if a pause is being undone
                    site.assert_clean(m.vm, m.img, m.on)
                if down or (moves == GUEST_MOVES and i + 1 < n):
                    tally.lost += retire(site, m, tally)
                    assert_nothing_left(site)
                    m, moves = faults_mod.Moving.boot(site), 0
                    watch.vm = m.vm
            except AssertionError as e:
                tally.leftovers += 1
                tally.problems.append(f"migration {i + 1} ({fault or 'no fault'}): {e}")
                break
        tally.lost += retire(site, m, tally)
        leaked = site.teardown_storage()
        if leaked:
            tally.leftovers += 1
            tally.problems.append(f"loop devices left on the PV: {leaked}")
    finally:
        watch.close()
        print(tally.table())
        for problem in tally.problems:
            print(f"problem: {problem}")
        site.close()
    assert tally.lost == 0 and tally.leftovers == 0, json.dumps(tally.problems)


def verify(site: site_mod.FaultSite, m: faults_mod.Moving, tally: Tally) -> int:
    chain = m.chain or site.chain(m.vm)
    result = site.verify(m.vm, m.img, m.on, chain[-1])
    print(f"verifier ({m.vm.vm_id[:8]}): {result}")
    if not (result.ok and result.lost == 0):
        tally.problems.append(f"verifier: {result}")
    return result.lost if result.lost else (0 if result.ok else 1)


def retire(site: site_mod.FaultSite, m: faults_mod.Moving, tally: Tally) -> int:
    """The guest's end: the VM destroyed, every write it acknowledged checked
    on the chain of the domain that has its image, the image deleted; the
    blocks lost."""
    tally.guests += 1
    site.call("VM.destroy", vmID=m.vm.vm_id)
    m.on = next(sd for sd in (site.file_sd, site.block_sd)
                if m.img in site.call("StorageDomain.getImages", storagedomainID=sd))
    lost = verify(site, m, tally)
    site.wait_task(site.call("Image.delete", storagepoolID=site.pool_id,
                             storagedomainID=m.on, imageID=m.img, postZero=False, force=False))
    return lost


def assert_nothing_left(site: site_mod.FaultSite) -> None:
    """No VM, image, task, journal, prepare link, LV or loop device of a VM's
    (the domains' own LVs only), no qemu-img."""
    assert site.call("Host.getAllTasksInfo") == {}
    assert os.listdir(site.state_dir) == []
    for sd_id in (site.file_sd, site.block_sd):
        assert site.call("StorageDomain.getImages", storagedomainID=sd_id) == []
        links = os.path.join(site.daemon.run_dir, "storage", sd_id)
        held = [i for i in (os.listdir(links) if os.path.isdir(links) else [])
                if os.listdir(os.path.join(links, i))]
        assert held == [], (sd_id, held)
    assert site.lvs() == sorted(block_manifest.SPECIAL_LVS)
    assert len(site.stacked_loops()) == len(block_manifest.SPECIAL_LVS), site.stacked_loops()
    assert site.qemu_img_orphans() == []
