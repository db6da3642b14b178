"""Extension of thin volumes: the SPM side and the HSM side.

A COW volume on a block domain is an LV that starts at one chunk and grows
while a VM writes to it.  Two steps, which may run on different hosts:

- :meth:`Extender.extend` (SPM): grow the volume to hold ``new_size`` bytes
  (block: ``lvextend`` the LV in whole extents, never beyond the volume's
  maximum size, in loop mode its PE reservation, then refresh it here if it
  is active here);
- :meth:`Extender.refresh` (HSM, the host running the VM): make the active
  device follow the volume (block: raise the loop device's size limit, or
  ``lvchange --refresh``), so a QEMU holding it open sees the new size at
  once.

Both answer the resulting size read back from the device (or LVM) and raise
``VolumeExtendingError`` if it is smaller than asked for.  What a step does
is the domain's own :meth:`storage.sd.StorageDomain.extend_volume` /
:meth:`~storage.sd.StorageDomain.refresh_volume`: file domains need no
extension (the file grows), so both answer the current size.  This module
serializes calls for one volume; calls for different volumes run in
parallel.  The watermark monitor (virt) calls these through the storage
provider's ``extend``/``refresh``.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable

from storage import errors, sd


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
        with self._lock(sd_id, vol_id):
            return dom.extend_volume(img_id, vol_id, new_size)

    def refresh(self, sd_id: str, img_id: str, vol_id: str) -> int:
        """HSM: make the active volume's device follow its storage; returns
        the device's size in bytes (the volume's if it is not active here)."""
        dom = self._get_domain(sd_id)
        with self._lock(sd_id, vol_id):
            return dom.refresh_volume(img_id, vol_id)

    def _lock(self, sd_id: str, vol_id: str) -> threading.Lock:
        with self._guard:
            return self._locks[(sd_id, vol_id)]
