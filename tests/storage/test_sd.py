"""What file and block domains share (storage/sd.py), on an in-memory
domain: the metadata format, the manifest's interpretation of it, and the
crash-safe sequencing of volume creation and deletion with the volume
rules of storage/volume.py.  No storage is touched."""

from __future__ import annotations

import collections.abc
import contextlib
import uuid
from typing import Any

import pytest

from storage import block_sd, errors, file_sd, oop, sd, volume

MiB = 1024**2
BLANK = sd.BLANK_UUID


def new_id() -> str:
    return str(uuid.uuid4())


class MemoryManifest(sd.DomainManifest):
    """A domain whose metadata lives in dicts."""

    domain_type = "memory"

    def __init__(self, sd_id: str, env: sd.Env) -> None:
        super().__init__(sd_id, env)
        self.fields: dict[str, str] = {}
        self.vols: dict[tuple[str, str], volume.Metadata] = {}

    def read_metadata(self) -> dict[str, str]:
        return dict(self.fields)

    def write_metadata(self, fields: dict[str, str]) -> None:
        self.fields = dict(fields)

    def list_images(self) -> list[str]:
        return sorted({img for img, _ in self.vols})

    def list_volumes(self, img_id: str) -> list[str]:
        return sorted(v for img, v in self.vols if img == img_id)

    def find_volume(self, vol_id: str) -> str | None:
        return next((img for img, v in self.vols if v == vol_id), None)

    def read_volume_metadata(self, img_id: str, vol_id: str) -> volume.Metadata:
        try:
            return self.vols[(img_id, vol_id)]
        except KeyError:
            raise errors.VolumeDoesNotExist(vol_id=vol_id, sd_id=self.sd_id) from None

    def write_volume_metadata(self, img_id: str, vol_id: str, md: volume.Metadata) -> None:
        self.vols[(img_id, vol_id)] = md

    def volume_size(self, img_id: str, vol_id: str) -> tuple[int, int]:
        md = self.read_volume_metadata(img_id, vol_id)
        return md.capacity, 0

    def type_info(self) -> dict[str, Any]:
        return {"where": "memory"}


class MemoryDomain(sd.StorageDomain):
    """Records what the hooks are asked to do, in order."""

    manifest: MemoryManifest

    def __init__(self, manifest: MemoryManifest) -> None:
        super().__init__(manifest)
        self.events: list[tuple[Any, ...]] = []
        self.fail_data = False

    def check_create(self, fmt: str, prealloc: str, capacity: int, initial_size: int | None,
                     check_space: bool = True) -> None:
        self.events.append(("check", capacity, check_space))

    def _allocate(self, img_id: str, vol_id: str, md: volume.Metadata,
                  initial_size: int | None) -> None:
        self.events.append(("allocate", vol_id, md.legality, initial_size))

    def _create_data(self, images: sd.Images, img_id: str, vol_id: str, md: volume.Metadata,
                     cluster_size: int | None) -> None:
        stored = self.manifest.read_volume_metadata(img_id, vol_id)
        self.events.append(("data", vol_id, stored.legality, self._backing(img_id, md)))
        if self.fail_data:
            raise errors.CommandFailed(cmd=["qemu-img"], rc=1, err="injected")

    def _remove(self, img_id: str, vol_id: str) -> None:
        self.events.append(("remove", vol_id))
        self.manifest.vols.pop((img_id, vol_id), None)


class FakeImages:
    """The Images interface: which volumes are prepared."""

    def __init__(self) -> None:
        self.busy: set[tuple[str, str, str]] = set()

    def is_prepared(self, sd_id: str, img_id: str, vol_id: str | None = None) -> bool:
        return (sd_id, img_id, vol_id) in self.busy

    @contextlib.contextmanager
    def prepared(self, dom: sd.StorageDomain, img_id: str, vol_id: str,
                 allow_illegal: bool = False) -> collections.abc.Iterator[dict[str, Any]]:
        yield {"path": f"/run/{vol_id}", "chain": []}


@pytest.fixture
def dom() -> MemoryDomain:
    env = sd.Env(oop=oop.InProcess(), run_dir="/nonexistent")
    return MemoryDomain(MemoryManifest(new_id(), env))


@pytest.fixture
def images() -> FakeImages:
    return FakeImages()


def legalities(dom: MemoryDomain, img: str) -> dict[str, tuple[str, str]]:
    return {v: (md.legality, md.voltype) for v, md in dom.manifest.image_metadata(img).items()}


# The metadata format.


def test_metadata_roundtrip_sorted_and_padded() -> None:
    fields = {sd.SDUUID: "x", sd.NAME: "a=b", sd.ROLE: sd.REGULAR}
    data = sd.dump_metadata(fields)
    assert data == b"NAME=a=b\nROLE=Regular\nSDUUID=x\nEOF\n"
    assert sd.parse_metadata(data + b"\0" * 512, "x") == fields
    # Lines after EOF are ignored: the end of an older, longer copy.
    assert sd.parse_metadata(data + b"STALE=1\n", "x") == fields


@pytest.mark.parametrize("data", [b"", b"SDUUID=x\n", b"\0" * 512])
def test_metadata_without_eof_refused(data: bytes) -> None:
    with pytest.raises(errors.StorageDomainMetadataNotFound) as e:
        sd.parse_metadata(data, "x")
    assert e.value.sd_id == "x"


def test_check_uuid() -> None:
    sd.check_uuid(new_id(), new_id(), BLANK)
    for bad in ("", "../x", new_id().upper(), new_id() + "\n"):
        with pytest.raises(errors.InvalidUUID) as e:
            sd.check_uuid(new_id(), bad)
        assert e.value.value == bad
        assert e.value.name == "InvalidParams"


# The manifest.


def test_update_metadata_sets_and_removes(dom: MemoryDomain) -> None:
    dom.manifest.write_metadata({sd.NAME: "n", sd.POOL_SPM_ID: "1"})
    result = dom.manifest.update_metadata({sd.ROLE: sd.MASTER, sd.POOL_SPM_ID: None,
                                           "ABSENT": None})
    assert result == {sd.NAME: "n", sd.ROLE: sd.MASTER}
    assert dom.manifest.read_metadata() == result


def test_info_with_defaults(dom: MemoryDomain) -> None:
    assert dom.manifest.pool_id() == ""
    assert dom.manifest.role() == sd.REGULAR
    assert dom.manifest.info() == {
        "uuid": dom.sd_id, "name": "", "type": "memory", "class": sd.DATA_CLASS,
        "role": sd.REGULAR, "pool": [], "version": str(sd.VERSION), "where": "memory",
    }
    pool = new_id()
    dom.manifest.write_metadata({sd.NAME: "x", sd.POOL_UUID: pool, sd.ROLE: sd.MASTER,
                                 sd.VERSION_KEY: "4"})
    info = dom.manifest.info()
    assert (info["name"], info["pool"], info["role"], info["version"]) == (
        "x", [pool], sd.MASTER, "4")
    assert dom.manifest.pool_id() == pool
    assert dom.domain_type == "memory"


# Creating volumes.


def test_create_sequence(dom: MemoryDomain, images: FakeImages) -> None:
    img, base, top = new_id(), new_id(), new_id()
    allocated: list[bool] = []

    def on_allocated() -> None:
        # Called once storage was touched, before the metadata exists.
        allocated.append(dom.manifest.find_volume(base) is None)

    dom.create_volume(images, img, base, MiB + 1, volume.RAW, volume.PREALLOCATED,
                      description="two\nlines", on_allocated=on_allocated)
    assert allocated == [True]
    assert dom.events == [
        # Validation sees the capacity in whole sectors; allocation re-checks space.
        ("check", MiB + 512, False),
        ("allocate", base, volume.ILLEGAL, None),
        # The data is written while the metadata says ILLEGAL.
        ("data", base, volume.ILLEGAL, (None, None)),
    ]
    md = dom.manifest.read_volume_metadata(img, base)
    assert (md.capacity, md.legality, md.voltype, md.parent) == (
        MiB + 512, volume.LEGAL, volume.LEAF, BLANK)
    assert md.description == "two lines"
    assert md.generation == 1  # LEGAL was one update

    dom.events.clear()
    dom.create_volume(images, img, top, 2 * MiB, volume.COW, volume.SPARSE, parent_id=base,
                      initial_size=MiB, cluster_size=65536)
    assert dom.events[1:] == [
        ("allocate", top, volume.ILLEGAL, MiB),
        ("data", top, volume.ILLEGAL, (base, "raw")),
    ]
    assert legalities(dom, img) == {
        base: (volume.LEGAL, volume.INTERNAL),
        top: (volume.LEGAL, volume.LEAF),
    }


def test_create_not_legal_stays_illegal(dom: MemoryDomain, images: FakeImages) -> None:
    img, vol = new_id(), new_id()
    dom.create_volume(images, img, vol, MiB, volume.COW, volume.SPARSE, legal=False)
    assert legalities(dom, img) == {vol: (volume.ILLEGAL, volume.LEAF)}


def test_failed_data_leaves_the_parent_alone(dom: MemoryDomain, images: FakeImages) -> None:
    img, base, top = new_id(), new_id(), new_id()
    dom.create_volume(images, img, base, MiB, volume.COW, volume.SPARSE)
    dom.fail_data = True
    with pytest.raises(errors.CommandFailed):
        dom.create_volume(images, img, top, MiB, volume.COW, volume.SPARSE, parent_id=base)
    # The half-made volume is ILLEGAL; its parent is still the leaf.
    assert legalities(dom, img) == {
        base: (volume.LEGAL, volume.LEAF),
        top: (volume.ILLEGAL, volume.LEAF),
    }
    dom.remove_volume(img, top)
    assert legalities(dom, img) == {base: (volume.LEGAL, volume.LEAF)}


def _bad_creations(img: str, base: str, top: str) -> list[tuple[str, dict[str, Any], type]]:
    return [
        ("image not a UUID", dict(img_id="x"), errors.InvalidUUID),
        ("parent not a UUID", dict(parent_id="../x"), errors.InvalidUUID),
        ("unknown format", dict(fmt="QCOW3"), errors.IncorrectFormat),
        ("unknown preallocation", dict(prealloc="THIN"), errors.IncorrectType),
        ("zero capacity", dict(capacity=0), errors.InvalidVolumeSize),
        ("bool capacity", dict(capacity=True), errors.InvalidVolumeSize),
        ("absurd capacity", dict(capacity=1 << 51), errors.InvalidVolumeSize),
        ("bad initial size", dict(initial_size=-1), errors.InvalidVolumeSize),
        ("existing volume", dict(vol_id=top), errors.VolumeAlreadyExists),
        ("second base", dict(parent_id=BLANK), errors.ImageIsNotLegalChain),
        ("unknown parent", dict(parent_id=new_id()), errors.VolumeDoesNotExist),
        ("RAW child", dict(fmt=volume.RAW, prealloc=volume.PREALLOCATED),
         errors.IncorrectFormat),
        ("fork", dict(parent_id=base), errors.ImageIsNotLegalChain),
        ("capacity below parent", dict(parent_id=top, capacity=MiB - 512),
         errors.VolumeCapacityBelowParent),
    ]


def test_validate_create_refuses(dom: MemoryDomain, images: FakeImages) -> None:
    img, base, top = new_id(), new_id(), new_id()
    dom.create_volume(images, img, base, MiB, volume.COW, volume.SPARSE)
    dom.create_volume(images, img, top, MiB, volume.COW, volume.SPARSE, parent_id=base)
    good = dict(img_id=img, vol_id=new_id(), capacity=MiB, fmt=volume.COW,
                prealloc=volume.SPARSE, parent_id=top)
    before = dict(dom.manifest.vols)
    for what, change, error in _bad_creations(img, base, top):
        with pytest.raises(error):
            dom.validate_create(**dict(good, **change))
        with pytest.raises(error):
            dom.create_volume(images, **dict(good, **change))
        assert dom.manifest.vols == before, what
    # The valid request answers its parent's metadata.
    parent = dom.validate_create(**good)
    assert parent == dom.manifest.read_volume_metadata(img, top)
    assert dom.validate_create(new_id(), new_id(), MiB, volume.RAW, volume.SPARSE, BLANK) is None


def test_validate_create_asks_the_domain_type(dom: MemoryDomain) -> None:
    dom.validate_create(new_id(), new_id(), 1000, volume.COW, volume.SPARSE, BLANK)
    dom.validate_create(new_id(), new_id(), 1000, volume.COW, volume.SPARSE, BLANK,
                        check_space=False)
    assert dom.events == [("check", 1024, True), ("check", 1024, False)]


# Deleting volumes.


def test_delete_restores_the_parent_as_leaf(dom: MemoryDomain, images: FakeImages) -> None:
    img, base, top = new_id(), new_id(), new_id()
    dom.create_volume(images, img, base, MiB, volume.COW, volume.SPARSE)
    dom.create_volume(images, img, top, MiB, volume.COW, volume.SPARSE, parent_id=base)
    with pytest.raises(errors.VolumeImageHasChildren):
        dom.delete_volume(images, img, base)
    images.busy.add((dom.sd_id, img, top))
    with pytest.raises(errors.VolumeIsBusy):
        dom.delete_volume(images, img, top)
    images.busy.clear()
    with pytest.raises(errors.VolumeDoesNotExist):
        dom.delete_volume(images, img, new_id())
    assert legalities(dom, img) == {
        base: (volume.LEGAL, volume.INTERNAL),
        top: (volume.LEGAL, volume.LEAF),
    }
    dom.events.clear()
    dom.delete_volume(images, img, top)
    assert dom.events == [("remove", top)]
    assert legalities(dom, img) == {base: (volume.LEGAL, volume.LEAF)}


def test_remove_whatever_exists(dom: MemoryDomain, images: FakeImages) -> None:
    img, vol = new_id(), new_id()
    # Nothing of the volume exists (a creation that failed early): no error.
    dom.remove_volume(img, vol)
    dom.remove_volume(img, vol, parent_id=new_id())
    assert dom.events == [("remove", vol), ("remove", vol)]


def test_volume_manifest_updates_bump_the_generation(dom: MemoryDomain,
                                                     images: FakeImages) -> None:
    img, vol = new_id(), new_id()
    dom.create_volume(images, img, vol, MiB, volume.COW, volume.SPARSE)
    vm = dom.manifest.volume(img, vol)
    vm.set_legality(volume.ILLEGAL)
    vm.set_voltype(volume.INTERNAL)
    md = vm.metadata()
    assert (md.legality, md.voltype, md.generation) == (volume.ILLEGAL, volume.INTERNAL, 3)
    with pytest.raises(ValueError):
        vm.set_legality("MAYBE")
    info = vm.info()
    assert (info["uuid"], info["image"], info["domain"]) == (vol, img, dom.sd_id)
    assert (info["apparentsize"], info["truesize"]) == (MiB, 0)
    assert (info["parent"], info["format"], info["capacity"], info["generation"]) == (
        BLANK, volume.COW, MiB, 3)


# What the domain types differ in, asked of the domain (not its type).


def test_domain_type_attributes() -> None:
    assert not file_sd.FileDomain.grows_by_extension
    assert file_sd.FileDomain.supports_sparse_raw
    assert file_sd.FileDomain.new_raw_reads_zero
    assert block_sd.BlockDomain.grows_by_extension
    assert not block_sd.BlockDomain.supports_sparse_raw
    assert not block_sd.BlockDomain.new_raw_reads_zero
