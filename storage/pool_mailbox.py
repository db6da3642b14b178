"""A connected pool's storage mailbox: this host's client, and the SPM's thread.

:class:`PoolMailbox` is what :class:`storage.pool.Pool` holds for the
mailbox (:mod:`storage.mailbox`), and follows the pool's life:

- :meth:`connect` (pool connect): this host's client,
  :class:`storage.mailbox_hsm.HsmMailbox`, on the master domain's
  ``inbox``/``outbox``; :meth:`disconnect` stops it (and zeroes this
  host's region, unless the daemon only stops);
- :meth:`spm_start` (this host became SPM): the SPM's thread,
  :class:`storage.mailbox_spm.SpmMailbox`, which serves every host's
  requests with the in-process extension; :meth:`spm_stop` ends it
  (``fence``: the lease is lost, no more writes).

A mailbox that cannot start (the master's mailbox files unreadable) is
logged and left out: the pool works without it, and extensions from this
host then fail with ``SpmRequestUnavailable`` (:attr:`client` is None).
Each side has its own oop helpers (:func:`storage.mailbox.open_boxes`).
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable

from storage import errors, mailbox, mailbox_hsm, mailbox_spm

log = logging.getLogger("storage.mailbox")

# The master domain's (inbox, outbox) paths.
Paths = Callable[[], tuple[str, str]]


class PoolMailbox:
    def __init__(self, pool_id: str, host_id: int, paths: Paths,
                 services: mailbox.Services | None) -> None:
        self.pool_id = pool_id
        self.host_id = host_id
        self.paths = paths
        self.services = services
        self._guard = threading.Lock()
        self.client: mailbox_hsm.HsmMailbox | None = None
        self.spm: mailbox_spm.SpmMailbox | None = None

    def connect(self) -> None:
        """Start this host's client (logged if it cannot)."""
        services = self.services
        if services is None or self.client is not None:
            return
        try:
            inbox, outbox = mailbox.open_boxes(self.paths(), services.settings,
                                               f"mailbox-hsm-{self.host_id}")
        except (errors.Error, OSError) as e:
            log.error("No storage mailbox for pool=%s host_id=%d: %s",
                      self.pool_id, self.host_id, e)
            return
        client = mailbox_hsm.HsmMailbox(self.pool_id, self.host_id, inbox, outbox,
                                        services.settings)
        try:
            client.start()
        except (errors.Error, OSError, ValueError) as e:
            inbox.close()
            log.error("Cannot start the storage mailbox of pool=%s host_id=%d: %s",
                      self.pool_id, self.host_id, e)
            return
        with self._guard:
            self.client = client

    def disconnect(self, clear: bool = True) -> None:
        """Stop this host's client; clear: zero its region (disconnect)."""
        with self._guard:
            client, self.client = self.client, None
        if client is not None:
            client.stop(clear=clear)

    def spm_start(self) -> None:
        """This host is SPM now: serve every host's requests (logged if it cannot)."""
        services = self.services
        if services is None or self.spm is not None:
            return
        try:
            inbox, outbox = mailbox.open_boxes(self.paths(), services.settings,
                                               f"mailbox-spm-{self.host_id}")
        except (errors.Error, OSError) as e:
            log.error("No SPM mailbox for pool=%s: %s", self.pool_id, e)
            return
        spm = mailbox_spm.SpmMailbox(
            f"pool={self.pool_id}", inbox, outbox,
            functools.partial(services.extend, self.pool_id), services.settings)
        try:
            spm.start()
        except (errors.Error, OSError) as e:
            inbox.close()
            log.error("Cannot start the SPM mailbox of pool=%s: %s", self.pool_id, e)
            return
        with self._guard:
            self.spm = spm

    def spm_stop(self, fence: bool = False) -> None:
        """This host is no longer SPM: stop serving (fence: write nothing more)."""
        with self._guard:
            spm, self.spm = self.spm, None
        if spm is not None:
            spm.stop(fence=fence)
