"""Where a client reaches the daemon: its unix socket, or TCP with mutual TLS.

:class:`Endpoint` is the part :class:`vdsm_lsm.client.Client` (JSON-RPC
over HTTP) and :class:`vdsm_lsm.stomp_client.StompClient` (over STOMP)
share: their common arguments, in this order, and the socket they open::

    Endpoint()                                  the daemon's unix socket (DEFAULT_SOCKET)
    Endpoint(socket_path="/run/x/api.sock")     another unix socket
    Endpoint(host="10.0.0.5", port=54321)       TCP, plain
    Endpoint(host="10.0.0.5", tls_key="client.key", tls_cert="client.crt",
             tls_ca="ca.crt")                   TCP with mutual TLS

A host, if given, wins over a socket path.  TLS is on when a CA or a
certificate is given: the server's certificate is checked against tls_ca
(the system's CAs when only a certificate is given), not against its host
name, and the client shows tls_cert (its key in tls_key, or in tls_cert
itself).  A missing or unreadable file raises as :mod:`ssl` does when the
client is built.  timeout (seconds) bounds the connect and every read.

The standard library only: the ``vdsm-lsm-client`` command imports this
(tests/vdsm_lsm/test_cli.py keeps the command light).
"""

from __future__ import annotations

import dataclasses
import socket
import ssl

DEFAULT_SOCKET = "/run/vdsm-lsm/api.sock"
DEFAULT_PORT = 54321


@dataclasses.dataclass(eq=False)
class Endpoint:
    """The daemon's address and the TLS context to reach it over TCP."""

    socket_path: str | None = None
    host: str | None = None
    port: int = DEFAULT_PORT
    tls_key: str | None = None
    tls_cert: str | None = None
    tls_ca: str | None = None
    timeout: float = 600.0

    def __post_init__(self) -> None:
        if self.host is None and self.socket_path is None:
            self.socket_path = DEFAULT_SOCKET
        # None: plain TCP (and always on the unix socket).
        self.ssl_context = tls_context(self.tls_key, self.tls_cert, self.tls_ca)

    def open_socket(self) -> socket.socket:
        """A connected socket to the daemon (TLS done over TCP when configured)."""
        if self.host is None:
            assert self.socket_path is not None
            return unix_socket(self.socket_path, self.timeout)
        sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
        if self.ssl_context is not None:
            try:
                return self.ssl_context.wrap_socket(sock, server_hostname=self.host)
            except BaseException:
                sock.close()
                raise
        return sock


def tls_context(
    tls_key: str | None, tls_cert: str | None, tls_ca: str | None
) -> ssl.SSLContext | None:
    """The client side of mutual TLS; None if neither a CA nor a certificate is given."""
    if not (tls_ca or tls_cert):
        return None
    ctx = ssl.create_default_context(cafile=tls_ca)
    ctx.check_hostname = False
    if tls_cert:
        ctx.load_cert_chain(tls_cert, tls_key)
    return ctx


def unix_socket(path: str, timeout: float | None) -> socket.socket:
    """A stream socket connected to the unix socket at path (timeout None: blocking)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(path)
    except BaseException:
        sock.close()
        raise
    return sock
