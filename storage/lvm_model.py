"""LVM data model: what lvm2 reports about a VG, parsed into frozen values.

PVs, VGs, LVs with their PV segments, LV layouts and free extent ranges, and
:class:`VGState`, one reading of a whole VG (see :meth:`storage.lvm.LVM.vg_state`).
Parsing and allocation here are pure: nothing runs lvm2.  Whether a reading
is still current is asked of the counter of VG changes kept by
:mod:`storage.lvm_cmd`, passed in when the reading is made.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable

from storage import errors


@dataclasses.dataclass(frozen=True)
class PV:
    name: str
    pe_start: int  # bytes from the start of the device to the first extent
    pe_count: int
    pe_alloc_count: int


@dataclasses.dataclass(frozen=True)
class VG:
    name: str
    extent_size: int  # bytes
    extent_count: int
    free_count: int
    tags: tuple[str, ...]
    pvs: tuple[PV, ...]

    def pv(self, name: str) -> PV:
        for pv in self.pvs:
            if pv.name == name:
                return pv
        raise KeyError(name)


@dataclasses.dataclass(frozen=True)
class Segment:
    """A range of physical extents of one PV, first and last inclusive."""

    pv: str
    first_pe: int
    last_pe: int

    @property
    def count(self) -> int:
        return self.last_pe - self.first_pe + 1

    def __str__(self) -> str:
        return pv_range(self.pv, self.first_pe, self.last_pe)


@dataclasses.dataclass(frozen=True)
class LV:
    vg_name: str
    name: str
    size: int  # bytes
    extent_count: int
    tags: tuple[str, ...]
    segments: tuple[Segment, ...]  # in LV order
    active: bool | None  # None: unknown (metadata-only mode)
    attr: str


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where an LV's extents are: what mapping it by hand needs."""

    vg_name: str
    name: str
    extent_size: int  # bytes
    segments: tuple[Segment, ...]  # in LV order
    pe_starts: dict[str, int]  # PV name -> bytes before its first extent

    def offset(self, segment: Segment) -> int:
        """Byte offset of segment's first extent on its PV."""
        return self.pe_starts[segment.pv] + segment.first_pe * self.extent_size


@dataclasses.dataclass(frozen=True)
class PERange:
    """A free range of count extents of one PV starting at first_pe."""

    pv: str
    first_pe: int
    count: int

    @property
    def last_pe(self) -> int:
        return self.first_pe + self.count - 1

    def __str__(self) -> str:
        return pv_range(self.pv, self.first_pe, self.last_pe)


@dataclasses.dataclass(frozen=True)
class VGState:
    """One reading of a VG (:meth:`LVM.vg_state`): the VG with its PVs, its
    LVs with their segments, and its free extents, as one command saw them.

    It answers what separate ``vgs``, ``lvs``, ``pvs`` and
    :meth:`LVM.lv_layout` commands would have answered at that moment.  It
    is :meth:`current` while no command of this process has changed the VG
    since; changes by other hosts are not seen, so a reading is for one
    operation (VDSM serializes metadata changes on the SPM), never kept.
    """

    vg: VG
    lvs: dict[str, LV]  # by name; hidden LVs (``[name]``) left out
    free: tuple[PERange, ...]  # in PV then PE order
    generation: int
    # VG name -> its generation now (storage.lvm_cmd.generation).
    generation_of: Callable[[str], int] = dataclasses.field(compare=False, repr=False)

    def current(self) -> bool:
        """True if no command of this process changed the VG since the reading."""
        return self.generation_of(self.vg.name) == self.generation

    def lv(self, name: str) -> LV:
        lv = self.lvs.get(name)
        if lv is None:
            raise errors.LogicalVolumeDoesNotExistError(vg=self.vg.name, lv=name)
        return lv

    def layout(self, name: str) -> Layout:
        """What :meth:`LVM.lv_layout` answers for the LV name."""
        lv = self.lv(name)
        return Layout(
            vg_name=self.vg.name,
            name=name,
            extent_size=self.vg.extent_size,
            segments=lv.segments,
            pe_starts={s.pv: self.vg.pv(s.pv).pe_start for s in lv.segments},
        )

    def find_free_range(self, extents: int, reserved: Iterable[Segment | PERange] = ()) -> PERange:
        """What :meth:`LVM.find_free_range` answers, from this reading."""
        return first_fit(self.vg.name, list(self.free), extents, reserved)


def pv_range(pv: str, first_pe: int, last_pe: int) -> str:
    """lvm2's notation of a PE range: ``/dev/loop3:10-19``."""
    return f"{pv}:{first_pe}-{last_pe}"


def merged_segments(segments: Iterable[Segment]) -> list[Segment]:
    """Segments with neighbours on the same PV joined, in LV order."""
    result: list[Segment] = []
    for seg in segments:
        if result and result[-1].pv == seg.pv and result[-1].last_pe + 1 == seg.first_pe:
            result[-1] = Segment(seg.pv, result[-1].first_pe, seg.last_pe)
        else:
            result.append(seg)
    return result


def parse_tags(value: str) -> tuple[str, ...]:
    return tuple(t for t in value.split(",") if t)


def _parse_ranges(value: str) -> list[Segment]:
    # "/dev/loop0:10-24" (several, space separated, for striped/mirrored).
    segments = []
    for item in value.split():
        pv, _, pe = item.rpartition(":")
        first, _, last = pe.partition("-")
        segments.append(Segment(pv, int(first), int(last)))
    return segments


def make_lv(rows: list[dict[str, str]]) -> LV:
    first = rows[0]
    segments: list[Segment] = []
    for row in rows:
        segments.extend(_parse_ranges(row["seg_pe_ranges"]))
    size = int(first["lv_size"])
    active = {"active": True, "": False}.get(first["lv_active"])
    return LV(
        vg_name=first["vg_name"],
        name=first["lv_name"],
        size=size,
        extent_count=size // int(first["vg_extent_size"]),
        tags=parse_tags(first["lv_tags"]),
        segments=tuple(segments),
        active=active,
        attr=first["lv_attr"],
    )


def _subtract(free: list[PERange], reserved: Iterable[Segment | PERange]) -> list[PERange]:
    """free minus the reserved ranges."""
    result = list(free)
    for res in reserved:
        next_result = []
        for r in result:
            if r.pv != res.pv or res.last_pe < r.first_pe or res.first_pe > r.last_pe:
                next_result.append(r)
                continue
            if res.first_pe > r.first_pe:
                next_result.append(PERange(r.pv, r.first_pe, res.first_pe - r.first_pe))
            if res.last_pe < r.last_pe:
                next_result.append(PERange(r.pv, res.last_pe + 1, r.last_pe - res.last_pe))
        result = next_result
    return result


def first_fit(
    vg: str, free: list[PERange], extents: int, reserved: Iterable[Segment | PERange]
) -> PERange:
    if extents < 1:
        raise ValueError(f"Invalid extents={extents}")
    for rng in _subtract(free, reserved):
        if rng.count >= extents:
            return PERange(rng.pv, rng.first_pe, extents)
    raise errors.VolumeGroupSizeError(
        vg=vg, reason=f"no contiguous free range of {extents} extents"
    )


def make_state(
    vg: str, rows: list[dict[str, str]], gen: int, generation_of: Callable[[str], int]
) -> VGState:
    """The VGState of vg from ``pvs --segments`` rows read at generation gen."""
    first = rows[0]
    extent_size = int(first["vg_extent_size"])
    pvs: dict[str, PV] = {}
    free: list[PERange] = []
    lv_rows: dict[str, list[dict[str, str]]] = {}
    for r in rows:
        name = r["pv_name"]
        if name not in pvs:
            pvs[name] = make_pv(r)
        lv = r["lv_name"]
        if not lv:
            if int(r["pvseg_size"]) > 0:
                free.append(PERange(name, int(r["pvseg_start"]), int(r["pvseg_size"])))
        elif not lv.startswith("["):
            lv_rows.setdefault(lv, []).append(r)
    order = {pv: i for i, pv in enumerate(pvs)}
    free.sort(key=lambda f: (order[f.pv], f.first_pe))
    lvs: dict[str, LV] = {}
    for name, segs in sorted(lv_rows.items()):
        segs.sort(key=lambda r: int(r["seg_start_pe"]))
        lv_first = segs[0]
        size = int(lv_first["lv_size"])
        lvs[name] = LV(
            vg_name=vg,
            name=name,
            size=size,
            extent_count=size // extent_size,
            tags=parse_tags(lv_first["lv_tags"]),
            segments=tuple(_pv_segment(r) for r in segs),
            active={"active": True, "": False}.get(lv_first["lv_active"]),
            attr=lv_first["lv_attr"],
        )
    return VGState(
        vg=make_vg(first, pvs.values()),
        lvs=lvs,
        free=tuple(free),
        generation=gen,
        generation_of=generation_of,
    )


def make_pv(row: dict[str, str]) -> PV:
    """The PV of a report row with pv_name, pe_start, pv_pe_count, pv_pe_alloc_count."""
    return PV(
        name=row["pv_name"],
        pe_start=int(row["pe_start"]),
        pe_count=int(row["pv_pe_count"]),
        pe_alloc_count=int(row["pv_pe_alloc_count"]),
    )


def make_vg(row: dict[str, str], pvs: Iterable[PV]) -> VG:
    """The VG of a report row with the vg_* fields, made of pvs."""
    return VG(
        name=row["vg_name"],
        extent_size=int(row["vg_extent_size"]),
        extent_count=int(row["vg_extent_count"]),
        free_count=int(row["vg_free_count"]),
        tags=parse_tags(row["vg_tags"]),
        pvs=tuple(pvs),
    )


def make_layout(vg: str, lv: str, rows: list[dict[str, str]]) -> Layout:
    """The Layout of vg/lv from its ``pvs --segments`` rows (at least one)."""
    rows = sorted(rows, key=lambda r: int(r["seg_start_pe"]))
    return Layout(
        vg_name=vg,
        name=lv,
        extent_size=int(rows[0]["vg_extent_size"]),
        segments=tuple(_pv_segment(r) for r in rows),
        pe_starts={r["pv_name"]: int(r["pe_start"]) for r in rows},
    )


def make_free(vg: str, rows: list[dict[str, str]]) -> list[PERange]:
    """Free ranges of vg from ``pvs`` segment rows in PV order, in PV then PE order."""
    free = [
        PERange(r["pv_name"], int(r["pvseg_start"]), int(r["pvseg_size"]))
        for r in rows
        if r["vg_name"] == vg and not r["lv_name"] and int(r["pvseg_size"]) > 0
    ]
    order = {pv: i for i, pv in enumerate(dict.fromkeys(r["pv_name"] for r in rows))}
    return sorted(free, key=lambda r: (order[r.pv], r.first_pe))


def _pv_segment(row: dict[str, str]) -> Segment:
    start = int(row["pvseg_start"])
    return Segment(row["pv_name"], start, start + int(row["pvseg_size"]) - 1)
