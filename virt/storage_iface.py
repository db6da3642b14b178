"""The narrow interface through which virt asks storage for volumes.

virt never touches domains, volumes or LVs itself. What it asks of storage
comes in two parts, as a VDSM host's own storage work is apart from the
SPM's (DESIGN sections 1 and 9):

- :class:`HostStorage`, the host-side service every host offers, SPM or
  not: prepare a volume with its chain (its path, the chain below it
  reachable through the prepare links) and give the reference back, make the
  local device follow a volume the SPM extended (``refresh``), and read
  which volumes under a leaf are not LEGAL yet (``unsynced_volumes``: "is
  this chain synced").  None of it writes metadata.
- :class:`SpmRequests`, the path to the pool's SPM, the one host that writes
  metadata: ``extend`` a thin block volume and ``set_volume_legality``.
  When this host is the SPM (``is_spm``) a request runs in-process; when it
  is not, ``extend`` goes to the SPM through the storage mailbox and blocks
  until its reply (storage's coded error if none comes in time), and
  ``set_volume_legality`` raises storage's coded error; this host writes
  no metadata itself.

What virt asks, and of which part::

    VM.create, VM.snapshot, recovery   host: prepare, teardown
    VM.diskReplicateStart              host: prepare (ILLEGAL allowed);
                                       SPM: extend (a thin block replica)
    VM.diskReplicateFinish (pivot)     host: unsynced_volumes (refuse an unsynced
                                       chain), teardown; SPM: set_volume_legality
                                       of the destination leaf, only if is_spm
                                       (else the engine's Volume.setLegality does)
    the watermark monitor              SPM: extend, then host: refresh
    recovery after a pivot             SPM: set_volume_legality, only if is_spm

The daemon passes storage's API provider (``storage.api.StorageAPI``), which
is both (:class:`Storage`), or the two parts apart.

Errors: storage raises its own coded errors (subclasses of
``common.errors.Error``, e.g. VolumeDoesNotExist, SpmStatusError); virt lets
them through to the caller after undoing its own work.
"""

from __future__ import annotations

from typing import Any, Protocol


class HostStorage(Protocol):
    """What any host does with storage for its VMs (no metadata writes)."""

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

    def refresh(self, pool_id: str, sd_id: str, img_id: str, vol_id: str) -> int:
        """Make the local device follow an extended volume; returns its size."""
        ...

    def unsynced_volumes(
        self, pool_id: str, sd_id: str, img_id: str, vol_id: str
    ) -> list[dict[str, str]]:
        """The volumes below vol_id in its chain that are not LEGAL, base first:
        [{"volumeID", "legality"}]; empty: the chain under vol_id is synced."""
        ...


class SpmRequests(Protocol):
    """What virt asks of the pool's SPM (in-process only when this host is SPM)."""

    def is_spm(self, pool_id: str) -> bool:
        """Whether this host is the pool's SPM now (requests run in-process)."""
        ...

    def extend(self, pool_id: str, sd_id: str, img_id: str, vol_id: str, new_size: int) -> int:
        """Grow a thin block volume to new_size bytes (capped at its maximum
        size); returns its size, read back. Not SPM: through the SPM (the
        storage mailbox), storage's coded error if it does not answer."""
        ...

    def set_volume_legality(
        self, pool_id: str, sd_id: str, img_id: str, vol_id: str, legal: bool
    ) -> None:
        """Mark the volume LEGAL (legal=True) or ILLEGAL. Not SPM: storage's coded error."""
        ...


class Storage(HostStorage, SpmRequests, Protocol):
    """Both parts in one object (storage's API provider)."""
