"""The soak's guest and its faults: one migration, with or without a fault of the matrix.

Each fault is a function ``fault(m, args, rng)`` that runs one move-disk of
``m``'s disk (``args``: move-disk's arguments) through the fault and returns
the last move-disk's completed process (None when no move-disk ran to the
end).  They are the fault matrix's own injections (tests/faults), chosen at
random; the soak (test_soak.py) judges the outcome the same way for all.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from typing import Any

from tests.faults import cluster_site, enospc_util, test_daemon_kill
from tests.vdsm_lsm import test_move_disk
from tests.virt import conftest as virt_conftest
from vdsm_lsm import client_errors

MiB = 1024**2

Proc = subprocess.CompletedProcess[str]
Fault = Callable[["Moving", tuple[str, ...], random.Random], "Proc | None"]


@dataclasses.dataclass
class Moving:
    """The guest whose disk goes back and forth (what tests/faults' cases take)."""

    site: cluster_site.PrivateLibvirtSite
    img: str
    base: str
    vm: virt_conftest.GuestVM
    on: str

    @classmethod
    def boot(cls, site: cluster_site.PrivateLibvirtSite) -> Moving:
        """A new image on the block domain and the guest on it, writing flat out over
        48 MiB: each new leaf grows past a 16 MiB chunk, so thin volumes extend."""
        img, (base, leaf) = site.create_image(site.block_sd)
        vm = site.start_guest(img, leaf, site.block_sd, rate=0, span_mb=48)
        return cls(site, img, base, vm, site.block_sd)

    @property
    def chain(self) -> list[str]:
        """The chain of the image on the domain it is on, base first (from the
        volumes' metadata: the VM may be gone)."""
        site = self.site
        vols = site.call("StorageDomain.getVolumes", storagedomainID=self.on,
                         storagepoolID=site.pool_id, imageID=self.img)
        parent = {}
        for vol_id in vols:
            info = site.call("Volume.getInfo", storagepoolID=site.pool_id,
                             storagedomainID=self.on, imageID=self.img, volumeID=vol_id)
            parent[vol_id] = info.get("parent")
        chain: list[str] = []
        child = {p: v for v, p in parent.items()}
        vol: str | None = next(v for v, p in parent.items() if p not in parent)
        while vol is not None:
            chain.append(vol)
            vol = child.get(vol)
        return chain


def no_fault(m: Moving, args: tuple[str, ...], rng: random.Random) -> Proc:
    return m.site.move_disk(*args)


def move_disk_killed(m: Moving, args: tuple[str, ...], rng: random.Random) -> Proc:
    """move-disk killed (SIGKILL) after a step chosen at random, then run again."""
    step = rng.choice(test_move_disk.KILL_STEPS)
    print(f"     move-disk killed after {step}")
    m.site.move_disk_killed_after(step, *args)
    return m.site.move_disk(*args)


def daemon_killed(m: Moving, args: tuple[str, ...], rng: random.Random) -> Proc:
    """The daemon killed (kill -9) at a step of DESIGN section 1 chosen at
    random (tests/faults/test_daemon_kill.py's cases), restarted, made SPM,
    then move-disk run again."""
    name, kill = rng.choice(test_daemon_kill.CASES)
    print(f"     daemon killed: {name}")
    check = kill(m, args)  # type: ignore[arg-type]
    m.site.restart_daemon()
    m.site.wait_up(m.vm)
    if check is not None:
        check()
    return m.site.move_disk(*args)


def in_process(m: Moving, to: str, hooks: dict[str, dict[str, enospc_util.Hook]],
               **options: Any) -> Proc:
    """The flow in-process (tests/faults/enospc_util.py FlowRun) with hooks
    before/after verbs; its outcome as move-disk's exit status and output."""
    run = enospc_util.FlowRun(m.site, m.vm, to, delete_source=True, **options)
    run.rpc.before.update(hooks.get("before", {}))
    run.rpc.after.update(hooks.get("after", {}))
    argv = ["move-disk", m.vm.vm_id, to]
    try:
        summary = run.run()
    except client_errors.ClientError as e:
        print(f"     move-disk failed: {e.code} {e.message}")
        return subprocess.CompletedProcess(argv, 1, "", f"error {e.code}: {e.message}\n")
    return subprocess.CompletedProcess(argv, 0, json.dumps(summary), "")


def is_pivot(params: dict[str, Any]) -> bool:
    return bool(params["dstDisk"]["domainID"] != params["srcDisk"]["domainID"])


def pause_mirror(m: Moving) -> str:
    """block-job-pause of the mirror in QEMU, behind libvirt's back; the job id."""
    job = str(enospc_util.mirror_job(m.site, m.vm)["device"])
    enospc_util.qmp(m.site, m.vm, "block-job-pause", device=job)
    return job


def pivot_refused(m: Moving, args: tuple[str, ...], rng: random.Random) -> Proc:
    """The mirror paused in QEMU just before the pivot, so QEMU holds the
    pivot: resumed after a moment (the pivot completes) or left paused (the
    daemon cancels the job, the move rolls back)."""
    resume = rng.random() < 0.5
    print(f"     pivot held by a paused job, {'resumed after 2 s' if resume else 'left'}")
    paused: list[str] = []
    timers: list[threading.Timer] = []

    def pause(params: dict[str, Any]) -> None:
        if not is_pivot(params) or paused:
            return
        paused.append(pause_mirror(m))
        if resume:
            timer = threading.Timer(2.0, enospc_util.qmp, [m.site, m.vm, "block-job-resume"],
                                    {"device": paused[0]})
            timer.start()
            timers.append(timer)

    try:
        return in_process(m, args[1], {"before": {"VM.diskReplicateFinish": pause}})
    finally:
        for timer in timers:
            timer.join()


def out_of_space(m: Moving, args: tuple[str, ...], rng: random.Random) -> Proc:
    """Onto the block domain: its VG filled (a plain lvcreate of every free
    extent) once the mirror runs, so the replica cannot grow: the VM pauses
    (ENOSPC) and the move rolls back; the filler removed afterwards.  Onto
    the file domain there is no such fault: a plain move."""
    to = args[1]
    if not m.site.is_block(to):
        return no_fault(m, args, rng)
    print("     destination VG filled during the mirror")

    def fill(params: dict[str, Any]) -> None:
        enospc_util.fill_vg(m.site)

    def wait_paused(params: dict[str, Any]) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            stats = m.site.stats(m.vm)
            if stats["status"] == "Paused":
                print(f"     VM paused: {stats.get('pauseCode')}")
                return
            time.sleep(0.1)
        print("     the VM did not need room in 30 s")

    try:
        return in_process(m, to, {"after": {"VM.diskReplicateStart": fill},
                                  "before": {"Image.syncData": wait_paused}})
    finally:
        enospc_util.remove_filler(m.site)


def in_background(m: Moving, args: tuple[str, ...]) -> subprocess.Popen[str]:
    """move-disk as a subprocess, left running; its stderr in the site's directory."""
    with open(os.path.join(m.site.workdir, "move-disk.err"), "w") as err:
        return subprocess.Popen(m.site.move_disk_argv(*args), cwd=test_move_disk.TOP,
                                stdout=subprocess.PIPE, stderr=err, text=True)


def finished(m: Moving, flow: subprocess.Popen[str]) -> Proc:
    try:
        out, _ = flow.communicate(timeout=600)
    finally:
        if flow.poll() is None:
            flow.kill()
            flow.wait(60)
    with open(os.path.join(m.site.workdir, "move-disk.err")) as f:
        err = f.read()
    if flow.returncode:
        print(f"     move-disk failed: {err.strip().splitlines()[-1:]}")
    return subprocess.CompletedProcess(flow.args, flow.returncode, out, err)


def wait_mirror(m: Moving, flow: subprocess.Popen[str]) -> bool:
    """Until the mirror runs (True) or move-disk ended first (False)."""
    while flow.poll() is None:
        if "replicate" in m.site.disk(m.vm) and m.site.block_job(m.vm):
            return True
        time.sleep(0.05)
    return False


def libvirtd_restarted(m: Moving, args: tuple[str, ...], rng: random.Random) -> Proc:
    """The site's own libvirtd stopped while the mirror runs, started again
    0.5-5 s later; move-disk runs on through it."""
    away = rng.uniform(0.5, 5.0)
    print(f"     libvirtd stopped during the mirror for {away:.1f} s")
    flow = in_background(m, args)
    if wait_mirror(m, flow):
        m.site.stop_libvirtd()
        time.sleep(away)
        m.site.start_libvirtd()
    return finished(m, flow)


def qemu_killed(m: Moving, args: tuple[str, ...], rng: random.Random) -> Proc:
    """kill -9 of the VM's QEMU while the mirror copies (at 1 MiB/s, so it
    is still copying): the VM is Down, move-disk fails and rolls back."""
    print("     QEMU killed during the mirror")
    qemu = cluster_site.qemu_pid(m.vm.vm_id)
    flow = in_background(m, (*args, "--bandwidth", "1", "--sync-writes", "off"))
    if wait_mirror(m, flow):
        os.kill(qemu, signal.SIGKILL)
    return finished(m, flow)


FAULTS: dict[str, Fault] = {
    "move-disk killed": move_disk_killed,
    "daemon killed": daemon_killed,
    "pivot refused": pivot_refused,
    "destination full": out_of_space,
    "libvirtd restarted": libvirtd_restarted,
    "QEMU killed": qemu_killed,
}


def migrate(m: Moving, to: str, fault: Fault | None, rng: random.Random) -> Proc | None:
    args = m.site.move_args(m.vm, to)
    return (fault or no_fault)(m, args, rng)

