"""Errors that reach a JSON-RPC caller.

Exception tree::

    Error                       base: a message template filled from fields
     +-- ProtocolError          JSON-RPC's own errors (-32700 ... -32602)
     |    +-- ParseError        -32700
     |    +-- InvalidRequest    -32600
     |    +-- MethodNotFound    -32601
     |    +-- InvalidParams     -32602
     +-- (package errors)       storage.errors, virt.errors, vdsm_lsm.errors

Every error has a ``name``: the key of its code in the schema's error table
(``vdsm_lsm/api.yml``).  Packages subclass :class:`Error` and set ``name``;
the code itself is only looked up in one place, ``rpc.dispatch``, so this
module and the packages never carry numbers.  Keyword arguments become
attributes and fill ``msg``, so the message and the structured fields
always agree::

    class VolumeDoesNotExist(errors.Error):
        name = "VolumeDoesNotExist"
        msg = "Volume {vol_id} does not exist in domain {sd_id}"
"""

from __future__ import annotations

from typing import Any


class Error(Exception):
    name = "GeneralException"
    msg = "Unexpected error"
    # Expected errors are logged at info level without a traceback.
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
    name = "GeneralException"
    msg = "Unexpected error"
    expected = False


class ProtocolError(Error):
    """Errors of JSON-RPC itself; their codes are fixed by the spec."""

    code = -32603


class ParseError(ProtocolError):
    name = "ParseError"
    code = -32700
    msg = "Parse error"


class InvalidRequest(ProtocolError):
    name = "InvalidRequest"
    code = -32600
    msg = "Invalid request"


class MethodNotFound(ProtocolError):
    name = "MethodNotFound"
    code = -32601
    msg = "Method not found: {method}"


class InvalidParams(ProtocolError):
    name = "InvalidParams"
    code = -32602
    msg = "Invalid params"


class NotImplementedVerb(Error):
    name = "noimpl"
    msg = "Verb {method} is not implemented yet"
