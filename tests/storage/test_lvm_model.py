"""The LVM data model: report rows parsed into values, and free-extent
allocation (pure: nothing runs lvm2)."""

from __future__ import annotations

import pytest

from storage import errors, lvm_model

MiB = 1024**2
EXTENT = 4 * MiB
VG = "vg0"


def vg_row(**changes: str) -> dict[str, str]:
    row = {
        "vg_name": VG,
        "vg_extent_size": str(EXTENT),
        "vg_extent_count": "200",
        "vg_free_count": "150",
        "vg_tags": "RHAT_storage_domain,other",
    }
    row.update(changes)
    return row


def pvseg_row(pv: str, start: int, size: int, lv: str = "", seg_start_pe: int = 0,
              lv_size: int = 0, tags: str = "", active: str = "") -> dict[str, str]:
    """A ``pvs --segments`` row of VGState's fields (lv "": free extents)."""
    return {
        **vg_row(),
        "pv_name": pv,
        "pe_start": str(MiB),
        "pv_pe_count": "100",
        "pv_pe_alloc_count": "25",
        "pvseg_start": str(start),
        "pvseg_size": str(size),
        "lv_name": lv,
        "lv_size": str(lv_size),
        "lv_tags": tags,
        "lv_active": active,
        "lv_attr": "-wi-------" if lv else "",
        "seg_start_pe": str(seg_start_pe),
    }


# Values.


def test_segment_and_range_notation() -> None:
    seg = lvm_model.Segment("/dev/loop3", 10, 19)
    assert seg.count == 10
    assert str(seg) == "/dev/loop3:10-19"
    rng = lvm_model.PERange("/dev/loop3", 10, 5)
    assert rng.last_pe == 14
    assert str(rng) == "/dev/loop3:10-14"
    assert lvm_model.pv_range("/dev/loop0", 0, 0) == "/dev/loop0:0-0"


def test_merged_segments_joins_neighbours_on_one_pv() -> None:
    a, b = "/dev/loop0", "/dev/loop1"
    segments = [
        lvm_model.Segment(a, 0, 9),
        lvm_model.Segment(a, 10, 19),  # follows: joined
        lvm_model.Segment(a, 30, 39),  # a gap: kept apart
        lvm_model.Segment(b, 40, 49),  # another PV: kept apart
        lvm_model.Segment(b, 50, 50),
    ]
    assert lvm_model.merged_segments(segments) == [
        lvm_model.Segment(a, 0, 19),
        lvm_model.Segment(a, 30, 39),
        lvm_model.Segment(b, 40, 50),
    ]
    assert lvm_model.merged_segments([]) == []


def test_parse_tags() -> None:
    assert lvm_model.parse_tags("") == ()
    assert lvm_model.parse_tags("IU_x,PU_y,,MD_3") == ("IU_x", "PU_y", "MD_3")


def test_vg_pv_lookup() -> None:
    pv = lvm_model.make_pv({"pv_name": "/dev/loop0", "pe_start": "1048576",
                            "pv_pe_count": "10", "pv_pe_alloc_count": "3"})
    vg = lvm_model.make_vg(vg_row(), [pv])
    assert vg.name == VG
    assert vg.extent_size == EXTENT
    assert (vg.extent_count, vg.free_count) == (200, 150)
    assert vg.tags == ("RHAT_storage_domain", "other")
    assert vg.pv("/dev/loop0") == lvm_model.PV("/dev/loop0", MiB, 10, 3)
    with pytest.raises(KeyError):
        vg.pv("/dev/loop9")


@pytest.mark.parametrize("active, expected", [("active", True), ("", False), ("unknown", None)])
def test_make_lv_from_lvs_rows(active: str, expected: bool | None) -> None:
    base = {"vg_name": VG, "lv_name": "lv1", "lv_size": str(5 * EXTENT),
            "vg_extent_size": str(EXTENT), "lv_tags": "IU_img,MD_0", "lv_active": active,
            "lv_attr": "-wi-a-----"}
    rows = [
        dict(base, seg_pe_ranges="/dev/loop0:10-12"),
        dict(base, seg_pe_ranges="/dev/loop1:0-1"),
    ]
    lv = lvm_model.make_lv(rows)
    assert lv.name == "lv1"
    assert lv.size == 5 * EXTENT
    assert lv.extent_count == 5
    assert lv.tags == ("IU_img", "MD_0")
    assert lv.segments == (
        lvm_model.Segment("/dev/loop0", 10, 12),
        lvm_model.Segment("/dev/loop1", 0, 1),
    )
    assert lv.active is expected


def test_layout_offset() -> None:
    rows = [
        {"vg_name": VG, "vg_extent_size": str(EXTENT), "lv_name": "lv1",
         "pv_name": "/dev/loop1", "pe_start": str(2 * MiB), "pvseg_start": "0",
         "pvseg_size": "2", "seg_start_pe": "3"},
        {"vg_name": VG, "vg_extent_size": str(EXTENT), "lv_name": "lv1",
         "pv_name": "/dev/loop0", "pe_start": str(MiB), "pvseg_start": "7",
         "pvseg_size": "3", "seg_start_pe": "0"},
    ]
    layout = lvm_model.make_layout(VG, "lv1", rows)
    # In LV order (seg_start_pe), not report order.
    assert layout.segments == (
        lvm_model.Segment("/dev/loop0", 7, 9),
        lvm_model.Segment("/dev/loop1", 0, 1),
    )
    assert layout.extent_size == EXTENT
    assert layout.offset(layout.segments[0]) == MiB + 7 * EXTENT
    assert layout.offset(layout.segments[1]) == 2 * MiB


def test_make_free_keeps_pv_order() -> None:
    rows = [
        {"vg_name": VG, "pv_name": "/dev/loop9", "pvseg_start": "5", "pvseg_size": "5",
         "lv_name": ""},
        {"vg_name": VG, "pv_name": "/dev/loop9", "pvseg_start": "0", "pvseg_size": "5",
         "lv_name": "used"},
        {"vg_name": VG, "pv_name": "/dev/loop10", "pvseg_start": "0", "pvseg_size": "0",
         "lv_name": ""},  # empty: dropped
        {"vg_name": VG, "pv_name": "/dev/loop10", "pvseg_start": "3", "pvseg_size": "7",
         "lv_name": ""},
        {"vg_name": "other", "pv_name": "/dev/loop11", "pvseg_start": "0", "pvseg_size": "9",
         "lv_name": ""},  # another VG: dropped
    ]
    assert lvm_model.make_free(VG, rows) == [
        lvm_model.PERange("/dev/loop9", 5, 5),
        lvm_model.PERange("/dev/loop10", 3, 7),
    ]


# Allocation.


def test_first_fit_skips_reserved_extents() -> None:
    pv = "/dev/loop0"
    free = [lvm_model.PERange(pv, 0, 10), lvm_model.PERange(pv, 20, 30)]
    assert lvm_model.first_fit(VG, free, 10, ()) == lvm_model.PERange(pv, 0, 10)
    # A reservation in the middle of the first range splits it.
    reserved = [lvm_model.PERange(pv, 3, 4)]
    assert lvm_model.first_fit(VG, free, 3, reserved) == lvm_model.PERange(pv, 0, 3)
    assert lvm_model.first_fit(VG, free, 4, reserved) == lvm_model.PERange(pv, 20, 4)
    # Segments count as reserved too; a reservation on another PV does not.
    segs = [lvm_model.Segment(pv, 20, 29), lvm_model.PERange("/dev/loop1", 0, 100)]
    assert lvm_model.first_fit(VG, free, 20, segs) == lvm_model.PERange(pv, 30, 20)


def test_first_fit_refuses() -> None:
    free = [lvm_model.PERange("/dev/loop0", 0, 10)]
    with pytest.raises(errors.VolumeGroupSizeError) as e:
        lvm_model.first_fit(VG, free, 11, ())
    assert e.value.vg == VG
    with pytest.raises(errors.VolumeGroupSizeError):
        lvm_model.first_fit(VG, free, 6, [lvm_model.PERange("/dev/loop0", 4, 1)])
    with pytest.raises(ValueError):
        lvm_model.first_fit(VG, free, 0, ())


# One reading of a VG.


def make_state(generation: list[int]) -> lvm_model.VGState:
    a, b = "/dev/loop0", "/dev/loop1"
    rows = [
        pvseg_row(a, 0, 4, lv="metadata", lv_size=4 * EXTENT),
        # vol1 spans two PVs: its rows out of LV order.
        pvseg_row(b, 0, 2, lv="vol1", seg_start_pe=3, lv_size=5 * EXTENT,
                  tags="IU_img,MD_0", active="active"),
        pvseg_row(a, 4, 3, lv="vol1", seg_start_pe=0, lv_size=5 * EXTENT,
                  tags="IU_img,MD_0", active="active"),
        pvseg_row(a, 7, 93),
        pvseg_row(b, 2, 1, lv="[lvol0_pmspare]", lv_size=EXTENT),  # hidden: left out
        pvseg_row(b, 3, 97),
    ]
    return lvm_model.make_state(VG, rows, generation[0], lambda vg: generation[0])


def test_vg_state_lists_lvs_and_free_ranges() -> None:
    state = make_state([0])
    assert state.vg.name == VG
    assert [pv.name for pv in state.vg.pvs] == ["/dev/loop0", "/dev/loop1"]
    assert sorted(state.lvs) == ["metadata", "vol1"]
    vol = state.lv("vol1")
    assert vol.extent_count == 5
    assert vol.tags == ("IU_img", "MD_0")
    assert vol.active is True
    assert vol.segments == (
        lvm_model.Segment("/dev/loop0", 4, 6),
        lvm_model.Segment("/dev/loop1", 0, 1),
    )
    assert state.free == (
        lvm_model.PERange("/dev/loop0", 7, 93),
        lvm_model.PERange("/dev/loop1", 3, 97),
    )
    with pytest.raises(errors.LogicalVolumeDoesNotExistError):
        state.lv("missing")


def test_vg_state_answers_layout_and_free_range() -> None:
    state = make_state([0])
    layout = state.layout("vol1")
    assert layout.segments == state.lv("vol1").segments
    assert layout.offset(layout.segments[0]) == MiB + 4 * EXTENT
    assert state.find_free_range(93) == lvm_model.PERange("/dev/loop0", 7, 93)
    assert state.find_free_range(94) == lvm_model.PERange("/dev/loop1", 3, 94)
    reserved = [lvm_model.PERange("/dev/loop0", 7, 10)]
    assert state.find_free_range(80, reserved=reserved) == lvm_model.PERange(
        "/dev/loop0", 17, 80)


def test_vg_state_is_current_until_the_vg_changes() -> None:
    generation = [3]
    state = make_state(generation)
    assert state.current()
    generation[0] += 1  # a command of this process changed the VG
    assert not state.current()
