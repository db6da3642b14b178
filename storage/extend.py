"""Extension of thin block volumes: the SPM side and the HSM side.

A COW volume on a block domain is an LV that starts at one chunk and grows
while a VM writes to it.  Two steps, which may run on different hosts:

- :meth:`Extender.extend` (SPM): ``lvextend`` the LV to hold ``new_size``
  bytes (whole extents; never beyond the volume's maximum size, in loop
  mode its PE reservation), then refresh it here if it is active here;
- :meth:`Extender.refresh` (HSM, the host running the VM): make the active
  device follow the LV (raise the loop device's size limit, or
  ``lvchange --refresh``), so a QEMU holding it open sees the new size at
  once.

Both read the resulting size back from the device (or LVM) and raise
``VolumeExtendingError`` if it is smaller than asked for.  Calls for one
volume are serialized; calls for different volumes run in parallel.  The
watermark monitor (virt) calls these through the storage provider's
``extend``/``refresh``; file domains need no extension (the file grows),
so both answer the current size.
"""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Callable

from storage import block_sd, errors, sd

log = logging.getLogger("storage.extend")


class Extender:
    def __init__(self, get_domain: Callable[[str], sd.StorageDomain]) -> None:
        self._get_domain = get_domain
        self._locks: collections.defaultdict[tuple[str, str], threading.Lock] = (
            collections.defaultdict(threading.Lock)
        )
        self._guard = threading.Lock()

    def extend(self, sd_id: str, img_id: str, vol_id: str, new_size: int) -> int:
        """SPM: grow the volume to at least new_size bytes (capped at its
        maximum size); returns its size in bytes, read back."""
        dom = self._get_domain(sd_id)
        if new_size <= 0:
            raise errors.InvalidVolumeSize(size=new_size, reason="must be positive")
        if not isinstance(dom, block_sd.BlockDomain):
            return dom.manifest.volume_size(img_id, vol_id)[0]
        with self._lock(sd_id, vol_id):
            try:
                size = dom.extend_volume(img_id, vol_id, new_size)
            except errors.VolumeGroupSizeError as e:
                raise errors.VolumeExtendingError(
                    vol_id=vol_id, sd_id=sd_id, size=new_size, reason=str(e)
                ) from e
            # Read the size back: from the device if it is active here.
            if dom.activation.is_active(dom.vg, vol_id):
                actual = dom.activation.refresh(dom.vg, vol_id)
            else:
                actual = dom.manifest.volume_lv(img_id, vol_id).size
            if actual < size:
                raise errors.VolumeExtendingError(
                    vol_id=vol_id, sd_id=sd_id, size=size, reason=f"size read back is {actual}"
                )
            size = actual
        log.info("Extended volume sd=%s img=%s vol=%s requested=%d size=%d",
                 sd_id, img_id, vol_id, new_size, size)
        return size

    def refresh(self, sd_id: str, img_id: str, vol_id: str) -> int:
        """HSM: make the active volume's device follow its LV; returns the
        device's size in bytes (the LV's if it is not active here)."""
        dom = self._get_domain(sd_id)
        if not isinstance(dom, block_sd.BlockDomain):
            return dom.manifest.volume_size(img_id, vol_id)[0]
        # One reading of the VG gives the LV's size and (loop mode) its layout.
        with self._lock(sd_id, vol_id), dom.manifest.reading():
            lv = dom.manifest.volume_lv(img_id, vol_id)
            if not dom.activation.is_active(dom.vg, vol_id):
                return lv.size
            size = dom.activation.refresh(dom.vg, vol_id, vg_state=dom.manifest.vg_state())
            if size < lv.size:
                raise errors.VolumeExtendingError(
                    vol_id=vol_id, sd_id=sd_id, size=lv.size, reason=f"device size is {size}"
                )
        log.info("Refreshed volume sd=%s img=%s vol=%s size=%d", sd_id, img_id, vol_id, size)
        return size

    def _lock(self, sd_id: str, vol_id: str) -> threading.Lock:
        with self._guard:
            return self._locks[(sd_id, vol_id)]
