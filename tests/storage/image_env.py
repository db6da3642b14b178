"""Real storage for the image verbs' tests: a connected pool, SPM, with two
file and two block (LVM on loop devices, loop activation) domains, and
chains of volumes with data written by ``qemu-io``.

Used by test_clone.py, test_sync.py, test_image_delete.py and test_image_ops.py.  Everything
is made with the real StorageAPI and removed at the end (the pool is
destroyed, the domains formatted), also when a test fails; the loop
devices and files are the shared fixtures' (tests/storage/conftest.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from storage import api, commands, image_ops, job, jobs, qemuimg, sd, volume
from tests.storage import conftest

log = logging.getLogger("tests.storage.image_env")

MiB = 1024**2
KiB = 1024
BLANK = volume.BLANK_UUID
WAIT = 120  # generous bound for "eventually"; nothing asserts on timing

CAPACITY = 64 * MiB
# Domains by role: "f1", "f2" file; "b1", "b2" block.
ROLES = ("f1", "f2", "b1", "b2")


@dataclasses.dataclass
class Layer:
    """One volume of a test chain and the qemu-io commands that fill it."""

    vol_id: str
    format: str
    ops: list[str]
    cluster_size: int | None = None


@dataclasses.dataclass
class Chain:
    img_id: str
    sd_id: str
    layers: list[Layer]

    @property
    def vol_ids(self) -> list[str]:
        return [layer.vol_id for layer in self.layers]

    @property
    def leaf(self) -> str:
        return self.layers[-1].vol_id


def standard_layers() -> list[Layer]:
    """RAW base + 3 COW layers, each with its own pattern, zero clusters and
    discarded ranges; one layer with 128 KiB clusters."""
    return [
        Layer(new_id(), volume.RAW, [
            "write -P 0x11 0 8M",
            "write -P 0x12 32M 4M",
            "write -P 0x13 60M 4M",
            "write -z 33M 1M",
            "discard 61M 1M",
        ]),
        Layer(new_id(), volume.COW, [
            "write -P 0x21 4M 8M",
            "write -z 0 1M",  # zero clusters over the base's data
            "write -P 0x22 32M 2M",
            "discard 33M 512k",  # a discarded range over the base's data
        ], cluster_size=128 * KiB),
        Layer(new_id(), volume.COW, [
            "write -P 0x31 20M 2M",
            "write -z 40M 2M",  # zero clusters over nothing
            "write -P 0x32 62M 1M",
        ]),
        Layer(new_id(), volume.COW, [
            "write -P 0x41 1M 1M",
            "write -P 0x42 50M 3M",
            "write -z 60M 64k",
        ]),
    ]


def new_id() -> str:
    return str(uuid.uuid4())


class Env:
    """A StorageAPI with a pool of four domains, this host its SPM."""

    def __init__(self, storage: api.StorageAPI, pool_id: str, domains: dict[str, str],
                 workdir: str) -> None:
        self.storage = storage
        self.pool_id = pool_id
        self.domains = domains  # role -> sd_id
        self.workdir = workdir

    def ops(self, copy_rate_limit_mb: int = 0) -> image_ops.ImageOps:
        """The image verbs; with a rate limit, the syncs they submit copy at
        that rate (as a daemon with [irs] copy_rate_limit_mb does)."""
        if not copy_rate_limit_mb:
            return image_ops.ImageOps(self.storage)
        return image_ops.ImageOps(RateLimited(self.storage, copy_rate_limit_mb * MiB))

    def job(self, kind: str, params: dict[str, Any]) -> job.Job:
        """A job of kind as the provider builds it (storage.jobs)."""
        return jobs.build(kind, self.storage.job_services, params)

    def dom(self, sd_id: str) -> sd.StorageDomain:
        return self.storage.cache.get(sd_id)

    # Tasks.

    def wait(self, task_id: str) -> dict[str, Any]:
        assert self.storage.pool(self.pool_id).tasks is not None
        self.storage.pool(self.pool_id).tasks.wait(task_id, timeout=WAIT)
        return self.storage.task_get_status(task_id)

    def run(self, task_id: str) -> dict[str, Any]:
        """Wait for a task that must succeed; clear it."""
        status = self.wait(task_id)
        assert status["taskResult"] == "success", status
        self.storage.task_clear(task_id)
        return status

    # Chains.

    def make_chain(self, sd_id: str, layers: list[Layer] | None = None,
                   capacity: int = CAPACITY) -> Chain:
        """Create the volumes (the domain's own code) and write their data."""
        layers = layers if layers is not None else standard_layers()
        img_id = new_id()
        dom = self.dom(sd_id)
        parent = BLANK
        for layer in layers:
            prealloc = volume.SPARSE
            if layer.format == volume.RAW and dom.domain_type == sd.BLOCK:
                prealloc = volume.PREALLOCATED
            dom.create_volume(self.storage.images, img_id, layer.vol_id, capacity, layer.format,
                              prealloc, parent_id=parent, description=f"layer {layer.vol_id[:8]}",
                              cluster_size=layer.cluster_size)
            if layer.ops:
                with self.prepared(sd_id, img_id, layer.vol_id) as path:
                    qemu_io(path, qemuimg_format(layer.format), *layer.ops)
            parent = layer.vol_id
        return Chain(img_id, sd_id, layers)

    @contextlib.contextmanager
    def prepared(self, sd_id: str, img_id: str, vol_id: str,
                 allow_illegal: bool = True) -> Iterator[str]:
        dom = self.dom(sd_id)
        with self.storage.images.prepared(dom, img_id, vol_id, allow_illegal=allow_illegal) as p:
            yield p["path"]

    @contextlib.contextmanager
    def prepared_chain(self, sd_id: str, img_id: str, vol_id: str) -> Iterator[list[str]]:
        dom = self.dom(sd_id)
        with self.storage.images.prepared(dom, img_id, vol_id, allow_illegal=True) as p:
            yield [entry["path"] for entry in p["chain"]]

    def metadata(self, sd_id: str, img_id: str) -> dict[str, volume.Metadata]:
        return self.dom(sd_id).manifest.image_metadata(img_id)

    def legality(self, sd_id: str, img_id: str) -> dict[str, str]:
        return {v: md.legality for v, md in self.metadata(sd_id, img_id).items()}

    def clone(self, ops: image_ops.ImageOps, chain: Chain, dst: str) -> dict[str, Any]:
        return self.run(ops.image_clone_structure(chain.img_id, self.pool_id, chain.sd_id, dst))

    def sync(self, ops: image_ops.ImageOps, chain: Chain, dst: str,
             sync_type: str) -> dict[str, Any]:
        return self.run(
            ops.image_sync_data(chain.img_id, self.pool_id, chain.sd_id, dst, sync_type)
        )


class RateLimited:
    """The storage of an ImageOps whose jobs copy at rate_limit_bps, for a
    slow sync on the module's shared provider (storage.image_ops.Storage)."""

    def __init__(self, storage: api.StorageAPI, rate_limit_bps: int) -> None:
        self.storage = storage
        self.images = storage.images
        self.services = dataclasses.replace(
            storage.job_services, copy_rate_limit_bps=rate_limit_bps
        )

    def spm_domain(self, pool_id: str, sd_id: str) -> sd.StorageDomain:
        return self.storage.spm_domain(pool_id, sd_id)

    def task_state(self, task_id: str) -> str | None:
        return self.storage.task_state(task_id)

    def submit_job(self, pool_id: str, kind: str, params: dict[str, Any]) -> str:
        tasks = self.storage.spm_pool(pool_id).spm_tasks()
        return tasks.submit(jobs.get(kind).verb, jobs.build(kind, self.services, params))


@contextlib.contextmanager
def real_storage() -> Iterator[tuple[str, Callable[[int], str]]]:
    """(workdir, make_loop_device(size)) for a whole test module: like the
    shared fixtures storage_tmpdir and loop_device_factory (which are per
    test), with the same clean-up and leak checks."""
    workdir = tempfile.mkdtemp(prefix="vdsm-lsm-test-", dir=conftest.VAR_TMP)
    made: list[str] = []

    def make_loop_device(size: int) -> str:
        path = os.path.join(workdir, f"disk{len(made)}.img")
        with open(path, "wb") as f:
            f.truncate(size)
        dev = commands.run(["losetup", "--find", "--show", path]).stdout.decode().strip()
        made.append(dev)
        return dev

    try:
        yield workdir, make_loop_device
    finally:
        leaks = [child for dev in made for child in conftest.stacked_loop_devices(dev)]
        for child in leaks:
            commands.run(["losetup", "--detach", child], check=False)
        if made:
            conftest.wipe_lvm(made)
        for dev in made:
            commands.run(["losetup", "--detach", dev], check=False)
        shutil.rmtree(workdir, ignore_errors=True)
        if leaks:
            pytest.fail(f"loop devices leaked over test devices: {leaks}", pytrace=False)


@contextlib.contextmanager
def make_env(workdir: str, loop_device_factory: Callable[[int], str],
             block_size: int = 2 * 1024 * MiB) -> Iterator[Env]:
    run_dir = os.path.join(workdir, "run")
    storage = api.StorageAPI(
        run_dir,
        chunk_mb=16,
        activation_mode="loop",
        cluster_lock_mode="local",
        block_extent_size_mb=4,
        oop_timeout=60.0,
        resource_timeout=60.0,
    )
    pool_id = new_id()
    domains: dict[str, str] = {}
    try:
        for role in ROLES:
            sd_id = new_id()
            if role.startswith("f"):
                path = os.path.join(workdir, role)
                os.mkdir(path)
                storage.storage_domain_create(sd_id, sd.FILE, {"path": path}, role)
            else:
                dev = loop_device_factory(block_size)
                storage.storage_domain_create(sd_id, sd.BLOCK, {"devices": [dev]}, role)
            domains[role] = sd_id
        master = domains["f1"]
        storage.storage_pool_create(pool_id, "pool", master, list(domains.values()))
        storage.storage_pool_connect(pool_id, 1, master)
        storage.storage_pool_spm_start(pool_id)
        yield Env(storage, pool_id, domains, workdir)
    finally:
        _teardown(storage, pool_id, domains)


def _teardown(storage: api.StorageAPI, pool_id: str, domains: dict[str, str]) -> None:
    """Undo make_env, best effort, so the shared fixtures find no leak."""
    images = storage.images
    for key in list(images._prepared):  # a test that failed while prepared
        sd_id, img_id, vol_id = key
        while images.is_prepared(sd_id, img_id, vol_id) and images._prepared.get(key):
            try:
                images.teardown(storage.cache.get(sd_id), img_id, vol_id)
            except Exception:
                log.exception("Cannot tear down %s", key)
                break
    with contextlib.suppress(Exception):
        p = storage.pool(pool_id)
        if p.tasks is not None:
            for task_id in p.tasks.unfinished():
                with contextlib.suppress(Exception):
                    p.tasks.stop(task_id)
            for task_id in list(p.tasks.all_info()):
                with contextlib.suppress(Exception):
                    p.tasks.wait(task_id, timeout=WAIT)
    try:
        storage.storage_pool_destroy(pool_id)
    except Exception:
        log.exception("Cannot destroy pool %s", pool_id)
        with contextlib.suppress(Exception):
            storage.storage_pool_disconnect(pool_id, 1, domains["f1"])
    for sd_id in domains.values():
        try:
            storage.storage_domain_format(sd_id)
        except Exception:
            log.exception("Cannot format domain %s", sd_id)
    storage.close()


# qemu-img / qemu-io helpers.


def qemuimg_format(fmt: str) -> str:
    return volume.QEMU_FORMAT[fmt]


def qemu_io(path: str, fmt: str, *ops: str) -> None:
    cmd = ["qemu-io", "-f", fmt]
    for op in ops:
        cmd += ["-c", op]
    commands.run([*cmd, path])


def own_extents(path: str, fmt: str = qemuimg.QCOW2) -> list[tuple[int, int, bool, bool]]:
    """(start, length, data, zero) of what the layer at path itself holds,
    neighbours of the same kind joined."""
    result: list[tuple[int, int, bool, bool]] = []
    for e in qemuimg.map(path, fmt=fmt):
        if e["depth"] != 0 or not e.get("present", True):
            continue
        if result:
            start, length, data, zero = result[-1]
            if start + length == e["start"] and (data, zero) == (e["data"], e["zero"]):
                result[-1] = (start, length + e["length"], data, zero)
                continue
        result.append((e["start"], e["length"], e["data"], e["zero"]))
    return result


def data_extents(path: str, fmt: str) -> list[tuple[int, int]]:
    """(start, length) of the ranges of a layer that hold data."""
    return [(s, n) for s, n, data, _ in own_extents(path, fmt) if data]


def qemu_img_pids(path_part: str) -> list[int]:
    """Pids of running qemu-img processes whose command line mentions path_part."""
    pids = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if argv and os.path.basename(argv[0]) == b"qemu-img" and any(
            path_part.encode() in a for a in argv
        ):
            pids.append(int(name))
    return pids


def cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode() for a in f.read().split(b"\0") if a]
    except OSError:
        return []


def check_layers(env: Env, chain: Chain, dst: str, vol_ids: list[str]) -> None:
    """Each of vol_ids on dst reads like the source (with its chain) and
    holds what the source layer holds: same clusters (COW), same data or
    less, zeros left out (a RAW base)."""
    top = max(chain.vol_ids.index(v) for v in vol_ids)
    top_id = chain.vol_ids[top]
    with env.prepared_chain(chain.sd_id, chain.img_id, top_id) as src_paths, \
            env.prepared_chain(dst, chain.img_id, top_id) as dst_paths:
        for vol_id in vol_ids:
            i = chain.vol_ids.index(vol_id)
            layer = chain.layers[i]
            fmt = qemuimg_format(layer.format)
            assert qemuimg.compare(src_paths[i], dst_paths[i], fmt, fmt), vol_id
            if layer.format == volume.COW:
                assert own_extents(dst_paths[i]) == own_extents(src_paths[i]), vol_id
                report = qemuimg.check(dst_paths[i], force_share=True)
                assert report["check-errors"] == 0 and "corruptions" not in report
            elif env.dom(dst).domain_type == sd.FILE:
                src_data = data_extents(src_paths[i], fmt)
                for start, length in data_extents(dst_paths[i], fmt):
                    assert (start, length) == (0, 4096) or any(
                        s <= start and start + length <= s + n for s, n in src_data
                    ), (start, length, src_data)
