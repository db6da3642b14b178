"""File storage domains: a directory tree on a (possibly shared) file system.

Layout (DESIGN section 6)::

    <path>/<sdUUID>/dom_md/metadata        domain metadata (KEY=VALUE, EOF)
    <path>/<sdUUID>/dom_md/ids             cluster lock: host ids
    <path>/<sdUUID>/dom_md/leases          cluster lock: the SPM lease
    <path>/<sdUUID>/dom_md/inbox, outbox   storage mailbox
    <path>/<sdUUID>/images/<imgUUID>/<volUUID>        volume data
    <path>/<sdUUID>/images/<imgUUID>/<volUUID>.meta   volume metadata
    <path>/<sdUUID>/master/tasks/          SPM tasks (when master of a pool)

Every file operation goes through :class:`storage.oop.Pool`, so a hung file
system fails a call with OopTimeout instead of blocking the daemon.
Metadata writes are atomic (temp file, fsync, rename).
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import uuid
from typing import Any

from common import uuids
from storage import clusterlock, errors, oop, qemuimg, sd, volume

log = logging.getLogger("storage.file_sd")

DOM_MD = "dom_md"
IMAGES = "images"
MASTER_TASKS = os.path.join("master", "tasks")
META_SUFFIX = ".meta"
MiB = 1024**2
# Sizes of the special files (sparse).
SPECIAL_SIZES = {"ids": 1 * MiB, "leases": 2 * MiB, "inbox": 1 * MiB, "outbox": 1 * MiB}


class FileDomainManifest(sd.DomainManifest):
    domain_type = sd.FILE

    def __init__(self, sd_id: str, path: str, env: sd.Env) -> None:
        super().__init__(sd_id, env)
        self.mount = path
        self.root = os.path.join(path, sd_id)
        self.oop = env.oop

    # Paths.

    def md_path(self, name: str) -> str:
        return os.path.join(self.root, DOM_MD, name)

    def image_dir(self, img_id: str) -> str:
        sd.check_uuid(img_id)
        return os.path.join(self.root, IMAGES, img_id)

    def volume_path(self, img_id: str, vol_id: str) -> str:
        sd.check_uuid(vol_id)
        return os.path.join(self.image_dir(img_id), vol_id)

    def meta_path(self, img_id: str, vol_id: str) -> str:
        return self.volume_path(img_id, vol_id) + META_SUFFIX

    # Domain metadata.

    def read_metadata(self) -> dict[str, str]:
        path = self.md_path("metadata")
        try:
            data = self.oop.read_file(path)
        except FileNotFoundError as e:
            raise errors.StorageDomainMetadataNotFound(sd_id=self.sd_id, reason=path) from e
        return sd.parse_metadata(data, self.sd_id)

    def write_metadata(self, fields: dict[str, str]) -> None:
        self.oop.write_file_atomic(self.md_path("metadata"), sd.dump_metadata(fields))

    # Images and volumes.

    def list_images(self) -> list[str]:
        try:
            names = self.oop.listdir(os.path.join(self.root, IMAGES))
        except FileNotFoundError:
            return []
        return sorted(n for n in names if uuids.is_canonical(n))

    def list_volumes(self, img_id: str) -> list[str]:
        try:
            names = self.oop.listdir(self.image_dir(img_id))
        except FileNotFoundError:
            return []
        vols = (n[: -len(META_SUFFIX)] for n in names if n.endswith(META_SUFFIX))
        return sorted(v for v in vols if uuids.is_canonical(v))

    def find_volume(self, vol_id: str) -> str | None:
        sd.check_uuid(vol_id)
        pattern = os.path.join(self.root, IMAGES, "*", vol_id + "*")
        for path in self.oop.glob(pattern):
            name = os.path.basename(path)
            if name in (vol_id, vol_id + META_SUFFIX):
                return os.path.basename(os.path.dirname(path))
        return None

    def read_volume_metadata(self, img_id: str, vol_id: str) -> volume.Metadata:
        try:
            data = self.oop.read_file(self.meta_path(img_id, vol_id))
        except FileNotFoundError as e:
            raise errors.VolumeDoesNotExist(vol_id=vol_id, sd_id=self.sd_id) from e
        return volume.Metadata.parse(data, vol_id)

    def write_volume_metadata(self, img_id: str, vol_id: str, md: volume.Metadata) -> None:
        try:
            self.oop.write_file_atomic(self.meta_path(img_id, vol_id), md.dump())
        except OSError as e:
            raise errors.VolumeMetadataWriteError(vol_id=vol_id, reason=str(e)) from e

    def volume_size(self, img_id: str, vol_id: str) -> tuple[int, int]:
        try:
            st = self.oop.stat(self.volume_path(img_id, vol_id))
        except FileNotFoundError:
            return 0, 0
        return st.st_size, st.st_blocks * 512

    def stats(self) -> dict[str, int]:
        st = self.oop.statvfs(self.root)
        return {"disktotal": st.f_blocks * st.f_frsize, "diskfree": st.f_bavail * st.f_frsize}

    def type_info(self) -> dict[str, Any]:
        return {"path": self.mount}


class FileDomain(sd.StorageDomain):
    manifest: FileDomainManifest

    def __init__(self, manifest: FileDomainManifest) -> None:
        super().__init__(manifest)
        self.oop = manifest.oop

    def lease_paths(self) -> tuple[str, str]:
        return self.manifest.md_path("ids"), self.manifest.md_path("leases")

    def mailbox_paths(self) -> tuple[str, str]:
        return self.manifest.md_path("inbox"), self.manifest.md_path("outbox")

    def task_store(self) -> tuple[str, Any]:
        return os.path.join(self.manifest.root, MASTER_TASKS), self.oop

    def format(self) -> None:
        log.info("Formatting file domain sd=%s root=%s", self.sd_id, self.manifest.root)
        self.oop.rmtree(self.manifest.root)

    # Volumes.

    def activate_volume(self, img_id: str, vol_id: str) -> str:
        path = self.manifest.volume_path(img_id, vol_id)
        if not self.oop.exists(path):
            raise errors.VolumeDoesNotExist(vol_id=vol_id, sd_id=self.sd_id)
        return path

    def deactivate_volume(self, img_id: str, vol_id: str) -> None:
        pass

    def extend_volume(self, img_id: str, vol_id: str, new_size: int) -> int:
        # A file grows as it is written: nothing to extend.
        return self.manifest.volume_size(img_id, vol_id)[0]

    def refresh_volume(self, img_id: str, vol_id: str) -> int:
        return self.manifest.volume_size(img_id, vol_id)[0]

    def _allocate(
        self, img_id: str, vol_id: str, md: volume.Metadata, initial_size: int | None
    ) -> None:
        self.oop.makedirs(self.manifest.image_dir(img_id))

    def _create_data(
        self,
        images: sd.Images,
        img_id: str,
        vol_id: str,
        md: volume.Metadata,
        cluster_size: int | None,
    ) -> None:
        path = self.manifest.volume_path(img_id, vol_id)
        # A bare UUID: resolved in the image directory (or the run dir links).
        backing, backing_fmt = self._backing(img_id, md)
        preallocation = None
        if md.type == volume.PREALLOCATED and backing is None:
            preallocation = "falloc"
        qemuimg.create(
            path,
            volume.QEMU_FORMAT[md.format],
            size=md.capacity,
            backing=backing,
            backing_fmt=backing_fmt,
            cluster_size=cluster_size if md.format == volume.COW else None,
            preallocation=preallocation,
        )

    def _remove(self, img_id: str, vol_id: str) -> None:
        for path in (
            self.manifest.volume_path(img_id, vol_id),
            self.manifest.meta_path(img_id, vol_id),
        ):
            try:
                self.oop.unlink(path)
            except FileNotFoundError:
                pass
        image_dir = self.manifest.image_dir(img_id)
        try:
            if not self.oop.listdir(image_dir):
                self.oop.rmtree(image_dir)
        except FileNotFoundError:
            pass


def create(sd_id: str, path: str, name: str, env: sd.Env) -> FileDomain:
    """Create a file domain under path (an existing directory).

    The tree is built under a temporary name and renamed into place, so a
    failure leaves no half-made domain.
    """
    ops = env.oop
    try:
        st = ops.stat(path)
    except FileNotFoundError as e:
        raise errors.StorageDomainIllegalRemotePath(path=path, reason="does not exist") from e
    if not os.path.isabs(path) or not stat.S_ISDIR(st.st_mode):
        raise errors.StorageDomainIllegalRemotePath(path=path, reason="not an absolute directory")
    root = os.path.join(path, sd_id)
    if ops.exists(root):
        raise errors.StorageDomainAlreadyExists(sd_id=sd_id)
    tmp = os.path.join(path, f".{sd_id}.{uuid.uuid4().hex[:8]}.creating")
    log.info("Creating file domain sd=%s path=%s", sd_id, path)
    try:
        ops.makedirs(os.path.join(tmp, DOM_MD))
        ops.makedirs(os.path.join(tmp, IMAGES))
        ops.makedirs(os.path.join(tmp, MASTER_TASKS))
        for special, size in SPECIAL_SIZES.items():
            ops.truncate(os.path.join(tmp, DOM_MD, special), size)
        fields = {
            sd.SDUUID: sd_id,
            sd.TYPE: "FILE",
            sd.NAME: name,
            sd.CLASS: sd.DATA_CLASS,
            sd.VERSION_KEY: str(sd.VERSION),
            sd.ROLE: sd.REGULAR,
            sd.POOL_UUID: "",
        }
        ops.write_file_atomic(os.path.join(tmp, DOM_MD, "metadata"), sd.dump_metadata(fields))
        clusterlock.init_domain(
            sd_id, os.path.join(tmp, DOM_MD, "ids"), os.path.join(tmp, DOM_MD, "leases"),
            io_timeout=env.io_timeout,
        )
        ops.rename(tmp, root)
    except OSError as e:
        _remove_quietly(ops, tmp)
        if e.errno == errno.ENOTEMPTY or e.errno == errno.EEXIST:
            raise errors.StorageDomainAlreadyExists(sd_id=sd_id) from e
        raise errors.StorageDomainCreationError(sd_id=sd_id, reason=str(e)) from e
    except BaseException:
        _remove_quietly(ops, tmp)
        raise
    ops.fsync(path)
    return open_domain(sd_id, {"path": path}, env)


def open_domain(sd_id: str, args: dict[str, Any], env: sd.Env) -> FileDomain:
    return FileDomain(FileDomainManifest(sd_id, args["path"], env))


def _remove_quietly(ops: oop.FileOps, path: str) -> None:
    try:
        ops.rmtree(path)
    except FileNotFoundError:
        pass
    except Exception:
        log.exception("Cannot remove %s", path)
