"""Wiring: builds the daemon's parts from the config and registers providers.

Packages depend downward only; this module is where they meet.  Each
package exposes a provider object whose methods serve schema verbs
(rpc.dispatch finds them by name); nothing here repeats the schema.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from rpc import dispatch, schema
from storage import activation, clusterlock, image_ops, lvm
from storage import api as storage_api
from vdsm_lsm import config as config_mod
from vdsm_lsm import host
from virt import api as virt_api

log = logging.getLogger("vdsm_lsm.app")

SCHEMA_PATH = os.path.join(os.path.dirname(__file__), "api.yml")


def load_schema() -> schema.Schema:
    return schema.Schema.load(SCHEMA_PATH)


def effective_activation(mode: str) -> str:
    if mode != "auto":
        return mode
    return "dm" if activation.dm_available() else "loop"


def lvm_users(devices: list[str]) -> dict[str, str]:
    """Device -> "lvm:<VG>" for the devices that are LVM PVs."""
    if not devices:
        return {}
    try:
        pvs = lvm.LVM(devices, activation=False).pvs()
    except Exception as e:  # a broken device must not break the listing
        log.warning("Cannot list PVs: %s", e)
        return {}
    return {dev: f"lvm:{vg}" if vg else "lvm" for dev, vg in pvs.items()}


class App:
    def __init__(self, cfg: config_mod.Config, api: schema.Schema | None = None) -> None:
        self.config = cfg
        self.schema = api or load_schema()
        self.storage = storage_api.StorageAPI.from_config(cfg)
        self.image_ops = image_ops.ImageOps(self.storage, cfg.irs.copy_rate_limit_mb)
        self.virt = virt_api.API(
            self.storage,
            virt_api.Config(
                libvirt_uri=cfg.libvirt.uri,
                accel=cfg.vm.accel,
                monitor_interval=cfg.thinp.monitor_interval,
                utilization_percent=cfg.irs.volume_utilization_percent,
                chunk_mb=cfg.irs.volume_utilization_chunk_mb,
            ),
        )
        self.storage.error_code = self.schema.code_of
        self.host = host.HostAPI(self.virt.connection.get, self.modes, lvm_users)
        self.dispatcher = dispatch.Dispatcher(
            self.schema, [self.host, self.storage, self.image_ops, self.virt]
        )

    def modes(self) -> dict[str, Any]:
        return {
            "clusterLock": clusterlock.resolve_mode(self.config.sanlock.cluster_lock),
            "activation": effective_activation(self.config.lvm.activation),
        }

    def start(self) -> None:
        """Reconnect the pool this host was in, then recover running VMs."""
        self.storage.recover()
        self.virt.start()

    def stop(self) -> None:
        self.virt.stop()
        self.storage.close()
