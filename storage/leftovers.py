"""What a previous life of the daemon left attached: adopted or released at start.

A daemon killed with kill -9 leaves behind, in its run dir and in the
kernel, everything it had prepared: prepare links under
``<run_dir>/storage/``, active LVs (loop devices over the PVs, each named
by a state file under ``<run_dir>/loop/``) and maybe ``qemu-img`` children
still copying into volumes.  Reference counts lived in its memory and are
gone.  The daemon's start (``vdsm_lsm.app.App.start``) calls, in order:

1. :func:`adopt`, before the storage provider reconnects its pool: orphaned
   ``qemu-img`` processes of this run dir are killed (they would go on
   writing into volumes that recovery rolls back or copies again, and hold
   their devices open); in loop mode, a device with this host's owner tag
   over a PV of a domain this host remembers, that no state file names (its
   state was lost), is recorded again as the device of the LV it maps, or
   released if it maps none.
2. the pool's reconnection and the VM recovery, which re-prepare what is
   still in use: a running VM's drives, a replica whose mirror still runs.
   A prepare finds the LV's recorded device and takes it over (the same
   device QEMU holds open, so a later extension reaches it), and the link.
3. :func:`release`, once recovery is done and before any request is served:
   what holds no reference now was left by users that are gone (a killed
   SPM task re-prepares when it runs again).  Its links are removed and its
   LVs deactivated; special LVs stay active for domains of the connected
   pool.  State of VGs this host no longer knows is released too.

Whose devices are these?  Several simulated hosts share this machine's
kernel (tests, ``tests/cluster``), each with its own run dir, and may map
the same LVs with their own loop devices.  Only two kinds of device are
ever released here: one recorded in THIS run dir's state (checked against
the kernel: same device, backing PV, offset and owner tag), and one that
carries THIS run dir's owner tag (``storage.activation.owner_tag``, kept by
the kernel in the device's ``lo_file_name``) over a PV of a domain this
host knows.  A device over our PVs without our tag (another host's, or one
bound before tags existed and not recorded) is left alone and logged.

dm activation mode: links are released (their LVs deactivated, as teardown
would); no other LV is touched (``/dev/<vg>/<lv>`` carries no owner).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import signal
import time
from collections.abc import Iterable

from storage import activation, block_manifest, block_sd, core, errors, loop, lvm_model, sd

log = logging.getLogger("storage.leftovers")

ORPHAN_WAIT = 10.0
PROC = "/proc"
_LOOP_NAME_RE = re.compile(r"loop[0-9]+")


@dataclasses.dataclass
class Report:
    """What start-up found: ids of what it adopted and released."""

    orphans: list[int] = dataclasses.field(default_factory=list)
    adopted: list[str] = dataclasses.field(default_factory=list)
    released: list[str] = dataclasses.field(default_factory=list)


def adopt(storage: core.StorageCore) -> Report:
    """Before the pool is reconnected: stop orphans, re-record lost devices."""
    report = Report()
    try:
        report.orphans = stop_orphans(storage.images.root)
    except Exception:
        log.exception("Cannot look for orphaned qemu-img processes")
    for dom in _block_domains(storage, storage.cache.registry):
        try:
            _adopt_tagged(dom, report)
        except Exception:
            log.exception("Cannot adopt leftover loop devices of sd=%s", dom.sd_id)
    if report.orphans or report.adopted or report.released:
        log.warning("Leftovers of the previous daemon: orphans=%s adopted=%s released=%s",
                    report.orphans, report.adopted, report.released)
    return report


def release(storage: core.StorageCore) -> Report:
    """After recovery: release every leftover nothing references."""
    report = Report()

    def domain_of(sd_id: str) -> sd.StorageDomain | None:
        try:
            return storage.cache.get(sd_id)
        except errors.Error:
            return None

    busy = _busy_devices()
    try:
        released = storage.images.release_leftovers(domain_of, busy=busy.__contains__)
        for sd_id, img_id, vol_id in released:
            report.released.append(f"link {sd_id}/{img_id}/{vol_id}")
    except Exception:
        log.exception("Cannot release leftover prepare links")
    in_pool = _pool_domains(storage)
    known = _block_domains(storage, storage.cache.known())
    for dom in known:
        try:
            _release_unused(storage, dom, dom.sd_id in in_pool, busy, report)
        except Exception:
            log.exception("Cannot release leftover LVs of sd=%s", dom.sd_id)
    try:
        _release_unknown_vgs(storage.run_dir, {d.vg for d in known}, busy, report)
    except Exception:
        log.exception("Cannot release loop devices of unknown VGs")
    if report.released:
        log.warning("Released leftovers of the previous daemon: %s", report.released)
    return report


def stop_orphans(storage_root: str) -> list[int]:
    """Kill ``qemu-img`` processes working on this run dir's prepared
    volumes that are not children of this process (a killed daemon's); their
    pids.  Only qemu-img: a VM's QEMU also opens those paths, and lives on."""
    prefixes = {os.path.join(storage_root, ""), os.path.join(os.path.realpath(storage_root), "")}
    me = os.getpid()
    killed = []
    for pid, argv in _processes():
        if pid == me or os.path.basename(argv[0]) != "qemu-img":
            continue
        if _parent(pid) == me:
            continue
        if not any(prefix in arg for arg in argv[1:] for prefix in prefixes):
            continue
        log.warning("Killing orphaned qemu-img of a previous daemon pid=%d argv=%s", pid, argv)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            continue
        killed.append(pid)
    deadline = time.monotonic() + ORPHAN_WAIT
    while any(_alive(pid) for pid in killed) and time.monotonic() < deadline:
        time.sleep(0.05)
    return killed


# Helpers


def _block_domains(
    storage: core.StorageCore, sd_ids: Iterable[str]
) -> list[block_sd.BlockDomain]:
    result = []
    for sd_id in list(sd_ids):
        try:
            dom = storage.cache.get(sd_id)
        except errors.Error as e:
            log.warning("Cannot open domain sd=%s to look for leftovers: %s", sd_id, e)
            continue
        if isinstance(dom, block_sd.BlockDomain):
            result.append(dom)
    return result


def _pool_domains(storage: core.StorageCore) -> set[str]:
    """Domains of the pool this host is connected to (their special LVs are in use)."""
    state = storage.host_state.load()
    if state is None:
        return set()
    try:
        return set(storage.pool(state["pool_id"]).domains())
    except errors.Error:
        return set()


def _adopt_tagged(dom: block_sd.BlockDomain, report: Report) -> None:
    act = dom.activation
    if not isinstance(act, activation.LoopActivation):
        return
    recorded = act.recorded_devices(dom.vg)
    unrecorded = [st for st in act.tagged_devices(dom.manifest.devices)
                  if st.device not in recorded]
    if not unrecorded:
        return
    starts = _lv_starts(dom)
    for st in unrecorded:
        found = [(lv, pv) for (pv, offset), lv in starts.items()
                 if offset == st.offset and st.backed_by(pv)]
        if found and found[0][0] not in recorded.values():
            lv, pv = found[0]
            if act.adopt(dom.vg, lv, st.device, pv, st.offset):
                report.adopted.append(f"{dom.vg}/{lv} {st.device}")
                continue
        act.release_device(st.device)
        report.released.append(f"device {st.device} at {st.offset}")


def _lv_starts(dom: block_sd.BlockDomain) -> dict[tuple[str, int], str]:
    """(PV, byte offset) -> LV, of every LV that is one contiguous range."""
    state = dom.lvm.vg_state(dom.vg)
    result = {}
    for name in state.lvs:
        layout = state.layout(name)
        segments = lvm_model.merged_segments(layout.segments)
        if len(segments) == 1:
            result[(segments[0].pv, layout.offset(segments[0]))] = name
    return result


def _release_unused(
    storage: core.StorageCore,
    dom: block_sd.BlockDomain,
    in_pool: bool,
    busy: dict[str, list[int]],
    report: Report,
) -> None:
    act = dom.activation
    if not isinstance(act, activation.LoopActivation):
        return
    keep = {vol for _, vol in storage.images.prepared_volumes(dom.sd_id)}
    if in_pool:
        keep.update(block_manifest.SPECIAL_LVS)
    recorded = act.recorded_devices(dom.vg)
    for dev, lv in sorted(recorded.items()):
        if lv in keep or _kept_busy(busy, dev, f"{dom.vg}/{lv}"):
            continue
        act.deactivate(dom.vg, lv)
        report.released.append(f"lv {dom.vg}/{lv} {dev}")
    ours = set(recorded)
    for st in act.tagged_devices(dom.manifest.devices):
        ours.add(st.device)
        if st.device not in recorded and not _kept_busy(busy, st.device, "unrecorded"):
            act.release_device(st.device)
            report.released.append(f"device {st.device} at {st.offset}")
    foreign = [name for name in _over(dom.manifest.devices) if name not in ours]
    if foreign:
        log.info("Loop devices over the PVs of sd=%s not bound by this host (left alone): %s",
                 dom.sd_id, foreign)


def _release_unknown_vgs(
    run_dir: str, known_vgs: set[str], busy: dict[str, list[int]], report: Report
) -> None:
    """Loop state of VGs of domains this host no longer knows: released."""
    act = activation.LoopActivation(None, run_dir)
    for vg in act.recorded_vgs():
        if vg in known_vgs:
            continue
        kept = False
        for dev, lv in sorted(act.recorded_devices(vg).items()):
            if _kept_busy(busy, dev, f"{vg}/{lv}"):
                kept = True
                continue
            act.deactivate(vg, lv)
            report.released.append(f"lv {vg}/{lv} {dev} (unknown VG)")
        if not kept:
            act.deactivate_all(vg, [])


def _kept_busy(busy: dict[str, list[int]], dev: str, what: str) -> bool:
    """A device some process still holds open is kept (a VM recovery could
    not take back, say): releasing it would not free it, and a later
    prepare would map the LV a second time."""
    pids = busy.get(dev)
    if pids:
        log.warning("Leftover loop device still open, kept dev=%s lv=%s pids=%s", dev, what, pids)
    return bool(pids)


def _busy_devices() -> dict[str, list[int]]:
    """Loop device -> pids holding it open (from /proc/*/fd)."""
    result: dict[str, list[int]] = {}
    for name in os.listdir(PROC):
        if not name.isascii() or not name.isdigit():
            continue
        fd_dir = os.path.join(PROC, name, "fd")
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(os.path.join(fd_dir, fd))
            except OSError:
                continue
            # A process of another mount namespace shows "/loopN" (the path
            # inside its own /dev mount).
            name_of = os.path.basename(target)
            if target in (f"/dev/{name_of}", f"/{name_of}") and _LOOP_NAME_RE.fullmatch(name_of):
                pids = result.setdefault(f"/dev/{name_of}", [])
                if int(name) not in pids:
                    pids.append(int(name))
    return result


def _over(pvs: list[str]) -> list[str]:
    """Loop devices bound over any of pvs (by device and inode)."""
    found = []
    for dev in loop.list():
        st = loop.status(dev.name)
        if st is not None and any(st.backed_by(pv) for pv in pvs):
            found.append(dev.name)
    return found


def _processes() -> list[tuple[int, list[str]]]:
    result = []
    for name in os.listdir(PROC):
        if not name.isascii() or not name.isdigit():
            continue
        try:
            with open(os.path.join(PROC, name, "cmdline"), "rb") as f:
                raw = f.read()
        except OSError:
            continue
        argv = [os.fsdecode(a) for a in raw.split(b"\0") if a]
        if argv:
            result.append((int(name), argv))
    return result


def _parent(pid: int) -> int | None:
    try:
        with open(os.path.join(PROC, str(pid), "stat"), "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # pid (comm) state ppid ...: comm may hold spaces and parentheses.
    fields = stat[stat.rfind(b")") + 2 :].split()
    return int(fields[1]) if len(fields) > 1 else None


def _alive(pid: int) -> bool:
    try:
        with open(os.path.join(PROC, str(pid), "stat"), "rb") as f:
            stat = f.read()
    except OSError:
        return False
    state = stat[stat.rfind(b")") + 2 :].split()[:1]
    return state != [b"Z"]
