"""Helpers for tests of domains, volumes, images and pools (not fixtures)."""

from __future__ import annotations

import json
import os
import uuid
from typing import Any

from storage import api as api_mod
from storage import block_sd, commands, lvm_model, volume

MiB = 1024**2
GiB = 1024**3
BLANK = volume.BLANK_UUID
TASK_TIMEOUT = 120.0

# StorageAPI options of the tests: small extents and chunks, the local lock.
API_OPTIONS: dict[str, Any] = {
    "chunk_mb": 8,
    "cluster_lock_mode": "local",
    "block_extent_size_mb": 4,
    "oop_timeout": 60.0,
    "task_workers": 4,
    "resource_timeout": 60.0,
}


def new_id() -> str:
    return str(uuid.uuid4())


def make_pool(provider: api_mod.StorageAPI, master: str, domains: list[str] | None = None,
              host_id: int = 1, spm: bool = True, pool_id: str | None = None) -> str:
    pool_id = pool_id or new_id()
    assert provider.storage_pool_create(pool_id, "pool", master, domains or [master])
    assert provider.storage_pool_connect(pool_id, host_id, master)
    if spm:
        assert provider.storage_pool_spm_start(pool_id)
    return pool_id


def run_task(provider: api_mod.StorageAPI, task_id: str) -> dict[str, Any]:
    """Wait for a task to finish; its status as Task.getStatus answers it."""
    p = provider._pool
    assert p is not None and p.tasks is not None
    p.tasks.wait(task_id, timeout=TASK_TIMEOUT)
    return provider.task_get_status(task_id)


def create_volume(provider: api_mod.StorageAPI, pool_id: str, sd_id: str, img_id: str,
                  vol_id: str, size: int, fmt: str = volume.COW,
                  prealloc: str = volume.SPARSE, parent: str = BLANK,
                  initial_size: int | None = None, desc: str = "") -> dict[str, Any]:
    kw = {} if initial_size is None else {"initial_size": initial_size}
    task_id = provider.volume_create(
        pool_id, sd_id, img_id, vol_id, size, fmt, prealloc, desc,
        img_id if parent != BLANK else BLANK, parent, **kw,
    )
    status = run_task(provider, task_id)
    assert status["taskResult"] == "success", status
    return status


def lvs_of(provider: api_mod.StorageAPI, sd_id: str) -> dict[str, lvm_model.LV]:
    """The VG's LVs by name, read with lvm2 directly."""
    dom = provider.cache.get(sd_id)
    assert isinstance(dom, block_sd.BlockDomain)
    return {lv.name: lv for lv in dom.lvm.lvs(dom.vg)}


def file_tree(root: str) -> list[str]:
    """Every path under root (relative), to compare before and after."""
    result = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            result.append(os.path.relpath(os.path.join(dirpath, name), root))
    return sorted(result)


def domain_state(provider: api_mod.StorageAPI, sd_id: str) -> Any:
    """What is on storage: the file tree or the LVs with their tags and sizes
    (SPM task records, which come and go with tasks, left out)."""
    dom = provider.cache.get(sd_id)
    if isinstance(dom, block_sd.BlockDomain):
        return {n: (lv.size, lv.tags) for n, lv in lvs_of(provider, sd_id).items()}
    return [p for p in file_tree(dom.manifest.root) if not p.startswith("master/tasks/")]


def qemu_io(path: str, fmt: str, command: str, check: bool = True) -> str:
    """qemu-io's output (stdout and stderr); raises CommandFailed if check."""
    out = commands.run(["qemu-io", "-f", fmt, "-c", command, path], timeout=60, check=check)
    return out.stdout.decode() + out.stderr.decode()


def qemu_img_info(path: str) -> dict[str, Any]:
    out = commands.run(["qemu-img", "info", "-U", "--output", "json", path], timeout=60)
    return json.loads(out.stdout)
