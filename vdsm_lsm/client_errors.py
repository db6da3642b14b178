"""The error a JSON-RPC answer carries, on the client side.

Raised by the transport (:class:`vdsm_lsm.client.Client`) for an error
answer, and by the move-disk flow (:mod:`vdsm_lsm.move_disk`) for a refusal
of its own, both with a schema code; the command (:mod:`vdsm_lsm.cli`)
prints any of them as ``error CODE: MESSAGE``.  Its own module so that the
flow and the transport need not import each other.
"""

from __future__ import annotations


class ClientError(Exception):
    """An error answer: its JSON-RPC ``code`` and ``message``."""

    def __init__(self, code: int, message: str) -> None:
        self.code = code
        self.message = message
        super().__init__(f"[{code}] {message}")
