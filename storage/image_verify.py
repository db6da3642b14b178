"""``Image.verify``: prove a copied image's internal volumes equal the source's.

Run on the SPM, which sees both domains, before the source of a live
storage migration is deleted (move-disk's ``--delete-source``)::

    Image.verify(imageID, storagepoolID, storagedomainID=source, dstSdUUID=destination)
    -> {equal, volumes: [{volumeID, equal, legality}]}

The destination must have the source's structure (same volumes, parents
and formats, as ``Image.syncData`` requires).  Every *internal* volume (all
but the leaf: after the pivot the guest writes the destination's leaf, so
the leaves differ by design) is compared with ``qemu-img compare -U`` layer
by layer, each layer opened without its backing chain and read up to its
capacity (an LV's extent rounding is not data): ``Image.syncData`` copies
exactly what each source layer holds, so equal layers prove the chain reads
the same below the leaf.  ``equal`` is true only if every internal volume
is equal and LEGAL on the destination.

Synchronous (no task): both images are held shared (a delete waits) and
prepared for the comparison only.  An image of one volume has nothing to
compare: ``{equal: true, volumes: []}``.
"""

from __future__ import annotations

import json
import logging
import os
import stat
import time
from typing import Any, Protocol

from storage import errors, image, job, qemuimg, resource, sd, sync, volume

log = logging.getLogger("storage.image_verify")

# A comparison reads both layers whole: allow for large volumes.
COMPARE_TIMEOUT = 3600.0


class Storage(Protocol):
    """What Image.verify asks of storage."""

    @property
    def images(self) -> image.ImageManager: ...

    @property
    def resources(self) -> resource.Manager: ...

    def spm_domain(self, pool_id: str, sd_id: str) -> sd.StorageDomain: ...


class ImageVerify:
    """Serves ``Image.verify``."""

    def __init__(self, storage: Storage, lock_timeout: float = resource.DEFAULT_TIMEOUT) -> None:
        self.storage = storage
        self.lock_timeout = lock_timeout

    def image_verify(
        self, image_id: str, storagepool_id: str, storagedomain_id: str, dst_sd_uuid: str
    ) -> dict[str, Any]:
        if dst_sd_uuid == storagedomain_id:
            raise errors.SameSourceAndDestination(sd_id=storagedomain_id, img_id=image_id)
        src = self.storage.spm_domain(storagepool_id, storagedomain_id)
        dst = self.storage.spm_domain(storagepool_id, dst_sd_uuid)
        locks = [
            *job.image_locks(storagedomain_id, image_id, resource.SHARED),
            *job.image_locks(dst_sd_uuid, image_id, resource.SHARED),
        ]
        start = time.monotonic()
        with self.storage.resources.acquire(locks, timeout=self.lock_timeout):
            src_chain = image.image_chain(src.manifest, image_id)
            dst_chain = image.image_chain(dst.manifest, image_id)
            sync.check_structure(src_chain, dst_chain, image_id, dst_sd_uuid)
            results = self._compare(src, dst, image_id, src_chain, dst_chain)
        equal = all(r["equal"] and r["legality"] == volume.LEGAL for r in results)
        log.info(
            "Verified image img=%s src=%s dst=%s equal=%s volumes=%d elapsed=%.3f",
            image_id, storagedomain_id, dst_sd_uuid, equal, len(results),
            time.monotonic() - start,
        )
        return {"equal": equal, "volumes": results}

    def _compare(
        self,
        src: sd.StorageDomain,
        dst: sd.StorageDomain,
        img_id: str,
        src_chain: image.Chain,
        dst_chain: image.Chain,
    ) -> list[dict[str, Any]]:
        internal = len(src_chain) - 1
        if internal == 0:
            return []
        top = src_chain[internal - 1][0]
        images = self.storage.images
        results = []
        with images.prepared(src, img_id, top) as src_prep, \
                images.prepared(dst, img_id, top, allow_illegal=True) as dst_prep:
            for i in range(internal):
                vol_id, md = src_chain[i]
                fmt = volume.QEMU_FORMAT[md.format]
                a = layer_filename(src_prep["chain"][i]["path"], fmt, md.capacity)
                b = layer_filename(dst_prep["chain"][i]["path"], fmt, md.capacity)
                same = qemuimg.compare(a, b, timeout=COMPARE_TIMEOUT)
                legality = dst_chain[i][1].legality
                if not same:
                    log.warning("Volumes differ img=%s vol=%s src=%s dst=%s",
                                img_id, vol_id, src.sd_id, dst.sd_id)
                results.append({"volumeID": vol_id, "equal": same, "legality": legality})
        return results


def layer_filename(path: str, fmt: str, capacity: int) -> str:
    """A json: filename reading one layer (no backing chain), capacity bytes of it."""
    protocol = "host_device" if stat.S_ISBLK(os.stat(path).st_mode) else "file"
    spec: dict[str, Any] = {"driver": fmt, "file": {"driver": protocol, "filename": path}}
    if fmt == qemuimg.QCOW2:
        spec["backing"] = None
    else:
        spec["size"] = capacity
    return "json:" + json.dumps(spec)
