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
from storage import activation, clusterlock, image_ops, image_verify, leftovers, lvm
from storage import api as storage_api
from storage import mailbox as storage_mailbox
from vdsm_lsm import api_schema, events, host, peer
from vdsm_lsm import config as config_mod
from virt import api as virt_api
from virt import migration_job, pivot, thinp

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
    """Storage from the [irs], [lvm], [sanlock] and [mailbox] sections."""
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
        io_timeout=cfg.sanlock.io_timeout,
        mailbox=mailbox_settings(cfg),
    )


def mailbox_settings(cfg: config_mod.Config) -> storage_mailbox.Settings:
    """The storage mailbox's timing from the [mailbox] section."""
    mb = cfg.mailbox
    return storage_mailbox.Settings(
        idle_interval=mb.idle_interval,
        busy_interval=mb.busy_interval,
        reply_interval=mb.reply_interval,
        retry_interval=mb.retry_interval,
        request_timeout=mb.request_timeout,
        workers=mb.workers,
    )


def virt_config(cfg: config_mod.Config, drive_root: str = "") -> virt_api.Config:
    """Virt's settings from the [libvirt], [vm], [thinp], [irs] and [replication] sections."""
    return virt_api.Config(
        libvirt_uri=cfg.libvirt.uri,
        accel=cfg.vm.accel,
        thinp=thinp.Config(
            interval=cfg.thinp.monitor_interval,
            utilization_percent=cfg.irs.volume_utilization_percent,
            chunk_mb=cfg.irs.volume_utilization_chunk_mb,
        ),
        drive_root=drive_root,
        replication_api=cfg.replication.api,
        job_timeouts=pivot.Timeouts(
            job_stall=cfg.replication.job_stall_timeout,
            job_end=cfg.replication.job_end_timeout,
        ),
        libvirt_unavailable_wait=cfg.libvirt.unavailable_wait,
        migration=migration_job.Config(
            libvirt_uri=cfg.libvirt.migration_uri,
            socket_dir=cfg.libvirt.migration_socket_dir,
            destination_timeout=cfg.vm.migration_destination_timeout,
            peer_timeout=cfg.vm.migration_peer_timeout,
        ),
    )


class App:
    def __init__(self, cfg: config_mod.Config, api: schema.Schema | None = None) -> None:
        self.config = cfg
        self.schema = api or load_schema()
        self.storage = storage_provider(cfg)
        self.image_ops = image_ops.ImageOps(self.storage)
        self.image_verify = image_verify.ImageVerify(self.storage)
        # Recovery adopts only the VMs whose drives are this host's prepare links.
        self.virt = virt_api.API(
            self.storage, virt_config(cfg, drive_root=self.storage.images.root)
        )
        # Migrations reach the destination's daemon through the client (vdsm_lsm/peer.py).
        self.virt.outgoing.set_connect(peer.connector(cfg))
        self.host = host.HostAPI(self.virt.connection.get, self.modes, lvm_users)
        # What virt and storage report, pushed as the schema's events once the
        # daemon sets events.publish (its server's publish).
        self.events = events.Events(self.schema)
        self.virt.set_notifier(self.events)
        self.storage.on_task_finished = self.events.task_finished
        self.dispatcher = dispatch.Dispatcher(
            self.schema, [self.host, self.storage, self.image_ops, self.image_verify, self.virt]
        )

    def modes(self) -> dict[str, Any]:
        return {
            "clusterLock": clusterlock.resolve_mode(self.config.sanlock.cluster_lock),
            "activation": effective_activation(self.config.lvm.activation),
        }

    def start(self) -> None:
        """Reconnect the pool this host was in, then recover running VMs."""
        # issue 13: adopt what a previous life left attached, release the rest
        # once recovery re-prepared what is in use (storage/leftovers.py).
        leftovers.adopt(self.storage)
        self.storage.recover()
        self.virt.start()
        leftovers.release(self.storage)

    def stop(self) -> None:
        self.virt.stop()
        self.storage.close()
