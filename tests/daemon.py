"""A real vdsm-lsm daemon process for tests: temp config, run dir and socket."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from typing import Any

from vdsm_lsm import client

START_TIMEOUT = 60.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_config(path: str, sections: dict[str, dict[str, Any]]) -> None:
    with open(path, "w") as f:
        for section, values in sections.items():
            f.write(f"[{section}]\n")
            for key, value in values.items():
                if isinstance(value, bool):
                    value = "true" if value else "false"
                f.write(f"{key} = {value}\n")
            f.write("\n")


class Daemon:
    """Starts `python -m vdsm_lsm.daemon` and talks to it over both transports."""

    def __init__(self, workdir: str, config: dict[str, dict[str, Any]] | None = None) -> None:
        self.workdir = workdir
        self.run_dir = os.path.join(workdir, "run")
        self.socket_path = os.path.join(self.run_dir, "api.sock")
        self.port = free_port()
        self.conf_path = os.path.join(workdir, "vdsm-lsm.conf")
        self.log_path = os.path.join(workdir, "daemon.log")
        sections: dict[str, dict[str, Any]] = {
            "addresses": {
                "management_ip": "127.0.0.1",
                "management_port": self.port,
                "unix_socket": self.socket_path,
            },
            "irs": {
                "run_dir": self.run_dir,
                "state_dir": os.path.join(workdir, "state"),
                "volume_utilization_chunk_mb": 64,
            },
            "vm": {"accel": "tcg"},
            # Say which lock: "auto" would pick sanlock if a daemon happened
            # to run on the machine (tests/cluster's hosts override this).
            "sanlock": {"cluster_lock": "local"},
            "logging": {"level": "DEBUG"},
        }
        for section, values in (config or {}).items():
            sections.setdefault(section, {}).update(values)
        self.config = sections
        os.makedirs(os.path.join(workdir, "conf.d"), exist_ok=True)
        write_config(self.conf_path, sections)
        self.proc: subprocess.Popen[bytes] | None = None
        self.extra_env: dict[str, str] = {}

    def command(self) -> list[str]:
        return [sys.executable, "-m", "vdsm_lsm.daemon", "--config", self.conf_path]

    def start(self, wait: bool = True) -> Daemon:
        env = dict(os.environ)
        env.update(self.extra_env)
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            self.command(), stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        log.close()
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited rc={self.proc.returncode}:\n{self.log()}")
            if os.path.exists(self.socket_path):
                try:
                    if self.unix().call("Host.ping2") is True:
                        return
                except OSError:
                    pass
            time.sleep(0.1)
        raise RuntimeError(f"daemon not ready in {START_TIMEOUT}s:\n{self.log()}")

    def unix(self, **kw: Any) -> client.Client:
        return client.Client(socket_path=self.socket_path, **kw)

    def tcp(self, **kw: Any) -> client.Client:
        return client.Client(host="127.0.0.1", port=self.port, **kw)

    def log(self) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        """Signal the daemon and wait for it; return its exit code."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        rc = self.proc.returncode
        self.proc = None
        return rc

    def kill9(self) -> None:
        self.stop(signal.SIGKILL)

    def restart(self) -> Daemon:
        self.stop()
        return self.start()
