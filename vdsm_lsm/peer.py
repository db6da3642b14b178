"""How this daemon calls another host's daemon: the migration's destination.

virt's migration (virt/migration.py) calls the destination's
``VM.migrationCreate``, pings it while the VM moves, and tells it to let go
when the move failed, as VDSM's source host does.  virt does not import
the transport: the wiring (vdsm_lsm/app.py) hands it :func:`connector`,
which turns a destination address into a :class:`Peer` over
:class:`vdsm_lsm.client.Client`:

- ``unix:PATH`` (or any absolute path): the daemon's unix socket;
- ``HOST:PORT`` or ``[IPv6]:PORT``: its TCP listener, with this daemon's own
  key and certificate and its CA when ``[tls] enabled`` (mutual TLS, as
  between VDSM hosts).

An error answer becomes a ``common.errors.Error`` under the destination's
error name (its code looked up in the schema), so this daemon answers its
caller with the destination's own code; an unreachable destination is the
transport's ``OSError``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from common import errors
from vdsm_lsm import api_schema, client, client_errors
from vdsm_lsm import config as config_mod

UNIX_PREFIX = "unix:"
TIMEOUT = 120.0


class PeerError(errors.Error):
    """The destination's error answer, under the destination's error name."""

    msg = "The destination host answered: {answer}"

    def __init__(self, name: str, answer: str) -> None:
        super().__init__(answer=answer)
        self.name = name


def parse(address: str) -> tuple[str | None, str | None, int]:
    """(socket path, None, 0) or (None, host, port); ValueError if malformed."""
    if address.startswith(UNIX_PREFIX) or address.startswith("/"):
        path = address[len(UNIX_PREFIX):] if address.startswith(UNIX_PREFIX) else address
        if not path.startswith("/"):
            raise ValueError(f"not an absolute socket path: {address!r}")
        return path, None, 0
    if address.startswith("["):
        host, sep, rest = address[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
        if not sep:
            port = ""
    else:
        host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"bad address {address!r}: expected HOST:PORT or unix:PATH")
    return None, host, int(port)


class Peer:
    """One connection to another daemon (one thread at a time; close it)."""

    def __init__(self, rpc: client.Client) -> None:
        self._rpc = rpc

    def call(self, method: str, **params: Any) -> Any:
        try:
            return self._rpc.call(method, **params)
        except client_errors.ClientError as e:
            name = api_schema.load().error_name_of(e.code) or errors.GENERAL
            raise PeerError(name, f"[{e.code}] {e.message}") from e

    def close(self) -> None:
        self._rpc.close()


def connector(cfg: config_mod.Config) -> Callable[[str, float], Peer]:
    """(address, timeout in seconds) -> a Peer, with this daemon's TLS identity
    when TLS is on."""
    tls = cfg.tls

    def connect(address: str, timeout: float = TIMEOUT) -> Peer:
        socket_path, host, port = parse(address)
        on = bool(tls.enabled) and host is not None
        return Peer(client.Client(
            socket_path=socket_path, host=host, port=port,
            tls_key=tls.key if on else None, tls_cert=tls.cert if on else None,
            tls_ca=tls.ca if on else None, timeout=timeout,
        ))

    return connect
