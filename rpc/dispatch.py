"""Schema-driven dispatch: from a JSON-RPC call to a handler and back.

Providers are plain objects; the verb ``Namespace.verbName`` is served by the
provider method ``namespace_verb_name`` (see :func:`rpc.schema.handler_name`).
A verb of the schema that no provider serves answers ``noimpl``.

This is the one place where error names become codes: an exception
(:meth:`Dispatcher.error_of`) carrying a ``name`` from the schema's table
gets that code, anything else is unexpected, logged with its traceback and
answered as ``GeneralException``; a result with error names in fields the
schema types ``errorCode`` (task statuses) gets their codes
(:meth:`rpc.schema.Schema.answer`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from rpc import errors, schema

log = logging.getLogger("rpc.dispatch")


class Dispatcher:
    def __init__(self, api: schema.Schema, providers: Iterable[object] = ()) -> None:
        self.schema = api
        self._handlers: dict[str, Callable[..., Any]] = {}
        self._lock = threading.Lock()
        for provider in providers:
            self.register(provider)

    def register(self, provider: object) -> list[str]:
        """Serve every schema verb the provider has a method for."""
        served = []
        with self._lock:
            for name, verb in self.schema.verbs.items():
                if verb.target is not None:
                    continue
                func = getattr(provider, schema.handler_name(name), None)
                if func is None:
                    continue
                if name in self._handlers:
                    raise ValueError(f"Verb {name} is served twice")
                self._handlers[name] = func
                served.append(name)
        log.debug("Registered provider=%s verbs=%d", type(provider).__name__, len(served))
        return served

    def implemented(self) -> set[str]:
        return set(self._handlers)

    def handlers(self) -> dict[str, Callable[..., Any]]:
        """Verb name -> the handler serving it."""
        with self._lock:
            return dict(self._handlers)

    def call(self, method: Any, params: Any) -> Any:
        """Validate and run one call and answer its result through the schema;
        raise an error on failure."""
        if not isinstance(method, str):
            raise errors.InvalidRequest("method must be a string")
        target, kwargs = self.schema.validate(method, params)
        func = self._handlers.get(target)
        if func is None:
            raise errors.NotImplementedVerb(method=target)
        return self.schema.answer(target, func(**kwargs))

    def handle(self, method: Any, params: Any) -> tuple[bool, Any]:
        """Run a call and log it. Return (True, result) or (False, (code, message))."""
        start = time.monotonic()
        try:
            result = self.call(method, params)
        except Exception as e:
            code, message = self.error_of(e, method)
            log.info(
                "Request method=%s duration=%.3f code=%d", method, time.monotonic() - start, code
            )
            return False, (code, message)
        log.info("Request method=%s duration=%.3f code=0", method, time.monotonic() - start)
        return True, result

    def error_of(self, exc: BaseException, method: Any = None) -> tuple[int, str]:
        """Map an exception to (code, message): the only such mapping."""
        if isinstance(exc, errors.ProtocolError):
            return exc.code, str(exc)
        name = getattr(exc, "name", None)
        code = self.schema.code_of(name) if isinstance(name, str) else None
        if isinstance(exc, errors.Error) and code is not None and code != self.general_code:
            if exc.expected:
                log.info("Request method=%s failed: %s: %s", method, name, exc)
            else:
                log.error("Request method=%s failed: %s: %s", method, name, exc, exc_info=exc)
            return code, str(exc)
        if isinstance(exc, errors.Error) and code is None:
            log.error("Error name %r has no code in the schema", name)
        log.error("Unexpected error in method=%s", method, exc_info=exc)
        return self.general_code, f"General exception: {type(exc).__name__}: {exc}"

    @property
    def general_code(self) -> int:
        return self.schema.errors["GeneralException"]
