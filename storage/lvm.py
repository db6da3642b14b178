"""LVM: real lvm2 commands, restricted to a storage domain's devices.

An :class:`LVM` object carries the devices LVM may look at and whether LVs
can be activated through device-mapper; every command runs with the
``--config`` string built for them (:func:`storage.lvm_cmd.config`: a device
filter accepting only those devices, and ``global{activation=0}`` in
metadata-only mode, for hosts without device-mapper (ENVIRONMENT.md): every
metadata operation works, LVs are created ``-an -Zn`` and reached through
loop devices instead, storage/activation.py).

Reports are JSON (:func:`storage.lvm_cmd.report_args`), parsed into the
values of :mod:`storage.lvm_model`.  :meth:`LVM.vg_state` reads a whole VG
(PVs, LVs with their segments, free extents) in one command, so an operation
can list, allocate and map LVs from one reading; a reading knows whether
this process changed the VG since (:meth:`storage.lvm_model.VGState.current`).
Commands that change a VG are serialized per VG name within this process
(:func:`storage.lvm_cmd.vg_lock`).  Failures raise the storage error for
what was attempted (``CannotCreateLogicalVolume`` ...) or, when lvm2 says
so, ``VolumeGroupDoesNotExist`` / ``LogicalVolumeDoesNotExistError``; each
carries the command's cmd, rc and err.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence

from storage import errors, lvm_cmd, lvm_model

log = logging.getLogger("storage.lvm")

DEFAULT_TIMEOUT = lvm_cmd.DEFAULT_TIMEOUT


class LVM:
    """lvm2 restricted to devices; metadata-only if activation is False."""

    def __init__(
        self, devices: Sequence[str], activation: bool = True, timeout: float = DEFAULT_TIMEOUT
    ) -> None:
        if not devices:
            raise ValueError("LVM needs at least one device")
        for dev in devices:
            lvm_cmd.check_device(dev)
        self.devices: tuple[str, ...] = tuple(devices)
        self.activation = activation
        self.timeout = timeout

    def __repr__(self) -> str:
        return f"<LVM devices={list(self.devices)} activation={self.activation}>"

    def config(self, extra_devices: Sequence[str] = ()) -> str:
        """The --config string for a command over our devices (and extra ones)."""
        devices = list(self.devices) + [d for d in extra_devices if d not in self.devices]
        return lvm_cmd.config(devices, self.activation)

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
                devices=list(devices), reason=lvm_cmd.clean(e.err), **lvm_cmd.failure(e)
            ) from e

    # Volume groups

    def vgcreate(
        self, vg: str, devices: Sequence[str], extent_size_mb: int = 128, tags: Iterable[str] = ()
    ) -> None:
        lvm_cmd.check_name(vg)
        cmd = ["vgcreate", "--physicalextentsize", f"{extent_size_mb}m"]
        for tag in tags:
            cmd += ["--addtag", tag]
        cmd += [vg, *devices]
        with lvm_cmd.vg_lock(vg):
            try:
                self._run(cmd, extra_devices=devices)
            except errors.CommandFailed as e:
                if lvm_cmd.VG_EXISTS.search(e.err):
                    raise errors.VolumeGroupAlreadyExistsError(
                        vg=vg, **lvm_cmd.failure(e)
                    ) from e
                raise errors.VolumeGroupCreateError(
                    vg=vg,
                    devices=list(devices),
                    reason=lvm_cmd.clean(e.err),
                    **lvm_cmd.failure(e),
                ) from e
        log.info("Created VG vg=%s devices=%s extent_size_mb=%d", vg, list(devices), extent_size_mb)

    def vgremove(self, vg: str) -> None:
        """Remove vg and all its LVs."""
        lvm_cmd.check_name(vg)
        with lvm_cmd.vg_lock(vg):
            try:
                self._run(["vgremove", "-f", vg])
            except errors.CommandFailed as e:
                lvm_cmd.raise_not_found(e, vg)
                raise errors.VolumeGroupRemoveError(
                    vg=vg, reason=lvm_cmd.clean(e.err), **lvm_cmd.failure(e)
                ) from e
        log.info("Removed VG vg=%s", vg)

    def vgchange_tags(self, vg: str, add: Iterable[str] = (), delete: Iterable[str] = ()) -> None:
        lvm_cmd.check_name(vg)
        cmd = ["vgchange"] + lvm_cmd.tag_args(add, delete) + [vg]
        with lvm_cmd.vg_lock(vg):
            try:
                self._run(cmd)
            except errors.CommandFailed as e:
                lvm_cmd.raise_not_found(e, vg)
                raise
        log.info("Changed VG tags vg=%s add=%s delete=%s", vg, list(add), list(delete))

    def vg_info(self, vg: str) -> lvm_model.VG:
        lvm_cmd.check_name(vg)
        fields = "vg_name,vg_extent_size,vg_extent_count,vg_free_count,vg_tags"
        pv_fields = "pv_name,pe_start,pv_pe_count,pv_pe_alloc_count"
        try:
            rows = self._report("vgs", f"{fields},{pv_fields}", "vg", [vg])
        except errors.CommandFailed as e:
            lvm_cmd.raise_not_found(e, vg)
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
        lvm_cmd.check_name(vg)
        lvm_cmd.check_name(lv)
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
        with lvm_cmd.vg_lock(vg):
            try:
                self._run(cmd)
            except errors.CommandFailed as e:
                lvm_cmd.raise_not_found(e, vg)
                fields = {"vg": vg, "lv": lv, **lvm_cmd.failure(e)}
                if lvm_cmd.LV_EXISTS.search(e.err):
                    raise errors.LogicalVolumeAlreadyExists(**fields) from e
                if lvm_cmd.NO_SPACE.search(e.err):
                    raise errors.VolumeGroupSizeError(reason=lvm_cmd.clean(e.err), **fields) from e
                raise errors.CannotCreateLogicalVolume(reason=lvm_cmd.clean(e.err), **fields) from e
        log.info("Created LV vg=%s lv=%s extents=%d range=%s", vg, lv, extents, pv_range)

    def lvextend(self, vg: str, lv: str, extents_total: int, pv_range: str | None = None) -> None:
        """Grow vg/lv to extents_total extents, taking them from pv_range if given."""
        lvm_cmd.check_name(vg)
        lvm_cmd.check_name(lv)
        cmd = ["lvextend", "--autobackup", "n", "--extents", str(extents_total), f"{vg}/{lv}"]
        if pv_range:
            cmd.append(pv_range)
        with lvm_cmd.vg_lock(vg):
            try:
                self._run(cmd)
            except errors.CommandFailed as e:
                lvm_cmd.raise_not_found(e, vg, lv)
                fields = {"vg": vg, "lv": lv, **lvm_cmd.failure(e)}
                if lvm_cmd.NO_SPACE.search(e.err):
                    raise errors.VolumeGroupSizeError(reason=lvm_cmd.clean(e.err), **fields) from e
                raise errors.LogicalVolumeExtendError(
                    extents=extents_total, reason=lvm_cmd.clean(e.err), **fields
                ) from e
        log.info("Extended LV vg=%s lv=%s extents=%d range=%s", vg, lv, extents_total, pv_range)

    def lvremove(self, vg: str, lv: str) -> None:
        lvm_cmd.check_name(vg)
        lvm_cmd.check_name(lv)
        self._change_lv(vg, lv, ["lvremove", "-f", f"{vg}/{lv}"], errors.CannotRemoveLogicalVolume)
        log.info("Removed LV vg=%s lv=%s", vg, lv)

    def lvs(self, vg: str, lv: str | None = None) -> list[lvm_model.LV]:
        """LVs of vg (or just vg/lv), sorted by name."""
        lvm_cmd.check_name(vg)
        if lv is not None:
            lvm_cmd.check_name(lv)
        fields = "vg_name,lv_name,lv_size,vg_extent_size,lv_tags,lv_active,lv_attr,seg_pe_ranges"
        target = f"{vg}/{lv}" if lv else vg
        try:
            rows = self._report("lvs", fields, "lv", [target])
        except errors.CommandFailed as e:
            lvm_cmd.raise_not_found(e, vg, lv)
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
        lvm_cmd.check_name(vg)
        lvm_cmd.check_name(lv)
        add, delete = list(add), list(delete)
        cmd = ["lvchange", "--autobackup", "n"] + lvm_cmd.tag_args(add, delete) + [f"{vg}/{lv}"]
        self._change_lv(vg, lv, cmd, errors.LogicalVolumeReplaceTagError)
        log.info("Changed LV tags vg=%s lv=%s add=%s delete=%s", vg, lv, add, delete)

    def lvchange_activate(self, vg: str, lv: str, active: bool) -> None:
        """Activate or deactivate vg/lv through device-mapper."""
        lvm_cmd.check_name(vg)
        lvm_cmd.check_name(lv)
        error = (
            errors.CannotActivateLogicalVolume if active else errors.CannotDeactivateLogicalVolume
        )
        if not self.activation:
            raise error(vg=vg, lv=lv, reason=lvm_cmd.METADATA_ONLY)
        cmd = ["lvchange", "--activate", "y" if active else "n", f"{vg}/{lv}"]
        self._change_lv(vg, lv, cmd, error)
        log.info("Changed LV activation vg=%s lv=%s active=%s", vg, lv, active)

    def lvchange_refresh(self, vg: str, lv: str) -> None:
        """Reload vg/lv's device-mapper table from the (changed) metadata."""
        lvm_cmd.check_name(vg)
        lvm_cmd.check_name(lv)
        if not self.activation:
            raise errors.LogicalVolumeRefreshError(vg=vg, lv=lv, reason=lvm_cmd.METADATA_ONLY)
        cmd = ["lvchange", "--refresh", f"{vg}/{lv}"]
        self._change_lv(vg, lv, cmd, errors.LogicalVolumeRefreshError)
        log.info("Refreshed LV vg=%s lv=%s", vg, lv)

    def lv_layout(self, vg: str, lv: str) -> lvm_model.Layout:
        """vg/lv's PV segments with the PVs' pe_start, in one lvm2 command."""
        lvm_cmd.check_name(vg)
        lvm_cmd.check_name(lv)
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
        lvm_cmd.check_name(vg)
        fields = "vg_name,pv_name,pvseg_start,pvseg_size,lv_name"
        try:
            rows = self._report(
                "pvs", fields, "pv", [], extra_args=[*lvm_cmd.VG_ORDER, f"vg_name={vg}"]
            )
        except errors.CommandFailed as e:
            lvm_cmd.raise_not_found(e, vg)
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
        lvm_cmd.check_name(vg)
        before = lvm_cmd.generation(vg)
        fields = (
            "vg_name,vg_extent_size,vg_extent_count,vg_free_count,vg_tags,"
            "pv_name,pe_start,pv_pe_count,pv_pe_alloc_count,pvseg_start,pvseg_size,"
            "lv_name,lv_size,lv_tags,lv_active,lv_attr,seg_start_pe"
        )
        try:
            select = ["--segments", *lvm_cmd.VG_ORDER, f"vg_name={vg}"]
            rows = self._report("pvs", fields, "pvseg", [], extra_args=select)
        except errors.CommandFailed as e:
            lvm_cmd.raise_not_found(e, vg)
            raise
        rows = [r for r in rows if r["vg_name"] == vg]
        if not rows:
            self.vg_info(vg)  # raises VolumeGroupDoesNotExist
            raise errors.VolumeGroupDoesNotExist(vg=vg)
        return lvm_model.make_state(vg, rows, before, lvm_cmd.generation)

    # Running lvm2

    def _change_lv(self, vg: str, lv: str, cmd: list[str], error: type[errors.Error]) -> None:
        """Run cmd changing vg/lv; a failure raises a not-found error or error."""
        with lvm_cmd.vg_lock(vg):
            try:
                self._run(cmd)
            except errors.CommandFailed as e:
                lvm_cmd.raise_not_found(e, vg, lv)
                raise error(
                    vg=vg, lv=lv, reason=lvm_cmd.clean(e.err), **lvm_cmd.failure(e)
                ) from e

    def _run(self, args: list[str], extra_devices: Sequence[str] = ()) -> str:
        return lvm_cmd.run(args, self.config(extra_devices), self.timeout)

    def _report(
        self,
        command: str,
        fields: str,
        kind: str,
        targets: list[str],
        extra_args: Sequence[str] = (),
    ) -> list[dict[str, str]]:
        out = self._run(lvm_cmd.report_args(command, fields, targets, extra_args))
        return lvm_cmd.parse_report(command, kind, out)
