"""The LV side of block volumes (storage/block_volume.py): sizes, allocation
with metadata slots and PE reservations, extension in place, removal; on
real lvm2 over a loop device, without the API or tasks."""

from __future__ import annotations

import collections.abc
import os
import uuid

import pytest

from common import sizes
from storage import block_sd, block_volume, errors, lvm_model, oop, sd, volume
from tests.storage.conftest import requires_root

MiB = 1024**2
GiB = 1024**3
EXTENT = 4 * MiB
CHUNK = 8 * MiB
BLANK = sd.BLANK_UUID


def new_id() -> str:
    return str(uuid.uuid4())


@pytest.fixture
def dom(
    storage_tmpdir: str, loop_device_factory: collections.abc.Callable[..., str]
) -> collections.abc.Iterator[block_sd.BlockDomain]:
    """A new block domain on one 1 GiB loop device (4 MiB extents, 8 MiB chunks)."""
    env = sd.Env(oop=oop.InProcess(), run_dir=os.path.join(storage_tmpdir, "run"),
                 chunk_size=CHUNK, extent_size_mb=EXTENT // MiB)
    domain = block_sd.create(new_id(), [loop_device_factory(GiB)], "volumes", env)
    yield domain
    for lv in domain.activation.active_lvs(domain.vg):
        domain.activation.deactivate(domain.vg, lv)


@pytest.fixture
def loop_dom(dom: block_sd.BlockDomain) -> block_sd.BlockDomain:
    if dom.activation_mode != "loop":
        pytest.skip("PE reservations exist in loop activation mode only")
    return dom


def allocate(dom: block_sd.BlockDomain, capacity: int, fmt: str = volume.COW,
             prealloc: str = volume.SPARSE, requested: int | None = None,
             img: str | None = None) -> tuple[str, str]:
    """A volume's LV and metadata, as a creation makes them before the data."""
    img, vol = img or new_id(), new_id()
    md = volume.Metadata(domain=dom.sd_id, image=img, parent=BLANK, capacity=capacity,
                         format=fmt, type=prealloc, voltype=volume.LEAF,
                         legality=volume.ILLEGAL, ctime=0)
    dom.volumes.allocate(img, vol, md, requested)
    dom.manifest.write_volume_metadata(img, vol, md)
    return img, vol


def lv_of(dom: block_sd.BlockDomain, vol: str) -> lvm_model.LV:
    return dom.lvm.lv_info(dom.vg, vol)


def only_segment(lv: lvm_model.LV) -> lvm_model.Segment:
    (seg,) = lvm_model.merged_segments(lv.segments)
    return seg


# Pure rules.


def lv(name: str, tags: tuple[str, ...], *segments: lvm_model.Segment) -> lvm_model.LV:
    count = sum(s.count for s in segments)
    return lvm_model.LV("vg", name, count * EXTENT, count, tags, segments, None, "")


def test_reserved_ranges() -> None:
    a, b = "/dev/loop0", "/dev/loop1"
    lvs = {
        "v1": lv("v1", ("IU_i", "RS_11"), lvm_model.Segment(a, 10, 11)),
        # Two segments side by side count as one range.
        "v2": lv("v2", ("RS_5",), lvm_model.Segment(a, 30, 30), lvm_model.Segment(a, 31, 32)),
        "dm": lv("dm", ("IU_i",), lvm_model.Segment(a, 50, 51)),  # no reservation
        "bad": lv("bad", ("RS_x",), lvm_model.Segment(a, 60, 61)),
        "split": lv("split", ("RS_9",), lvm_model.Segment(a, 70, 70), lvm_model.Segment(b, 0, 0)),
    }
    assert block_volume.reserved(lvs) == [
        lvm_model.PERange(a, 10, 11),
        lvm_model.PERange(a, 30, 5),
    ]


@requires_root
def test_initial_size_and_reservation(dom: block_sd.BlockDomain) -> None:
    vols = dom.volumes
    cap = 40 * MiB
    cow_max = sizes.cow_max_size(cap)
    assert vols.initial_size(volume.RAW, volume.PREALLOCATED, cap, 12 * MiB) == cap
    assert vols.initial_size(volume.COW, volume.SPARSE, cap, 12 * MiB) == 12 * MiB
    assert vols.initial_size(volume.COW, volume.PREALLOCATED, cap, None) == cow_max
    assert vols.initial_size(volume.COW, volume.SPARSE, cap, None) == CHUNK
    # Loop mode keeps the maximum size behind a volume; dm mode nothing.
    vols.loop_mode = True
    assert vols.reservation(volume.COW, cap, CHUNK) == cow_max
    assert vols.reservation(volume.RAW, cap, cap) == cap
    assert vols.reservation(volume.COW, cap, 2 * cow_max) == 2 * cow_max
    vols.loop_mode = False
    assert vols.reservation(volume.COW, cap, CHUNK) == CHUNK


# Allocation and removal.


@requires_root
def test_allocate_tags_slots_and_reservations(loop_dom: block_sd.BlockDomain) -> None:
    dom = loop_dom
    img1, cow = allocate(dom, 40 * MiB)
    img2, raw = allocate(dom, 20 * MiB, volume.RAW, volume.PREALLOCATED)
    img3, big = allocate(dom, 40 * MiB, requested=20 * MiB + 1)
    cow_lv, raw_lv, big_lv = lv_of(dom, cow), lv_of(dom, raw), lv_of(dom, big)
    assert set(cow_lv.tags) == {f"IU_{img1}", f"PU_{BLANK}", "MD_0", "RS_11"}
    assert set(raw_lv.tags) == {f"IU_{img2}", f"PU_{BLANK}", "MD_1", "RS_5"}
    assert set(big_lv.tags) == {f"IU_{img3}", f"PU_{BLANK}", "MD_2", "RS_11"}
    # Whole extents: one chunk, the capacity, the requested size rounded up.
    assert (cow_lv.size, raw_lv.size, big_lv.size) == (CHUNK, 20 * MiB, 24 * MiB)
    # Each LV starts after the reservation of the one before.
    first, second, third = only_segment(cow_lv), only_segment(raw_lv), only_segment(big_lv)
    assert second.first_pe >= first.first_pe + 11
    assert third.first_pe >= second.first_pe + 5
    assert dom.manifest.list_volumes(img1) == [cow]


@requires_root
def test_remove_clears_the_slot_for_the_next_volume(loop_dom: block_sd.BlockDomain) -> None:
    dom = loop_dom
    img, vol = allocate(dom, 16 * MiB)
    other_img, other = allocate(dom, 16 * MiB)
    with pytest.raises(errors.VolumeDoesNotExist):
        dom.volumes.remove(other_img, vol)  # not that image's volume
    dom.volumes.remove(img, vol)
    dom.volumes.remove(img, vol)  # idempotent
    with pytest.raises(errors.VolumeDoesNotExist):
        dom.manifest.volume_lv(img, vol)
    with pytest.raises(errors.VolumeMetadataReadError):
        dom.manifest._read_slot(vol, 0)  # cleared
    _, again = allocate(dom, 16 * MiB)
    assert "MD_0" in lv_of(dom, again).tags
    assert "MD_1" in lv_of(dom, other).tags


@requires_root
def test_check_create(dom: block_sd.BlockDomain) -> None:
    vols = dom.volumes
    with pytest.raises(errors.IncorrectType):
        vols.check_create(volume.RAW, volume.SPARSE, MiB, None)
    with pytest.raises(errors.IncorrectType):
        vols.check_create(volume.RAW, volume.SPARSE, MiB, None, check_space=False)
    vols.check_create(volume.COW, volume.SPARSE, 100 * MiB, None)
    vols.check_create(volume.RAW, volume.PREALLOCATED, 100 * MiB, None)
    with pytest.raises(errors.NoSpaceLeftOnDomain) as e:
        vols.check_create(volume.RAW, volume.PREALLOCATED, 2 * GiB, None)
    assert e.value.sd_id == dom.sd_id
    vols.check_create(volume.RAW, volume.PREALLOCATED, 2 * GiB, None, check_space=False)


# Growth.


@requires_root
def test_extend_in_place_up_to_the_maximum(loop_dom: block_sd.BlockDomain) -> None:
    dom = loop_dom
    img, vol = allocate(dom, 40 * MiB)
    start = only_segment(lv_of(dom, vol)).first_pe
    assert dom.volumes.max_size(img, vol) == 11 * EXTENT
    assert dom.volumes.extend(img, vol, 10 * MiB + 1) == 12 * MiB
    assert dom.volumes.extend(img, vol, MiB) == 12 * MiB  # never shrinks
    assert dom.volumes.extend(img, vol, GiB) == 11 * EXTENT  # capped
    seg = only_segment(lv_of(dom, vol))
    assert (seg.first_pe, seg.count) == (start, 11)
    assert lv_of(dom, vol).size == 11 * EXTENT


@requires_root
def test_max_size_without_reservation(dom: block_sd.BlockDomain) -> None:
    img, vol = allocate(dom, 40 * MiB)
    tags = [t for t in lv_of(dom, vol).tags if t.startswith("RS_")]
    dom.lvm.lvchange_tags(dom.vg, vol, delete=tags)
    # From the metadata: the COW maximum size in whole extents.
    expected = sizes.round_up(sizes.cow_max_size(40 * MiB), EXTENT)
    assert dom.volumes.max_size(img, vol) == expected == 11 * EXTENT


@requires_root
def test_extend_needs_one_contiguous_range(loop_dom: block_sd.BlockDomain) -> None:
    dom = loop_dom
    img, vol = allocate(dom, 40 * MiB)
    seg = only_segment(lv_of(dom, vol))
    # Another extent far away: the LV is no longer one range.
    far = lvm_model.pv_range(seg.pv, 200, 200)
    dom.lvm.lvextend(dom.vg, vol, seg.count + 1, pv_range=far)
    with pytest.raises(errors.LogicalVolumeNotContiguous):
        dom.volumes.extend(img, vol, 40 * MiB)


@requires_root
def test_extend_into_taken_extents_fails_as_extending_error(
    loop_dom: block_sd.BlockDomain,
) -> None:
    dom = loop_dom
    img, vol = allocate(dom, 40 * MiB)
    seg = only_segment(lv_of(dom, vol))
    # Something took the extent behind the LV despite its reservation.
    dom.lvm.lvcreate(dom.vg, "intruder", 1,
                     pv_range=lvm_model.pv_range(seg.pv, seg.last_pe + 1, seg.last_pe + 1))
    with pytest.raises(errors.VolumeGroupSizeError):
        dom.volumes.extend(img, vol, 20 * MiB)
    with pytest.raises(errors.VolumeExtendingError) as e:
        dom.extend_volume(img, vol, 20 * MiB)
    assert (e.value.vol_id, e.value.sd_id, e.value.size) == (vol, dom.sd_id, 20 * MiB)
    assert lv_of(dom, vol).size == CHUNK


@requires_root
def test_domain_extend_and_refresh_read_the_size_back(loop_dom: block_sd.BlockDomain) -> None:
    dom = loop_dom
    img, vol = allocate(dom, 40 * MiB)
    # Not active: the LV's size.
    assert dom.extend_volume(img, vol, 16 * MiB) == 16 * MiB
    assert dom.refresh_volume(img, vol) == 16 * MiB
    path = dom.activate_volume(img, vol)
    try:
        # Active: the device's size, following the LV.
        assert dom.extend_volume(img, vol, 20 * MiB) == 20 * MiB
        assert sizes.device_size(path) == 20 * MiB
        assert dom.refresh_volume(img, vol) == 20 * MiB
    finally:
        dom.deactivate_volume(img, vol)
