"""Benchmark: Host.ping2 latency and throughput, and daemon memory.

Runs the real daemon (temp config) and, as the baseline measured in the same
run, a bare threaded HTTP server that answers a constant JSON-RPC result:
the ratio shows what schema validation, dispatch and logging cost on top of
plain HTTP handling. The same calls then go over STOMP (VDSM's wire
protocol, on the same listeners) from a minimal synchronous client: one
``SEND`` to ``jms.topic.vdsm_requests``, then wait for its ``MESSAGE``; the
ratio of those rows is against the daemon's own HTTP row of the same run.

    .venv/bin/python -m contrib.bench.bench_rpc [--requests N]
"""

from __future__ import annotations

import argparse
import http.server
import json
import os
import shutil
import socket
import socketserver
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from tests import daemon as daemon_mod
from vdsm_lsm import client


class _Baseline(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        length = int(self.headers["Content-Length"])
        self.rfile.read(length)
        body = b'{"jsonrpc": "2.0", "id": 1, "result": true}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


class _TCPBaseline(_Baseline):
    disable_nagle_algorithm = True


class _UnixHTTPServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    request_queue_size = 128


class _TCPHTTPServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    request_queue_size = 128


class _Caller(Protocol):
    def call(self, method: str, **params: Any) -> Any: ...


class _StompClient:
    """Just enough STOMP 1.2 for synchronous calls: a frame out, a MESSAGE back."""

    def __init__(self, socket_path: str | None = None, port: int | None = None) -> None:
        if socket_path is not None:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.connect(socket_path)
        else:
            self.sock = socket.create_connection(("127.0.0.1", port))
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.settimeout(60)
        self._buf = b""
        self._ids = 0
        self.sock.sendall(b"CONNECT\naccept-version:1.2\nheart-beat:0,0\n\n\0"
                          b"SUBSCRIBE\ndestination:jms.topic.vdsm_responses\nid:bench\n\n\0")
        assert self._frame().startswith(b"CONNECTED")

    def call(self, method: str, **params: Any) -> Any:
        self._ids += 1
        body = json.dumps({"jsonrpc": "2.0", "id": self._ids, "method": method,
                           "params": params}).encode()
        self.sock.sendall(b"SEND\ndestination:jms.topic.vdsm_requests\ncontent-length:%d\n\n"
                          % len(body) + body + b"\0")
        frame = self._frame()
        return json.loads(frame[frame.index(b"\n\n") + 2:])["result"]

    def _frame(self) -> bytes:
        while b"\0" not in self._buf:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("closed")
            self._buf += data
        frame, _, self._buf = self._buf.partition(b"\0")
        return frame.lstrip(b"\n")


def _measure(make_client: Callable[[], _Caller], clients: int, requests: int):
    per_client = requests // clients
    latencies: list[float] = []
    lock = threading.Lock()

    def worker() -> None:
        rpc = make_client()
        mine = []
        for _ in range(per_client):
            t0 = time.perf_counter()
            assert rpc.call("Host.ping2") is True
            mine.append(time.perf_counter() - t0)
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    latencies.sort()
    p50 = statistics.median(latencies)
    p99 = latencies[int(len(latencies) * 0.99) - 1]
    return p50 * 1000, p99 * 1000, len(latencies) / elapsed


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=2000)
    args = parser.parse_args(argv)
    work = tempfile.mkdtemp(prefix="bench-rpc-", dir="/var/tmp")
    d = daemon_mod.Daemon(work, {"logging": {"level": "WARNING"}})
    d.start()
    base_path = os.path.join(work, "baseline.sock")
    base = _UnixHTTPServer(base_path, _Baseline)
    threading.Thread(target=base.serve_forever, daemon=True).start()
    tcp_base = _TCPHTTPServer(("127.0.0.1", 0), _TCPBaseline)
    threading.Thread(target=tcp_base.serve_forever, daemon=True).start()
    try:
        assert d.proc is not None
        rss_idle = _rss_kib(d.proc.pid)
        rows = []
        transports: dict[str, tuple[Callable[[], _Caller], Callable[[], _Caller]]] = {
            "unix": (d.unix, lambda: client.Client(socket_path=base_path)),
            "tcp": (d.tcp, lambda: client.Client(host="127.0.0.1",
                                                 port=tcp_base.server_address[1])),
        }
        total = 0
        for name, (ours, baseline) in transports.items():
            for clients in (1, 8):
                b = _measure(baseline, clients, args.requests)
                o = _measure(ours, clients, args.requests)
                total += args.requests
                rows.append((name, clients, o, b))
        stomp_transports: dict[str, Callable[[], _Caller]] = {
            "unix": lambda: _StompClient(socket_path=d.socket_path),
            "tcp": lambda: _StompClient(port=d.port),
        }
        stomp_rows = []
        for name, make in stomp_transports.items():
            for clients in (1, 8):
                o = _measure(make, clients, args.requests)
                total += args.requests
                http_row = next(r[2] for r in rows if r[0] == name and r[1] == clients)
                stomp_rows.append((f"stomp-{name}", clients, o, http_row))
        while total < 10000:
            _measure(d.unix, 8, 2000)
            total += 2000
        rss_after = _rss_kib(d.proc.pid)
    finally:
        d.stop()
        base.shutdown()
        tcp_base.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    print("Host.ping2 (vdsm-lsm vs bare HTTP baseline, same run)")
    print(f"{'transport':<9} {'clients':>7} {'p50 ms':>8} {'p99 ms':>8} {'req/s':>8} "
          f"{'base req/s':>10} {'ratio':>6}")
    for name, clients, (p50, p99, rps), (_, _, brps) in rows:
        print(f"{name:<9} {clients:>7} {p50:>8.2f} {p99:>8.2f} {rps:>8.0f} {brps:>10.0f} "
              f"{rps / brps:>6.2f}")
    print()
    print("Host.ping2 over STOMP 1.2 (vs the daemon's HTTP rows above, same run)")
    print(f"{'transport':<10} {'clients':>6} {'p50 ms':>8} {'p99 ms':>8} {'req/s':>8} "
          f"{'HTTP req/s':>10} {'ratio':>6}")
    for name, clients, (p50, p99, rps), (_, _, hrps) in stomp_rows:
        print(f"{name:<10} {clients:>6} {p50:>8.2f} {p99:>8.2f} {rps:>8.0f} {hrps:>10.0f} "
              f"{rps / hrps:>6.2f}")
    print(f"daemon RSS idle {rss_idle / 1024:.1f} MiB, after {total} requests "
          f"{rss_after / 1024:.1f} MiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
