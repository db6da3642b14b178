"""Images: chains of volumes, and preparing them for use on this host.

An image is a chain ``base <- v1 <- ... <- leaf`` of volumes that share an
image UUID; each volume's metadata names its parent (``PUUID``).
:func:`chain` walks it from a volume down to the base and refuses a broken
one (a missing parent, a loop, a fork) with ``ImageIsNotLegalChain``.

:class:`ImageManager` prepares a volume for use: it activates every volume
of its chain (block domains) and links each one as
``<run_dir>/storage/<sdUUID>/<imgUUID>/<volUUID>``.  The links of one image
sit side by side, so the bare-UUID qcow2 backing references resolve
there on both domain types.  Prepare and teardown are reference counted
per volume: two users of one image (a VM and a copy, or two chains that
share a base) never tear it down under each other; the last teardown
deactivates the volume and removes its link.

Reference counts live in memory: after a daemon restart the users
re-prepare what they use (the VM recovery does this for running VMs); a
prepare finds the link and the active LV its previous life left and takes
them over.  Whatever is still unreferenced once recovery is done was left
by users that are gone: :meth:`ImageManager.release_leftovers` (called by
:mod:`storage.leftovers` at daemon start) removes those links and
deactivates their volumes.
"""

from __future__ import annotations

import collections
import logging
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from common import uuids
from storage import errors, sd, volume

log = logging.getLogger("storage.image")

Chain = list[tuple[str, volume.Metadata]]


def chain(manifest: sd.DomainManifest, img_id: str, vol_id: str) -> Chain:
    """[(volUUID, metadata)] from the base to vol_id."""
    sd.check_uuid(img_id, vol_id)
    mds = manifest.image_metadata(img_id)
    if not mds:
        raise errors.ImageDoesNotExistInSD(img_id=img_id, sd_id=manifest.sd_id)
    if vol_id not in mds:
        raise errors.VolumeDoesNotExist(vol_id=vol_id, sd_id=manifest.sd_id)
    return _walk(manifest.sd_id, img_id, mds, vol_id)


def image_chain(manifest: sd.DomainManifest, img_id: str) -> Chain:
    """The whole image, base to leaf; refuses an image that is not one chain."""
    sd.check_uuid(img_id)
    mds = manifest.image_metadata(img_id)
    if not mds:
        raise errors.ImageDoesNotExistInSD(img_id=img_id, sd_id=manifest.sd_id)
    children = collections.Counter(md.parent for md in mds.values())
    leaves = [v for v in mds if children[v] == 0]
    if len(leaves) != 1:
        raise errors.ImageIsNotLegalChain(
            img_id=img_id, sd_id=manifest.sd_id, reason=f"{len(leaves)} leaves: {leaves}"
        )
    result = _walk(manifest.sd_id, img_id, mds, leaves[0])
    if len(result) != len(mds):
        stray = sorted(set(mds) - {v for v, _ in result})
        raise errors.ImageIsNotLegalChain(
            img_id=img_id, sd_id=manifest.sd_id, reason=f"volumes outside the chain: {stray}"
        )
    return result


def _walk(sd_id: str, img_id: str, mds: dict[str, volume.Metadata], vol_id: str) -> Chain:
    result: Chain = []
    seen: set[str] = set()
    current = vol_id
    while True:
        if current in seen:
            raise errors.ImageIsNotLegalChain(img_id=img_id, sd_id=sd_id, reason="loop")
        seen.add(current)
        md = mds[current]
        result.append((current, md))
        if md.parent == volume.BLANK_UUID:
            break
        if md.parent not in mds:
            raise errors.ImageIsNotLegalChain(
                img_id=img_id,
                sd_id=sd_id,
                reason=f"parent {md.parent} of volume {current} is missing",
            )
        if md.format != volume.COW:
            raise errors.ImageIsNotLegalChain(
                img_id=img_id, sd_id=sd_id, reason=f"volume {current} has a parent but is RAW"
            )
        current = md.parent
    result.reverse()
    return result


class ImageManager:
    """Reference-counted prepare/teardown of volume chains on this host.

    It is what volume creation and deletion are given as
    :class:`storage.sd.Images` (the domain layer does not import this one).
    """

    def __init__(self, run_dir: str) -> None:
        self.root = os.path.join(run_dir, "storage")
        self._lock = threading.Lock()
        self._image_locks: dict[tuple[str, str], threading.Lock] = {}
        # (sd, img, vol) -> references held on that volume.
        self._refs: collections.Counter[tuple[str, str, str]] = collections.Counter()
        # (sd, img, vol) -> chains prepared for vol (a stack, one per prepare).
        self._prepared: dict[tuple[str, str, str], list[list[str]]] = {}

    # Paths.

    def image_dir(self, sd_id: str, img_id: str) -> str:
        sd.check_uuid(sd_id, img_id)
        return os.path.join(self.root, sd_id, img_id)

    def link_path(self, sd_id: str, img_id: str, vol_id: str) -> str:
        sd.check_uuid(sd_id, img_id, vol_id)
        return os.path.join(self.root, sd_id, img_id, vol_id)

    # Prepare and teardown.

    def prepare(
        self, dom: sd.StorageDomain, img_id: str, vol_id: str, allow_illegal: bool = False
    ) -> dict[str, Any]:
        """Activate and link the chain of vol_id; returns {path, chain}.

        ILLEGAL volumes are refused unless allow_illegal (the replication and
        creation paths, which prepare volumes that are not complete yet).
        """
        sd_id = dom.sd_id
        # One reading of the domain lists the chain and maps its volumes.
        with self._image_lock(sd_id, img_id), dom.manifest.reading():
            vols = chain(dom.manifest, img_id, vol_id)
            if not allow_illegal:
                for v, md in vols:
                    if md.legality != volume.LEGAL:
                        raise errors.prepareIllegalVolumeError(vol_id=v, sd_id=sd_id)
            taken: list[str] = []
            try:
                for v, _ in vols:
                    key = (sd_id, img_id, v)
                    with self._lock:
                        first = self._refs[key] == 0
                    if first:
                        path = dom.activate_volume(img_id, v)
                        self._link(sd_id, img_id, v, path)
                    with self._lock:
                        self._refs[key] += 1
                    taken.append(v)
            except BaseException:
                self._release_all(dom, img_id, taken)
                raise
            self._prepared.setdefault((sd_id, img_id, vol_id), []).append(taken)
        log.info("Prepared image sd=%s img=%s vol=%s chain=%s", sd_id, img_id, vol_id, taken)
        return {
            "path": self.link_path(sd_id, img_id, vol_id),
            "chain": [
                {
                    "volumeID": v,
                    "path": self.link_path(sd_id, img_id, v),
                    "format": md.format,
                }
                for v, md in vols
            ],
        }

    def teardown(self, dom: sd.StorageDomain, img_id: str, vol_id: str) -> None:
        """Release the references taken by one prepare of vol_id.

        A volume that is not prepared on this host is left alone (after a
        restart, references are taken again by whoever uses the volume).
        """
        sd_id = dom.sd_id
        with self._image_lock(sd_id, img_id):
            key = (sd_id, img_id, vol_id)
            stack = self._prepared.get(key)
            if not stack:
                log.warning("Volume not prepared sd=%s img=%s vol=%s", sd_id, img_id, vol_id)
                return
            vols = stack.pop()
            if not stack:
                del self._prepared[key]
            self._release_all(dom, img_id, vols)
        log.info("Tore down image sd=%s img=%s vol=%s", sd_id, img_id, vol_id)

    @contextmanager
    def prepared(
        self, dom: sd.StorageDomain, img_id: str, vol_id: str, allow_illegal: bool = False
    ) -> Iterator[dict[str, Any]]:
        """prepare() for the duration of a with block."""
        result = self.prepare(dom, img_id, vol_id, allow_illegal=allow_illegal)
        try:
            yield result
        finally:
            self.teardown(dom, img_id, vol_id)

    def is_prepared(self, sd_id: str, img_id: str, vol_id: str | None = None) -> bool:
        """Whether a volume (or any volume of the image) holds references."""
        with self._lock:
            if vol_id is not None:
                return self._refs[(sd_id, img_id, vol_id)] > 0
            return any(n > 0 and k[0] == sd_id and k[1] == img_id for k, n in self._refs.items())

    def prepared_volumes(self, sd_id: str) -> list[tuple[str, str]]:
        """(image, volume) of the domain's volumes holding references."""
        with self._lock:
            return sorted((k[1], k[2]) for k, n in self._refs.items() if n > 0 and k[0] == sd_id)

    def forget(self, sd_id: str, img_id: str, vol_id: str) -> None:
        """Remove the link of a volume that no longer exists (a prepare left
        by a crashed daemon); a volume holding references is left alone."""
        with self._lock:
            if self._refs[(sd_id, img_id, vol_id)] > 0:
                return
        self._unlink(sd_id, img_id, vol_id)

    def refs(self, sd_id: str, img_id: str, vol_id: str) -> int:
        with self._lock:
            return self._refs[(sd_id, img_id, vol_id)]

    # A previous life's prepares.

    def links(self) -> list[tuple[str, str, str]]:
        """(sd, img, vol) of every prepare link under the run dir, held or not."""
        found = []
        for sd_id in _uuid_entries(self.root):
            for img_id in _uuid_entries(os.path.join(self.root, sd_id)):
                for vol_id in _uuid_entries(os.path.join(self.root, sd_id, img_id)):
                    if os.path.islink(self.link_path(sd_id, img_id, vol_id)):
                        found.append((sd_id, img_id, vol_id))
        return found

    def release_leftovers(
        self,
        domain_of: Callable[[str], sd.StorageDomain | None],
        busy: Callable[[str], bool] = lambda target: False,
    ) -> list[tuple[str, str, str]]:
        """Remove every link that holds no reference, deactivating its
        volume (domain_of(sd_id) gives the domain, None if this host no
        longer knows it: the link only is removed); returns what was released.
        A link whose target busy(target) says some process holds open is
        kept (and logged).

        Run at daemon start, after recovery re-prepared what is in use.
        """
        released = []
        for sd_id, img_id, vol_id in self.links():
            dom = domain_of(sd_id)
            with self._image_lock(sd_id, img_id):
                if self.refs(sd_id, img_id, vol_id) > 0:
                    continue
                target = os.path.realpath(self.link_path(sd_id, img_id, vol_id))
                if busy(target):
                    log.warning("Leftover prepare still open, kept sd=%s img=%s vol=%s path=%s",
                                sd_id, img_id, vol_id, target)
                    continue
                try:
                    self._unlink(sd_id, img_id, vol_id)
                    if dom is not None:
                        dom.deactivate_volume(img_id, vol_id)
                except Exception:
                    log.exception("Cannot release leftover prepare sd=%s img=%s vol=%s",
                                  sd_id, img_id, vol_id)
                    continue
            log.info("Released leftover prepare sd=%s img=%s vol=%s", sd_id, img_id, vol_id)
            released.append((sd_id, img_id, vol_id))
        self._remove_stray(released)
        return released

    # Internals.

    def _image_lock(self, sd_id: str, img_id: str) -> threading.Lock:
        with self._lock:
            return self._image_locks.setdefault((sd_id, img_id), threading.Lock())

    def _release_all(self, dom: sd.StorageDomain, img_id: str, vols: list[str]) -> None:
        """Drop one reference of each volume, leaf first; the last one deactivates."""
        first_error: BaseException | None = None
        for v in reversed(vols):
            key = (dom.sd_id, img_id, v)
            with self._lock:
                self._refs[key] -= 1
                last = self._refs[key] <= 0
                if last:
                    del self._refs[key]
            if not last:
                continue
            try:
                self._unlink(dom.sd_id, img_id, v)
                dom.deactivate_volume(img_id, v)
            except Exception as e:
                log.exception("Cannot deactivate sd=%s img=%s vol=%s", dom.sd_id, img_id, v)
                first_error = first_error or e
        if first_error is not None:
            raise first_error

    def _link(self, sd_id: str, img_id: str, vol_id: str, target: str) -> None:
        link = self.link_path(sd_id, img_id, vol_id)
        os.makedirs(os.path.dirname(link), exist_ok=True)
        tmp = f"{link}.tmp"
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        os.symlink(target, tmp)
        os.replace(tmp, link)

    def _remove_stray(self, released: list[tuple[str, str, str]]) -> None:
        """Temp links of a crashed _link and empty directories of released images."""
        for sd_id, img_id in sorted({(s, i) for s, i, _ in released}):
            path = self.image_dir(sd_id, img_id)
            try:
                names = os.listdir(path)
            except FileNotFoundError:
                continue
            for name in names:
                if name.endswith(".tmp") and uuids.is_canonical(name[: -len(".tmp")]):
                    try:
                        os.unlink(os.path.join(path, name))
                    except FileNotFoundError:
                        pass
            for leftover in (path, os.path.join(self.root, sd_id)):
                try:
                    os.rmdir(leftover)
                except OSError:
                    break

    def _unlink(self, sd_id: str, img_id: str, vol_id: str) -> None:
        try:
            os.unlink(self.link_path(sd_id, img_id, vol_id))
        except FileNotFoundError:
            pass
        for path in (self.image_dir(sd_id, img_id), os.path.join(self.root, sd_id)):
            try:
                os.rmdir(path)
            except OSError:
                break


def _uuid_entries(path: str) -> list[str]:
    """Names in path that are canonical UUIDs (anything else is not ours)."""
    try:
        return sorted(n for n in os.listdir(path) if uuids.is_canonical(n))
    except (FileNotFoundError, NotADirectoryError):
        return []
