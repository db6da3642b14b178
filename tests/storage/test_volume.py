"""Volumes on file and block domains: metadata, a 4-volume chain with data,
info, deletion rules, creation failures rolled back, bad input refused
before any task exists and with nothing changed on storage."""

from __future__ import annotations

import os

import pytest

from storage import errors, qemuimg, sd, volume
from tests.storage.conftest import requires_root
from tests.storage.domain_helpers import (
    BLANK,
    create_volume,
    domain_state,
    lvs_of,
    make_pool,
    new_id,
    qemu_io,
    run_task,
)

pytest_plugins = ["tests.storage.domain_fixtures"]

MiB = 1024**2


# Metadata codec (no storage needed).


def sample_md(**changes):
    md = volume.Metadata(
        domain=new_id(), image=new_id(), parent=BLANK, capacity=MiB, format=volume.COW,
        type=volume.SPARSE, voltype=volume.LEAF, legality=volume.ILLEGAL, ctime=1700000000,
        description="disk", generation=3,
    )
    for key, value in changes.items():
        setattr(md, key, value)
    return md


def test_metadata_roundtrip():
    md = sample_md()
    data = md.dump()
    assert data.endswith(b"EOF\n")
    assert volume.Metadata.parse(data + b"\0" * 100, "v") == md


def test_metadata_description_may_hold_equal_signs():
    md = sample_md(description="a=b")
    assert volume.Metadata.parse(md.dump(), "v").description == "a=b"


@pytest.mark.parametrize("data", [b"", b"CAP=1\n", b"\0" * 512, b"CAP=x\nEOF\n"])
def test_metadata_incomplete_refused(data):
    with pytest.raises(errors.VolumeMetadataReadError):
        volume.Metadata.parse(data, "v")


def test_metadata_unknown_values_refused():
    data = sample_md(format="QCOW").dump()
    with pytest.raises(errors.VolumeMetadataReadError):
        volume.Metadata.parse(data, "v")


@pytest.mark.parametrize("size", [0, -1, 1 << 51, "12", True, 1.5])
def test_check_capacity_refuses(size):
    with pytest.raises(errors.InvalidVolumeSize):
        volume.check_capacity(size)


def test_check_capacity_rounds_to_sectors():
    assert volume.check_capacity(1) == 512
    assert volume.check_capacity(4096) == 4096


# Chains on both domain types.


@requires_root
def test_chain_of_four_with_data(api, domain_factory, domain_type):
    """RAW base + 3 COW layers; each layer gets its own pattern through the
    prepared path and every pattern reads back through the leaf."""
    sd_id = domain_factory(api)
    pool_id = make_pool(api, sd_id)
    img = new_id()
    vols = [new_id() for _ in range(4)]
    capacity = 64 * MiB
    base_type = volume.PREALLOCATED if domain_type == sd.BLOCK else volume.SPARSE
    create_volume(api, pool_id, sd_id, img, vols[0], capacity, volume.RAW, base_type)
    for i in range(1, 4):
        create_volume(api, pool_id, sd_id, img, vols[i], capacity, parent=vols[i - 1],
                      desc=f"layer {i}")

    assert api.storage_domain_get_volumes(sd_id, pool_id, img) == sorted(vols)
    infos = [api.volume_get_info(pool_id, sd_id, img, v) for v in vols]
    assert [i["voltype"] for i in infos] == ["INTERNAL"] * 3 + ["LEAF"]
    assert [i["legality"] for i in infos] == ["LEGAL"] * 4
    assert [i["format"] for i in infos] == ["RAW", "COW", "COW", "COW"]
    assert [i["parent"] for i in infos] == [BLANK] + vols[:3]
    assert all(i["capacity"] == capacity for i in infos)
    assert infos[3]["description"] == "layer 3"
    assert set(infos[0]) >= {"uuid", "domain", "image", "parent", "format", "type", "voltype",
                             "capacity", "apparentsize", "truesize", "legality", "ctime",
                             "description"}
    if domain_type == sd.BLOCK:
        assert infos[0]["apparentsize"] == capacity
        assert infos[1]["apparentsize"] == 8 * MiB  # one chunk

    # Write each layer's pattern through a prepare of that layer.
    for i, vol in enumerate(vols):
        prep = api.image_prepare(pool_id, sd_id, img, vol)
        fmt = "raw" if i == 0 else "qcow2"
        try:
            # Layers 1..3 can't be written once they have children (INTERNAL),
            # but qemu-io writes into the file under the chain: fine for a test.
            qemu_io(prep["path"], fmt, f"write -P 0x{0x11 * (i + 1):02x} {i}M 1M")
        finally:
            api.image_teardown(pool_id, sd_id, img, vol)

    prep = api.image_prepare(pool_id, sd_id, img, vols[3])
    try:
        assert [c["volumeID"] for c in prep["chain"]] == vols
        assert [c["format"] for c in prep["chain"]] == ["RAW", "COW", "COW", "COW"]
        info = qemuimg.info(prep["path"], backing_chain=True)
        assert [os.path.basename(entry["filename"]) for entry in info] == vols[::-1]
        for i in range(4):
            out = qemu_io(prep["path"], "qcow2", f"read -P 0x{0x11 * (i + 1):02x} {i}M 1M")
            assert "Pattern verification failed" not in out, out
        out = qemu_io(prep["path"], "qcow2", "read -P 0 4M 1M")
        assert "Pattern verification failed" not in out
    finally:
        api.image_teardown(pool_id, sd_id, img, vols[3])


@requires_root
def test_child_marks_parent_internal_and_delete_restores_leaf(api, domain_factory):
    sd_id = domain_factory(api)
    pool_id = make_pool(api, sd_id)
    img, base, top = new_id(), new_id(), new_id()
    create_volume(api, pool_id, sd_id, img, base, 16 * MiB)
    assert api.volume_get_info(pool_id, sd_id, img, base)["voltype"] == "LEAF"
    create_volume(api, pool_id, sd_id, img, top, 16 * MiB, parent=base)
    assert api.volume_get_info(pool_id, sd_id, img, base)["voltype"] == "INTERNAL"

    with pytest.raises(errors.VolumeImageHasChildren):
        api.volume_delete(pool_id, sd_id, img, base)

    status = run_task(api, api.volume_delete(pool_id, sd_id, img, top))
    assert status["taskResult"] == "success"
    assert api.volume_get_info(pool_id, sd_id, img, base)["voltype"] == "LEAF"
    with pytest.raises(errors.VolumeDoesNotExist):
        api.volume_get_info(pool_id, sd_id, img, top)

    run_task(api, api.volume_delete(pool_id, sd_id, img, base))
    assert api.storage_domain_get_images(sd_id) == []
    with pytest.raises(errors.ImageDoesNotExistInSD):
        api.volume_get_info(pool_id, sd_id, img, base)


@requires_root
def test_delete_of_prepared_volume_refused(api, domain_factory):
    sd_id = domain_factory(api)
    pool_id = make_pool(api, sd_id)
    img, vol = new_id(), new_id()
    create_volume(api, pool_id, sd_id, img, vol, 16 * MiB)
    api.image_prepare(pool_id, sd_id, img, vol)
    try:
        with pytest.raises(errors.VolumeIsBusy):
            api.volume_delete(pool_id, sd_id, img, vol)
    finally:
        api.image_teardown(pool_id, sd_id, img, vol)
    run_task(api, api.volume_delete(pool_id, sd_id, img, vol))


@requires_root
def test_block_cow_initial_size_and_rounding(api, block_domain_factory):
    sd_id = block_domain_factory(api)
    pool_id = make_pool(api, sd_id)
    img, raw, cow = new_id(), new_id(), new_id()
    create_volume(api, pool_id, sd_id, img, raw, 10 * MiB + 512, volume.RAW, volume.PREALLOCATED)
    create_volume(api, pool_id, sd_id, new_id(), cow, 100 * MiB, initial_size=13 * MiB)
    lvs = lvs_of(api, sd_id)
    assert lvs[raw].size == 12 * MiB  # whole 4 MiB extents
    assert lvs[cow].size == 16 * MiB
    assert api.volume_get_info(pool_id, sd_id, img, raw)["capacity"] == 10 * MiB + 512


@requires_root
def test_file_raw_preallocated_is_allocated(api, file_domain_factory):
    sd_id = file_domain_factory(api)
    pool_id = make_pool(api, sd_id)
    img, vol = new_id(), new_id()
    create_volume(api, pool_id, sd_id, img, vol, 8 * MiB, volume.RAW, volume.PREALLOCATED)
    info = api.volume_get_info(pool_id, sd_id, img, vol)
    assert info["apparentsize"] == 8 * MiB
    assert info["truesize"] >= 8 * MiB


# Failures.


@requires_root
def test_failed_creation_is_rolled_back(api, domain_factory, monkeypatch):
    sd_id = domain_factory(api)
    pool_id = make_pool(api, sd_id)
    img, base, top = new_id(), new_id(), new_id()
    create_volume(api, pool_id, sd_id, img, base, 16 * MiB)
    before = domain_state(api, sd_id)

    def broken_create(*args, **kwargs):
        raise errors.CommandFailed(cmd=["qemu-img", "create"], rc=1, err="injected")

    monkeypatch.setattr(qemuimg, "create", broken_create)
    status = run_task(api, api.volume_create(
        pool_id, sd_id, img, top, 16 * MiB, "COW", "SPARSE", "", img, base))
    assert status["taskResult"] == "cleanFailure"
    assert status["code"] == "CommandFailed"
    assert domain_state(api, sd_id) == before
    assert api.volume_get_info(pool_id, sd_id, img, base)["voltype"] == "LEAF"


def _bad_requests(img, base, existing):
    """(description, kwargs, error) for Volume.create on an image with a base."""
    return [
        ("capacity below parent", dict(size=8 * MiB, src_vol_uuid=base),
         errors.VolumeCapacityBelowParent),
        ("unknown parent", dict(src_vol_uuid=new_id()), errors.VolumeDoesNotExist),
        ("existing volume", dict(volume_id=existing, src_vol_uuid=base),
         errors.VolumeAlreadyExists),
        ("RAW child", dict(vol_format="RAW", preallocate="PREALLOCATED", src_vol_uuid=base),
         errors.IncorrectFormat),
        ("second base", dict(src_vol_uuid=BLANK, src_img_uuid=BLANK),
         errors.ImageIsNotLegalChain),
        ("parent in another image", dict(src_vol_uuid=base, src_img_uuid=new_id()),
         errors.ImageIsNotLegalChain),
        ("zero size", dict(size=0, src_vol_uuid=base), errors.InvalidVolumeSize),
        ("negative size", dict(size=-MiB, src_vol_uuid=base), errors.InvalidVolumeSize),
        ("absurd size", dict(size=1 << 60, src_vol_uuid=base), errors.InvalidVolumeSize),
        ("bad initial size", dict(initial_size=0, src_vol_uuid=base), errors.InvalidVolumeSize),
        ("unknown format", dict(vol_format="QCOW3", src_vol_uuid=base), errors.IncorrectFormat),
        ("long description", dict(desc="x" * 5000, src_vol_uuid=base),
         errors.VolumeDescriptionTooLong),
    ]


@requires_root
def test_bad_requests_refused_before_any_task(api, domain_factory):
    sd_id = domain_factory(api)
    pool_id = make_pool(api, sd_id)
    img, base = new_id(), new_id()
    create_volume(api, pool_id, sd_id, img, base, 16 * MiB)
    before = domain_state(api, sd_id)
    tasks_before = api.host_get_all_tasks_info()
    for what, kwargs, error in _bad_requests(img, base, base):
        request = dict(
            storagepool_id=pool_id, storagedomain_id=sd_id, image_id=img, volume_id=new_id(),
            size=16 * MiB, vol_format="COW", preallocate="SPARSE", desc="",
            src_img_uuid=img, src_vol_uuid=base,
        )
        request.update(kwargs)
        with pytest.raises(error):
            api.volume_create(**request)
            pytest.fail(what)
    assert api.host_get_all_tasks_info() == tasks_before
    assert domain_state(api, sd_id) == before


@requires_root
def test_raw_sparse_on_block_refused(api, block_domain_factory):
    sd_id = block_domain_factory(api)
    pool_id = make_pool(api, sd_id)
    before = domain_state(api, sd_id)
    with pytest.raises(errors.IncorrectType):
        api.volume_create(pool_id, sd_id, new_id(), new_id(), 16 * MiB, "RAW", "SPARSE")
    assert domain_state(api, sd_id) == before
    assert api.host_get_all_tasks_info() == {}


@requires_root
def test_no_space_refused_before_task(api, block_domain_factory):
    sd_id = block_domain_factory(api, pv_size=512 * MiB)
    pool_id = make_pool(api, sd_id)
    before = domain_state(api, sd_id)
    with pytest.raises(errors.NoSpaceLeftOnDomain):
        api.volume_create(pool_id, sd_id, new_id(), new_id(), 600 * MiB, "RAW", "PREALLOCATED")
    # A thin volume whose maximum size can't be reserved (loop mode) too.
    if api.cache.get(sd_id).activation_mode == "loop":
        with pytest.raises(errors.NoSpaceLeftOnDomain):
            api.volume_create(pool_id, sd_id, new_id(), new_id(), 600 * MiB, "COW", "SPARSE")
    assert domain_state(api, sd_id) == before
    assert api.host_get_all_tasks_info() == {}


@requires_root
def test_unknown_pool_domain_image_volume(api, domain_factory, file_domain_factory):
    sd_id = domain_factory(api)
    pool_id = make_pool(api, sd_id)
    img, vol = new_id(), new_id()
    create_volume(api, pool_id, sd_id, img, vol, 16 * MiB)
    outside = file_domain_factory(api, name="not in the pool")
    with pytest.raises(errors.StoragePoolUnknown):
        api.volume_get_info(new_id(), sd_id, img, vol)
    with pytest.raises(errors.StoragePoolUnknown):
        api.volume_create(new_id(), sd_id, img, new_id(), MiB, "COW", "SPARSE")
    with pytest.raises(errors.StorageDomainDoesNotExist):
        api.volume_get_info(pool_id, new_id(), img, vol)
    with pytest.raises(errors.StorageDomainNotInPool):
        api.volume_get_info(pool_id, outside, img, vol)
    with pytest.raises(errors.ImageDoesNotExistInSD):
        api.volume_get_info(pool_id, sd_id, new_id(), vol)
    with pytest.raises(errors.VolumeDoesNotExist):
        api.volume_get_info(pool_id, sd_id, img, new_id())
    with pytest.raises(errors.ImageDoesNotExistInSD):
        api.storage_domain_get_volumes(sd_id, pool_id, new_id())
    with pytest.raises(errors.ImageDoesNotExistInSD):
        api.volume_delete(pool_id, sd_id, new_id(), vol)
    with pytest.raises(errors.VolumeDoesNotExist):
        api.volume_delete(pool_id, sd_id, img, new_id())

