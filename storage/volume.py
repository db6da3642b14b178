"""Volumes: their metadata (the manifest) and the rules shared by file and
block volumes.

A volume's metadata is a block of ``KEY=VALUE`` lines ending in ``EOF``
(DESIGN section 6)::

    CAP=1073741824
    CTIME=1700000000
    DESCRIPTION=
    DOMAIN=<sdUUID>
    FORMAT=COW
    GEN=0
    IMAGE=<imgUUID>
    LEGALITY=LEGAL
    PUUID=<parent volUUID or the blank UUID>
    TYPE=SPARSE
    VOLTYPE=LEAF
    EOF

Where it is stored is the domain's business (a ``.meta`` file on file
domains, a slot of the ``metadata`` LV on block domains); this module only
encodes, decodes and checks it, with the rules every volume obeys whatever
its domain (:func:`check_request`, :func:`check_parent`, :func:`check_delete`,
:func:`max_size`).  :class:`VolumeManifest` reads and changes one volume's
metadata through a :class:`MetadataStore`, its domain's manifest.  Creating
and removing volumes is sequenced by :class:`storage.sd.StorageDomain`
(metadata ILLEGAL, data, LEGAL), with the data side in ``file_sd`` and
``block_sd``/``block_volume``.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any, Protocol

from common import sizes, uuids
from storage import errors

log = logging.getLogger("storage.volume")

BLANK_UUID = uuids.BLANK_UUID

# FORMAT
COW = "COW"
RAW = "RAW"
FORMATS = (COW, RAW)
QEMU_FORMAT = {COW: "qcow2", RAW: "raw"}

# TYPE
SPARSE = "SPARSE"
PREALLOCATED = "PREALLOCATED"
TYPES = (SPARSE, PREALLOCATED)

# VOLTYPE
LEAF = "LEAF"
INTERNAL = "INTERNAL"
VOLTYPES = (LEAF, INTERNAL)

# LEGALITY
LEGAL = "LEGAL"
ILLEGAL = "ILLEGAL"
LEGALITIES = (LEGAL, ILLEGAL)

# Same limit as the schema: 1 PiB.
MAX_CAPACITY = 1 << 50
MAX_DESCRIPTION = 1024


@dataclasses.dataclass
class Metadata:
    """The metadata of one volume (all fields of DESIGN section 6)."""

    domain: str
    image: str
    parent: str
    capacity: int
    format: str
    type: str
    voltype: str
    legality: str
    ctime: int
    description: str = ""
    generation: int = 0

    def dump(self) -> bytes:
        fields = {
            "CAP": str(self.capacity),
            "CTIME": str(self.ctime),
            "DESCRIPTION": self.description,
            "DOMAIN": self.domain,
            "FORMAT": self.format,
            "GEN": str(self.generation),
            "IMAGE": self.image,
            "LEGALITY": self.legality,
            "PUUID": self.parent,
            "TYPE": self.type,
            "VOLTYPE": self.voltype,
        }
        lines = [f"{k}={v}" for k, v in fields.items()]
        lines.append("EOF")
        return ("\n".join(lines) + "\n").encode("utf-8")

    @classmethod
    def parse(cls, data: bytes, vol_id: str) -> Metadata:
        """Decode metadata; raises VolumeMetadataReadError if it is not whole."""
        text = data.split(b"\0", 1)[0].decode("utf-8", "replace")
        fields: dict[str, str] = {}
        complete = False
        for line in text.splitlines():
            if line == "EOF":
                complete = True
                break
            key, sep, value = line.partition("=")
            if sep:
                fields[key] = value
        if not complete:
            raise errors.VolumeMetadataReadError(vol_id=vol_id, reason="no EOF marker")
        try:
            md = cls(
                domain=fields["DOMAIN"],
                image=fields["IMAGE"],
                parent=fields["PUUID"],
                capacity=int(fields["CAP"]),
                format=fields["FORMAT"],
                type=fields["TYPE"],
                voltype=fields["VOLTYPE"],
                legality=fields["LEGALITY"],
                ctime=int(fields["CTIME"]),
                description=fields.get("DESCRIPTION", ""),
                generation=int(fields.get("GEN", "0")),
            )
        except (KeyError, ValueError) as e:
            raise errors.VolumeMetadataReadError(vol_id=vol_id, reason=f"bad field {e}") from e
        if (
            md.format not in FORMATS
            or md.type not in TYPES
            or md.voltype not in VOLTYPES
            or md.legality not in LEGALITIES
        ):
            raise errors.VolumeMetadataReadError(vol_id=vol_id, reason="unknown value")
        return md


def clean_description(text: str) -> str:
    """A description that fits on one metadata line."""
    cleaned = " ".join(text.splitlines())
    if len(cleaned) > MAX_DESCRIPTION:
        raise errors.VolumeDescriptionTooLong(length=len(cleaned), limit=MAX_DESCRIPTION)
    return cleaned


def max_size(capacity: int, fmt: str) -> int:
    """Most bytes a volume of this capacity and format can ever need (a COW
    volume: :func:`common.sizes.cow_max_size`, the rule virt applies too)."""
    if fmt == RAW:
        return capacity
    return sizes.cow_max_size(capacity)


def check_capacity(capacity: int) -> int:
    """Capacity in bytes, rounded up to whole sectors; refuses absurd values."""
    if isinstance(capacity, bool) or not isinstance(capacity, int):
        raise errors.InvalidVolumeSize(size=capacity, reason="not an integer")
    if capacity <= 0 or capacity > MAX_CAPACITY:
        raise errors.InvalidVolumeSize(size=capacity, reason=f"must be 1..{MAX_CAPACITY}")
    return sizes.round_up(capacity, sizes.SECTOR)


def check_request(fmt: str, prealloc: str, capacity: int, initial_size: int | None) -> int:
    """Refuse an unknown format or preallocation and bad sizes; returns the
    capacity in whole sectors."""
    if fmt not in FORMATS:
        raise errors.IncorrectFormat(format=fmt, reason="unknown format")
    if prealloc not in TYPES:
        raise errors.IncorrectType(type=prealloc, reason="unknown preallocation")
    capacity = check_capacity(capacity)
    if initial_size is not None:
        check_capacity(initial_size)
    return capacity


def check_parent(
    existing: dict[str, Metadata],
    sd_id: str,
    img_id: str,
    parent_id: str,
    fmt: str,
    capacity: int,
) -> Metadata | None:
    """Refuse a new volume of the image whose volumes are ``existing`` that
    would not extend its chain at the leaf; returns the parent's metadata
    (None for a new base volume)."""
    if parent_id == BLANK_UUID:
        if existing:
            raise errors.ImageIsNotLegalChain(
                img_id=img_id, sd_id=sd_id, reason="the image already has a base volume"
            )
        return None
    parent = existing.get(parent_id)
    if parent is None:
        raise errors.VolumeDoesNotExist(vol_id=parent_id, sd_id=sd_id)
    if fmt != COW:
        raise errors.IncorrectFormat(format=fmt, reason="a volume with a parent must be COW")
    if any(md.parent == parent_id for md in existing.values()):
        raise errors.ImageIsNotLegalChain(
            img_id=img_id, sd_id=sd_id, reason=f"volume {parent_id} already has a child"
        )
    if capacity < parent.capacity:
        raise errors.VolumeCapacityBelowParent(
            capacity=capacity, parent_id=parent_id, parent_capacity=parent.capacity
        )
    return parent


def check_delete(existing: dict[str, Metadata], sd_id: str, vol_id: str) -> None:
    """Refuse deleting a volume missing from ``existing`` (its image's
    volumes) or one that has children."""
    if vol_id not in existing:
        raise errors.VolumeDoesNotExist(vol_id=vol_id, sd_id=sd_id)
    if any(md.parent == vol_id for md in existing.values()):
        raise errors.VolumeImageHasChildren(vol_id=vol_id, sd_id=sd_id)


class MetadataStore(Protocol):
    """Where volumes' metadata is read and written: a domain's manifest
    (:class:`storage.sd.DomainManifest`)."""

    @property
    def sd_id(self) -> str: ...

    @property
    def lock(self) -> AbstractContextManager[Any]:
        """Serializes read-modify-write of the domain's metadata."""
        ...

    def read_volume_metadata(self, img_id: str, vol_id: str) -> Metadata: ...

    def update_volume_metadata(
        self, img_id: str, vol_id: str, change: Callable[[Metadata], Metadata]
    ) -> Metadata: ...

    def volume_size(self, img_id: str, vol_id: str) -> tuple[int, int]: ...


class VolumeManifest:
    """One volume's metadata, read and written through its domain manifest."""

    def __init__(self, manifest: MetadataStore, img_id: str, vol_id: str) -> None:
        self.manifest = manifest
        self.sd_id = manifest.sd_id
        self.img_id = img_id
        self.vol_id = vol_id

    def __repr__(self) -> str:
        return f"<Volume sd={self.sd_id} img={self.img_id} vol={self.vol_id}>"

    def metadata(self) -> Metadata:
        return self.manifest.read_volume_metadata(self.img_id, self.vol_id)

    def update(self, **changes: Any) -> Metadata:
        """Change metadata fields (legality, voltype...) and bump GEN."""
        with self.manifest.lock:
            md = self.manifest.update_volume_metadata(
                self.img_id,
                self.vol_id,
                lambda md: dataclasses.replace(md, generation=md.generation + 1, **changes),
            )
        log.info(
            "Updated volume metadata sd=%s img=%s vol=%s changes=%s",
            self.sd_id,
            self.img_id,
            self.vol_id,
            changes,
        )
        return md

    def set_legality(self, legality: str) -> None:
        if legality not in LEGALITIES:
            raise ValueError(f"bad legality {legality!r}")
        self.update(legality=legality)

    def set_voltype(self, voltype: str) -> None:
        if voltype not in VOLTYPES:
            raise ValueError(f"bad voltype {voltype!r}")
        self.update(voltype=voltype)

    def info(self) -> dict[str, Any]:
        """Volume.getInfo (DESIGN section 4)."""
        md = self.metadata()
        apparent, true = self.manifest.volume_size(self.img_id, self.vol_id)
        return {
            "uuid": self.vol_id,
            "domain": self.sd_id,
            "image": self.img_id,
            "parent": md.parent,
            "format": md.format,
            "type": md.type,
            "voltype": md.voltype,
            "capacity": md.capacity,
            "apparentsize": apparent,
            "truesize": true,
            "legality": md.legality,
            "ctime": md.ctime,
            "description": md.description,
            "generation": md.generation,
        }
