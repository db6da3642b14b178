"""JSON-RPC 2.0 client: the transport to the daemon, and request params from text.

:class:`Client` posts requests over the daemon's unix socket or TCP (TLS)
and raises :class:`vdsm_lsm.client_errors.ClientError` (also reachable as
``client.ClientError``) for an error answer.  :func:`parse_params` turns
the command line's ``key=value`` words and ``-f params.json|-`` into a
verb's params: values are parsed as JSON where they parse
(``size=1073741824``, ``domainList='["..."]'``), else taken as strings.

The ``vdsm-lsm-client`` command itself is :mod:`vdsm_lsm.cli`;
``python -m vdsm_lsm.client`` still runs it.
"""

from __future__ import annotations

import http.client
import itertools
import json
import sys
from typing import Any

from vdsm_lsm import client_errors, client_socket

DEFAULT_SOCKET = client_socket.DEFAULT_SOCKET

# The error of an error answer; its class lives in client_errors so that the
# move-disk flow can raise and catch it without importing the transport.
ClientError = client_errors.ClientError


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        self.sock = client_socket.unix_socket(self.unix_path, self.timeout)


class Client(client_socket.Endpoint):
    """Talks JSON-RPC 2.0 to the daemon over its unix socket or TCP (TLS).

    Client(socket_path=None, host=None, port=54321, tls_key=None,
    tls_cert=None, tls_ca=None, timeout=600.0): see vdsm_lsm/client_socket.py.
    """

    def __post_init__(self) -> None:
        super().__post_init__()
        self._ids = itertools.count(1)
        self._conn: http.client.HTTPConnection | None = None

    def _connection(self) -> http.client.HTTPConnection:
        if self.host is not None:
            if self.ssl_context is not None:
                return http.client.HTTPSConnection(
                    self.host, self.port, timeout=self.timeout, context=self.ssl_context
                )
            return http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        assert self.socket_path is not None
        return _UnixHTTPConnection(self.socket_path, self.timeout)

    def post(self, body: bytes | str) -> Any:
        """POST a raw body; return the decoded JSON answer (None if empty).

        The HTTP connection is kept open between calls (a Client belongs to
        one thread); a connection the daemon closed while idle is reopened
        once.
        """
        if isinstance(body, str):
            body = body.encode("utf-8")
        for attempt in (1, 2):
            fresh = self._conn is None
            if self._conn is None:
                self._conn = self._connection()
            try:
                self._conn.request("POST", "/", body, {"Content-Type": "application/json"})
                response = self._conn.getresponse()
                data = response.read()
                if response.getheader("Connection", "").lower() == "close":
                    self.close()
                break
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                self.close()
                if fresh or attempt == 2:
                    raise
            except BaseException:
                self.close()
                raise
        return json.loads(data) if data else None

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def call(self, method: str, **params: Any) -> Any:
        request = {"jsonrpc": "2.0", "id": next(self._ids), "method": method, "params": params}
        response = self.post(json.dumps(request))
        if response is None:
            raise client_errors.ClientError(-32603, "Empty response")
        if "error" in response:
            error = response["error"]
            raise client_errors.ClientError(error.get("code", -32603), error.get("message", ""))
        return response.get("result")

    def notify(self, method: str, **params: Any) -> Any:
        return self.post(json.dumps({"jsonrpc": "2.0", "method": method, "params": params}))


def parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def parse_params(pairs: list[str], params_file: str | None) -> dict[str, Any]:
    params: dict[str, Any] = {}
    if params_file:
        if params_file == "-":
            params.update(json.load(sys.stdin))
        else:
            with open(params_file, encoding="utf-8") as f:
                params.update(json.load(f))
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"expected key=value, got {pair!r}")
        params[key] = parse_value(value)
    return params


if __name__ == "__main__":
    # ``python -m vdsm_lsm.client``: run the command (vdsm_lsm.cli), which
    # imports this module under its own name; this module never imports cli.
    import runpy

    runpy.run_module("vdsm_lsm.cli", run_name="__main__", alter_sys=True)
