"""Errors of the JSON-RPC layer itself.

Exception tree::

    common.errors.Error         the one foundation (name, msg, fields)
     +-- ProtocolError          JSON-RPC's own errors (-32700 ... -32602)
     |    +-- ParseError        -32700
     |    +-- InvalidRequest    -32600
     |    +-- MethodNotFound    -32601
     |    +-- InvalidParams     -32602
     +-- NotImplementedVerb     noimpl 44

Storage and virt build on :mod:`common.errors` too, never on this module;
``rpc.dispatch`` maps any of those errors to its code by ``name``.
``Error`` and ``GeneralException`` are re-exported for rpc's own callers.
"""

from __future__ import annotations

from common import errors

Error = errors.Error
GeneralException = errors.GeneralException


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
