"""The error foundation of every package.

Exception tree::

    Error                       base: a message template filled from fields
     +-- GeneralException       the unexpected (never raised on purpose)
     +-- rpc.errors.*           JSON-RPC's own errors (-32700 ... -32602)
     +-- storage.errors.*       storage errors
     +-- virt.errors.*          virt errors

Every error has a ``name``: the key of its code in the schema's error table
(``vdsm_lsm/api.yml``).  Packages subclass :class:`Error` and set ``name``;
numbers live only in the schema and are looked up in one place,
``rpc.dispatch``.  Keyword arguments become attributes and fill ``msg``, so
the message and the structured fields always agree::

    class VolumeDoesNotExist(errors.Error):
        name = "VolumeDoesNotExist"
        msg = "Volume {vol_id} does not exist in domain {sd_id}"

``expected`` says how the failure is logged where it is answered: expected
errors at info level without a traceback, the others with one.
"""

from __future__ import annotations

from typing import Any

GENERAL = "GeneralException"


class Error(Exception):
    name = GENERAL
    msg = "Unexpected error"
    expected = True

    def __init__(self, reason: str | None = None, **fields: Any) -> None:
        self.reason = reason
        self.fields = fields
        for key, value in fields.items():
            setattr(self, key, value)
        super().__init__(str(self))

    def __str__(self) -> str:
        try:
            text = self.msg.format(**self.fields)
        except (KeyError, IndexError):
            text = self.msg
        if self.reason:
            text = f"{text}: {self.reason}"
        return text


class GeneralException(Error):
    name = GENERAL
    msg = "Unexpected error"
    expected = False


def name_of(exc: BaseException) -> str:
    """The schema error name of an exception: its own for our errors,
    ``GeneralException`` for anything else."""
    return exc.name if isinstance(exc, Error) else GENERAL
