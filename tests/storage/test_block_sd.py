"""Block domains on real lvm2 over loop devices: layout, metadata slots,
info, stats, format; bad input leaves LVM untouched; one reading of the VG
per operation (the master LV store: test_master_store.py)."""

from __future__ import annotations

import json
import os

import pytest

from storage import (
    block_manifest,
    commands,
    errors,
    loop,
    lvm,
    lvm_model,
    sd,
    volume,
)
from tests.storage.conftest import requires_root, stacked_loop_devices
from tests.storage.domain_helpers import (
    create_volume,
    lvs_of,
    make_pool,
    new_id,
)

pytest_plugins = ["tests.storage.domain_fixtures"]

pytestmark = requires_root

MiB = 1024**2
GiB = 1024**3


def pvs_on(devices: list[str]) -> list[dict]:
    """PVs on devices as lvm2 reports them (empty once labels are wiped)."""
    config = lvm.LVM(devices, activation=False).config()
    out = commands.run(
        ["lvm", "pvs", "--config", config, "--reportformat", "json", "-o", "pv_name,vg_name"],
        env={"LVM_SUPPRESS_FD_WARNINGS": "1"},
    ).stdout
    return json.loads(out)["report"][0]["pv"]


def test_create_makes_vg_and_special_lvs(api, block_domain_factory):
    sd_id = block_domain_factory(api, name="blockdom", pv_count=2)
    dom = api.cache.get(sd_id)
    vg = dom.lvm.vg_info(sd_id)
    assert block_manifest.VG_TAG in vg.tags
    assert vg.extent_size == 4 * MiB
    lvs = lvs_of(api, sd_id)
    assert set(lvs) == set(block_manifest.SPECIAL_LVS)
    for lv in lvs.values():
        # Loop activation maps each LV as one range.
        assert len(lvm_model.merged_segments(lv.segments)) == 1
    info = api.storage_domain_get_info(sd_id)
    assert info["uuid"] == sd_id
    assert info["name"] == "blockdom"
    assert info["type"] == "block"
    assert info["role"] == "Regular"
    assert info["pool"] == []
    assert info["vgname"] == sd_id
    assert info["devices"] == dom.manifest.devices
    stats = api.storage_domain_get_stats(sd_id)
    assert stats["disktotal"] == vg.extent_size * vg.extent_count
    assert stats["diskfree"] == vg.extent_size * vg.free_count
    assert api.storage_domain_get_images(sd_id) == []


def test_domain_metadata_in_metadata_lv(api, block_domain_factory):
    sd_id = block_domain_factory(api, name="x")
    dom = api.cache.get(sd_id)
    dev = dom.activation.active_path(sd_id, "metadata")
    assert dev is not None
    with open(dev, "rb") as f:
        head = f.read(block_manifest.DOMAIN_MD_SIZE)
    text = head.rstrip(b"\0").decode()
    lines = text.splitlines()
    assert lines[-1] == "EOF"
    fields = dict(line.split("=", 1) for line in lines[:-1])
    assert fields["SDUUID"] == sd_id
    assert fields["TYPE"] == "BLOCK"
    assert fields["NAME"] == "x"


def test_volume_lv_tags_and_slot(api, block_domain_factory):
    sd_id = block_domain_factory(api)
    pool_id = make_pool(api, sd_id)
    img, base, top = new_id(), new_id(), new_id()
    create_volume(api, pool_id, sd_id, img, base, 20 * MiB, volume.RAW, volume.PREALLOCATED)
    create_volume(api, pool_id, sd_id, img, top, 40 * MiB, parent=base)
    lvs = lvs_of(api, sd_id)
    assert set(lvs[base].tags) >= {f"IU_{img}", f"PU_{volume.BLANK_UUID}", "MD_0"}
    assert set(lvs[top].tags) >= {f"IU_{img}", f"PU_{base}", "MD_1"}
    # RAW: its capacity in whole extents; COW: one chunk (8 MiB here).
    assert lvs[base].size == 20 * MiB
    assert lvs[top].size == 8 * MiB
    # Each reservation holds the volume's maximum size.
    assert "RS_5" in lvs[base].tags
    assert "RS_11" in lvs[top].tags  # ceil(40 MiB * 1.1 / 4 MiB)
    dom = api.cache.get(sd_id)
    dev = dom.activation.active_path(sd_id, "metadata")
    with open(dev, "rb") as f:
        f.seek(block_manifest.SLOT_BASE + block_manifest.SLOT_SIZE)
        slot = f.read(block_manifest.SLOT_SIZE)
    md = volume.Metadata.parse(slot, top)
    assert md.parent == base
    assert md.capacity == 40 * MiB
    assert api.storage_domain_get_images(sd_id) == [img]


def test_next_volume_skips_reservations(api, block_domain_factory):
    sd_id = block_domain_factory(api)
    pool_id = make_pool(api, sd_id)
    img1, img2, v1, v2 = new_id(), new_id(), new_id(), new_id()
    create_volume(api, pool_id, sd_id, img1, v1, 40 * MiB)
    create_volume(api, pool_id, sd_id, img2, v2, 40 * MiB)
    lvs = lvs_of(api, sd_id)
    first = lvm_model.merged_segments(lvs[v1].segments)[0]
    second = lvm_model.merged_segments(lvs[v2].segments)[0]
    assert second.first_pe >= first.first_pe + 11


def test_create_twice_refused(api, block_domain_factory):
    sd_id = block_domain_factory(api)
    devices = api.cache.get(sd_id).manifest.devices
    before = lvs_of(api, sd_id)
    with pytest.raises(errors.StorageDomainAlreadyExists):
        api.storage_domain_create(sd_id, sd.BLOCK, {"devices": devices}, "again")
    assert lvs_of(api, sd_id).keys() == before.keys()


def test_devices_of_another_domain_refused(api, block_domain_factory):
    sd_id = block_domain_factory(api)
    devices = api.cache.get(sd_id).manifest.devices
    other = new_id()
    with pytest.raises(errors.StorageDomainCreationError):
        api.storage_domain_create(other, sd.BLOCK, {"devices": devices}, "other")
    assert [pv["vg_name"] for pv in pvs_on(devices)] == [sd_id]


def test_device_in_use_by_a_foreign_vg_refused(api, vg_factory):
    foreign = vg_factory()
    with pytest.raises(errors.StorageDomainCreationError):
        api.storage_domain_create(new_id(), sd.BLOCK, {"devices": foreign.devices}, "x")
    assert [pv["vg_name"] for pv in pvs_on(foreign.devices)] == [foreign.name]


def test_not_a_block_device_refused(api, storage_tmpdir):
    path = os.path.join(storage_tmpdir, "plain-file")
    with open(path, "wb") as f:
        f.truncate(GiB)
    sd_id = new_id()
    with pytest.raises(errors.StorageDomainCreationError):
        api.storage_domain_create(sd_id, sd.BLOCK, {"devices": [path]}, "x")
    with pytest.raises(errors.StorageDomainCreationError):
        api.storage_domain_create(sd_id, sd.BLOCK, {"devices": ["/dev/no-such-dev"]}, "x")
    with pytest.raises(errors.StorageDomainDoesNotExist):
        api.storage_domain_get_info(sd_id)


def test_too_small_device_leaves_nothing(api, loop_device_factory):
    dev = loop_device_factory(24 * MiB)
    sd_id = new_id()
    with pytest.raises(errors.Error):
        api.storage_domain_create(sd_id, sd.BLOCK, {"devices": [dev]}, "small")
    assert pvs_on([dev]) == []
    assert stacked_loop_devices(dev) == []
    with pytest.raises(errors.StorageDomainDoesNotExist):
        api.storage_domain_get_info(sd_id)


def test_format_removes_vg_and_labels(api, block_domain_factory):
    sd_id = block_domain_factory(api, pv_count=2)
    devices = api.cache.get(sd_id).manifest.devices
    pool_id = make_pool(api, sd_id)
    create_volume(api, pool_id, sd_id, new_id(), new_id(), 16 * MiB)
    with pytest.raises(errors.CannotFormatAttachedStorageDomain):
        api.storage_domain_format(sd_id)
    api.storage_pool_destroy(pool_id)
    assert api.storage_domain_format(sd_id) is True
    assert pvs_on(devices) == []
    for dev in devices:
        assert stacked_loop_devices(dev) == []
    with pytest.raises(errors.StorageDomainDoesNotExist):
        api.storage_domain_get_info(sd_id)
    # The devices can make a new domain.
    api.storage_domain_create(new_id(), sd.BLOCK, {"devices": devices}, "again")


def test_domain_found_after_restart(api_factory, block_domain_factory):
    first = api_factory()
    sd_id = block_domain_factory(first, name="persistent")
    first.close()
    second = api_factory()
    assert second.storage_domain_get_info(sd_id)["name"] == "persistent"


class CommandLog:
    """The commands run (commands.run) while installed, from any thread."""

    def __init__(self, monkeypatch) -> None:
        self.argv: list[list[str]] = []
        real = commands.run

        def logging_run(argv, *args, **kwargs):
            self.argv.append(list(argv))
            return real(argv, *args, **kwargs)

        monkeypatch.setattr(commands, "run", logging_run)

    def names(self) -> list[str]:
        """lvm2 commands by name (``pvs``, ``lvcreate``), others by program."""
        return [a[1] if a[0] == "lvm" else os.path.basename(a[0]) for a in self.argv]

    def clear(self) -> None:
        self.argv.clear()


REPORTS = ("pvs", "vgs", "lvs")


def test_hot_paths_read_the_vg_once_per_operation(api, block_domain_factory, monkeypatch):
    """Volume.create reads the VG once to validate and once to allocate and
    once after its lvcreate; Image.prepare reads it once for the whole chain
    (loop activation maps each volume from that reading)."""
    sd_id = block_domain_factory(api)
    pool_id = make_pool(api, sd_id)
    dom = api.cache.get(sd_id)
    loop_mode = dom.activation_mode == "loop"
    img, vols = new_id(), [new_id() for _ in range(4)]
    log = CommandLog(monkeypatch)

    create_volume(api, pool_id, sd_id, img, vols[0], 40 * MiB)

    assert [n for n in log.names() if n in REPORTS] == ["pvs", "pvs", "pvs"]
    if loop_mode:
        assert log.names() == ["pvs", "pvs", "lvcreate", "pvs", "qemu-img"]

    log.clear()
    create_volume(api, pool_id, sd_id, img, vols[1], 40 * MiB, parent=vols[0])

    assert [n for n in log.names() if n in REPORTS] == ["pvs", "pvs", "pvs"]
    if loop_mode:
        assert log.names() == ["pvs", "pvs", "lvcreate", "pvs", "qemu-img"]

    for parent, vol in zip(vols[1:], vols[2:], strict=False):
        create_volume(api, pool_id, sd_id, img, vol, 40 * MiB, parent=parent)
    log.clear()
    prep = api.prepare(pool_id, sd_id, img, vols[-1])

    assert [n for n in log.names() if n in REPORTS] == ["pvs"]
    if loop_mode:
        assert log.names() == ["pvs"]
    assert [v["volumeID"] for v in prep["chain"]] == vols

    log.clear()
    api.teardown(pool_id, sd_id, img, vols[-1])
    assert [n for n in log.names() if n in REPORTS] == []


def test_prepared_chain_maps_each_lv_exactly(api, block_domain_factory):
    sd_id = block_domain_factory(api, pv_count=2, pv_size=GiB)
    pool_id = make_pool(api, sd_id)
    dom = api.cache.get(sd_id)
    if dom.activation_mode != "loop":
        pytest.skip("loop activation only")
    img, vols = new_id(), [new_id() for _ in range(3)]
    parent = volume.BLANK_UUID
    for vol in vols:
        create_volume(api, pool_id, sd_id, img, vol, 200 * MiB, parent=parent)
        parent = vol
    # Grow the middle one in place, so sizes differ.
    dom.extend_volume(img, vols[1], 3 * 8 * MiB)
    prep = api.prepare(pool_id, sd_id, img, vols[-1])
    try:
        for entry in prep["chain"]:
            layout = dom.lvm.lv_layout(sd_id, entry["volumeID"])
            (seg,) = lvm_model.merged_segments(layout.segments)
            st = loop.status(os.path.realpath(entry["path"]))
            assert st is not None and st.backed_by(seg.pv)
            assert st.offset == layout.offset(seg)
            assert st.sizelimit == seg.count * layout.extent_size
            lv = dom.lvm.lv_info(sd_id, entry["volumeID"])
            assert loop.size(os.path.realpath(entry["path"])) == lv.size
    finally:
        api.teardown(pool_id, sd_id, img, vols[-1])


def test_refresh_reads_the_vg_once(api, block_domain_factory, monkeypatch):
    """HSM refresh after another host's lvextend: one reading gives the LV's
    size and the layout the loop device follows."""
    sd_id = block_domain_factory(api)
    pool_id = make_pool(api, sd_id)
    dom = api.cache.get(sd_id)
    if dom.activation_mode != "loop":
        pytest.skip("loop activation only")
    img, vol = new_id(), new_id()
    create_volume(api, pool_id, sd_id, img, vol, 40 * MiB)
    path = api.prepare(pool_id, sd_id, img, vol)["path"]
    try:
        (seg,) = lvm_model.merged_segments(dom.lvm.lv_info(sd_id, vol).segments)
        other = lvm.LVM(dom.manifest.devices, activation=False)  # "another host"
        other.lvextend(sd_id, vol, seg.count + 1, pv_range=lvm_model.pv_range(
            seg.pv, seg.last_pe + 1, seg.last_pe + 1))
        log = CommandLog(monkeypatch)

        size = api.refresh(pool_id, sd_id, img, vol)

        assert log.names() == ["pvs"]
        assert size == (seg.count + 1) * dom.manifest.extent_size()
        assert loop.size(os.path.realpath(path)) == size
    finally:
        api.teardown(pool_id, sd_id, img, vol)
