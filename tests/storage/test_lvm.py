"""storage.lvm against real lvm2 on loop devices over sparse files."""

from __future__ import annotations

import collections.abc
import threading

import pytest

from storage import errors, lvm, lvm_model
from tests.storage import conftest

pytestmark = [pytest.mark.root, conftest.requires_root]

GiB = conftest.GiB
MiB = conftest.MiB

VGFactory = collections.abc.Callable[..., conftest.LoopVG]


def test_vg_lifecycle(vg_factory: VGFactory) -> None:
    vg = vg_factory(pv_count=2, pv_size=GiB, extent_size_mb=4, tags=("RHAT_storage_domain",))

    info = vg.lvm.vg_info(vg.name)

    assert info.name == vg.name
    assert info.extent_size == 4 * MiB
    assert info.tags == ("RHAT_storage_domain",)
    assert [pv.name for pv in info.pvs] == vg.devices
    for pv in info.pvs:
        assert pv.pe_start >= 4 * MiB  # after the 4 MiB metadata area
        assert pv.pe_start % 4096 == 0
        assert pv.pe_alloc_count == 0
        assert 0 < pv.pe_count <= GiB // (4 * MiB)
    assert info.extent_count == sum(pv.pe_count for pv in info.pvs)
    assert info.free_count == info.extent_count

    vg.lvm.vgchange_tags(vg.name, add=["MDT_X"], delete=["RHAT_storage_domain"])
    assert vg.lvm.vg_info(vg.name).tags == ("MDT_X",)

    vg.lvm.vgremove(vg.name)
    with pytest.raises(errors.VolumeGroupDoesNotExist) as e:
        vg.lvm.vg_info(vg.name)
    assert e.value.vg == vg.name
    vg.lvm.pvremove(vg.devices)


def test_missing_vg_is_a_specific_error_carrying_the_command(vg_factory: VGFactory) -> None:
    vg = vg_factory()
    with pytest.raises(errors.VolumeGroupDoesNotExist) as e:
        vg.lvm.lvs("no-such-vg")
    assert e.value.rc != 0
    assert e.value.cmd[:2] == ["lvm", "lvs"]
    assert "not found" in e.value.err
    with pytest.raises(errors.VolumeGroupDoesNotExist):
        vg.lvm.lvcreate("no-such-vg", "lv", 1)
    with pytest.raises(errors.VolumeGroupDoesNotExist):
        vg.lvm.free_ranges("no-such-vg")
    with pytest.raises(errors.VolumeGroupDoesNotExist):
        vg.lvm.vgremove("no-such-vg")


def test_config_restricts_lvm_to_the_given_devices(
    vg_factory: VGFactory, loop_device_factory: collections.abc.Callable[..., str]
) -> None:
    vg = vg_factory()
    other = lvm.LVM([loop_device_factory(64 * MiB)], activation=vg.lvm.activation)
    with pytest.raises(errors.VolumeGroupDoesNotExist):
        other.vg_info(vg.name)
    config = vg.lvm.config()
    assert f'"a|^{vg.devices[0]}$|"' in config
    assert '"r|.*|"' in config
    assert f"activation={int(vg.lvm.activation)}" in config


def test_lv_lifecycle_tags_and_json_report(vg_factory: VGFactory) -> None:
    vg = vg_factory()
    vg.lvm.lvcreate(vg.name, "vol1", 5, tags=["IU_img", "PU_none", "MD_3"])

    lv = vg.lvm.lv_info(vg.name, "vol1")

    assert lv.vg_name == vg.name and lv.name == "vol1"
    assert lv.extent_count == 5
    assert lv.size == 5 * vg.extent_size
    assert sorted(lv.tags) == ["IU_img", "MD_3", "PU_none"]
    assert len(lv.segments) == 1 and lv.segments[0].pv == vg.devices[0]
    assert lv.segments[0].count == 5
    if not vg.lvm.activation:
        assert lv.active is None  # unknown without device-mapper

    vg.lvm.lvchange_tags(vg.name, "vol1", add=["PU_parent"], delete=["PU_none"])
    assert sorted(vg.lvm.lv_info(vg.name, "vol1").tags) == ["IU_img", "MD_3", "PU_parent"]

    vg.lvm.lvcreate(vg.name, "vol0", 1)
    assert [x.name for x in vg.lvm.lvs(vg.name)] == ["vol0", "vol1"]

    vg.lvm.lvremove(vg.name, "vol1")
    assert [x.name for x in vg.lvm.lvs(vg.name)] == ["vol0"]
    with pytest.raises(errors.LogicalVolumeDoesNotExistError) as e:
        vg.lvm.lv_info(vg.name, "vol1")
    assert (e.value.vg, e.value.lv) == (vg.name, "vol1")
    with pytest.raises(errors.LogicalVolumeDoesNotExistError):
        vg.lvm.lvremove(vg.name, "vol1")
    with pytest.raises(errors.LogicalVolumeDoesNotExistError):
        vg.lvm.lvchange_tags(vg.name, "vol1", add=["X"])


def test_lv_errors(vg_factory: VGFactory) -> None:
    vg = vg_factory(pv_size=256 * MiB)
    vg.lvm.lvcreate(vg.name, "vol", 1)
    with pytest.raises(errors.LogicalVolumeAlreadyExists):
        vg.lvm.lvcreate(vg.name, "vol", 1)
    with pytest.raises(errors.VolumeGroupSizeError):
        vg.lvm.lvcreate(vg.name, "huge", 100000)
    with pytest.raises(errors.VolumeGroupSizeError):
        vg.lvm.lvextend(vg.name, "vol", 100000)
    with pytest.raises(ValueError):
        vg.lvm.lvcreate(vg.name, "../evil", 1)
    with pytest.raises(ValueError):
        lvm.LVM(["/dev/loop0|.*"])


def test_lv_in_a_pe_range_and_extend_into_the_following_extents(vg_factory: VGFactory) -> None:
    vg = vg_factory()
    pv = vg.devices[0]
    vg.lvm.lvcreate(vg.name, "vol", 10, pv_range=lvm_model.pv_range(pv, 20, 29))
    assert vg.lvm.lv_info(vg.name, "vol").segments == (lvm_model.Segment(pv, 20, 29),)

    vg.lvm.lvextend(vg.name, "vol", 15, pv_range=lvm_model.pv_range(pv, 30, 39))

    lv = vg.lvm.lv_info(vg.name, "vol")
    assert lv.extent_count == 15
    assert lvm_model.merged_segments(lv.segments) == [lvm_model.Segment(pv, 20, 34)]

    # Extending elsewhere makes a second segment.
    vg.lvm.lvextend(vg.name, "vol", 17, pv_range=lvm_model.pv_range(pv, 100, 101))
    lv = vg.lvm.lv_info(vg.name, "vol")
    assert lvm_model.merged_segments(lv.segments) == [
        lvm_model.Segment(pv, 20, 34),
        lvm_model.Segment(pv, 100, 101),
    ]


def test_free_ranges_and_contiguous_allocation_with_reservations(vg_factory: VGFactory) -> None:
    vg = vg_factory(pv_count=2, pv_size=256 * MiB)
    pv1, pv2 = vg.devices
    count1 = vg.lvm.vg_info(vg.name).pv(pv1).pe_count
    vg.lvm.lvcreate(vg.name, "a", 10, pv_range=lvm_model.pv_range(pv1, 0, 9))
    vg.lvm.lvcreate(vg.name, "b", 5, pv_range=lvm_model.pv_range(pv1, 30, 34))

    free = vg.lvm.free_ranges(vg.name)

    assert free[:2] == [lvm_model.PERange(pv1, 10, 20), lvm_model.PERange(pv1, 35, count1 - 35)]
    assert free[2].pv == pv2 and free[2].first_pe == 0

    # "a" keeps extents 10-19 reserved to grow in place.
    reserved = [lvm_model.Segment(pv1, 10, 19)]
    assert vg.lvm.find_free_range(vg.name, 10, reserved=reserved) == lvm_model.PERange(pv1, 20, 10)
    assert vg.lvm.find_free_range(vg.name, 11, reserved=reserved) == lvm_model.PERange(pv1, 35, 11)
    assert vg.lvm.find_free_range(vg.name, count1 - 30).pv == pv2
    with pytest.raises(errors.VolumeGroupSizeError):
        vg.lvm.find_free_range(vg.name, 10000)

    found = vg.lvm.find_free_range(vg.name, 10, reserved=reserved)
    vg.lvm.lvcreate(vg.name, "c", found.count, pv_range=str(found))
    assert vg.lvm.lv_info(vg.name, "c").segments == (lvm_model.Segment(pv1, 20, 29),)


def test_metadata_only_lvm_refuses_activation(vg_factory: VGFactory) -> None:
    vg = vg_factory(lvm_activation=False)
    vg.lvm.lvcreate(vg.name, "vol", 1)
    with pytest.raises(errors.CannotActivateLogicalVolume):
        vg.lvm.lvchange_activate(vg.name, "vol", True)
    with pytest.raises(errors.LogicalVolumeRefreshError):
        vg.lvm.lvchange_refresh(vg.name, "vol")
    with pytest.raises(ValueError):
        vg.lvm.lvcreate(vg.name, "vol2", 1, activate=True)


def test_concurrent_changes_of_one_vg_all_succeed(vg_factory: VGFactory) -> None:
    vg = vg_factory()
    failures: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            vg.lvm.lvcreate(vg.name, f"lv{i}", 2, tags=[f"N_{i}"])
            vg.lvm.lvextend(vg.name, f"lv{i}", 3)
            vg.lvm.lvchange_tags(vg.name, f"lv{i}", add=["DONE"])
        except BaseException as e:  # reported below
            failures.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert not failures
    lvs = vg.lvm.lvs(vg.name)
    assert [x.name for x in lvs] == [f"lv{i}" for i in range(6)]
    assert all(x.extent_count == 3 and "DONE" in x.tags for x in lvs)


def test_lv_layout_gives_segments_in_lv_order_with_pv_offsets(vg_factory: VGFactory) -> None:
    vg = vg_factory(pv_count=2, pv_size=256 * MiB)
    pv1, pv2 = vg.devices
    vg.lvm.lvcreate(vg.name, "vol", 3, pv_range=lvm_model.pv_range(pv1, 40, 42))
    vg.lvm.lvextend(vg.name, "vol", 5, pv_range=lvm_model.pv_range(pv1, 10, 11))
    vg.lvm.lvextend(vg.name, "vol", 6, pv_range=lvm_model.pv_range(pv2, 0, 0))

    layout = vg.lvm.lv_layout(vg.name, "vol")

    # LV order, not PV order: 40-42 comes first although 10-11 is lower.
    assert layout.segments == (
        lvm_model.Segment(pv1, 40, 42),
        lvm_model.Segment(pv1, 10, 11),
        lvm_model.Segment(pv2, 0, 0),
    )
    assert layout.extent_size == vg.extent_size
    info = vg.lvm.vg_info(vg.name)
    assert layout.pe_starts == {pv.name: pv.pe_start for pv in info.pvs}
    assert layout.offset(layout.segments[0]) == info.pv(pv1).pe_start + 40 * vg.extent_size
    with pytest.raises(errors.LogicalVolumeDoesNotExistError):
        vg.lvm.lv_layout(vg.name, "missing")
    with pytest.raises(errors.VolumeGroupDoesNotExist):
        vg.lvm.lv_layout("no-such-vg", "vol")


def test_vg_state_answers_what_separate_reports_answer(vg_factory: VGFactory) -> None:
    vg = vg_factory(pv_count=2, pv_size=256 * MiB)
    pv1, pv2 = vg.devices
    vg.lvm.lvcreate(
        vg.name, "a", 3, tags=["IU_x", "MD_0"], pv_range=lvm_model.pv_range(pv1, 40, 42)
    )
    vg.lvm.lvextend(vg.name, "a", 5, pv_range=lvm_model.pv_range(pv1, 10, 11))
    vg.lvm.lvextend(vg.name, "a", 6, pv_range=lvm_model.pv_range(pv2, 0, 0))
    vg.lvm.lvcreate(vg.name, "b", 2, pv_range=lvm_model.pv_range(pv1, 0, 1))

    state = vg.lvm.vg_state(vg.name)

    assert state.vg == vg.lvm.vg_info(vg.name)
    assert state.lvs == {x.name: x for x in vg.lvm.lvs(vg.name)}
    assert list(state.free) == vg.lvm.free_ranges(vg.name)
    for name in ("a", "b"):
        assert state.layout(name) == vg.lvm.lv_layout(vg.name, name)
    reserved = [lvm_model.Segment(pv1, 2, 9)]
    for extents in (1, 8, 30):
        assert state.find_free_range(extents, reserved) == vg.lvm.find_free_range(
            vg.name, extents, reserved
        )
    with pytest.raises(errors.VolumeGroupSizeError):
        state.find_free_range(10000)
    with pytest.raises(errors.LogicalVolumeDoesNotExistError):
        state.layout("missing")
    with pytest.raises(errors.VolumeGroupDoesNotExist):
        vg.lvm.vg_state("no-such-vg")


def test_vg_state_is_current_until_this_process_changes_the_vg(vg_factory: VGFactory) -> None:
    vg = vg_factory()
    state = vg.lvm.vg_state(vg.name)
    vg.lvm.lvs(vg.name)  # reading does not change anything
    assert state.current()

    vg.lvm.lvcreate(vg.name, "a", 1)
    assert not state.current()
    assert vg.lvm.vg_state(vg.name).current()

    state = vg.lvm.vg_state(vg.name)
    with pytest.raises(errors.LogicalVolumeAlreadyExists):
        vg.lvm.lvcreate(vg.name, "a", 1)  # a failed change counts too
    assert not state.current()
