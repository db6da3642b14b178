"""The narrow interface through which virt asks storage for volumes.

virt never touches domains, volumes or LVs itself: it asks for a prepared
volume (its path and the chain below it, reachable through the prepare
links), gives the reference back when done, and later asks for extensions.
The daemon passes an object with these methods: storage's API provider
(``storage.api.StorageAPI``) has them (``prepare``, ``teardown``,
``volume_get_info``, ``set_volume_legality``, ``extend``, ``refresh``).

Errors: storage raises its own coded errors (subclasses of
``common.errors.Error``, e.g. VolumeDoesNotExist); virt lets them through to the
caller after undoing its own work.
"""

from __future__ import annotations

from typing import Any, Protocol


class Storage(Protocol):
    def prepare(
        self, pool_id: str, sd_id: str, img_id: str, vol_id: str, allow_illegal: bool = False
    ) -> dict[str, Any]:
        """Prepare vol_id and its chain; take one reference.

        Returns {"path": leaf path, "chain": [{"volumeID", "path", "format"}, ...]}
        from base to vol_id; format is "COW" or "RAW". ILLEGAL volumes are
        refused unless allow_illegal (the destination of a replication).
        """
        ...

    def teardown(self, pool_id: str, sd_id: str, img_id: str, vol_id: str) -> None:
        """Release one reference taken by prepare."""
        ...

    def volume_get_info(
        self, storagepool_id: str, storagedomain_id: str, image_id: str, volume_id: str
    ) -> dict[str, Any]:
        """Volume.getInfo: {"legality": "LEGAL" | "ILLEGAL", ...}."""
        ...

    def set_volume_legality(
        self, pool_id: str, sd_id: str, img_id: str, vol_id: str, legal: bool
    ) -> None:
        """Mark the volume LEGAL (legal=True) or ILLEGAL."""
        ...

    def extend(self, pool_id: str, sd_id: str, img_id: str, vol_id: str, new_size: int) -> int:
        """SPM: grow a thin block volume to new_size bytes (capped at its
        maximum size); returns its size, read back."""
        ...

    def refresh(self, pool_id: str, sd_id: str, img_id: str, vol_id: str) -> int:
        """HSM: make the local device follow an extended volume; returns its size."""
        ...
