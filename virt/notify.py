"""What virt tells whoever wires it: a VM's status changed, a mirror became ready or failed.

Virt knows nothing of the transport. :class:`virt.api.API` is given a
:class:`Notifier` (the daemon's event sink, vdsm_lsm/events.py, pushes
them to STOMP subscribers as VDSM's events) and calls it:

- :meth:`Notifier.vm_status` whenever a VM's status or pause code changes
  (:meth:`virt.vm.VM.set_status`: libvirt's lifecycle and I/O error events,
  ``VM.create``, ``VM.cont``, ``VM.destroy``, a refresh after a reconnect);
  a VM that went Down comes with VDSM's exit info (``exitCode``,
  ``exitReason``, ``exitMessage``: :class:`virt.vm.Exit`);
- :meth:`Notifier.replication` when a drive's replica becomes ``ready`` or
  ``failed`` (the BLOCK_JOB_2 event, or the domain XML read after a
  reconnect, see :func:`replica_changed`).

Calls come from the libvirt event loop thread or a request's thread, never
while a VM's locks are held by the caller's own code; a notifier must not
block (the daemon's queues the message and returns).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Protocol

from virt import drive as drive_mod

log = logging.getLogger("virt.notify")

# The replica states that are told (copying is where every mirror starts).
TOLD_STATES = (drive_mod.READY, drive_mod.FAILED)


class Notifier(Protocol):
    def vm_status(self, vm_id: str, status: str, pause_code: str,
                  exit_info: dict[str, Any] | None = None) -> None:
        """A VM's status (Up, Paused, Down) or pause code changed; exit_info:
        why it went Down ({exitCode, exitReason, exitMessage}), if known."""
        ...

    def replication(self, vm_id: str, drive: str, state: str) -> None:
        """The replica of a VM's drive (its target name) is now ``ready`` or ``failed``."""
        ...


class Nobody:
    """The notifier of a virt nobody listens to (tests, tools)."""

    def vm_status(self, vm_id: str, status: str, pause_code: str,
                  exit_info: dict[str, Any] | None = None) -> None:
        pass

    def replication(self, vm_id: str, drive: str, state: str) -> None:
        pass


NOBODY = Nobody()


def replica_changed(
    notifier: Notifier, vm_id: str, d: drive_mod.Drive, before: str | None
) -> None:
    """Tell notifier if d's replica state moved from before to ready or failed."""
    state = d.replica.state if d.replica is not None else None
    if state is None or state == before or state not in TOLD_STATES:
        return
    safely(notifier.replication, vm_id, d.name, state)


def safely(fn: Callable[..., None], *args: Any) -> None:
    """Call a notifier method; its failure is logged, never raised into virt."""
    try:
        fn(*args)
    except Exception:
        log.exception("Notifier %r failed", fn)
