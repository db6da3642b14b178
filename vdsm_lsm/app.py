"""Wiring: builds the daemon's parts from the config and registers providers.

Packages depend downward only; this module is where they meet.  Each
package exposes a provider object whose methods serve schema verbs
(rpc.dispatch finds them by name); nothing here repeats the schema.

This is also the one place that reads the daemon's :class:`Config`: each
package gets its own settings built from it here (storage the keywords of
``StorageAPI``, virt a :class:`virt.api.Config` holding the watermark
monitor's :class:`virt.thinp.Config`), and passes them on as they are.
"""

from __future__ import annotations

import logging
from typing import Any

from rpc import dispatch, schema
from storage import activation, clusterlock, image_ops, lvm
from storage import api as storage_api
from vdsm_lsm import api_schema, host
from vdsm_lsm import config as config_mod
from virt import api as virt_api
from virt import thinp

log = logging.getLogger("vdsm_lsm.app")

SCHEMA_PATH = api_schema.SCHEMA_PATH


def load_schema() -> schema.Schema:
    return api_schema.load()


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


def storage_provider(cfg: config_mod.Config) -> storage_api.StorageAPI:
    """Storage from the [irs], [lvm] and [sanlock] sections."""
    irs = cfg.irs
    return storage_api.StorageAPI(
        irs.run_dir,
        # Where domains and the pool connection are remembered (empty:
        # <run_dir>/state; a persistent directory such as /var/lib/vdsm-lsm
        # survives a reboot).
        state_dir=irs.state_dir or None,
        chunk_mb=irs.volume_utilization_chunk_mb,
        activation_mode=cfg.lvm.activation,
        cluster_lock_mode=cfg.sanlock.cluster_lock,
        oop_timeout=irs.oop_timeout,
        task_workers=irs.task_workers,
        block_extent_size_mb=irs.block_extent_size_mb,
        copy_rate_limit_mb=irs.copy_rate_limit_mb,
    )


def virt_config(cfg: config_mod.Config) -> virt_api.Config:
    """Virt's settings from the [libvirt], [vm], [thinp] and [irs] sections."""
    return virt_api.Config(
        libvirt_uri=cfg.libvirt.uri,
        accel=cfg.vm.accel,
        thinp=thinp.Config(
            interval=cfg.thinp.monitor_interval,
            utilization_percent=cfg.irs.volume_utilization_percent,
            chunk_mb=cfg.irs.volume_utilization_chunk_mb,
        ),
    )


class App:
    def __init__(self, cfg: config_mod.Config, api: schema.Schema | None = None) -> None:
        self.config = cfg
        self.schema = api or load_schema()
        self.storage = storage_provider(cfg)
        self.image_ops = image_ops.ImageOps(self.storage)
        self.virt = virt_api.API(self.storage, virt_config(cfg))
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
