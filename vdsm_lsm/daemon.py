"""The vdsm-lsm daemon: ``vdsm-lsm [--config FILE] [--show-config]``."""

from __future__ import annotations

import argparse
import fcntl
import ipaddress
import logging
import os
import signal
import socket
import sys
import threading

from rpc import server
from vdsm_lsm import app as app_mod
from vdsm_lsm import config as config_mod

log = logging.getLogger("vdsm_lsm.daemon")

LOG_FORMAT = "%(asctime)s %(levelname)-7s (%(threadName)s) [%(name)s] %(message)s"


class StartupError(Exception):
    pass


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="vdsm-lsm", description="Host agent for live storage migration of VM disks."
    )
    parser.add_argument(
        "--config",
        default=config_mod.DEFAULT_FILE,
        help="main configuration file; conf.d/*.conf beside it are read too "
        f"(default {config_mod.DEFAULT_FILE})",
    )
    parser.add_argument(
        "--show-config", action="store_true", help="print the effective configuration and exit"
    )
    return parser.parse_args(argv)


def setup_logging(cfg: config_mod.Config) -> None:
    root = logging.getLogger()
    root.setLevel(cfg.logging.level)
    for handler in list(root.handlers):
        root.removeHandler(handler)
    formatter = logging.Formatter(LOG_FORMAT)
    stderr = logging.StreamHandler(sys.stderr)
    stderr.setFormatter(formatter)
    root.addHandler(stderr)
    if cfg.logging.file:
        os.makedirs(os.path.dirname(cfg.logging.file), exist_ok=True)
        file_handler = logging.FileHandler(cfg.logging.file)
        file_handler.setFormatter(formatter)
        root.addHandler(file_handler)


def is_loopback(address: str) -> bool:
    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def check_tls_policy(cfg: config_mod.Config) -> None:
    if not cfg.tls.enabled and not is_loopback(cfg.addresses.management_ip):
        raise StartupError(
            f"Refusing to listen on non-loopback address {cfg.addresses.management_ip} "
            "without TLS: set [tls] enabled = true (with key, cert and ca) or listen on "
            "127.0.0.1"
        )
    if cfg.tls.enabled:
        for key in ("key", "cert", "ca"):
            path = getattr(cfg.tls, key)
            if not os.path.isfile(path):
                raise StartupError(f"[tls] {key} = {path}: no such file")


class RunDirLock:
    """Refuses a second daemon on the same run dir."""

    def __init__(self, run_dir: str) -> None:
        self.path = os.path.join(run_dir, "vdsm-lsm.lock")
        self._fd: int | None = None

    def acquire(self) -> None:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            with open(self.path) as f:
                holder = f.read().strip() or "unknown"
            os.close(fd)
            raise StartupError(
                f"Another vdsm-lsm (pid {holder}) is running with run dir "
                f"{os.path.dirname(self.path)}"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def sd_notify(state: str) -> None:
    """Tell systemd about our state when it supervises us (Type=notify)."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
    except OSError as e:
        log.warning("Cannot notify systemd state=%s: %s", state, e)


class Daemon:
    def __init__(self, cfg: config_mod.Config) -> None:
        self.config = cfg
        self.lock = RunDirLock(cfg.irs.run_dir)
        self.app: app_mod.App | None = None
        self.listeners: list[server.Listener] = []
        self.rpc: server.Server | None = None  # its publish() pushes events to STOMP clients
        self.stopping = threading.Event()

    def start(self) -> None:
        check_tls_policy(self.config)
        self.lock.acquire()
        self.app = app_mod.App(self.config)
        self.rpc = rpc = server.Server(server.Protocol(self.app.dispatcher))
        # Events reach STOMP subscribers once a listener runs (dropped before).
        self.app.events.publish = rpc.publish
        self.app.start()
        addresses = self.config.addresses
        self.listeners.append(rpc.unix_listener(addresses.unix_socket))
        ssl_context = None
        if self.config.tls.enabled:
            tls = self.config.tls
            ssl_context = server.server_tls_context(tls.cert, tls.key, tls.ca)
        self.listeners.append(
            rpc.tcp_listener(addresses.management_ip, addresses.management_port, ssl_context)
        )
        for listener in self.listeners:
            listener.start()

    def stop(self) -> None:
        sd_notify("STOPPING=1")
        log.info("Stopping")
        for listener in self.listeners:
            listener.stop()
        if self.app is not None:
            self.app.stop()
        self.lock.release()
        log.info("Stopped")

    def run(self) -> None:
        try:
            self.start()
            tcp = self.listeners[-1].address
            log.info(
                "vdsm-lsm serving unix=%s tcp=%s:%s", self.config.addresses.unix_socket, *tcp[:2]
            )
            sd_notify("READY=1")
            while not self.stopping.wait(3600):
                pass
        finally:
            self.stop()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = config_mod.load(args.config)
    except config_mod.ConfigError as e:
        print(f"vdsm-lsm: configuration error: {e}", file=sys.stderr)
        return 2
    if args.show_config:
        print(cfg.format())
        return 0
    setup_logging(cfg)
    daemon = Daemon(cfg)

    def on_signal(signum: int, frame: object) -> None:
        log.info("Received signal %s", signal.Signals(signum).name)
        daemon.stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        daemon.run()
    except (StartupError, OSError) as e:
        log.error("%s", e)
        print(f"vdsm-lsm: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
