"""LVM: real lvm2 commands, restricted to a storage domain's devices.

An :class:`LVM` object carries the devices LVM may look at and whether LVs
can be activated through device-mapper.  Every command gets a ``--config``
string built for that object:

- a device filter accepting only the given devices (``a|^/dev/loop3$|``,
  then ``r|.*|``), no udev device list, no devices file, no hints, so
  commands neither scan nor touch anything else on the host;
- ``global{activation=0}`` in metadata-only mode, for hosts without
  device-mapper (ENVIRONMENT.md): every metadata operation works, LVs are
  created ``-an -Zn`` and reached through loop devices instead
  (storage/activation.py);
- no udev synchronisation, no monitoring, no metadata backups (the VG is
  shared; a host-local backup of it would be stale at once).

Reports are read with ``--reportformat json --units b --nosuffix``.
:meth:`LVM.vg_state` reads a whole VG (PVs, LVs with their segments, free
extents) in one command, so an operation can list, allocate and map LVs
from one reading; a reading knows whether this process changed the VG since
(:meth:`storage.lvm_model.VGState.current`).
Commands that change a VG are serialized per VG name within this process
(lvm2's own file locks serialize processes on one host).  Failures raise the
storage error for what was attempted (``CannotCreateLogicalVolume`` ...) or,
when lvm2 says so, ``VolumeGroupDoesNotExist`` /
``LogicalVolumeDoesNotExistError``; each carries the command's cmd, rc and err.
"""

from __future__ import annotations

import collections
import json
import logging
import re
import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from storage import commands, errors, lvm_model

log = logging.getLogger("storage.lvm")

LVM_COMMAND = "lvm"
ENV = {"LVM_SUPPRESS_FD_WARNINGS": "1"}
DEFAULT_TIMEOUT = 120.0

# Device paths allowed in a filter: they go into a regex inside a quoted
# config string, so keep them plain.
_DEVICE_RE = re.compile(r"^/dev/[A-Za-z0-9_./:+-]+$")
_NAME_RE = re.compile(r"^[A-Za-z0-9_+.-]+$")

# stderr lines lvm2 prints on every command in metadata-only mode, or that
# only repeat our own choices; they are dropped from error messages.
_NOISE = (
    "WARNING: Activation disabled",
    "NOT backed up",
    "not zeroed",
)

_METADATA_ONLY = "LVM is metadata-only on this host (no device-mapper)"

_VG_NOT_FOUND = re.compile(r'Volume group "([^"]+)" not found')
_LV_NOT_FOUND = re.compile(r'Failed to find logical volume "([^"]+)"')
_VG_EXISTS = re.compile(r"volume group called .* already exists", re.IGNORECASE)
_LV_EXISTS = re.compile(r"already exists in volume group")
_NO_SPACE = re.compile(r"insufficient (free )?(space|extents)|Insufficient free", re.IGNORECASE)

# pvs sorts by PV name by default ("/dev/loop10" before "/dev/loop9"); sorted
# by the VG name alone, rows keep the VG's PV order (what vgs reports), each
# PV's segments in PE order.  Followed by the --select expression.
_VG_ORDER = ["--sort", "vg_name", "--select"]

_vg_locks: collections.defaultdict[str, threading.Lock] = collections.defaultdict(threading.Lock)
_vg_locks_guard = threading.Lock()
# VG name -> number of commands of this process that changed it (or tried
# to): a reading of the VG taken at generation g is current while the count
# is still g.  Changes by other processes or hosts are not counted.
_generations: collections.Counter[str] = collections.Counter()


class LVM:
    """lvm2 restricted to devices; metadata-only if activation is False."""

    def __init__(
        self, devices: Sequence[str], activation: bool = True, timeout: float = DEFAULT_TIMEOUT
    ) -> None:
        if not devices:
            raise ValueError("LVM needs at least one device")
        for dev in devices:
            _check_device(dev)
        self.devices: tuple[str, ...] = tuple(devices)
        self.activation = activation
        self.timeout = timeout

    def __repr__(self) -> str:
        return f"<LVM devices={list(self.devices)} activation={self.activation}>"

    def config(self, extra_devices: Sequence[str] = ()) -> str:
        """The --config string for a command over our devices (and extra ones)."""
        devices = list(self.devices) + [d for d in extra_devices if d not in self.devices]
        for dev in devices:
            _check_device(dev)
        accept = ", ".join(f'"a|^{dev}$|"' for dev in devices)
        return (
            f'devices {{ filter=[{accept}, "r|.*|"] obtain_device_list_from_udev=0 '
            'use_devicesfile=0 write_cache_state=0 hints="none" } '
            f"global {{ activation={int(self.activation)} notify_dbus=0 use_lvmpolld=0 }} "
            "activation { udev_sync=0 udev_rules=0 monitoring=0 } "
            "backup { backup=0 archive=0 }"
        )

    # Physical volumes

    def pvs(self) -> dict[str, str]:
        """Our devices that are PVs -> their VG name ("" when in no VG)."""
        rows = self._report("pvs", "pv_name,vg_name", "pv", [])
        return {row["pv_name"]: row.get("vg_name", "") for row in rows}

    def pvcreate(self, devices: Sequence[str], metadata_size: int | None = None) -> None:
        """Initialize devices as PVs (metadata_size in bytes)."""
        cmd = ["pvcreate"]
        if metadata_size is not None:
            cmd += ["--metadatasize", f"{metadata_size}b"]
        self._change_pvs(cmd + list(devices), devices)

    def pvremove(self, devices: Sequence[str]) -> None:
        """Wipe the PV labels of devices that belong to no VG."""
        self._change_pvs(["pvremove", "-y", "-f", *devices], devices)

    def _change_pvs(self, cmd: list[str], devices: Sequence[str]) -> None:
        try:
            self._run(cmd, extra_devices=devices)
        except errors.CommandFailed as e:
            raise errors.PhysDevInitializationError(
                devices=list(devices), reason=_clean(e.err), cmd=e.cmd, rc=e.rc, err=e.err
            ) from e

    # Volume groups

    def vgcreate(
        self, vg: str, devices: Sequence[str], extent_size_mb: int = 128, tags: Iterable[str] = ()
    ) -> None:
        check_name(vg)
        cmd = ["vgcreate", "--physicalextentsize", f"{extent_size_mb}m"]
        for tag in tags:
            cmd += ["--addtag", tag]
        cmd += [vg, *devices]
        with _vg_lock(vg):
            try:
                self._run(cmd, extra_devices=devices)
            except errors.CommandFailed as e:
                if _VG_EXISTS.search(e.err):
                    raise errors.VolumeGroupAlreadyExistsError(
                        vg=vg, cmd=e.cmd, rc=e.rc, err=e.err
                    ) from e
                raise errors.VolumeGroupCreateError(
                    vg=vg,
                    devices=list(devices),
                    reason=_clean(e.err),
                    cmd=e.cmd,
                    rc=e.rc,
                    err=e.err,
                ) from e
        log.info("Created VG vg=%s devices=%s extent_size_mb=%d", vg, list(devices), extent_size_mb)

    def vgremove(self, vg: str) -> None:
        """Remove vg and all its LVs."""
        check_name(vg)
        with _vg_lock(vg):
            try:
                self._run(["vgremove", "-f", vg])
            except errors.CommandFailed as e:
                _raise_not_found(e, vg)
                raise errors.VolumeGroupRemoveError(
                    vg=vg, reason=_clean(e.err), cmd=e.cmd, rc=e.rc, err=e.err
                ) from e
        log.info("Removed VG vg=%s", vg)

    def vgchange_tags(self, vg: str, add: Iterable[str] = (), delete: Iterable[str] = ()) -> None:
        check_name(vg)
        cmd = ["vgchange"] + _tag_args(add, delete) + [vg]
        with _vg_lock(vg):
            try:
                self._run(cmd)
            except errors.CommandFailed as e:
                _raise_not_found(e, vg)
                raise
        log.info("Changed VG tags vg=%s add=%s delete=%s", vg, list(add), list(delete))

    def vg_info(self, vg: str) -> lvm_model.VG:
        check_name(vg)
        fields = "vg_name,vg_extent_size,vg_extent_count,vg_free_count,vg_tags"
        pv_fields = "pv_name,pe_start,pv_pe_count,pv_pe_alloc_count"
        try:
            rows = self._report("vgs", f"{fields},{pv_fields}", "vg", [vg])
        except errors.CommandFailed as e:
            _raise_not_found(e, vg)
            raise
        if not rows:
            raise errors.VolumeGroupDoesNotExist(vg=vg)
        return lvm_model.make_vg(rows[0], [lvm_model.make_pv(r) for r in rows if r["pv_name"]])

    # Logical volumes

    def lvcreate(
        self,
        vg: str,
        lv: str,
        extents: int,
        tags: Iterable[str] = (),
        pv_range: str | None = None,
        activate: bool = False,
        zero: bool = False,
    ) -> None:
        """Create vg/lv of extents extents, inside pv_range if given.

        pv_range is lvm2's ``/dev/loop3:10-19`` (see :func:`pv_range`).
        """
        check_name(vg)
        check_name(lv)
        if extents < 1:
            raise ValueError(f"Invalid extents={extents}")
        if (activate or zero) and not self.activation:
            raise ValueError("Metadata-only LVM cannot activate or zero an LV")
        cmd = [
            "lvcreate",
            "--activate",
            "y" if activate else "n",
            "--zero",
            "y" if zero else "n",
            "--wipesignatures",
            "n",
            "--extents",
            str(extents),
            "--name",
            lv,
        ]
        for tag in tags:
            cmd += ["--addtag", tag]
        cmd.append(vg)
        if pv_range:
            cmd.append(pv_range)
        with _vg_lock(vg):
            try:
                self._run(cmd)
            except errors.CommandFailed as e:
                _raise_not_found(e, vg)
                fields = {"vg": vg, "lv": lv, "cmd": e.cmd, "rc": e.rc, "err": e.err}
                if _LV_EXISTS.search(e.err):
                    raise errors.LogicalVolumeAlreadyExists(**fields) from e
                if _NO_SPACE.search(e.err):
                    raise errors.VolumeGroupSizeError(reason=_clean(e.err), **fields) from e
                raise errors.CannotCreateLogicalVolume(reason=_clean(e.err), **fields) from e
        log.info("Created LV vg=%s lv=%s extents=%d range=%s", vg, lv, extents, pv_range)

    def lvextend(self, vg: str, lv: str, extents_total: int, pv_range: str | None = None) -> None:
        """Grow vg/lv to extents_total extents, taking them from pv_range if given."""
        check_name(vg)
        check_name(lv)
        cmd = ["lvextend", "--autobackup", "n", "--extents", str(extents_total), f"{vg}/{lv}"]
        if pv_range:
            cmd.append(pv_range)
        with _vg_lock(vg):
            try:
                self._run(cmd)
            except errors.CommandFailed as e:
                _raise_not_found(e, vg, lv)
                fields = {"vg": vg, "lv": lv, "cmd": e.cmd, "rc": e.rc, "err": e.err}
                if _NO_SPACE.search(e.err):
                    raise errors.VolumeGroupSizeError(reason=_clean(e.err), **fields) from e
                raise errors.LogicalVolumeExtendError(
                    extents=extents_total, reason=_clean(e.err), **fields
                ) from e
        log.info("Extended LV vg=%s lv=%s extents=%d range=%s", vg, lv, extents_total, pv_range)

    def lvremove(self, vg: str, lv: str) -> None:
        check_name(vg)
        check_name(lv)
        self._change_lv(vg, lv, ["lvremove", "-f", f"{vg}/{lv}"], errors.CannotRemoveLogicalVolume)
        log.info("Removed LV vg=%s lv=%s", vg, lv)

    def lvs(self, vg: str, lv: str | None = None) -> list[lvm_model.LV]:
        """LVs of vg (or just vg/lv), sorted by name."""
        check_name(vg)
        if lv is not None:
            check_name(lv)
        fields = "vg_name,lv_name,lv_size,vg_extent_size,lv_tags,lv_active,lv_attr,seg_pe_ranges"
        target = f"{vg}/{lv}" if lv else vg
        try:
            rows = self._report("lvs", fields, "lv", [target])
        except errors.CommandFailed as e:
            _raise_not_found(e, vg, lv)
            raise
        by_name: dict[str, list[dict[str, str]]] = {}
        for row in rows:
            by_name.setdefault(row["lv_name"], []).append(row)
        return [lvm_model.make_lv(rows) for _, rows in sorted(by_name.items())]

    def lv_info(self, vg: str, lv: str) -> lvm_model.LV:
        lvs = self.lvs(vg, lv)
        if not lvs:
            raise errors.LogicalVolumeDoesNotExistError(vg=vg, lv=lv)
        return lvs[0]

    def lvchange_tags(
        self, vg: str, lv: str, add: Iterable[str] = (), delete: Iterable[str] = ()
    ) -> None:
        check_name(vg)
        check_name(lv)
        add, delete = list(add), list(delete)
        cmd = ["lvchange", "--autobackup", "n"] + _tag_args(add, delete) + [f"{vg}/{lv}"]
        self._change_lv(vg, lv, cmd, errors.LogicalVolumeReplaceTagError)
        log.info("Changed LV tags vg=%s lv=%s add=%s delete=%s", vg, lv, add, delete)

    def lvchange_activate(self, vg: str, lv: str, active: bool) -> None:
        """Activate or deactivate vg/lv through device-mapper."""
        check_name(vg)
        check_name(lv)
        error = (
            errors.CannotActivateLogicalVolume if active else errors.CannotDeactivateLogicalVolume
        )
        if not self.activation:
            raise error(vg=vg, lv=lv, reason=_METADATA_ONLY)
        cmd = ["lvchange", "--activate", "y" if active else "n", f"{vg}/{lv}"]
        self._change_lv(vg, lv, cmd, error)
        log.info("Changed LV activation vg=%s lv=%s active=%s", vg, lv, active)

    def lvchange_refresh(self, vg: str, lv: str) -> None:
        """Reload vg/lv's device-mapper table from the (changed) metadata."""
        check_name(vg)
        check_name(lv)
        if not self.activation:
            raise errors.LogicalVolumeRefreshError(vg=vg, lv=lv, reason=_METADATA_ONLY)
        cmd = ["lvchange", "--refresh", f"{vg}/{lv}"]
        self._change_lv(vg, lv, cmd, errors.LogicalVolumeRefreshError)
        log.info("Refreshed LV vg=%s lv=%s", vg, lv)

    def lv_layout(self, vg: str, lv: str) -> lvm_model.Layout:
        """vg/lv's PV segments with the PVs' pe_start, in one lvm2 command."""
        check_name(vg)
        check_name(lv)
        fields = (
            "vg_name,vg_extent_size,lv_name,pv_name,pe_start,pvseg_start,pvseg_size,seg_start_pe"
        )
        select = ["--segments", "--select", f"vg_name={vg} && lv_name={lv}"]
        rows = self._report("pvs", fields, "pvseg", [], extra_args=select)
        rows = [r for r in rows if r["vg_name"] == vg and r["lv_name"] == lv]
        if not rows:
            self.lv_info(vg, lv)  # raises the specific error
            raise errors.LogicalVolumeDoesNotExistError(vg=vg, lv=lv)
        return lvm_model.make_layout(vg, lv, rows)

    # Free extents

    def free_ranges(self, vg: str) -> list[lvm_model.PERange]:
        """Free extent ranges of vg's PVs, in PV then PE order."""
        check_name(vg)
        fields = "vg_name,pv_name,pvseg_start,pvseg_size,lv_name"
        try:
            rows = self._report("pvs", fields, "pv", [], extra_args=_VG_ORDER + [f"vg_name={vg}"])
        except errors.CommandFailed as e:
            _raise_not_found(e, vg)
            raise
        if not rows:
            # Either no such VG, or a VG without PVs (impossible): say which.
            self.vg_info(vg)
            return []
        return lvm_model.make_free(vg, rows)

    def find_free_range(
        self, vg: str, extents: int, reserved: Iterable[lvm_model.Segment | lvm_model.PERange] = ()
    ) -> lvm_model.PERange:
        """The first free range of exactly extents extents on one PV.

        Extents in reserved ranges (e.g. kept free behind other LVs so they
        can grow in place, in loop activation mode) are treated as used.
        Raises VolumeGroupSizeError if no PV has such a contiguous range.
        """
        if extents < 1:
            raise ValueError(f"Invalid extents={extents}")
        return lvm_model.first_fit(vg, self.free_ranges(vg), extents, reserved)

    # Whole VG

    def vg_state(self, vg: str) -> lvm_model.VGState:
        """vg, its PVs, LVs and free extents in one lvm2 command.

        One ``pvs --segments`` row per PV segment: an LV's rows give its
        segments (ordered by their first extent in the LV), rows without an
        LV the free ranges.  LVs without extents on a PV (thin, virtual) are
        not listed; a domain's LVs are linear.
        """
        check_name(vg)
        before = generation(vg)
        fields = (
            "vg_name,vg_extent_size,vg_extent_count,vg_free_count,vg_tags,"
            "pv_name,pe_start,pv_pe_count,pv_pe_alloc_count,pvseg_start,pvseg_size,"
            "lv_name,lv_size,lv_tags,lv_active,lv_attr,seg_start_pe"
        )
        try:
            rows = self._report(
                "pvs", fields, "pvseg", [], extra_args=["--segments", *_VG_ORDER, f"vg_name={vg}"]
            )
        except errors.CommandFailed as e:
            _raise_not_found(e, vg)
            raise
        rows = [r for r in rows if r["vg_name"] == vg]
        if not rows:
            self.vg_info(vg)  # raises VolumeGroupDoesNotExist
            raise errors.VolumeGroupDoesNotExist(vg=vg)
        return lvm_model.make_state(vg, rows, before, generation)

    # Running lvm2

    def _change_lv(self, vg: str, lv: str, cmd: list[str], error: type[errors.Error]) -> None:
        """Run cmd changing vg/lv; a failure raises a not-found error or error."""
        with _vg_lock(vg):
            try:
                self._run(cmd)
            except errors.CommandFailed as e:
                _raise_not_found(e, vg, lv)
                raise error(
                    vg=vg, lv=lv, reason=_clean(e.err), cmd=e.cmd, rc=e.rc, err=e.err
                ) from e

    def _run(self, args: list[str], extra_devices: Sequence[str] = ()) -> str:
        cmd = [LVM_COMMAND, args[0], "--config", self.config(extra_devices), *args[1:]]
        proc = commands.run(cmd, timeout=self.timeout, env=ENV)
        return proc.stdout.decode("utf-8", "replace")

    def _report(
        self,
        command: str,
        fields: str,
        kind: str,
        targets: list[str],
        extra_args: Sequence[str] = (),
    ) -> list[dict[str, str]]:
        args = [
            command,
            "--reportformat",
            "json",
            "--units",
            "b",
            "--nosuffix",
            "-o",
            fields,
            *extra_args,
            *targets,
        ]
        out = self._run(args)
        try:
            doc = json.loads(out)
            rows: list[dict[str, str]] = []
            for report in doc["report"]:
                rows.extend(report.get(kind, []))
        except (ValueError, KeyError, TypeError) as e:
            raise errors.CommandFailed(
                cmd=[LVM_COMMAND, command],
                rc=0,
                err=f"cannot parse JSON report: {e}: {out[:200]!r}",
            ) from e
        return rows


# Helpers


@contextmanager
def _vg_lock(vg: str) -> Iterator[None]:
    """Serialize a command changing vg; counts it in vg's generation."""
    with _vg_locks_guard:
        lock = _vg_locks[vg]
    with lock:
        try:
            yield
        finally:
            with _vg_locks_guard:
                _generations[vg] += 1


def generation(vg: str) -> int:
    """How many commands of this process changed (or tried to change) vg."""
    with _vg_locks_guard:
        return _generations[vg]


def _check_device(dev: str) -> None:
    if not _DEVICE_RE.match(dev):
        raise ValueError(f"Unsupported device path for an LVM filter: {dev!r}")


def check_name(name: str) -> None:
    if not _NAME_RE.match(name) or name.startswith("-"):
        raise ValueError(f"Invalid LVM name: {name!r}")


def _tag_args(add: Iterable[str], delete: Iterable[str]) -> list[str]:
    args: list[str] = []
    for tag in delete:
        args += ["--deltag", tag]
    for tag in add:
        args += ["--addtag", tag]
    return args


def _clean(err: str) -> str:
    lines = [line.strip() for line in err.splitlines()]
    return "; ".join(line for line in lines if line and not any(n in line for n in _NOISE))


def _raise_not_found(e: errors.CommandFailed, vg: str, lv: str | None = None) -> None:
    fields: dict[str, Any] = {"cmd": e.cmd, "rc": e.rc, "err": e.err}
    if _VG_NOT_FOUND.search(e.err):
        raise errors.VolumeGroupDoesNotExist(vg=vg, **fields) from e
    if lv is not None and _LV_NOT_FOUND.search(e.err):
        raise errors.LogicalVolumeDoesNotExistError(vg=vg, lv=lv, **fields) from e
