"""Benchmark: Host.ping2 latency and throughput, and daemon memory.

Runs the real daemon (temp config) and, as the baseline measured in the same
run, a bare threaded HTTP server that answers a constant JSON-RPC result:
the ratio shows what schema validation, dispatch and logging cost on top of
plain HTTP handling.

    .venv/bin/python -m contrib.bench.bench_rpc [--requests N]
"""

from __future__ import annotations

import argparse
import http.server
import os
import shutil
import socketserver
import statistics
import tempfile
import threading
import time
from collections.abc import Callable

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


def _measure(make_client: Callable[[], client.Client], clients: int, requests: int):
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
        transports = {
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
    print(f"daemon RSS idle {rss_idle / 1024:.1f} MiB, after {total} requests "
          f"{rss_after / 1024:.1f} MiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
