"""LV activation: make a logical volume reachable as a block device.

Two modes (DESIGN section 6), chosen by :func:`open`:

``dm``
    lvm2 itself: ``lvchange -ay`` / ``--refresh`` / ``-an``; the device is
    ``/dev/<vg>/<lv>``.
``loop``
    For hosts without device-mapper.  An LV must be one contiguous range of
    one PV; it is mapped by a loop device over that range (offset = the PV's
    pe_start + first_pe * extent_size, size limit = extents * extent_size).
    After an ``lvextend`` into the following extents, :meth:`refresh` raises
    the loop device's size limit, which a process holding it open (QEMU)
    sees at once.  The devices bypass the page cache (direct I/O), and so
    does a PV that is itself a loop device (a file made a disk): its direct
    I/O is turned on at its first activation, or everything written to the
    domain would wait in its backing file's page cache for the next flush.

``auto`` picks ``dm`` when device-mapper works (``/dev/mapper/control``
can be opened: the node may exist without the kernel driver).

Loop mode state: each active LV has a small JSON file
``<run_dir>/loop/<vg>/<lv>`` naming its loop device, the PV, the offset
and the owner tag.  It is written *before* the device is bound (so a crash
cannot leak a device we don't know about) and checked against the kernel on
every use, so a restarted daemon finds its devices again.  Devices are only
ever taken over from this state or by their owner tag, never found by
backing alone: another "host" on the same kernel (network namespaces in
tests) may map the same LV with its own device, and deactivating ours must
not pull theirs away.

The owner tag (:attr:`LoopActivation.owner`, derived from this host's run
dir) is written into each device's ``lo_file_name`` when it is bound
(the kernel keeps it; ``losetup`` and sysfs still show the PV as the
backing file).  It proves which host bound a device: a recorded device
whose tag is not ours (the daemon died after recording a candidate device
and before binding it, and another host bound that device since) is not
ours, and a device with our tag over a PV that no state names (its state
was lost) is ours (:mod:`storage.leftovers` adopts or releases those at
start).  State written before the tag existed (no ``owner`` key) is trusted
as before.
"""

from __future__ import annotations

import builtins
import collections
import errno
import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from storage import errors, loop, lvm, lvm_cmd, lvm_model

log = logging.getLogger("storage.activation")

DM_CONTROL = "/dev/mapper/control"
MODES = ("auto", "dm", "loop")
# How long deactivate waits for a detached device still open to be released.
RELEASE_WAIT = 2.0

_lv_locks: collections.defaultdict[tuple[str, str, str], threading.Lock] = collections.defaultdict(
    threading.Lock
)
_lv_locks_guard = threading.Lock()


def dm_available() -> bool:
    """True if the kernel's device-mapper answers (not just a device node)."""
    try:
        fd = os.open(DM_CONTROL, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    os.close(fd)
    return True


def open(mode: str, lvm_: lvm.LVM, run_dir: str, direct_io: bool = True) -> Activation:
    """An Activation for the LVs that lvm_ sees.

    mode is "auto", "dm" or "loop"; run_dir holds loop mode's state.
    direct_io makes loop devices bypass the page cache (loop mode only).
    """
    if mode not in MODES:
        raise ValueError(f"Unknown activation mode {mode!r}, expected one of {MODES}")
    if mode == "auto":
        mode = "dm" if dm_available() else "loop"
    if mode == "dm":
        if not dm_available():
            raise errors.ActivationModeUnavailable(mode="dm", reason=f"cannot open {DM_CONTROL}")
        if not lvm_.activation:
            raise ValueError("dm activation needs an LVM with activation=True")
        return DMActivation(lvm_)
    return LoopActivation(lvm_, run_dir, direct_io=direct_io)


class Activation:
    """Interface of both modes."""

    mode = ""

    def activate(self, vg: str, lv: str, vg_state: lvm_model.VGState | None = None) -> str:
        """Make vg/lv reachable; return its device.  Idempotent.

        vg_state: a reading of vg the caller holds (:meth:`lvm.LVM.vg_state`);
        loop mode maps the LV from it, instead of reading its layout, if no
        command of this process changed the VG since.
        """
        raise NotImplementedError

    def deactivate(self, vg: str, lv: str) -> None:
        """Release vg/lv's device.  Not an error if it is not active."""
        raise NotImplementedError

    def refresh(self, vg: str, lv: str, vg_state: lvm_model.VGState | None = None) -> int:
        """Make an active vg/lv's device follow its current metadata (after
        an lvextend, maybe by another host); return the device's size.

        vg_state: a reading of vg taken for this refresh, as in :meth:`activate`.
        """
        raise NotImplementedError

    def is_active(self, vg: str, lv: str) -> bool:
        return self.active_path(vg, lv) is not None

    def active_path(self, vg: str, lv: str) -> str | None:
        """vg/lv's device if it is active on this host, else None."""
        raise NotImplementedError

    def active_lvs(self, vg: str) -> builtins.list[str]:
        """Names of vg's LVs active on this host."""
        raise NotImplementedError

    def deactivate_all(self, vg: str, pvs: builtins.list[str]) -> None:
        """Release every device of vg this host holds (format, failed
        create): its active LVs and, in loop mode, any device with this
        host's tag over the PVs (one whose state was lost)."""
        for name in self.active_lvs(vg):
            self.deactivate(vg, name)


class DMActivation(Activation):
    mode = "dm"

    def __init__(self, lvm_: lvm.LVM) -> None:
        self.lvm = lvm_

    def activate(self, vg: str, lv: str, vg_state: lvm_model.VGState | None = None) -> str:
        self.lvm.lvchange_activate(vg, lv, True)
        return _dm_path(vg, lv)

    def deactivate(self, vg: str, lv: str) -> None:
        if os.path.exists(_dm_path(vg, lv)):
            self.lvm.lvchange_activate(vg, lv, False)

    def refresh(self, vg: str, lv: str, vg_state: lvm_model.VGState | None = None) -> int:
        self.lvm.lvchange_refresh(vg, lv)
        return loop.size(_dm_path(vg, lv))

    def active_path(self, vg: str, lv: str) -> str | None:
        path = _dm_path(vg, lv)
        return path if os.path.exists(path) else None

    def active_lvs(self, vg: str) -> builtins.list[str]:
        try:
            return sorted(os.listdir(os.path.join("/dev", vg)))
        except FileNotFoundError:
            return []


class LoopActivation(Activation):
    mode = "loop"

    def __init__(self, lvm_: lvm.LVM | None, run_dir: str, direct_io: bool = True) -> None:
        """lvm_ None: an activation that can only find and release devices
        (the LVs of a VG this host no longer knows)."""
        self.lvm = lvm_
        self.state_dir = os.path.join(run_dir, "loop")
        self.direct_io = direct_io
        self.owner = owner_tag(run_dir)
        self._direct_pvs: set[str] = set()  # PVs whose own loop device was checked

    def activate(self, vg: str, lv: str, vg_state: lvm_model.VGState | None = None) -> str:
        with self._lock(vg, lv):
            dev = self._current(vg, lv)
            if dev is not None:
                log.debug("LV already active vg=%s lv=%s dev=%s", vg, lv, dev)
                return dev
            pv, offset, sizelimit = self._mapping(vg, lv, vg_state)
            if self.direct_io:
                self._direct_pv(pv)
            state = {"device": None, "backing": pv, "offset": offset, "owner": self.owner}

            def record(candidate: str) -> None:
                state["device"] = candidate
                self._write_state(vg, lv, state)

            try:
                dev = loop.attach(
                    pv,
                    offset=offset,
                    sizelimit=sizelimit,
                    direct_io=self.direct_io,
                    on_device=record,
                    name=self.owner,
                )
            except errors.Error as e:
                self._remove_state(vg, lv)
                raise errors.CannotActivateLogicalVolume(vg=vg, lv=lv, reason=str(e)) from e
            record(dev)
            log.info(
                "Activated LV vg=%s lv=%s dev=%s pv=%s offset=%d size=%d",
                vg,
                lv,
                dev,
                pv,
                offset,
                sizelimit,
            )
            return dev

    def _direct_pv(self, pv: str) -> None:
        """A PV that is itself a loop device over a file (the demo's, a test
        rig's) and buffered keeps all that is written to the domain in its
        backing file's page cache, so the next flush of any LV writes out
        the whole backlog: QEMU's flush when it completes a mirror, while
        the guest's I/O is drained, waited for every write the mirror made
        since it was ready (the first pivot onto a block domain stalled the
        guest for hundreds of ms).  Its direct I/O is turned on, as ours
        are (same data, no backlog); checked once per PV."""
        real = os.path.realpath(pv)
        if real in self._direct_pvs:
            return
        self._direct_pvs.add(real)
        st = loop.status(real) if loop.is_device_name(real) else None
        if st is None or st.direct_io:
            return
        if loop.ensure_direct_io(real):
            log.info("Turned on direct I/O of the PV's loop device pv=%s", real)

    def deactivate(self, vg: str, lv: str) -> None:
        with self._lock(vg, lv):
            dev = self._current(vg, lv)
            if dev is not None:
                try:
                    loop.detach(dev)
                except errors.Error as e:
                    raise errors.CannotDeactivateLogicalVolume(vg=vg, lv=lv, reason=str(e)) from e
                if not self._released(dev):
                    # Its opener (QEMU) may write on: its range must not be reused.
                    log.error(
                        "LV device still open after %.0fs, released on its last close "
                        "vg=%s lv=%s dev=%s", RELEASE_WAIT, vg, lv, dev,
                    )
            self._remove_state(vg, lv)
            log.info("Deactivated LV vg=%s lv=%s dev=%s", vg, lv, dev)

    @staticmethod
    def _released(dev: str) -> bool:
        """Whether detached dev is free: a device still open is released by the
        kernel on its last close (auto-clear), e.g. by a process closing it just
        now; waited for up to RELEASE_WAIT seconds."""
        deadline = time.monotonic() + RELEASE_WAIT
        while True:
            st = loop.status(dev)
            if st is None or not st.autoclear:
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)

    def refresh(self, vg: str, lv: str, vg_state: lvm_model.VGState | None = None) -> int:
        with self._lock(vg, lv):
            dev = self._current(vg, lv)
            if dev is None:
                raise errors.LogicalVolumeRefreshError(vg=vg, lv=lv, reason="not active")
            pv, offset, sizelimit = self._mapping(vg, lv, vg_state)
            st = loop.status(dev)
            assert st is not None  # checked by _current
            if not st.backed_by(pv) or st.offset != offset:
                # The LV moved: its data is not where our device points.
                raise errors.LogicalVolumeRefreshError(
                    vg=vg, lv=lv, reason=f"{dev} maps {st.offset}, LV now starts at {pv}:{offset}"
                )
            if st.sizelimit == sizelimit:
                return loop.size(dev)
            try:
                size = loop.set_size_limit(dev, sizelimit)
            except errors.Error as e:
                raise errors.LogicalVolumeRefreshError(vg=vg, lv=lv, reason=str(e)) from e
            log.info("Refreshed LV vg=%s lv=%s dev=%s size=%d", vg, lv, dev, size)
            return size

    def active_path(self, vg: str, lv: str) -> str | None:
        with self._lock(vg, lv):
            return self._current(vg, lv)

    def active_lvs(self, vg: str) -> builtins.list[str]:
        lv_dir = os.path.join(self.state_dir, vg)
        try:
            names = sorted(n for n in os.listdir(lv_dir) if not n.startswith("."))
        except FileNotFoundError:
            return []
        return [n for n in names if self.active_path(vg, n) is not None]

    def deactivate_all(self, vg: str, pvs: builtins.list[str]) -> None:
        super().deactivate_all(vg, pvs)
        for st in self.tagged_devices(pvs):
            log.warning("Releasing unrecorded loop device of this host vg=%s dev=%s", vg, st.device)
            self.release_device(st.device)
        self._remove_vg_dir(vg)

    # Leftovers of a previous life of the daemon (storage.leftovers).

    def recorded_vgs(self) -> builtins.list[str]:
        """VGs with loop state in this host's run dir."""
        try:
            return sorted(n for n in os.listdir(self.state_dir) if not n.startswith("."))
        except FileNotFoundError:
            return []

    def recorded_devices(self, vg: str) -> dict[str, str]:
        """Device -> LV of vg's LVs active here (stale state dropped)."""
        result = {}
        for lv in self.active_lvs(vg):
            dev = self.active_path(vg, lv)
            if dev is not None:
                result[dev] = lv
        return result

    def tagged_devices(self, pvs: builtins.list[str]) -> builtins.list[loop.Status]:
        """Bound loop devices over any of pvs that carry this host's tag.

        Matched by the backing's device and inode, not sysfs' path: a device
        bound in another mount namespace shows a path relative to it.
        """
        found = []
        for dev in loop.list():
            st = loop.status(dev.name)
            if st is None or st.file_name != self.owner or st.autoclear:
                continue
            if any(st.backed_by(pv) for pv in pvs):
                found.append(st)
        return found

    def adopt(self, vg: str, lv: str, dev: str, pv: str, offset: int) -> bool:
        """Record dev, bound by this host over pv at offset, as vg/lv's
        device (its state was lost); False if vg/lv already has one."""
        with self._lock(vg, lv):
            if self._current(vg, lv) is not None:
                return False
            st = loop.status(dev)
            if st is None or st.file_name != self.owner or st.offset != offset:
                return False
            self._write_state(vg, lv, {"device": dev, "backing": pv, "offset": offset,
                                       "owner": self.owner})
        log.info("Adopted loop device vg=%s lv=%s dev=%s", vg, lv, dev)
        return True

    def release_device(self, dev: str) -> None:
        """Detach a device of this host that no LV state names."""
        st = loop.status(dev)
        if st is None or st.file_name != self.owner:
            return
        loop.detach(dev)
        log.info("Released loop device dev=%s", dev)

    # Helpers

    def _mapping(
        self, vg: str, lv: str, vg_state: lvm_model.VGState | None = None
    ) -> tuple[str, int, int]:
        """(pv, offset, sizelimit) of vg/lv from the LVM metadata: from
        vg_state if it is a current reading of vg listing lv, else read now.

        Called under the LV's lock, so an lvextend by this process either
        makes vg_state stale before the check, or finds the LV active after
        the mapping and refreshes it (storage/extend.py).
        """
        st = vg_state
        if st is not None and st.vg.name == vg and lv in st.lvs and st.current():
            layout = st.layout(lv)
        else:
            if self.lvm is None:
                raise errors.CannotActivateLogicalVolume(vg=vg, lv=lv, reason="VG not known")
            layout = self.lvm.lv_layout(vg, lv)
        segments = lvm_model.merged_segments(layout.segments)
        if len(segments) != 1:
            raise errors.LogicalVolumeNotContiguous(
                vg=vg, lv=lv, segments=" ".join(str(s) for s in segments)
            )
        seg = segments[0]
        return seg.pv, layout.offset(seg), seg.count * layout.extent_size

    def _current(self, vg: str, lv: str) -> str | None:
        """Our device for vg/lv if the kernel still maps it as recorded;
        drops stale state."""
        state = self._read_state(vg, lv)
        if state is None:
            return None
        dev = state.get("device")
        if dev:
            st = loop.status(dev)
            if (
                st is not None
                and not st.autoclear
                and st.backed_by(state["backing"])
                and st.offset == state["offset"]
                and st.file_name == state.get("owner", st.file_name)
            ):
                return dev
        log.info("Dropping stale loop state vg=%s lv=%s state=%s", vg, lv, state)
        self._remove_state(vg, lv)
        return None

    def _state_path(self, vg: str, lv: str) -> str:
        lvm_cmd.check_name(vg)
        lvm_cmd.check_name(lv)
        return os.path.join(self.state_dir, vg, lv)

    def _read_state(self, vg: str, lv: str) -> dict[str, Any] | None:
        try:
            with builtins.open(self._state_path(vg, lv)) as f:
                return json.load(f)
        except FileNotFoundError:
            return None
        except ValueError:
            log.warning("Ignoring corrupt loop state vg=%s lv=%s", vg, lv)
            return {}

    def _write_state(self, vg: str, lv: str, state: dict[str, Any]) -> None:
        path = self._state_path(vg, lv)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = os.path.join(os.path.dirname(path), f".{lv}.tmp")
        with builtins.open(tmp, "w") as f:
            json.dump(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, path)

    def _remove_state(self, vg: str, lv: str) -> None:
        try:
            os.unlink(self._state_path(vg, lv))
        except OSError as e:
            if e.errno != errno.ENOENT:
                raise

    def _remove_vg_dir(self, vg: str) -> None:
        lvm_cmd.check_name(vg)
        path = os.path.join(self.state_dir, vg)
        try:
            for name in os.listdir(path):
                if name.startswith("."):
                    os.unlink(os.path.join(path, name))  # a temp file of a crash
            os.rmdir(path)
        except OSError:
            pass

    @contextmanager
    def _lock(self, vg: str, lv: str) -> Iterator[None]:
        with _lv_locks_guard:
            lock = _lv_locks[(self.state_dir, vg, lv)]
        with lock:
            yield


def owner_tag(run_dir: str) -> str:
    """The tag this host's run dir writes into its loop devices (63 bytes
    at most: the kernel's lo_file_name)."""
    digest = hashlib.sha256(os.fsencode(os.path.realpath(run_dir))).hexdigest()
    return f"vdsm-lsm:{digest[:32]}"


def _dm_path(vg: str, lv: str) -> str:
    return os.path.join("/dev", vg, lv)
