"""The watermark monitor: extends thin volumes of running VMs before they fill.

A COW volume on a block domain is an LV that starts at one chunk and grows
by extension (DESIGN sections 1 and 6). :class:`Monitor` watches every such
drive (COW leaf reached as a block device) of every VM:

- it sets a libvirt block threshold on the drive at ``physical - watermark``
  (``watermark = chunk * utilization_percent / 100``: VDSM's meaning, extend
  when the free space left in the LV drops below that); the BLOCK_THRESHOLD
  event (``threshold_hooks``) wakes the monitor at once;
- it also polls every ``interval`` seconds (``blockInfo``: allocation vs
  physical) in case an event was missed (reconnect, restart, a threshold
  already crossed when set);
- when the allocation crosses ``physical - watermark`` the volume grows to
  ``physical + chunk`` (at most its maximum size, ``capacity * 1.1`` in whole
  sectors: ``common.sizes.cow_max_size``, storage's rule): an ``extend``
  request to the pool's SPM (``storage_iface.SpmRequests``: in-process on
  the SPM, else through the storage mailbox, blocking until the reply),
  then ``refresh`` of this host's own device, then a new threshold.  A
  failure is logged (ERROR once, then DEBUG while it repeats) and, for a
  replication's first extension, raised to the caller;
- while the drive is mirrored (a replication with ``need_extend``) to a
  block destination, the **replica is extended first, then the source**, to
  the same size, so the mirror never has less room than the source; a
  source that needs no extension itself (a file domain's COW leaf) mirrored
  to a thin block replica has the replica follow its allocation: the
  threshold is set on the source at ``replica physical - watermark`` and
  the replica grows by a chunk past the source's allocation
  (:func:`replica_size`);
- a VM paused with pause code ENOSPC (``io_error_hooks``) has its thin drives
  extended and is resumed once every extension succeeded, or once the drive
  that ran out left its thin volume (a pivot onto a file domain); a failed
  extension leaves it paused (the mirror running) until a later cycle's;
- **a replica that cannot be extended pauses the VM** (DESIGN section 1).
  QEMU would not: a mirror's target error policy is ``report`` (libvirt
  sets no other), so an overflowing replica fails the job while the guest
  runs on.  So a failed replica extension once the source's allocation
  crossed the replica's watermark suspends the VM (pause code ENOSPC)
  before the replica fills; each cycle retries, and resumes the VM once
  the replica has room or the replication ended (aborted, pivoted).  That
  pause is recorded in the domain's metadata (virt/thinp_pause.py), so a
  restarted daemon's monitor resumes it too.

A VM whose lock a verb holds for long (a pivot waited for) is skipped by
the cycles; that verb calls :meth:`Monitor.checker`'s check as it waits.

One thread per daemon (``Monitor(storage, spm, api.vms, config)``, its
hooks in ``api.events.threshold_hooks`` and ``io_error_hooks``).  The
decision is plain arithmetic, testable without libvirt (virt/thinp_rules.py).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable

import libvirt

from common import sizes
from virt import drive as drive_mod
from virt import storage_iface, thinp_pause, thinp_rules
from virt import vm as vm_mod

log = logging.getLogger("virt.thinp")

MiB = 1024**2
# How long a cycle waits for a VM busy with another operation before skipping it.
LOCK_TIMEOUT = 1.0


@dataclasses.dataclass(frozen=True)
class Config:
    interval: float = 2.0  # [thinp] monitor_interval, seconds
    utilization_percent: int = 20  # [irs] volume_utilization_percent
    chunk_mb: int = 2560  # [irs] volume_utilization_chunk_mb

    @property
    def chunk(self) -> int:
        return self.chunk_mb * MiB


# The monitor


class ExtensionFailed(Exception):
    pass


class Monitor:
    def __init__(
        self,
        storage: storage_iface.HostStorage,
        spm: storage_iface.SpmRequests,
        vms: Callable[[], list[vm_mod.VM]],
        config: Config,
    ) -> None:
        self._storage = storage
        self._spm = spm
        # (vm id, drive, which) -> the error of its last failed extension,
        # so that a failure repeating every cycle is logged at ERROR once.
        self._failing: dict[tuple[str, str, str], str] = {}
        self._vms = vms
        self.config = config
        self.mark = thinp_rules.watermark(config.chunk, config.utilization_percent)
        self._wakeup = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        # vm id -> drive names that hit ENOSPC, not thin (None: unknown drive).
        self._enospc: dict[str, set[str | None]] = {}
        # vm id -> thin drives out of room (or whose replica had none: the
        # monitor paused the VM); no more thin (pivoted away): nothing to wait for.
        self._paused: dict[str, set[str]] = {}
        self._lock = threading.Lock()
        self.cycles = 0

    # Life cycle

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stopping.clear()
        self._thread = threading.Thread(target=self._run, name="thinp-monitor", daemon=True)
        self._thread.start()
        log.info(
            "Watermark monitor started interval=%s chunk_mb=%d utilization_percent=%d",
            self.config.interval, self.config.chunk_mb, self.config.utilization_percent,
        )

    def stop(self) -> None:
        t = self._thread
        if t is None:
            return
        self._stopping.set()
        self._wakeup.set()
        t.join()
        self._thread = None
        log.info("Watermark monitor stopped")

    def checker(self, vm: vm_mod.VM) -> Callable[[], None]:
        """check_vm(vm) at most once an interval, for a thread holding its lock."""
        last = [time.monotonic()]

        def check() -> None:
            if time.monotonic() - last[0] >= self.config.interval and vm.status != vm_mod.DOWN:
                last[0] = time.monotonic()
                try:
                    self.check_vm(vm)
                except Exception:
                    log.exception("Watermark check failed vm=%s", vm.id)

        return check

    def wake(self) -> None:
        """Check all VMs now (rather than at the next interval)."""
        self._wakeup.set()

    # Event hooks (event loop thread: only note and wake)

    def on_threshold(
        self, vm: vm_mod.VM, d: drive_mod.Drive, dev: str, path: str, threshold: int, excess: int
    ) -> None:
        self.wake()

    def on_io_error(self, vm: vm_mod.VM, d: drive_mod.Drive | None, reason: str) -> None:
        if vm_mod.pause_code_of(reason) != vm_mod.ENOSPC:
            return
        # An unnamed node (QEMU's mirror filter over the drive) is the thin drives'.
        thin = {x.name for x in ([d] if d else vm.drives) if is_thin(x) or replica_only(x)}
        with self._lock:
            if thin:
                self._paused.setdefault(vm.id, set()).update(thin)
            else:
                self._enospc.setdefault(vm.id, set()).add(d.name if d is not None else None)
        self.wake()

    # The thread

    def _run(self) -> None:
        while not self._stopping.is_set():
            self._wakeup.clear()
            try:
                self.check_all()
            except Exception:
                log.exception("Watermark monitor cycle failed")
            self._wakeup.wait(self.config.interval)

    def check_all(self) -> None:
        self.cycles += 1
        vms = self._vms()
        running = {vm.id for vm in vms if vm.status != vm_mod.DOWN}
        for key in [k for k in self._failing if k[0] not in running]:
            del self._failing[key]
        for vm in vms:
            if self._stopping.is_set():
                return
            if vm.status == vm_mod.DOWN:
                with self._lock:
                    self._enospc.pop(vm.id, None)
                    self._paused.pop(vm.id, None)
                continue
            try:
                self.check_vm(vm)
            except Exception:
                log.exception("Watermark check failed vm=%s", vm.id)

    def check_vm(self, vm: vm_mod.VM) -> None:
        """Extend the VM's thin drives that need it; resume it if paused on ENOSPC."""
        if not vm.lock.acquire(timeout=LOCK_TIMEOUT):
            log.debug("VM busy, checked next cycle vm=%s", vm.id)
            return
        try:
            self._check_vm(vm)
        finally:
            vm.lock.release()

    def _check_vm(self, vm: vm_mod.VM) -> None:
        enospc = vm.status == vm_mod.PAUSED and vm.pause_code == vm_mod.ENOSPC
        with self._lock:
            flagged = self._enospc.get(vm.id, set()) if enospc else set()
            paused = set(self._paused.get(vm.id, set())) if enospc else set()
            if not enospc:
                self._enospc.pop(vm.id, None)
                self._paused.pop(vm.id, None)
        thinp_pause.forget_stale(vm)
        if enospc and not paused and vm.recorded_pause == vm_mod.ENOSPC:
            # A previous daemon's pause (recovered): for which replica is not
            # known, so every drive must have room (one no longer mirrored has).
            paused = {d.name for d in vm.drives}
        thin = [d for d in vm.drives if is_thin(d) or replica_only(d)]
        ok = True
        room: dict[str, bool] = {}
        for d in thin:
            try:
                room[d.name] = self._check_drive(vm, d)
            except ExtensionFailed:
                ok = False
            except libvirt.libvirtError as e:
                if e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                    return
                log.warning("Watermark check failed vm=%s drive=%s error=%s", vm.id, d.name, e)
                ok = False
        if not enospc:
            return
        for name in paused:
            if vm.drive(name) not in thin:
                room[name] = True  # its replication ended: no replica to make room in
        names = {n for n in flagged if n is not None} | paused or {d.name for d in thin}
        if not names or any(n not in room and vm.drive(n) not in thin for n in names):
            # Out of space on a drive that is not ours to extend.
            log.debug("VM paused on ENOSPC of a drive not monitored vm=%s", vm.id)
            return
        if not ok or not all(room.get(n, False) for n in names):
            log.warning("VM stays paused on ENOSPC, no room made yet vm=%s", vm.id)
            return
        self._resume(vm)

    def _resume(self, vm: vm_mod.VM) -> None:
        if not thinp_pause.resume(vm):
            return
        with self._lock:
            self._enospc.pop(vm.id, None)
            self._paused.pop(vm.id, None)
        log.info("Resumed vm=%s: its thin drives have room", vm.id)

    def _pause_for_replica(
        self, vm: vm_mod.VM, d: drive_mod.Drive, allocation: int, replica_physical: int, why: str
    ) -> None:
        """After a failed replica extension: suspend the VM (ENOSPC) if the
        source's allocation crossed the replica's watermark."""
        if allocation < replica_physical - self.mark:
            return
        with self._lock:
            self._paused.setdefault(vm.id, set()).add(d.name)
        if vm.status == vm_mod.PAUSED:
            return  # already (its source out of space too, or by hand)
        thinp_pause.pause(vm, d.name, f"(allocation={allocation} replica_physical="
                          f"{replica_physical} watermark={self.mark}): {why}")

    def _check_drive(self, vm: vm_mod.VM, d: drive_mod.Drive) -> bool:
        """Extend the drive if it needs it; whether it has room (is below its watermark).

        Raises ExtensionFailed if an extension failed.
        """
        capacity, allocation, physical = vm.call(lambda dom: dom.blockInfo(d.name, 0))
        d.update_sizes(capacity, allocation, physical)
        r = d.replica
        if replica_only(d):
            return self._check_replica_only(vm, d, capacity, allocation)
        replica_physical = None
        if replica_needs_extend(r):
            assert r is not None
            replica_physical = sizes.device_size(r.path)
            if replica_physical < physical:
                # The mirror must never have less room than the source.
                self._extend_replica(vm, d, physical, replica_physical, allocation)
                replica_physical = physical
        if thinp_rules.needs_extension(capacity, allocation, physical, self.mark):
            log.info(
                "Volume needs extension vm=%s drive=%s allocation=%d physical=%d watermark=%d",
                vm.id, d.name, allocation, physical, self.mark,
            )
            for which, size in thinp_rules.extension_plan(
                capacity, physical, replica_physical, self.config.chunk
            ):
                if which == "replica":
                    self._extend_replica(vm, d, size, replica_physical or 0, allocation)
                else:
                    self._extend(vm, d, which, size, physical)
            capacity, allocation, physical = vm.call(lambda dom: dom.blockInfo(d.name, 0))
            d.update_sizes(capacity, allocation, physical)
        self._set_threshold(vm, d, capacity, physical)
        return allocation < physical - self.mark

    def _check_replica_only(
        self, vm: vm_mod.VM, d: drive_mod.Drive, capacity: int, allocation: int
    ) -> bool:
        """A source that is not thin, mirrored to a thin block replica: the
        replica keeps a watermark of room past the source's allocation."""
        r = d.replica
        assert r is not None
        replica_physical = sizes.device_size(r.path)
        if thinp_rules.needs_extension(capacity, allocation, replica_physical, self.mark):
            log.info(
                "Replica needs extension vm=%s drive=%s allocation=%d replica_physical=%d "
                "watermark=%d", vm.id, d.name, allocation, replica_physical, self.mark,
            )
            size = thinp_rules.replica_size(
                capacity, allocation, replica_physical, self.config.chunk)
            self._extend_replica(vm, d, size, replica_physical, allocation)
            replica_physical = sizes.device_size(r.path)
            capacity, allocation, _ = vm.call(lambda dom: dom.blockInfo(d.name, 0))
        self._set_threshold(vm, d, capacity, replica_physical)
        return allocation < replica_physical - self.mark

    def _extend_replica(
        self, vm: vm_mod.VM, d: drive_mod.Drive, size: int, old: int, allocation: int
    ) -> None:
        """Extend the replica; ExtensionFailed (the VM paused if needed) if not."""
        try:
            self._extend(vm, d, "replica", size, old)
        except ExtensionFailed as e:
            self._pause_for_replica(vm, d, allocation, old, str(e))
            raise

    def _extend(self, vm: vm_mod.VM, d: drive_mod.Drive, which: str, size: int, old: int) -> None:
        if which == "replica":
            r = d.replica
            assert r is not None
            ids = (r.pool_id, r.domain_id, r.image_id, r.volume_id)
        else:
            ids = (d.pool_id, d.domain_id, d.image_id, d.volume_id)
        start = time.monotonic()
        key = (vm.id, d.name, which)
        try:
            new, extended = self._extend_and_refresh(ids, size)
        except Exception as e:
            repeated = self._failing.get(key) == str(e)
            self._failing[key] = str(e)
            log.log(
                logging.DEBUG if repeated else logging.ERROR,
                "Extension failed%s vm=%s drive=%s which=%s sd=%s img=%s vol=%s old=%d new=%d: %s",
                " again" if repeated else "", vm.id, d.name, which, ids[1], ids[2], ids[3],
                old, size, e,
            )
            raise ExtensionFailed(str(e)) from e
        if self._failing.pop(key, None) is not None:
            log.info("Extension works again vm=%s drive=%s which=%s", vm.id, d.name, which)
        now = time.monotonic()
        log.info(
            "Extended vm=%s drive=%s which=%s sd=%s img=%s vol=%s old=%d new=%d "
            "requested=%d elapsed=%.3f extend=%.3f refresh=%.3f",
            vm.id, d.name, which, ids[1], ids[2], ids[3], old, new, size,
            now - start, extended - start, now - extended,
        )

    def _set_threshold(
        self, vm: vm_mod.VM, d: drive_mod.Drive, capacity: int, physical: int
    ) -> None:
        if physical >= sizes.cow_max_size(capacity):
            return
        value = thinp_rules.threshold(physical, self.mark)
        if value == 0 or value == d.threshold:
            return
        vm.call(lambda dom: dom.setBlockThreshold(d.name, value, 0))
        d.threshold = value
        log.debug("Set block threshold vm=%s drive=%s threshold=%d", vm.id, d.name, value)

    # Replication

    def prepare_replica(self, vm: vm_mod.VM, d: drive_mod.Drive, r: drive_mod.Replica) -> None:
        """Before the mirror starts: give a thin block replica the source's size
        (a source that is not thin: a watermark of room past its data).

        Raises the storage error if the extension fails (the replication is
        not started).
        """
        if not (r.need_extend and r.disk_type == drive_mod.BLOCK and r.format == drive_mod.COW):
            return
        if d.format != drive_mod.COW:
            return
        capacity, allocation, physical = vm.call(lambda dom: dom.blockInfo(d.name, 0))
        have = sizes.device_size(r.path)
        if not is_thin(d):
            # The source needs no extension: the replica gets a watermark past its data.
            if not thinp_rules.needs_extension(capacity, allocation, have, self.mark):
                return
            physical = thinp_rules.replica_size(capacity, allocation, have, self.config.chunk)
        if have >= physical:
            return
        ids = (r.pool_id, r.domain_id, r.image_id, r.volume_id)
        try:
            new = self.extend_and_refresh(ids, physical)
        except Exception as e:
            log.error(
                "Cannot extend the replica before mirroring vm=%s drive=%s sd=%s vol=%s: %s",
                vm.id, d.name, ids[1], ids[3], e,
            )
            raise
        log.info(
            "Extended vm=%s drive=%s which=replica sd=%s img=%s vol=%s old=%d new=%d "
            "(before mirroring)",
            vm.id, d.name, ids[1], ids[2], ids[3], have, new,
        )

    def extend_and_refresh(self, ids: tuple[str, str, str, str], size: int) -> int:
        """Ask the SPM to extend the volume (in-process, or through the storage
        mailbox and its reply), then make this host's device follow."""
        return self._extend_and_refresh(ids, size)[0]

    def _extend_and_refresh(self, ids: tuple[str, str, str, str], size: int) -> tuple[int, float]:
        """extend_and_refresh; (its size, the monotonic time the SPM's extension ended)."""
        self._spm.extend(*ids, size)
        extended = time.monotonic()
        return self._storage.refresh(*ids), extended


def is_thin(d: drive_mod.Drive) -> bool:
    """A COW leaf on a block device: it grows by extension."""
    return d.format == drive_mod.COW and d.disk_type == drive_mod.BLOCK


def replica_only(d: drive_mod.Drive) -> bool:
    """A COW source that needs no extension (a file) mirrored to a thin
    block replica: only the replica is extended."""
    return d.format == drive_mod.COW and not is_thin(d) and replica_needs_extend(d.replica)


def replica_needs_extend(r: drive_mod.Replica | None) -> bool:
    return (
        r is not None
        and r.need_extend
        and r.disk_type == drive_mod.BLOCK
        and r.state != drive_mod.FAILED
    )

