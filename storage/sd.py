"""Storage domains: what file and block domains share.

A domain has two faces, as in VDSM:

- the *manifest* (:class:`DomainManifest`): metadata only.  The domain's own
  metadata (``SDUUID, TYPE, NAME, CLASS, VERSION, ROLE, POOL_UUID`` and, on a
  pool's master domain, the pool's ``POOL_*``/``MASTER_VERSION`` keys), the
  listing of images and volumes, and each volume's metadata.
- the *domain* (:class:`StorageDomain`): operations that change storage.
  Creating and removing volumes (data and metadata, in a crash-safe order),
  activating, extending and refreshing them, formatting the domain.

File and block domains implement both (``storage/file_sd.py``;
``storage/block_manifest.py`` and ``storage/block_sd.py``); what differs
between them once a domain is open is a method or an attribute of the domain
object, never a test of its type.  How each type is created and opened is
:mod:`storage.domain_types`; where this host finds its domains is
:mod:`storage.sd_registry`.

This module is the bottom of the domain layer: it imports neither images nor
a domain type.  What volume creation needs of the host's prepared images is
the :class:`Images` interface (:class:`storage.image.ImageManager` is one).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, Protocol

from common import uuids
from storage import errors, oop, volume

log = logging.getLogger("storage.sd")

# Domain types (storage.domain_types has one entry for each).
FILE = "file"
BLOCK = "block"

MASTER = "Master"
REGULAR = "Regular"

VERSION = 5
DATA_CLASS = "Data"
BLANK_UUID = uuids.BLANK_UUID

# Keys of the domain metadata.
SDUUID = "SDUUID"
TYPE = "TYPE"
NAME = "NAME"
CLASS = "CLASS"
VERSION_KEY = "VERSION"
ROLE = "ROLE"
POOL_UUID = "POOL_UUID"
# Keys a pool keeps in its master domain's metadata (VDSM's names).
POOL_DESCRIPTION = "POOL_DESCRIPTION"
POOL_DOMAINS = "POOL_DOMAINS"
MASTER_VERSION = "MASTER_VERSION"
POOL_SPM_ID = "POOL_SPM_ID"
POOL_SPM_LVER = "POOL_SPM_LVER"
POOL_KEYS = (POOL_DESCRIPTION, POOL_DOMAINS, MASTER_VERSION, POOL_SPM_ID, POOL_SPM_LVER)


def check_uuid(*values: str) -> None:
    """Refuse anything but canonical UUIDs where they become paths or LV
    names (the schema validates requests; this guards every other caller)."""
    for value in values:
        if not uuids.is_canonical(value):
            raise errors.InvalidUUID(value=value)


# The domain metadata format: KEY=VALUE lines ending in EOF.


def dump_metadata(fields: dict[str, str]) -> bytes:
    """KEY=VALUE lines, sorted, ending in EOF."""
    lines = [f"{k}={v}" for k, v in sorted(fields.items())]
    lines.append("EOF")
    return ("\n".join(lines) + "\n").encode("utf-8")


def parse_metadata(data: bytes, sd_id: str) -> dict[str, str]:
    text = data.split(b"\0", 1)[0].decode("utf-8", "replace")
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if line == "EOF":
            return fields
        key, sep, value = line.partition("=")
        if sep:
            fields[key] = value
    raise errors.StorageDomainMetadataNotFound(sd_id=sd_id, reason="no EOF marker")


@dataclasses.dataclass
class Env:
    """What domain objects need from the host (plain values, no config)."""

    oop: oop.FileOps
    run_dir: str
    activation_mode: str = "auto"
    chunk_size: int = 2560 * 1024**2
    extent_size_mb: int = 128
    # sanlock's I/O timeout written into new domains' lockspaces ([sanlock] io_timeout).
    io_timeout: int = 10


class Images(Protocol):
    """What creating and deleting volumes needs of the volumes prepared on
    this host (:class:`storage.image.ImageManager`)."""

    def is_prepared(self, sd_id: str, img_id: str, vol_id: str | None = None) -> bool: ...

    def prepared(
        self, dom: StorageDomain, img_id: str, vol_id: str, allow_illegal: bool = False
    ) -> contextlib.AbstractContextManager[dict[str, Any]]: ...


class DomainManifest:
    """A domain's metadata. Subclasses store it; this class interprets it.

    It is the :class:`storage.volume.MetadataStore` of the domain's volumes.
    """

    domain_type = ""

    def __init__(self, sd_id: str, env: Env) -> None:
        self.sd_id = sd_id
        self.env = env
        # Serializes read-modify-write of the domain's and its volumes' metadata.
        self.lock = threading.RLock()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.sd_id}>"

    @contextlib.contextmanager
    def reading(self) -> Iterator[None]:
        """One operation's listings of the domain may come from one reading
        of the storage within the block (block domains: one ``pvs`` of the
        VG, see :meth:`storage.block_manifest.BlockDomainManifest.reading`)."""
        yield

    # Domain metadata: implemented by subclasses.

    def read_metadata(self) -> dict[str, str]:
        raise NotImplementedError

    def write_metadata(self, fields: dict[str, str]) -> None:
        raise NotImplementedError

    def update_metadata(self, changes: dict[str, str | None]) -> dict[str, str]:
        """Set keys (None removes a key) atomically with respect to this host."""
        with self.lock:
            fields = self.read_metadata()
            for key, value in changes.items():
                if value is None:
                    fields.pop(key, None)
                else:
                    fields[key] = value
            self.write_metadata(fields)
            return fields

    # Images and volumes: implemented by subclasses.

    def list_images(self) -> list[str]:
        raise NotImplementedError

    def list_volumes(self, img_id: str) -> list[str]:
        raise NotImplementedError

    def find_volume(self, vol_id: str) -> str | None:
        """The image holding vol_id anywhere in the domain, or None."""
        raise NotImplementedError

    def read_volume_metadata(self, img_id: str, vol_id: str) -> volume.Metadata:
        raise NotImplementedError

    def write_volume_metadata(self, img_id: str, vol_id: str, md: volume.Metadata) -> None:
        raise NotImplementedError

    def volume_size(self, img_id: str, vol_id: str) -> tuple[int, int]:
        """(apparent size, true size) in bytes."""
        raise NotImplementedError

    def update_volume_metadata(
        self, img_id: str, vol_id: str, change: Callable[[volume.Metadata], volume.Metadata]
    ) -> volume.Metadata:
        """Read, change and write a volume's metadata; callers hold self.lock."""
        md = change(self.read_volume_metadata(img_id, vol_id))
        self.write_volume_metadata(img_id, vol_id, md)
        return md

    def stats(self) -> dict[str, int]:
        raise NotImplementedError

    def type_info(self) -> dict[str, Any]:
        """Type-specific fields of getInfo (path or VG and devices)."""
        raise NotImplementedError

    # Shared behaviour.

    def image_metadata(self, img_id: str) -> dict[str, volume.Metadata]:
        """Metadata of every volume of an image (empty if no such image)."""
        return {v: self.read_volume_metadata(img_id, v) for v in self.list_volumes(img_id)}

    def pool_id(self) -> str:
        return self.read_metadata().get(POOL_UUID, "")

    def role(self) -> str:
        return self.read_metadata().get(ROLE, REGULAR)

    def info(self) -> dict[str, Any]:
        md = self.read_metadata()
        pool = md.get(POOL_UUID, "")
        result = {
            "uuid": self.sd_id,
            "name": md.get(NAME, ""),
            "type": self.domain_type,
            "class": md.get(CLASS, DATA_CLASS),
            "role": md.get(ROLE, REGULAR),
            "pool": [pool] if pool else [],
            "version": md.get(VERSION_KEY, str(VERSION)),
        }
        result.update(self.type_info())
        return result

    # Last in the class: below this method, "volume" names it, not the module.
    def volume(self, img_id: str, vol_id: str) -> volume.VolumeManifest:
        return volume.VolumeManifest(self, img_id, vol_id)


class StorageDomain:
    """Operations on a domain; the sequencing of volume creation lives here.

    What the domain types do differently is a hook (``_allocate``,
    ``_create_data``, ``_remove``, ``activate_volume``, ``extend_volume``...)
    or one of the attributes below, which callers ask instead of the type.
    """

    # Thin volumes start small and grow by extension while they are written
    # (block: an LV extended by the SPM); otherwise the storage grows by itself.
    grows_by_extension = False
    # RAW volumes may be SPARSE (a sparse file); else only PREALLOCATED.
    supports_sparse_raw = True
    # A newly made RAW volume reads as zeros (block: a new LV is not zeroed).
    new_raw_reads_zero = True

    def __init__(self, manifest: DomainManifest) -> None:
        self.manifest = manifest
        self.sd_id = manifest.sd_id
        self.env = manifest.env

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.sd_id}>"

    @property
    def domain_type(self) -> str:
        return self.manifest.domain_type

    # Hooks of the subclasses.

    def open(self) -> None:
        """Make the domain's own metadata reachable (block: activate special LVs)."""

    def close(self) -> None:
        """Undo open() (block: deactivate special LVs)."""

    def format(self) -> None:
        raise NotImplementedError

    def lease_paths(self) -> tuple[str, str]:
        """(ids, leases) paths for the cluster lock."""
        raise NotImplementedError

    def mailbox_paths(self) -> tuple[str, str]:
        """(inbox, outbox) paths of the storage mailbox (storage.mailbox)."""
        raise NotImplementedError

    def task_store(self) -> tuple[str, Any]:
        """(directory, file operations) of the SPM task store when this
        domain is a pool's master (see storage.task.TaskManager)."""
        raise NotImplementedError

    def check_create(
        self, fmt: str, prealloc: str, capacity: int, initial_size: int | None,
        check_space: bool = True,
    ) -> None:
        """Refuse what this domain type can't create or (check_space) can't fit."""

    def activate_volume(self, img_id: str, vol_id: str) -> str:
        """Make the volume's data reachable on this host; returns its path."""
        raise NotImplementedError

    def deactivate_volume(self, img_id: str, vol_id: str) -> None:
        raise NotImplementedError

    def extend_volume(self, img_id: str, vol_id: str, new_size: int) -> int:
        """SPM: grow the volume to hold new_size bytes (at most its maximum
        size); returns its size in bytes, read back.  Storage that grows by
        itself (a file) answers its current size.  Callers serialize calls
        per volume (storage.extend)."""
        raise NotImplementedError

    def refresh_volume(self, img_id: str, vol_id: str) -> int:
        """HSM: make this host's device of the volume follow its (extended)
        storage; returns its size in bytes.  Storage that grows by itself
        answers its current size."""
        raise NotImplementedError

    def _allocate(
        self, img_id: str, vol_id: str, md: volume.Metadata, initial_size: int | None
    ) -> None:
        """Reserve room for a new volume (image directory or LV)."""
        raise NotImplementedError

    def _create_data(
        self,
        images: Images,
        img_id: str,
        vol_id: str,
        md: volume.Metadata,
        cluster_size: int | None,
    ) -> None:
        raise NotImplementedError

    def _remove(self, img_id: str, vol_id: str) -> None:
        """Remove a volume's data and metadata; idempotent."""
        raise NotImplementedError

    def _backing(self, img_id: str, md: volume.Metadata) -> tuple[str | None, str | None]:
        """(backing, backing format) of a new volume's qcow2 header: the bare
        parent UUID, resolved beside the volume (the image directory or the
        links of a prepared chain), so a copied chain stays valid."""
        if md.parent == BLANK_UUID:
            return None, None
        parent = self.manifest.read_volume_metadata(img_id, md.parent)
        return md.parent, volume.QEMU_FORMAT[parent.format]

    # Volume creation and removal (SPM).

    def validate_create(
        self,
        img_id: str,
        vol_id: str,
        capacity: int,
        fmt: str,
        prealloc: str,
        parent_id: str,
        initial_size: int | None = None,
        check_space: bool = True,
    ) -> volume.Metadata | None:
        """Refuse a creation that is invalid on its face; returns the parent's
        metadata.  check_space: also refuse what would not fit (the allocation
        itself checks again, exactly)."""
        with self.manifest.reading():
            check_uuid(img_id, vol_id, parent_id)
            capacity = volume.check_request(fmt, prealloc, capacity, initial_size)
            self.check_create(fmt, prealloc, capacity, initial_size, check_space=check_space)
            found = self.manifest.find_volume(vol_id)
            if found is not None:
                raise errors.VolumeAlreadyExists(vol_id=vol_id, sd_id=self.sd_id, img_id=found)
            existing = self.manifest.image_metadata(img_id)
            return volume.check_parent(existing, self.sd_id, img_id, parent_id, fmt, capacity)

    def create_volume(
        self,
        images: Images,
        img_id: str,
        vol_id: str,
        capacity: int,
        fmt: str,
        prealloc: str,
        parent_id: str = BLANK_UUID,
        description: str = "",
        initial_size: int | None = None,
        cluster_size: int | None = None,
        legal: bool = True,
        on_allocated: Callable[[], None] | None = None,
    ) -> None:
        """Create a volume: metadata ILLEGAL, then data, then the parent INTERNAL
        and the volume LEGAL (left ILLEGAL when legal is false: clone).

        on_allocated is called once something exists on storage, so a caller
        knows it must remove the volume if a later step fails.
        """
        with self.manifest.reading():
            with self.manifest.lock:
                self.validate_create(img_id, vol_id, capacity, fmt, prealloc, parent_id,
                                     initial_size, check_space=False)
                md = volume.Metadata(
                    domain=self.sd_id,
                    image=img_id,
                    parent=parent_id,
                    capacity=volume.check_capacity(capacity),
                    format=fmt,
                    type=prealloc,
                    voltype=volume.LEAF,
                    legality=volume.ILLEGAL,
                    ctime=int(time.time()),
                    description=volume.clean_description(description),
                )
                log.info(
                    "Creating volume sd=%s img=%s vol=%s parent=%s format=%s type=%s "
                    "capacity=%d",
                    self.sd_id, img_id, vol_id, parent_id, fmt, prealloc, md.capacity,
                )
                self._allocate(img_id, vol_id, md, initial_size)
                if on_allocated is not None:
                    on_allocated()
                self.manifest.write_volume_metadata(img_id, vol_id, md)
            self._create_data(images, img_id, vol_id, md, cluster_size)
            with self.manifest.lock:
                if parent_id != BLANK_UUID:
                    self.manifest.volume(img_id, parent_id).set_voltype(volume.INTERNAL)
                if legal:
                    self.manifest.volume(img_id, vol_id).set_legality(volume.LEGAL)
        log.info("Created volume sd=%s img=%s vol=%s", self.sd_id, img_id, vol_id)

    def validate_delete(self, images: Images, img_id: str, vol_id: str) -> None:
        """Refuse deleting a missing, prepared or non-leaf volume."""
        check_uuid(img_id, vol_id)
        volume.check_delete(self.manifest.image_metadata(img_id), self.sd_id, vol_id)
        if images.is_prepared(self.sd_id, img_id, vol_id):
            raise errors.VolumeIsBusy(vol_id=vol_id, sd_id=self.sd_id, reason="prepared")

    def delete_volume(self, images: Images, img_id: str, vol_id: str) -> None:
        """Delete a leaf volume; its parent becomes the leaf again."""
        with self.manifest.lock, self.manifest.reading():
            self.validate_delete(images, img_id, vol_id)
            md = self.manifest.read_volume_metadata(img_id, vol_id)
            log.info("Deleting volume sd=%s img=%s vol=%s", self.sd_id, img_id, vol_id)
            # ILLEGAL first: a crash leaves a volume nobody will use.
            self.manifest.volume(img_id, vol_id).set_legality(volume.ILLEGAL)
            self.remove_volume(img_id, vol_id, md.parent)

    def remove_volume(self, img_id: str, vol_id: str, parent_id: str | None = None) -> None:
        """Remove whatever exists of a volume (rollback of a creation, or deletion).

        The parent (read from the metadata if not given) becomes LEAF when it
        has no other child.
        """
        with self.manifest.lock, self.manifest.reading():
            if parent_id is None:
                try:
                    parent_id = self.manifest.read_volume_metadata(img_id, vol_id).parent
                except (errors.VolumeDoesNotExist, errors.VolumeMetadataReadError):
                    parent_id = BLANK_UUID
            self._remove(img_id, vol_id)
            log.info("Removed volume sd=%s img=%s vol=%s", self.sd_id, img_id, vol_id)
            if parent_id == BLANK_UUID:
                return
            try:
                siblings = self.manifest.image_metadata(img_id)
                if parent_id in siblings and not any(
                    md.parent == parent_id for md in siblings.values()
                ):
                    self.manifest.volume(img_id, parent_id).set_voltype(volume.LEAF)
            except errors.Error:
                log.exception("Cannot restore parent sd=%s vol=%s to LEAF", self.sd_id, parent_id)
