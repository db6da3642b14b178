"""Fixtures of the transport tests: an in-process server over a small test
schema (so tests can set limits and register slow handlers), and a STOMP
client written by hand, independent of the server's codec."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from rpc import dispatch, jsonrpc, schema, server

TEST_SCHEMA = {
    "verbs": {
        "Host.ping2": {"doc": "Answers true.", "params": {}, "returns": "bool"},
        "Test.sleep": {
            "doc": "Sleeps, then answers true.",
            "params": {"seconds": {"type": "number"}},
            "returns": "bool",
        },
        "Test.echo": {"doc": "Answers its value.", "params": {"value": {"type": "any"}},
                      "returns": "any"},
    },
    "errors": {"GeneralException": {"code": 100, "message": "General exception"}},
}


class Provider:
    def host_ping2(self) -> bool:
        return True

    def test_sleep(self, seconds: float) -> bool:
        time.sleep(seconds)
        return True

    def test_echo(self, value: Any) -> Any:
        return value


class Served:
    """An in-process server on a unix socket and on 127.0.0.1."""

    def __init__(self, workdir: str, limits: server.Limits | None = None,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        api = schema.Schema(TEST_SCHEMA)
        self.dispatcher = dispatch.Dispatcher(api, [Provider()])
        self.server = server.Server(jsonrpc.Protocol(self.dispatcher), limits, name="test-rpc")
        self.unix_path = os.path.join(workdir, "api.sock")
        self.listeners = [
            self.server.unix_listener(self.unix_path),
            self.server.tcp_listener("127.0.0.1", 0, ssl_context),
        ]
        for listener in self.listeners:
            listener.start()
        self.port = self.listeners[1].address[1]

    def stop(self) -> None:
        for listener in self.listeners:
            listener.stop()

    def unix_socket(self, timeout: float = 10.0) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        sock.connect(self.unix_path)
        return sock

    def tcp_socket(self, timeout: float = 10.0) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=timeout)


@pytest.fixture
def served_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Served]]:
    made: list[Served] = []

    def make(limits: server.Limits | None = None, **kw: Any) -> Served:
        s = Served(str(tmp_path_factory.mktemp("rpc")), limits, **kw)
        made.append(s)
        return s

    yield make
    for s in made:
        s.stop()


@pytest.fixture
def served(served_factory: Callable[..., Served]) -> Served:
    return served_factory()


def frame(command: str, headers: dict[str, str] | None = None, body: bytes | str = b"") -> bytes:
    if isinstance(body, str):
        body = body.encode()
    lines = [command] + [f"{k}:{v}" for k, v in (headers or {}).items()]
    return ("\n".join(lines) + "\n\n").encode() + body + b"\0"


def request(method: str, params: dict[str, Any] | None = None, req_id: Any = 1) -> str:
    return json.dumps({"jsonrpc": "2.0", "id": req_id, "method": method, "params": params or {}})


class RawStomp:
    """Frames by hand over any socket; a reader thread collects what comes back."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.frames: queue.Queue[tuple[str, dict[str, str], bytes]] = queue.Queue()
        self.heartbeats = 0
        self.closed = threading.Event()
        # An SSL socket may not be read and written by two threads at once:
        # its reader polls, and a writer takes turns with it.
        self._tls = isinstance(sock, ssl.SSLSocket)
        self._lock: Any = threading.Lock() if self._tls else contextlib.nullcontext()
        self._stop = False
        sock.settimeout(0.05 if self._tls else None)
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def send(self, data: bytes) -> None:
        if not self._tls:
            self.sock.sendall(data)
            return
        with self._lock:
            self.sock.settimeout(30)
            try:
                self.sock.sendall(data)
            finally:
                self.sock.settimeout(0.05)

    def connect(self, heart_beat: str = "0,0") -> dict[str, str]:
        self.send(frame("CONNECT", {"accept-version": "1.2", "host": "localhost",
                                     "heart-beat": heart_beat}))
        command, headers, _ = self.next()
        assert command == "CONNECTED", (command, headers)
        return headers

    def next(self, timeout: float = 10.0) -> tuple[str, dict[str, str], bytes]:
        return self.frames.get(timeout=timeout)

    def call(self, body: str, destination: str = "jms.topic.vdsm_requests",
             **headers: str) -> Any:
        self.send(frame("SEND", {"destination": destination, **headers}, body))
        command, _, data = self.next()
        assert command == "MESSAGE", (command, data)
        return json.loads(data)

    def close(self) -> None:
        """Stop the reader first: it must leave recv() before the fd can be reused."""
        self._stop = True
        if not self._tls:
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._thread.join(10)
        self.sock.close()

    def _read(self) -> None:
        buf = b""
        while not self._stop:
            try:
                with self._lock:
                    data = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                break
            if not data:
                break
            buf += data
            buf = self._parse(buf)
        self.closed.set()

    def _parse(self, buf: bytes) -> bytes:
        while buf:
            if buf[:1] == b"\n":
                self.heartbeats += 1
                buf = buf[1:]
                continue
            head_end = buf.find(b"\n\n")
            if head_end < 0:
                return buf
            lines = buf[:head_end].decode().split("\n")
            headers: dict[str, str] = {}
            for line in lines[1:]:
                key, _, value = line.partition(":")
                headers.setdefault(key, value.replace("\\c", ":").replace("\\n", "\n")
                                   .replace("\\\\", "\\"))
            start = head_end + 2
            if "content-length" in headers:
                end = start + int(headers["content-length"])
                if len(buf) <= end:
                    return buf
            else:
                end = buf.find(b"\0", start)
                if end < 0:
                    return buf
            self.frames.put((lines[0], headers, buf[start:end]))
            buf = buf[end + 1:]
        return buf
