"""File domains: layout, metadata, info, stats, images, format; bad input."""

from __future__ import annotations

import os

import pytest

from common import errors as common_errors
from storage import errors, sd, volume
from tests.storage.domain_helpers import (
    create_volume,
    file_tree,
    make_pool,
    new_id,
)

pytest_plugins = ["tests.storage.domain_fixtures"]

MiB = 1024**2


def test_create_makes_the_layout(api, file_domain_factory, storage_tmpdir):
    sd_id = file_domain_factory(api, name="my domain")
    root = os.path.join(storage_tmpdir, "mnt", sd_id)
    tree = file_tree(root)
    for name in ("dom_md/metadata", "dom_md/ids", "dom_md/leases", "dom_md/inbox",
                 "dom_md/outbox", "images", "master/tasks"):
        assert name in tree
    # Nothing left of the temporary tree it was built in.
    assert os.listdir(os.path.join(storage_tmpdir, "mnt")) == [sd_id]
    with open(os.path.join(root, "dom_md", "metadata")) as f:
        lines = f.read().splitlines()
    assert lines[-1] == "EOF"
    fields = dict(line.split("=", 1) for line in lines[:-1])
    assert fields["SDUUID"] == sd_id
    assert fields["NAME"] == "my domain"
    assert fields["TYPE"] == "FILE"
    assert fields["ROLE"] == "Regular"
    assert fields["POOL_UUID"] == ""


def test_info_stats_images(api, file_domain_factory, storage_tmpdir):
    sd_id = file_domain_factory(api, name="dom")
    info = api.storage_domain_get_info(sd_id)
    assert info == {
        "uuid": sd_id,
        "name": "dom",
        "type": "file",
        "class": "Data",
        "role": "Regular",
        "pool": [],
        "version": "5",
        "path": os.path.join(storage_tmpdir, "mnt"),
    }
    stats = api.storage_domain_get_stats(sd_id)
    st = os.statvfs(storage_tmpdir)
    assert stats["disktotal"] == st.f_blocks * st.f_frsize
    assert 0 < stats["diskfree"] <= stats["disktotal"]
    assert api.storage_domain_get_images(sd_id) == []


def test_volume_files_and_metadata(api, file_domain_factory, storage_tmpdir):
    sd_id = file_domain_factory(api)
    pool_id = make_pool(api, sd_id)
    img, vol = new_id(), new_id()
    create_volume(api, pool_id, sd_id, img, vol, 64 * MiB, desc="a\nb")
    assert api.storage_domain_get_images(sd_id) == [img]
    image_dir = os.path.join(storage_tmpdir, "mnt", sd_id, "images", img)
    assert sorted(os.listdir(image_dir)) == [vol, vol + ".meta"]
    with open(os.path.join(image_dir, vol + ".meta")) as f:
        lines = f.read().splitlines()
    assert lines[-1] == "EOF"
    fields = dict(line.split("=", 1) for line in lines[:-1])
    assert set(fields) == {"CAP", "FORMAT", "TYPE", "VOLTYPE", "PUUID", "IMAGE", "DOMAIN",
                           "LEGALITY", "CTIME", "DESCRIPTION", "GEN"}
    assert fields["CAP"] == str(64 * MiB)
    assert fields["FORMAT"] == "COW"
    assert fields["LEGALITY"] == "LEGAL"
    assert fields["PUUID"] == volume.BLANK_UUID
    assert fields["DESCRIPTION"] == "a b"


def test_create_twice_refused(api, file_domain_factory, storage_tmpdir):
    sd_id = file_domain_factory(api)
    before = file_tree(storage_tmpdir + "/mnt")
    with pytest.raises(errors.StorageDomainAlreadyExists):
        file_domain_factory(api, sd_id=sd_id)
    assert file_tree(storage_tmpdir + "/mnt") == before


def test_create_over_a_foreign_directory_refused(api, storage_tmpdir):
    """A directory named like the domain that this host doesn't know."""
    sd_id = new_id()
    os.makedirs(os.path.join(storage_tmpdir, "mnt", sd_id))
    with pytest.raises(errors.StorageDomainAlreadyExists):
        api.storage_domain_create(sd_id, sd.FILE, {"path": storage_tmpdir + "/mnt"}, "x")
    assert os.listdir(os.path.join(storage_tmpdir, "mnt", sd_id)) == []
    with pytest.raises(errors.StorageDomainDoesNotExist):
        api.storage_domain_get_info(sd_id)


@pytest.mark.parametrize("path", ["missing", "a-file", ""])
def test_path_must_be_an_existing_directory(api, storage_tmpdir, path):
    with open(os.path.join(storage_tmpdir, "a-file"), "w"):
        pass
    sd_id = new_id()
    before = file_tree(storage_tmpdir)
    with pytest.raises(common_errors.Error) as e:
        api.storage_domain_create(
            sd_id, sd.FILE, {"path": os.path.join(storage_tmpdir, path) if path else ""}, "x"
        )
    assert e.value.name in ("StorageDomainIllegalRemotePath", "InvalidParams")
    assert file_tree(storage_tmpdir) == before
    with pytest.raises(errors.StorageDomainDoesNotExist):
        api.storage_domain_get_info(sd_id)


def test_relative_path_refused(api, storage_tmpdir, monkeypatch):
    monkeypatch.chdir(storage_tmpdir)
    os.makedirs(os.path.join(storage_tmpdir, "rel"))
    with pytest.raises(errors.StorageDomainIllegalRemotePath):
        api.storage_domain_create(new_id(), sd.FILE, {"path": "rel"}, "x")
    assert os.listdir(os.path.join(storage_tmpdir, "rel")) == []


def test_format_removes_the_domain(api, file_domain_factory, storage_tmpdir):
    sd_id = file_domain_factory(api)
    assert api.storage_domain_format(sd_id) is True
    assert os.listdir(os.path.join(storage_tmpdir, "mnt")) == []
    with pytest.raises(errors.StorageDomainDoesNotExist):
        api.storage_domain_get_info(sd_id)
    with pytest.raises(errors.StorageDomainDoesNotExist):
        api.storage_domain_format(sd_id)
    # The UUID can be used again.
    file_domain_factory(api, sd_id=sd_id)


def test_format_of_attached_domain_refused(api, file_domain_factory, storage_tmpdir):
    sd_id = file_domain_factory(api)
    pool_id = make_pool(api, sd_id, spm=False)
    before = file_tree(storage_tmpdir + "/mnt")
    with pytest.raises(errors.CannotFormatAttachedStorageDomain):
        api.storage_domain_format(sd_id)
    assert file_tree(storage_tmpdir + "/mnt") == before
    assert api.storage_domain_get_info(sd_id)["pool"] == [pool_id]


def test_unknown_domain(api):
    sd_id = new_id()
    for call in (api.storage_domain_get_info, api.storage_domain_get_stats,
                 api.storage_domain_get_images, api.storage_domain_format):
        with pytest.raises(errors.StorageDomainDoesNotExist):
            call(sd_id)


def test_domains_known_after_restart(api_factory, file_domain_factory):
    first = api_factory()
    sd_id = file_domain_factory(first, name="persistent")
    second = api_factory()  # same run dir: the daemon restarted
    assert second.storage_domain_get_info(sd_id)["name"] == "persistent"


def test_metadata_without_eof_is_refused(api, file_domain_factory, storage_tmpdir):
    sd_id = file_domain_factory(api)
    path = os.path.join(storage_tmpdir, "mnt", sd_id, "dom_md", "metadata")
    with open(path, "w") as f:
        f.write("SDUUID=x\n")
    with pytest.raises(errors.StorageDomainMetadataNotFound):
        api.storage_domain_get_info(sd_id)


def test_check_uuid():
    """Only canonical UUIDs become paths (names on the file system)."""
    sd.check_uuid(new_id())
    for bad in ("../etc", new_id().upper()):
        with pytest.raises(errors.InvalidUUID):
            sd.check_uuid(bad)
