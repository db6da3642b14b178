"""Listening sockets (TCP, optionally TLS, and AF_UNIX) of the RPC server.

A :class:`Listener` is bound when it is made (so a busy port is an error at
start-up) and served by its :class:`Acceptor`, the server, once started:
in the event loop it accepts every pending connection and hands each to
:meth:`Acceptor.accepted`. When the process runs out of file descriptors,
accepting pauses for :data:`ACCEPT_PAUSE` seconds instead of spinning.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import ssl
import time
from typing import Any, Protocol

from rpc import reactor

log = logging.getLogger("rpc.listener")

BACKLOG = 256
ACCEPT_BATCH = 64
ACCEPT_PAUSE = 0.5
_RESOURCE_ERRORS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


class Acceptor(Protocol):
    def start_listener(self, listener: Listener) -> None: ...

    def stop_listener(self, listener: Listener) -> None: ...

    def accepted(self, listener: Listener, sock: socket.socket, client: str) -> None: ...


class Listener:
    """One listening socket of a server."""

    def __init__(
        self,
        acceptor: Acceptor,
        sock: socket.socket,
        name: str,
        ssl_context: ssl.SSLContext | None = None,
        unix_path: str | None = None,
    ) -> None:
        self.acceptor = acceptor
        self.sock = sock
        self.name = name
        self.ssl_context = ssl_context
        self.unix_path = unix_path
        self.address: Any = sock.getsockname()
        self.paused_until: float | None = None
        self.active = False
        self.started = False
        self._loop: reactor.EventLoop | None = None

    def __repr__(self) -> str:
        return f"<Listener {self.name} {self.address}>"

    def start(self) -> None:
        self.started = True
        self.acceptor.start_listener(self)
        log.info("Listening on %s %s", self.name, self.address)

    def stop(self) -> None:
        """Stop accepting, let requests in flight finish, close the socket."""
        if self.started:
            self.acceptor.stop_listener(self)
            self.started = False
        else:
            self.sock.close()
        if self.unix_path:
            try:
                os.unlink(self.unix_path)
            except FileNotFoundError:
                pass
        log.info("Stopped %s", self.name)

    # Loop thread

    def on_event(self, mask: int) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                sock, addr = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue
            except OSError as e:
                if e.errno not in _RESOURCE_ERRORS:
                    raise
                log.warning("Cannot accept on %s: %s; pausing %.1fs", self.name, e,
                            ACCEPT_PAUSE)
                self.pause()
                return
            self.acceptor.accepted(self, sock, _client_name(addr))

    def on_error(self, exc: BaseException) -> None:
        self.pause()

    def pause(self) -> None:
        if self.paused_until is None and self._loop is not None:
            self.paused_until = time.monotonic() + ACCEPT_PAUSE
            self._loop.selector.unregister(self.sock)

    def resume_if_due(self, now: float, loop: reactor.EventLoop) -> float | None:
        """Housekeeping: accept again after a pause; answer when to look again."""
        if self.paused_until is None:
            return None
        if now < self.paused_until:
            return self.paused_until
        self.paused_until = None
        if self.active:
            loop.selector.register(self.sock, reactor.READ, self)
        return None

    def attach(self, loop: reactor.EventLoop) -> None:
        self._loop = loop
        self.active = True
        loop.selector.register(self.sock, reactor.READ, self)

    def detach(self) -> None:
        self.active = False
        if self.paused_until is None and self._loop is not None:
            self._loop.selector.unregister(self.sock)
        self.paused_until = None
        self.sock.close()


def _client_name(addr: Any) -> str:
    if isinstance(addr, tuple) and len(addr) >= 2:
        return f"{addr[0]}:{addr[1]}"
    return "unix"


def bind_tcp(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(BACKLOG)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def bind_unix(path: str, mode: int) -> socket.socket:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    try:
        os.unlink(path)  # A stale socket of a dead daemon; the run-dir lock guards a live one.
    except FileNotFoundError:
        pass
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        os.chmod(path, mode)
        sock.listen(BACKLOG)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock
