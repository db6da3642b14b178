"""Wiring: builds the daemon's parts from the config and registers providers.

Packages depend downward only; this module is where they meet.  Each
package exposes a provider object whose methods serve schema verbs
(rpc.dispatch finds them by name); nothing here repeats the schema.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import libvirt

from rpc import dispatch, schema
from vdsm_lsm import config as config_mod
from vdsm_lsm import host

log = logging.getLogger("vdsm_lsm.app")

SCHEMA_PATH = os.path.join(os.path.dirname(__file__), "api.yml")


def load_schema() -> schema.Schema:
    return schema.Schema.load(SCHEMA_PATH)


class LibvirtConnection:
    """One libvirt connection, reopened when libvirtd went away."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self._conn: Any = None

    def get(self) -> Any:
        conn = self._conn
        if conn is not None:
            try:
                if conn.isAlive():
                    return conn
            except libvirt.libvirtError:
                pass
            log.warning("libvirt connection lost, reconnecting uri=%s", self.uri)
        self._conn = libvirt.open(self.uri)
        log.info("Connected to libvirt uri=%s", self.uri)
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except libvirt.libvirtError:
                pass
            self._conn = None


def has_device_mapper() -> bool:
    """True when the kernel has device-mapper.

    /dev/mapper/control alone proves nothing: libdevmapper creates the node
    even when the kernel lacks the driver, so ask the kernel.
    """
    try:
        with open("/proc/misc") as f:
            return any(line.split()[-1] == "device-mapper" for line in f if line.strip())
    except OSError:
        return False


def effective_activation(mode: str) -> str:
    if mode != "auto":
        return mode
    return "dm" if has_device_mapper() else "loop"


def effective_cluster_lock(mode: str) -> str:
    if mode != "auto":
        return mode
    return "sanlock" if os.path.exists("/run/sanlock/sanlock.sock") else "local"


class App:
    def __init__(self, cfg: config_mod.Config, api: schema.Schema | None = None) -> None:
        self.config = cfg
        self.schema = api or load_schema()
        self.libvirt = LibvirtConnection(cfg.libvirt.uri)
        self.dispatcher = dispatch.Dispatcher(self.schema)
        self.host = host.HostAPI(self.libvirt.get, self.modes)
        self.dispatcher.register(self.host)

    def modes(self) -> dict[str, str]:
        return {
            "clusterLock": effective_cluster_lock(self.config.sanlock.cluster_lock),
            "activation": effective_activation(self.config.lvm.activation),
        }

    def start(self) -> None:
        self.libvirt.get()

    def stop(self) -> None:
        self.libvirt.close()
