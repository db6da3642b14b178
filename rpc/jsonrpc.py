"""JSON-RPC 2.0 framing around a dispatcher, shared by the HTTP and STOMP transports.

:meth:`Protocol.process` takes one request body (bytes or text) and answers
the response text ("" when nothing is to be answered: a notification, or a
batch of them). Conformance is exact: batches, notifications (no response,
even on error), -32700 parse error, -32600 invalid request, and every other
error through the dispatcher's single mapping.

The parser refuses, as -32700, what ``json.loads`` alone would let through
to a handler or turn into a server error: a body that is not UTF-8, JSON
nested deeper than :data:`MAX_DEPTH`, and strings holding a lone UTF-16
surrogate (``"\\ud800"``), which no file name, log line or reply could carry.
No request reaches -32603.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from rpc import dispatch, errors

log = logging.getLogger("rpc.jsonrpc")

# Deeper JSON is a parse error: no verb's params come near it, and handlers
# and validators may recurse over what they are given.
MAX_DEPTH = 100


class Protocol:
    """JSON-RPC 2.0 framing around a dispatcher."""

    def __init__(self, dispatcher: dispatch.Dispatcher) -> None:
        self.dispatcher = dispatcher

    def process(self, data: bytes | str) -> str:
        """Answer one request body; never raises for anything a client sends."""
        try:
            request = parse(data)
        except errors.ParseError as e:
            return _dumps(_error(None, errors.ParseError.code, str(e)))
        if isinstance(request, list):
            if not request:
                return _dumps(_error(None, errors.InvalidRequest.code, "Empty batch"))
            responses = [r for r in (self._one(item) for item in request) if r is not None]
            return _dumps(responses) if responses else ""
        response = self._one(request)
        return _dumps(response) if response is not None else ""

    def _one(self, request: Any) -> dict[str, Any] | None:
        if not isinstance(request, dict):
            return _error(None, errors.InvalidRequest.code, "Request must be an object")
        req_id = request.get("id")
        if not isinstance(req_id, (str, int, type(None))) or isinstance(req_id, bool):
            return _error(None, errors.InvalidRequest.code, "Invalid id")
        problem = _request_problem(request)
        if problem:
            return _error(req_id, errors.InvalidRequest.code, f"Invalid request: {problem}")
        ok, value = self.dispatcher.handle(request["method"], request.get("params"))
        if "id" not in request:
            return None  # A notification: no response, even on error.
        if not ok:
            code, message = value
            return _error(req_id, code, message)
        try:
            json.dumps(value)
        except (TypeError, ValueError, RecursionError) as e:
            code, message = self.dispatcher.error_of(e, request["method"])
            return _error(req_id, code, message)
        return {"jsonrpc": "2.0", "id": req_id, "result": value}


def parse(data: bytes | str) -> Any:
    """Decode one JSON-RPC body; raise :class:`rpc.errors.ParseError` on bad input."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        try:
            text = bytes(data).decode("utf-8")
        except UnicodeDecodeError as e:
            raise errors.ParseError(f"Parse error: body is not valid UTF-8: {e}") from None
    else:
        text = data
    try:
        value = json.loads(text)
    except RecursionError:
        raise errors.ParseError(f"Parse error: nested deeper than {MAX_DEPTH} levels") from None
    except ValueError as e:
        raise errors.ParseError(f"Parse error: {e}") from None
    problem = _shape_problem(value, check_strings="\\u" in text)
    if problem:
        raise errors.ParseError(f"Parse error: {problem}")
    return value


def _shape_problem(value: Any, check_strings: bool) -> str | None:
    """Walk the document without recursion: its depth, and lone surrogates."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            if depth > MAX_DEPTH:
                return f"nested deeper than {MAX_DEPTH} levels"
            for key, sub in item.items():
                if check_strings and not _encodable(key):
                    return "string with a lone surrogate"
                stack.append((sub, depth + 1))
        elif isinstance(item, list):
            if depth > MAX_DEPTH:
                return f"nested deeper than {MAX_DEPTH} levels"
            stack.extend((sub, depth + 1) for sub in item)
        elif check_strings and isinstance(item, str) and not _encodable(item):
            return "string with a lone surrogate"
    return None


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _request_problem(request: dict[str, Any]) -> str | None:
    if request.get("jsonrpc") != "2.0":
        return 'jsonrpc must be "2.0"'
    if not isinstance(request.get("method"), str):
        return "method must be a string"
    if "params" in request and not isinstance(request["params"], (dict, list)):
        return "params must be an object"
    extra = set(request) - {"jsonrpc", "method", "params", "id"}
    if extra:
        return f"unknown member(s) {', '.join(sorted(extra))}"
    return None


def _error(req_id: Any, code: int, message: str) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": req_id, "error": {"code": code, "message": message}}


def error_text(code: int, message: str) -> str:
    """A response to no request in particular (transport errors: too large, timeout)."""
    return _dumps(_error(None, code, message))


def notification(method: str, params: Any) -> str:
    """A JSON-RPC notification: what the server pushes to event subscribers."""
    return json.dumps({"jsonrpc": "2.0", "method": method, "params": params})


def _dumps(response: Any) -> str:
    return json.dumps(response)
