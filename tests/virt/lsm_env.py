"""Real storage for live storage migration tests: one pool, two domains.

:class:`LsmEnv` is a :class:`tests.virt.storage_env.StorageEnv` on the
source domain (``sd_id``) of a pool that also holds a destination domain
(``dst_sd_id``, of the same or another type), with the SPM image verbs
(``Image.cloneStructure`` / ``syncData`` / ``delete`` through
``storage.image_ops.ImageOps``) and the whole storage interface virt uses
(prepare with ``allow_illegal``, ``unsynced_volumes``,
``set_volume_legality``; ``is_spm`` from StorageEnv), the changing calls
logged like StorageEnv's.

:func:`make_lsm_env` returns the env and a clean-up function that
deactivates every volume, removes the VGs and detaches the loop devices,
also after a failed test.
"""

from __future__ import annotations

import contextlib
import logging
import os
import uuid
from collections.abc import Callable, Iterator
from typing import Any

from storage import api as storage_api
from storage import commands, image_ops, sd
from tests.storage import domain_helpers
from tests.virt import storage_env

log = logging.getLogger("tests.virt.lsm_env")

GiB = 1024**3


class LsmEnv(storage_env.StorageEnv):
    def __init__(self, *args: Any, dst_sd_id: str, dst_type: str, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.dst_sd_id = dst_sd_id
        self.dst_type = dst_type
        self.ops = image_ops.ImageOps(self.provider)

    # The storage interface virt uses.

    def prepare(
        self, pool_id: str, sd_id: str, img_id: str, vol_id: str, allow_illegal: bool = False
    ) -> dict[str, Any]:
        self.calls.append(("prepare", vol_id))
        return self.provider.prepare(pool_id, sd_id, img_id, vol_id, allow_illegal=allow_illegal)

    def unsynced_volumes(
        self, pool_id: str, sd_id: str, img_id: str, vol_id: str
    ) -> list[dict[str, str]]:
        return self.provider.unsynced_volumes(pool_id, sd_id, img_id, vol_id)

    def set_volume_legality(
        self, pool_id: str, sd_id: str, img_id: str, vol_id: str, legal: bool
    ) -> None:
        self.calls.append(("legal" if legal else "illegal", vol_id))
        self.provider.set_volume_legality(pool_id, sd_id, img_id, vol_id, legal)

    # The engine's SPM verbs.

    def clone(self, img_id: str) -> None:
        task_id = self.ops.image_clone_structure(img_id, self.pool_id, self.sd_id, self.dst_sd_id)
        self._wait(task_id)

    def sync(self, img_id: str, sync_type: str = "INTERNAL") -> None:
        task_id = self.ops.image_sync_data(
            img_id, self.pool_id, self.sd_id, self.dst_sd_id, sync_type
        )
        self._wait(task_id)

    def delete_image(self, sd_id: str, img_id: str) -> None:
        self._wait(self.ops.image_delete(img_id, self.pool_id, sd_id))

    def _wait(self, task_id: str) -> None:
        status = domain_helpers.run_task(self.provider, task_id)
        assert status["taskResult"] == "success", status
        self.provider.task_clear(task_id)

    # Destination helpers.

    def disk(self, img_id: str, vol_id: str, dst: bool = False) -> dict[str, str]:
        """A DriveSpecVolume (srcDisk / dstDisk of diskReplicateStart/Finish)."""
        return {
            "poolID": self.pool_id,
            "domainID": self.dst_sd_id if dst else self.sd_id,
            "imageID": img_id,
            "volumeID": vol_id,
            "device": "disk",
        }

    def legality(self, sd_id: str, img_id: str, vol_id: str) -> str:
        return str(self.provider.volume_get_info(self.pool_id, sd_id, img_id, vol_id)["legality"])

    def dst_link_path(self, img_id: str, vol_id: str) -> str:
        return self.provider.images.link_path(self.dst_sd_id, img_id, vol_id)

    def dst_refs(self, img_id: str, vol_id: str) -> int:
        return self.provider.images.refs(self.dst_sd_id, img_id, vol_id)

    @contextlib.contextmanager
    def dst_prepared(self, img_id: str, vol_id: str) -> Iterator[str]:
        """The destination volume prepared for a with block; its link path."""
        self.provider.prepare(self.pool_id, self.dst_sd_id, img_id, vol_id)
        try:
            yield self.dst_link_path(img_id, vol_id)
        finally:
            self.provider.teardown(self.pool_id, self.dst_sd_id, img_id, vol_id)


def make_lsm_env(
    workdir: str, src_type: str, dst_type: str
) -> tuple[LsmEnv, Callable[[], None]]:
    """A connected pool of two domains (source, destination), SPM on this host."""
    run_dir = os.path.join(workdir, "run")
    provider = storage_api.StorageAPI(run_dir, **storage_env.PROVIDER_OPTIONS)
    devices: list[str] = []
    backing: list[str] = []
    src_id, dst_id = str(uuid.uuid4()), str(uuid.uuid4())
    env = LsmEnv(
        workdir, src_type, provider, "", src_id, devices, dst_sd_id=dst_id, dst_type=dst_type
    )

    def cleanup() -> None:
        storage_env.release(env.providers, devices, backing)

    def create_domain(sd_id: str, domain_type: str, name: str) -> None:
        if domain_type == sd.FILE:
            path = os.path.join(workdir, name)
            os.makedirs(path)
            provider.storage_domain_create(sd_id, sd.FILE, {"path": path}, f"lsm-{name}")
            return
        path = os.path.join(workdir, f"{name}-pv.img")
        with open(path, "wb") as f:
            f.truncate(2 * GiB)
        backing.append(path)
        dev = commands.run(["losetup", "--find", "--show", path]).stdout.decode().strip()
        devices.append(dev)
        provider.storage_domain_create(sd_id, sd.BLOCK, {"devices": [dev]}, f"lsm-{name}")

    try:
        create_domain(src_id, src_type, "src")
        create_domain(dst_id, dst_type, "dst")
        env.pool_id = domain_helpers.make_pool(provider, src_id, [src_id, dst_id])
    except BaseException:
        cleanup()
        raise
    return env, cleanup
