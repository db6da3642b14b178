"""Images: chain discovery and validation, reference-counted prepare and
teardown (links, activation), ILLEGAL volumes."""

from __future__ import annotations

import os

import pytest

from storage import block_sd, errors, image, volume
from tests.storage.conftest import requires_root
from tests.storage.domain_helpers import (
    create_volume,
    make_pool,
    new_id,
)

pytest_plugins = ["tests.storage.domain_fixtures"]

pytestmark = requires_root

MiB = 1024**2


@pytest.fixture
def chain3(api, domain_factory):
    """A pool on one domain holding an image base <- mid <- top."""
    sd_id = domain_factory(api)
    pool_id = make_pool(api, sd_id)
    img = new_id()
    vols = [new_id() for _ in range(3)]
    create_volume(api, pool_id, sd_id, img, vols[0], 32 * MiB)
    create_volume(api, pool_id, sd_id, img, vols[1], 32 * MiB, parent=vols[0])
    create_volume(api, pool_id, sd_id, img, vols[2], 32 * MiB, parent=vols[1])
    return pool_id, sd_id, img, vols


def active(api, sd_id, vol_id):
    dom = api.cache.get(sd_id)
    if isinstance(dom, block_sd.BlockDomain):
        return dom.activation.is_active(dom.vg, vol_id)
    return None  # file volumes are always reachable


def link(api, sd_id, img, vol):
    return api.images.link_path(sd_id, img, vol)


def test_chain_and_image_chain(api, chain3):
    pool_id, sd_id, img, vols = chain3
    manifest = api.cache.get(sd_id).manifest
    assert [v for v, _ in image.chain(manifest, img, vols[1])] == vols[:2]
    assert [v for v, _ in image.image_chain(manifest, img)] == vols
    with pytest.raises(errors.VolumeDoesNotExist):
        image.chain(manifest, img, new_id())
    with pytest.raises(errors.ImageDoesNotExistInSD):
        image.image_chain(manifest, new_id())


def test_broken_chain_refused(api, chain3):
    pool_id, sd_id, img, vols = chain3
    manifest = api.cache.get(sd_id).manifest
    # The middle volume names a parent that does not exist.
    manifest.volume(img, vols[1]).update(parent=new_id())
    with pytest.raises(errors.ImageIsNotLegalChain):
        image.chain(manifest, img, vols[2])
    with pytest.raises(errors.ImageIsNotLegalChain):
        api.image_prepare(pool_id, sd_id, img, vols[2])
    assert not os.path.exists(link(api, sd_id, img, vols[2]))


def test_forked_image_refused_by_image_chain(api, chain3):
    pool_id, sd_id, img, vols = chain3
    manifest = api.cache.get(sd_id).manifest
    manifest.volume(img, vols[2]).update(parent=vols[0])
    with pytest.raises(errors.ImageIsNotLegalChain):
        image.image_chain(manifest, img)


def test_prepare_links_and_activates_the_chain(api, chain3):
    pool_id, sd_id, img, vols = chain3
    result = api.image_prepare(pool_id, sd_id, img, vols[1])
    try:
        assert result["path"] == link(api, sd_id, img, vols[1])
        assert [c["volumeID"] for c in result["chain"]] == vols[:2]
        assert all(c["format"] == "COW" for c in result["chain"])
        for vol in vols[:2]:
            path = link(api, sd_id, img, vol)
            assert os.path.islink(path)
            assert os.path.exists(path)
            assert active(api, sd_id, vol) in (True, None)
        assert not os.path.exists(link(api, sd_id, img, vols[2]))
        assert active(api, sd_id, vols[2]) in (False, None)
    finally:
        api.image_teardown(pool_id, sd_id, img, vols[1])
    for vol in vols:
        assert not os.path.lexists(link(api, sd_id, img, vol))
        assert active(api, sd_id, vol) in (False, None)
    assert not os.path.exists(api.images.image_dir(sd_id, img))


def test_reference_counts(api, chain3):
    pool_id, sd_id, img, vols = chain3
    api.image_prepare(pool_id, sd_id, img, vols[2])
    api.image_prepare(pool_id, sd_id, img, vols[2])
    api.image_prepare(pool_id, sd_id, img, vols[1])  # shares base and mid
    assert api.images.refs(sd_id, img, vols[0]) == 3
    assert api.images.refs(sd_id, img, vols[2]) == 2

    api.image_teardown(pool_id, sd_id, img, vols[2])
    assert all(os.path.exists(link(api, sd_id, img, v)) for v in vols)
    assert active(api, sd_id, vols[2]) in (True, None)

    api.image_teardown(pool_id, sd_id, img, vols[2])
    # top released; base and mid still held by the prepare of mid.
    assert not os.path.lexists(link(api, sd_id, img, vols[2]))
    assert active(api, sd_id, vols[2]) in (False, None)
    assert os.path.exists(link(api, sd_id, img, vols[1]))
    assert active(api, sd_id, vols[0]) in (True, None)

    api.image_teardown(pool_id, sd_id, img, vols[1])
    assert not any(os.path.lexists(link(api, sd_id, img, v)) for v in vols)
    assert not api.images.is_prepared(sd_id, img)
    # One more teardown than prepares changes nothing.
    api.image_teardown(pool_id, sd_id, img, vols[1])
    assert api.images.refs(sd_id, img, vols[0]) == 0


def test_prepare_refuses_illegal_volume(api, chain3):
    pool_id, sd_id, img, vols = chain3
    dom = api.cache.get(sd_id)
    dom.manifest.volume(img, vols[1]).set_legality(volume.ILLEGAL)
    with pytest.raises(errors.prepareIllegalVolumeError):
        api.image_prepare(pool_id, sd_id, img, vols[2])
    assert not any(os.path.lexists(link(api, sd_id, img, v)) for v in vols)
    # The replication path may prepare it.
    result = api.prepare(pool_id, sd_id, img, vols[2], allow_illegal=True)
    assert len(result["chain"]) == 3
    api.teardown(pool_id, sd_id, img, vols[2])


def test_failed_activation_releases_what_was_taken(api, chain3, monkeypatch):
    pool_id, sd_id, img, vols = chain3
    dom = api.cache.get(sd_id)
    real = dom.activate_volume

    def fail_on_top(img_id, vol_id):
        if vol_id == vols[2]:
            raise errors.VolumeDoesNotExist(vol_id=vol_id, sd_id=sd_id, reason="injected")
        return real(img_id, vol_id)

    monkeypatch.setattr(dom, "activate_volume", fail_on_top)
    with pytest.raises(errors.VolumeDoesNotExist):
        api.image_prepare(pool_id, sd_id, img, vols[2])
    assert not api.images.is_prepared(sd_id, img)
    for vol in vols:
        assert not os.path.lexists(link(api, sd_id, img, vol))
        assert active(api, sd_id, vol) in (False, None)


def test_prepare_unknown(api, chain3):
    pool_id, sd_id, img, vols = chain3
    with pytest.raises(errors.ImageDoesNotExistInSD):
        api.image_prepare(pool_id, sd_id, new_id(), vols[0])
    with pytest.raises(errors.VolumeDoesNotExist):
        api.image_prepare(pool_id, sd_id, img, new_id())
    with pytest.raises(errors.StoragePoolUnknown):
        api.image_prepare(new_id(), sd_id, img, vols[0])
    with pytest.raises(errors.StorageDomainDoesNotExist):
        api.image_prepare(pool_id, new_id(), img, vols[0])


def test_block_volumes_are_loop_devices_side_by_side(api, block_domain_factory):
    sd_id = block_domain_factory(api)
    pool_id = make_pool(api, sd_id)
    img, base, top = new_id(), new_id(), new_id()
    create_volume(api, pool_id, sd_id, img, base, 16 * MiB, volume.RAW, volume.PREALLOCATED)
    create_volume(api, pool_id, sd_id, img, top, 16 * MiB, parent=base)
    result = api.image_prepare(pool_id, sd_id, img, top)
    try:
        dom = api.cache.get(sd_id)
        for entry in result["chain"]:
            target = os.readlink(entry["path"])
            assert target == dom.activation.active_path(sd_id, entry["volumeID"])
            assert os.path.dirname(entry["path"]) == api.images.image_dir(sd_id, img)
        assert result["chain"][0]["format"] == "RAW"
    finally:
        api.image_teardown(pool_id, sd_id, img, top)
    assert dom.activation.active_path(sd_id, top) is None


@pytest.mark.parametrize("suffix", ["\n", " ", "\x00", "/..", "\u2028"])
def test_ids_that_become_paths_are_canonical_uuids(api, suffix):
    # common.uuids uses fullmatch: "$" would take a trailing newline.
    good = new_id()
    for args in [(good + suffix, good, good), (good, good + suffix, good),
                 (good, good, good + suffix)]:
        with pytest.raises(errors.InvalidUUID):
            api.images.link_path(*args)
    with pytest.raises(errors.InvalidUUID):
        api.images.image_dir(good.upper(), good)


def test_release_leftovers_keeps_what_is_held(api, chain3):
    # A previous life prepared the chain (links, active LVs) and died: a
    # new ImageManager on the same run dir holds no reference.
    pool_id, sd_id, img, vols = chain3
    api.image_prepare(pool_id, sd_id, img, vols[2])
    old_targets = {v: os.readlink(link(api, sd_id, img, v)) for v in vols}
    api.images = image.ImageManager(api.run_dir)  # the restarted daemon's
    assert sorted(api.images.links()) == sorted((sd_id, img, v) for v in vols)

    # Recovery re-prepares mid: it takes the links and devices over.
    api.image_prepare(pool_id, sd_id, img, vols[1])
    for v in vols[:2]:
        assert os.readlink(link(api, sd_id, img, v)) == old_targets[v]
    os.symlink("nowhere", link(api, sd_id, img, vols[2]) + ".tmp")  # a crashed _link
    dom = api.cache.get(sd_id)

    released = api.images.release_leftovers(lambda s: dom if s == sd_id else None)

    assert released == [(sd_id, img, vols[2])]
    assert not os.path.lexists(link(api, sd_id, img, vols[2]))
    assert not os.path.lexists(link(api, sd_id, img, vols[2]) + ".tmp")
    assert active(api, sd_id, vols[2]) in (False, None)
    assert active(api, sd_id, vols[0]) in (True, None)
    api.image_teardown(pool_id, sd_id, img, vols[1])
    assert api.images.links() == []
    assert not os.path.exists(api.images.root + "/" + sd_id)


def test_release_leftovers_of_an_unknown_domain_removes_links(api, chain3):
    pool_id, sd_id, img, vols = chain3
    api.image_prepare(pool_id, sd_id, img, vols[0])
    api.images = image.ImageManager(api.run_dir)
    dom = api.cache.get(sd_id)
    busy = os.path.realpath(link(api, sd_id, img, vols[0]))
    # A target some process holds open is kept.
    assert api.images.release_leftovers(lambda s: None, busy=lambda t: t == busy) == []
    assert api.images.release_leftovers(lambda s: None) == [(sd_id, img, vols[0])]
    assert api.images.links() == []
    if isinstance(dom, block_sd.BlockDomain):  # not deactivated: the domain was unknown
        assert dom.activation.is_active(dom.vg, vols[0])
        dom.activation.deactivate(dom.vg, vols[0])
