"""Real storage for virt tests: a file or block domain in a pool, through storage's API.

:class:`StorageEnv` wraps a ``storage.api.StorageAPI`` (the object the daemon
passes to virt as its storage interface) connected to a pool of one domain,
with this host as SPM and the local cluster lock. Volumes are made with
``Volume.create`` tasks; a block domain lives on a loop device (and its
volumes are activated in loop mode on hosts without device-mapper).

:meth:`StorageEnv.restart` is the storage side of a daemon restart: the old
provider is closed, a new one on the same run dir reconnects the pool and
holds no references until someone prepares again (:meth:`StorageEnv.reopen`
alone when the old daemon was killed in another process).

:func:`make_env` returns the env and a clean-up function that deactivates
every volume, removes the VG and detaches the loop device, also after a
failed test.
"""

from __future__ import annotations

import contextlib
import logging
import os
import uuid
from collections.abc import Callable, Iterator
from typing import Any

from storage import api as storage_api
from storage import commands, sd, volume
from tests.storage import conftest as storage_conftest
from tests.storage import domain_fixtures, domain_helpers

log = logging.getLogger("tests.virt.storage_env")

MiB = 1024**2
GiB = 1024**3
PROVIDER_OPTIONS: dict[str, Any] = {
    "chunk_mb": 8,
    "cluster_lock_mode": "local",
    "block_extent_size_mb": 4,
    "task_workers": 2,
}


class StorageEnv:
    def __init__(
        self,
        workdir: str,
        domain_type: str,
        provider: storage_api.StorageAPI,
        pool_id: str,
        sd_id: str,
        devices: list[str],
    ) -> None:
        self.workdir = workdir
        self.domain_type = domain_type
        self.provider = provider
        self.pool_id = pool_id
        self.sd_id = sd_id
        self.devices = devices
        self.volumes: list[tuple[str, str]] = []
        self.providers = [provider]
        self.calls: list[tuple[str, str]] = []  # ("prepare" | "teardown", vol_id)

    @property
    def run_dir(self) -> str:
        return self.provider.run_dir

    # What virt calls: the provider's own prepare/teardown (the daemon hands
    # virt the provider itself), with a log of the calls.

    def prepare(self, pool_id: str, sd_id: str, img_id: str, vol_id: str) -> dict[str, Any]:
        self.calls.append(("prepare", vol_id))
        return self.provider.prepare(pool_id, sd_id, img_id, vol_id)

    def teardown(self, pool_id: str, sd_id: str, img_id: str, vol_id: str) -> None:
        self.calls.append(("teardown", vol_id))
        self.provider.teardown(pool_id, sd_id, img_id, vol_id)

    # The SPM-request path (virt/storage_iface.py): in-process, this host is
    # SPM unless a test says otherwise (spm = False: an HSM's answer).

    spm = True

    def is_spm(self, pool_id: str) -> bool:
        return self.spm and self.provider.is_spm(pool_id)

    # Test helpers

    def create(
        self,
        img_id: str,
        vol_id: str,
        size: int,
        fmt: str = volume.COW,
        parent: str | None = None,
        initial_size: int | None = None,
    ) -> None:
        """Volume.create as the engine does it (SPM task), waited for."""
        prealloc = volume.PREALLOCATED if fmt == volume.RAW and self.is_block else volume.SPARSE
        domain_helpers.create_volume(
            self.provider,
            self.pool_id,
            self.sd_id,
            img_id,
            vol_id,
            size,
            fmt=fmt,
            prealloc=prealloc,
            parent=parent or domain_helpers.BLANK,
            initial_size=initial_size,
        )
        self.volumes.append((img_id, vol_id))

    def new_image(self, size: int = 64 * MiB, initial_size: int | None = None) -> tuple[str, str]:
        img_id, vol_id = str(uuid.uuid4()), str(uuid.uuid4())
        self.create(img_id, vol_id, size, initial_size=initial_size)
        return img_id, vol_id

    @property
    def is_block(self) -> bool:
        return self.domain_type == sd.BLOCK

    def drive(self, img_id: str, vol_id: str, fmt: str = "cow") -> dict[str, str]:
        """A VM.create drive spec for the volume."""
        return {
            "poolID": self.pool_id,
            "domainID": self.sd_id,
            "imageID": img_id,
            "volumeID": vol_id,
            "device": "disk",
            "iface": "virtio",
            "format": fmt,
            "propagateErrors": "off",
        }

    def link_path(self, img_id: str, vol_id: str) -> str:
        return self.provider.images.link_path(self.sd_id, img_id, vol_id)

    def volume_path(self, img_id: str, vol_id: str) -> str:
        """Where the volume's data is (file) or its active device (block)."""
        return os.path.realpath(self.link_path(img_id, vol_id))

    @contextlib.contextmanager
    def prepared(self, img_id: str, vol_id: str) -> Iterator[str]:
        """The volume prepared for the duration of a with block; its data path."""
        self.provider.prepare(self.pool_id, self.sd_id, img_id, vol_id)
        try:
            yield os.path.realpath(self.link_path(img_id, vol_id))
        finally:
            self.provider.teardown(self.pool_id, self.sd_id, img_id, vol_id)

    def refs(self, img_id: str, vol_id: str) -> int:
        return self.provider.images.refs(self.sd_id, img_id, vol_id)

    def held(self) -> dict[str, int]:
        """References held on the volumes made here, by volume id."""
        held = {}
        for img_id, vol_id in self.volumes:
            n = self.refs(img_id, vol_id)
            if n:
                held[vol_id] = n
        return held

    def close(self) -> None:
        """The daemon goes away: tasks stop, the SPM lease is released; volumes stay active."""
        self.provider.close()

    def reopen(self, spm: bool = False) -> StorageEnv:
        """The storage of a restarted daemon: same run dir, pool reconnected, no references."""
        provider = storage_api.StorageAPI(self.run_dir, **PROVIDER_OPTIONS)
        self.providers.append(provider)
        provider.recover()
        if spm:
            provider.storage_pool_spm_start(self.pool_id)
        env = StorageEnv(
            self.workdir, self.domain_type, provider, self.pool_id, self.sd_id, self.devices
        )
        env.volumes = self.volumes
        env.providers = self.providers
        return env

    def restart(self, spm: bool = False) -> StorageEnv:
        self.close()
        return self.reopen(spm)

    def set_illegal(self, img_id: str, vol_id: str) -> None:
        dom = self.provider.domain(self.pool_id, self.sd_id)
        dom.manifest.volume(img_id, vol_id).set_legality(volume.ILLEGAL)


def make_env(workdir: str, domain_type: str) -> tuple[StorageEnv, Callable[[], None]]:
    """A connected pool with one domain of domain_type, SPM on this host."""
    run_dir = os.path.join(workdir, "run")
    provider = storage_api.StorageAPI(run_dir, **PROVIDER_OPTIONS)
    devices: list[str] = []
    backing: list[str] = []
    sd_id = str(uuid.uuid4())
    env = StorageEnv(workdir, domain_type, provider, "", sd_id, devices)

    def cleanup() -> None:
        release(env.providers, devices, backing)

    try:
        if domain_type == sd.FILE:
            path = os.path.join(workdir, "mnt")
            os.makedirs(path)
            provider.storage_domain_create(sd_id, sd.FILE, {"path": path}, "virt-file")
        else:
            path = os.path.join(workdir, "pv.img")
            with open(path, "wb") as f:
                f.truncate(2 * GiB)
            backing.append(path)
            dev = commands.run(["losetup", "--find", "--show", path]).stdout.decode().strip()
            devices.append(dev)
            provider.storage_domain_create(sd_id, sd.BLOCK, {"devices": [dev]}, "virt-block")
        env.pool_id = domain_helpers.make_pool(provider, sd_id)
    except BaseException:
        cleanup()
        raise
    return env, cleanup


def release(
    providers: list[storage_api.StorageAPI], devices: list[str], backing: list[str]
) -> None:
    """Undo an env: clean every provider's storage, then the loop devices and files."""
    for p in reversed(providers):
        try:
            domain_fixtures.cleanup(p)
        except Exception:
            log.exception("Storage clean-up failed")
    for dev in devices:
        for child in storage_conftest.stacked_loop_devices(dev):
            log.error("Loop device %s left over %s", child, dev)
            commands.run(["losetup", "--detach", child], check=False)
    if devices:
        storage_conftest.wipe_lvm(devices)
    for dev in devices:
        commands.run(["losetup", "--detach", dev], check=False)
    for path in backing:
        os.unlink(path)
