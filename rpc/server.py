"""JSON-RPC 2.0 over HTTP on jsonrpclib-pelix: TCP (optionally mutual TLS) and AF_UNIX.

jsonrpclib-pelix gives the HTTP transport (``POST /``, a thread per
request); the JSON-RPC 2.0 framing is done here so that conformance is
exact: batches, notifications (no response), -32700 parse error, -32600
invalid request, and every other error through the dispatcher's single
mapping.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import socketserver
import ssl
import threading
from typing import Any

from jsonrpclib import SimpleJSONRPCServer as pelix  # noqa: N813

from rpc import dispatch, errors

log = logging.getLogger("rpc.server")

HANDSHAKE_TIMEOUT = 30.0
IDLE_TIMEOUT = 300.0


class Protocol:
    """JSON-RPC 2.0 framing around a dispatcher."""

    def __init__(self, dispatcher: dispatch.Dispatcher) -> None:
        self.dispatcher = dispatcher

    def process(self, data: str) -> str:
        try:
            request = json.loads(data)
        except ValueError as e:
            return self._dumps(_error(None, errors.ParseError.code, f"Parse error: {e}"))
        if isinstance(request, list):
            if not request:
                return self._dumps(_error(None, errors.InvalidRequest.code, "Empty batch"))
            responses = [r for r in (self._one(item) for item in request) if r is not None]
            return self._dumps(responses) if responses else ""
        response = self._one(request)
        return self._dumps(response) if response is not None else ""

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
        except (TypeError, ValueError) as e:
            code, message = self.dispatcher.error_of(e, request["method"])
            return _error(req_id, code, message)
        return {"jsonrpc": "2.0", "id": req_id, "result": value}

    @staticmethod
    def _dumps(response: Any) -> str:
        return json.dumps(response)


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


class _RequestHandler(pelix.SimpleJSONRPCRequestHandler):
    """Keeps HTTP/1.1 connections open between requests; tells the server
    when a connection is idle, so a stopping server can close it without
    cutting a request short."""

    rpc_paths = ("/",)
    timeout = IDLE_TIMEOUT
    server: _Server

    def setup(self) -> None:
        super().setup()
        self.idle = True
        self.server.track(self, True)

    def parse_request(self) -> bool:
        self.idle = False
        ok = super().parse_request()
        log.debug("Reading request client=%s path=%s", self.client_address, self.path)
        return ok

    def handle_one_request(self) -> None:
        super().handle_one_request()
        self.idle = True
        if self.server.stopping:
            self.close_connection = True

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.track(self, False)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        log.debug("HTTP %s", format % args)


class _Server(socketserver.ThreadingMixIn, pelix.SimpleJSONRPCServer):
    daemon_threads = False
    block_on_close = True
    request_queue_size = 128

    def __init__(
        self,
        address: Any,
        family: int,
        protocol: Protocol,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.protocol = protocol
        self.ssl_context = ssl_context
        self.stopping = False
        self._handlers: set[_RequestHandler] = set()
        self._handlers_lock = threading.Lock()
        super().__init__(
            address, requestHandler=_RequestHandler, logRequests=False, address_family=family
        )

    def _marshaled_dispatch(self, data: str, dispatch_method: Any = None, path: Any = None) -> str:
        return self.protocol.process(data)

    def finish_request(self, request: Any, client_address: Any) -> None:
        if self.ssl_context is None:
            super().finish_request(request, client_address)
            return
        request.settimeout(HANDSHAKE_TIMEOUT)
        try:
            tls = self.ssl_context.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError) as e:
            log.warning("TLS handshake failed client=%s: %s", client_address, e)
            return
        try:
            tls.settimeout(IDLE_TIMEOUT)
            super().finish_request(tls, client_address)
        finally:
            tls.close()

    def track(self, handler: _RequestHandler, active: bool) -> None:
        with self._handlers_lock:
            if active:
                self._handlers.add(handler)
            else:
                self._handlers.discard(handler)

    def close_idle(self) -> None:
        """Stop reading on idle keep-alive connections; busy ones finish first."""
        self.stopping = True
        with self._handlers_lock:
            handlers = list(self._handlers)
        for handler in handlers:
            if handler.idle:
                try:
                    handler.connection.shutdown(socket.SHUT_RD)
                except OSError:
                    pass

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.exception("Error serving client=%s", client_address)


class Listener:
    """One listening server running in its own thread."""

    def __init__(self, server: _Server, name: str, unix_path: str | None = None) -> None:
        self.server = server
        self.name = name
        self.unix_path = unix_path
        self._thread = threading.Thread(target=server.serve_forever, name=name, daemon=True)

    @property
    def address(self) -> Any:
        return self.server.server_address

    def start(self) -> None:
        self._thread.start()
        log.info("Listening on %s %s", self.name, self.address)

    def stop(self) -> None:
        """Stop accepting, wait for running requests, close the socket."""
        self.server.shutdown()
        self.server.close_idle()
        self.server.server_close()
        self._thread.join()
        if self.unix_path:
            try:
                os.unlink(self.unix_path)
            except FileNotFoundError:
                pass
        log.info("Stopped %s", self.name)


def tcp_listener(
    host: str, port: int, protocol: Protocol, ssl_context: ssl.SSLContext | None = None
) -> Listener:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    server = _Server((host, port), family, protocol, ssl_context)
    return Listener(server, "tls" if ssl_context else "tcp")


def unix_listener(path: str, protocol: Protocol, mode: int = 0o660) -> Listener:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    try:
        os.unlink(path)  # A stale socket of a dead daemon; the run-dir lock guards a live one.
    except FileNotFoundError:
        pass
    server = _Server(path, socket.AF_UNIX, protocol)
    os.chmod(path, mode)
    return Listener(server, "unix", unix_path=path)


def server_tls_context(cert: str, key: str, ca: str) -> ssl.SSLContext:
    """Mutual TLS: the client must present a certificate signed by ca."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=ca)
    ctx.load_cert_chain(cert, key)
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx
