"""The SPM-request path: changes a host needs that only the pool's SPM may make.

Only the SPM writes metadata or changes volumes (DESIGN section 9).  A host
running VMs still needs two such changes for them:

- ``extend``: grow a thin block volume (the watermark monitor, virt/thinp);
- ``set_volume_legality``: mark a volume LEGAL or ILLEGAL (the pivot of a
  replication marks the destination leaf LEGAL; VM recovery finishes that).

:class:`SpmRequests` carries them out in-process when this host holds the
SPM role of the pool.  Otherwise:

- ``extend`` goes to the SPM through the storage mailbox (DESIGN section 9:
  the master domain's ``inbox``/``outbox``, :mod:`storage.mailbox`): this
  host's client (:class:`storage.mailbox_hsm.HsmMailbox`) writes the
  request and waits for the reply, and the SPM's mailbox thread runs
  :meth:`SpmRequests.extend_in_process`, the same code as the in-process
  path.  No reply in time, or no mailbox, is ``SpmRequestUnavailable``; an
  extension the SPM failed raises the SPM's error (its name and code);
- ``set_volume_legality`` stays an SPM-only request: refused with
  ``SpmRequestUnavailable`` (a code of our own, not the verbs'
  ``SpmStatusError``: the caller did nothing wrong; after a pivot on an
  HSM the engine's ``Volume.setLegality`` on the SPM marks the leaf).

Nothing here writes metadata on a host that is not SPM.

:func:`set_legality` is also what the ``Volume.setLegality`` verb does once
its SPM check passed (storage.volume_verbs).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from storage import errors, extend, sd, volume
from storage import pool as storage_pool

log = logging.getLogger("storage.spm_requests")

EXTEND = "extend a volume"
SET_LEGALITY = "set a volume's legality"


def set_legality(dom: sd.StorageDomain, img_id: str, vol_id: str, legality: str) -> None:
    """SPM: write the volume's LEGALITY if it differs (the metadata path of
    Image.syncData's); VolumeDoesNotExist for a missing volume."""
    if legality not in (volume.LEGAL, volume.ILLEGAL):
        # The schema's enum refuses it in a request; this guards in-process callers.
        raise ValueError(f"legality must be {volume.LEGAL} or {volume.ILLEGAL}: {legality!r}")
    sd.check_uuid(img_id, vol_id)
    with dom.manifest.lock:
        if dom.manifest.read_volume_metadata(img_id, vol_id).legality == legality:
            return
        dom.manifest.volume(img_id, vol_id).set_legality(legality)
    log.info("Set legality sd=%s img=%s vol=%s legality=%s", dom.sd_id, img_id, vol_id, legality)


class SpmRequests:
    """extend and set_volume_legality: in-process on the SPM, refused elsewhere.

    pool: the connected pool by id (StoragePoolUnknown otherwise).
    """

    def __init__(
        self, pool: Callable[[str], storage_pool.Pool], extender: extend.Extender
    ) -> None:
        self._pool = pool
        self._extender = extender

    def is_spm(self, pool_id: str) -> bool:
        """Whether this host holds the SPM role of pool_id now (requests then
        run in-process); False when it is not connected to that pool."""
        try:
            return self._pool(pool_id).is_spm()
        except errors.StoragePoolUnknown:
            return False

    def extend(self, pool_id: str, sd_id: str, img_id: str, vol_id: str, new_size: int) -> int:
        """Grow a thin block volume to new_size bytes (capped at its maximum
        size); its size, read back.  In-process on the SPM, else through
        the storage mailbox (blocks until the SPM's reply)."""
        p = self._pool(pool_id)
        if p.is_spm():
            return self.extend_in_process(pool_id, sd_id, img_id, vol_id, new_size)
        client = p.mailbox.client
        if client is None:
            log.warning("Refusing SPM request pool=%s sd=%s request=%r: not SPM, no mailbox",
                        pool_id, sd_id, EXTEND)
            raise errors.SpmRequestUnavailable(
                "no storage mailbox", pool_id=pool_id, request=EXTEND)
        if new_size <= 0:
            raise errors.InvalidVolumeSize(size=new_size, reason="must be positive")
        sd.check_uuid(sd_id, img_id, vol_id)
        return client.extend(sd_id, img_id, vol_id, new_size)

    def extend_in_process(self, pool_id: str, sd_id: str, img_id: str, vol_id: str,
                          new_size: int) -> int:
        """extend on this host, which must be the SPM (the in-process path,
        and what the SPM's mailbox thread runs for every host)."""
        self._spm_domain(pool_id, sd_id, EXTEND)
        return self._extender.extend(sd_id, img_id, vol_id, new_size)

    def set_volume_legality(
        self, pool_id: str, sd_id: str, img_id: str, vol_id: str, legal: bool
    ) -> None:
        """Mark a volume LEGAL (legal=True) or ILLEGAL."""
        dom = self._spm_domain(pool_id, sd_id, SET_LEGALITY)
        set_legality(dom, img_id, vol_id, volume.LEGAL if legal else volume.ILLEGAL)

    def _spm_domain(self, pool_id: str, sd_id: str, request: str) -> sd.StorageDomain:
        p = self._pool(pool_id)
        if not p.is_spm():
            log.warning("Refusing SPM request pool=%s sd=%s request=%r: not SPM",
                        pool_id, sd_id, request)
            raise errors.SpmRequestUnavailable(pool_id=pool_id, request=request)
        return p.get_domain(sd_id)
