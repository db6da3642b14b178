"""storage.sync (Image.syncData) on real file and block domains."""

from __future__ import annotations

import collections.abc
import threading
from typing import Any

import pytest

from storage import errors, image_delete, sd, sync, task, volume
from tests.storage import conftest
from tests.storage import image_env as ie

pytestmark = [conftest.requires_root, pytest.mark.timeout(300)]

DIRECTIONS = [("f1", "f2"), ("f1", "b1"), ("b1", "f1"), ("b1", "b2")]
LEGAL, ILLEGAL = volume.LEGAL, volume.ILLEGAL


@pytest.fixture(scope="module")
def env() -> collections.abc.Iterator[ie.Env]:
    """One pool for the module; each test makes or clones its own images."""
    with ie.real_storage() as (workdir, make_loop_device), \
            ie.make_env(workdir, make_loop_device) as e:
        yield e


@pytest.fixture(scope="module")
def sources(env: ie.Env) -> dict[str, ie.Chain]:
    """A standard chain on f1 and one on b1, never changed by the tests."""
    return {role: env.make_chain(env.domains[role]) for role in ("f1", "b1")}


def leave_garbage(env: ie.Env, sd_id: str) -> None:
    """Fill extents of a block domain with 0xee and free them again, so the
    next volume made there starts on garbage (an LV does not read as zeros)."""
    img_id, vol_id = ie.new_id(), ie.new_id()
    dom = env.dom(sd_id)
    dom.create_volume(env.storage.images, img_id, vol_id, ie.CAPACITY, volume.RAW,
                      volume.PREALLOCATED)
    with env.prepared(sd_id, img_id, vol_id) as path:
        ie.qemu_io(path, "raw", f"write -P 0xee 0 {ie.CAPACITY}")
    dom.delete_volume(env.storage.images, img_id, vol_id)


def reads_pattern(path: str, fmt: str, offset: int, length: int, pattern: int) -> bool:
    out = ie.commands.run(
        ["qemu-io", "-r", "-U", "-f", fmt, "-c", f"read -P {pattern} {offset} {length}", path]
    ).stdout.decode()
    return "Pattern verification failed" not in out


@pytest.mark.parametrize("src_role,dst_role", DIRECTIONS, ids=lambda r: r)
def test_sync_all_copies_every_layer_keeping_its_structure(
    env: ie.Env, sources: dict[str, ie.Chain], src_role: str, dst_role: str
) -> None:
    src, dst = env.domains[src_role], env.domains[dst_role]
    chain = sources[src_role]
    ops = env.ops()
    block_dst = env.dom(dst).domain_type == sd.BLOCK
    if block_dst:
        leave_garbage(env, dst)
    env.clone(ops, chain, dst)
    if block_dst:
        # The new base LV took the freed extents: garbage where the source
        # has zeros, which the sync must overwrite.
        with env.prepared(dst, chain.img_id, chain.vol_ids[0]) as path:
            assert reads_pattern(path, "raw", 16 * ie.MiB, ie.MiB, 0xEE)

    status = env.sync(ops, chain, dst, sync.ALL)

    assert status["progress"] == 100
    assert env.legality(dst, chain.img_id) == {v: LEGAL for v in chain.vol_ids}
    ie.check_layers(env, chain, dst, chain.vol_ids)
    assert set(env.legality(src, chain.img_id).values()) == {LEGAL}

    env.run(ops.image_delete(chain.img_id, env.pool_id, dst))


def test_internal_leaves_the_leaf_then_leaf_copies_only_it(
    env: ie.Env, sources: dict[str, ie.Chain]
) -> None:
    chain = sources["f1"]
    dst = env.domains["b2"]
    ops = env.ops()
    env.clone(ops, chain, dst)

    env.sync(ops, chain, dst, sync.INTERNAL)

    internal, leaf = chain.vol_ids[:-1], chain.leaf
    assert env.legality(dst, chain.img_id) == {**{v: LEGAL for v in internal}, leaf: ILLEGAL}
    ie.check_layers(env, chain, dst, internal)
    with env.prepared(dst, chain.img_id, leaf) as path:
        assert ie.own_extents(path) == []  # untouched: the mirror fills it

    env.sync(ops, chain, dst, sync.LEAF)

    assert env.legality(dst, chain.img_id) == {v: LEGAL for v in chain.vol_ids}
    ie.check_layers(env, chain, dst, chain.vol_ids)
    env.run(ops.image_delete(chain.img_id, env.pool_id, dst))


def test_leaf_copies_nothing_but_the_leaf(env: ie.Env, sources: dict[str, ie.Chain]) -> None:
    chain = sources["f1"]
    dst = env.domains["f2"]
    ops = env.ops()
    env.clone(ops, chain, dst)

    env.sync(ops, chain, dst, sync.LEAF)

    assert env.legality(dst, chain.img_id) == {
        **{v: ILLEGAL for v in chain.vol_ids[:-1]}, chain.leaf: LEGAL
    }
    with env.prepared_chain(dst, chain.img_id, chain.leaf) as paths:
        assert ie.data_extents(paths[0], "raw") in ([], [(0, 4096)])
        for path in paths[1:-1]:
            assert ie.own_extents(path) == []
        with env.prepared_chain(chain.sd_id, chain.img_id, chain.leaf) as src_paths:
            assert ie.own_extents(paths[-1]) == ie.own_extents(src_paths[-1])
    env.run(ops.image_delete(chain.img_id, env.pool_id, dst))


class RecordingContext:
    """What a job sees of its task (storage.task.Context), recording progress."""

    def __init__(self) -> None:
        self.task_id = ie.new_id()
        self.verb = "Image.syncData"
        self.aborted = threading.Event()
        self.recovering = False
        self.values: list[float] = []

    def progress(self, pct: float) -> None:
        self.values.append(pct)

    def check_abort(self) -> None:
        if self.aborted.is_set():
            raise errors.TaskAborted(task_id=self.task_id)


def test_progress_grows_across_layers_to_100(env: ie.Env, sources: dict[str, ie.Chain]) -> None:
    chain = sources["f1"]
    dst = env.domains["f2"]
    ops = env.ops()
    env.clone(ops, chain, dst)
    job = env.job(sync.KIND, sync.make_params(chain.sd_id, dst, chain.img_id, sync.ALL))
    ctx = RecordingContext()

    job.run(ctx)  # type: ignore[arg-type]

    assert ctx.values == sorted(ctx.values)
    assert ctx.values[-1] == pytest.approx(100.0)
    assert 0 <= ctx.values[0] < 100
    # Every layer ends at its own share, so there are steps between 0 and 100.
    assert len({round(v) for v in ctx.values}) >= len(chain.layers)
    env.run(ops.image_delete(chain.img_id, env.pool_id, dst))


def test_stop_kills_qemu_img_and_a_retry_completes(env: ie.Env) -> None:
    # 24 MiB in the base at 1 MiB/s: the copy runs long enough to stop it.
    layers = ie.standard_layers()[:3]
    layers[0].ops.append("write -P 0x14 40M 16M")
    chain = env.make_chain(env.domains["f1"], layers)
    dst = env.domains["f2"]
    slow = env.ops(copy_rate_limit_mb=1)
    env.clone(slow, chain, dst)
    tasks = env.storage.pool(env.pool_id).tasks
    assert tasks is not None
    dst_dir = env.dom(dst).manifest.image_dir(chain.img_id)  # type: ignore[attr-defined]
    link_dir = env.storage.images.image_dir(dst, chain.img_id)

    task_id = slow.image_sync_data(chain.img_id, env.pool_id, chain.sd_id, dst, sync.ALL)
    pids = _wait_for_qemu_img(link_dir, tasks, task_id)
    argv = ie.cmdline(pids[0])
    assert argv[argv.index("-r") + 1] == str(ie.MiB)  # the rate limit is passed
    seen = _wait_for_progress(tasks, task_id)
    tasks.stop(task_id)
    status = env.wait(task_id)

    assert status["taskResult"] == task.CLEAN_FAILURE
    assert status["code"] == errors.TaskAborted.name
    assert ie.qemu_img_pids(link_dir) == [] and ie.qemu_img_pids(dst_dir) == []
    assert all(0 <= p < 100 for p in seen) and seen == sorted(seen)
    # The interrupted base is not LEGAL; nothing after it was touched.
    assert env.legality(dst, chain.img_id) == {v: ILLEGAL for v in chain.vol_ids}
    assert not env.storage.images.is_prepared(dst, chain.img_id)

    env.storage.task_clear(task_id)
    ops = env.ops()
    env.sync(ops, chain, dst, sync.ALL)
    assert env.legality(dst, chain.img_id) == {v: LEGAL for v in chain.vol_ids}
    ie.check_layers(env, chain, dst, chain.vol_ids)
    env.run(ops.image_delete(chain.img_id, env.pool_id, dst))


def _wait_for_qemu_img(path_part: str, tasks: Any, task_id: str) -> list[int]:
    for _ in range(ie.WAIT * 20):
        pids = ie.qemu_img_pids(path_part)
        if pids:
            return pids
        assert tasks.get_status(task_id)["taskState"] != task.FINISHED, tasks.get_status(task_id)
        threading.Event().wait(0.05)
    raise AssertionError("qemu-img never started")


def _wait_for_progress(tasks: Any, task_id: str) -> list[int]:
    seen = []
    for _ in range(ie.WAIT * 20):
        status = tasks.get_status(task_id)
        seen.append(status["progress"])
        if status["progress"] > 0:
            return seen
        threading.Event().wait(0.05)
    raise AssertionError(f"no progress: {seen}")


def test_bad_input_is_refused_with_codes_before_any_task(
    env: ie.Env, sources: dict[str, ie.Chain]
) -> None:
    chain = sources["f1"]
    f2 = env.domains["f2"]
    ops = env.ops()
    tasks = env.storage.pool(env.pool_id).tasks
    assert tasks is not None
    known = set(tasks.all_info())
    images = {role: env.dom(sd_id).manifest.list_images() for role, sd_id in env.domains.items()}

    def sync_data(img_id: str, src: str, dst: str, sync_type: str = sync.ALL) -> str:
        return ops.image_sync_data(img_id, env.pool_id, src, dst, sync_type)

    with pytest.raises(errors.InvalidSyncType):
        sync_data(chain.img_id, chain.sd_id, f2, "SOME")
    with pytest.raises(errors.ImageDoesNotExistInSD):
        sync_data(ie.new_id(), chain.sd_id, f2)
    with pytest.raises(errors.SameSourceAndDestination):
        sync_data(chain.img_id, chain.sd_id, chain.sd_id)
    with pytest.raises(errors.ImageDoesNotExistInSD):  # not cloned there
        sync_data(chain.img_id, chain.sd_id, f2)
    with pytest.raises(errors.StorageDomainDoesNotExist):
        sync_data(chain.img_id, chain.sd_id, ie.new_id())
    assert set(tasks.all_info()) == known
    assert images == {
        role: env.dom(sd_id).manifest.list_images() for role, sd_id in env.domains.items()
    }


def test_sync_refuses_a_destination_of_another_structure(env: ie.Env) -> None:
    layers = ie.standard_layers()[:2]
    chain = env.make_chain(env.domains["f1"], layers)
    dst = env.domains["f2"]
    # Same image and base on the destination, another top volume.
    other = [ie.Layer(layers[0].vol_id, volume.RAW, []), ie.Layer(ie.new_id(), volume.COW, [])]
    dom = env.dom(dst)
    dom.create_volume(env.storage.images, chain.img_id, other[0].vol_id, ie.CAPACITY,
                      volume.RAW, volume.SPARSE)
    dom.create_volume(env.storage.images, chain.img_id, other[1].vol_id, ie.CAPACITY,
                      volume.COW, volume.SPARSE, parent_id=other[0].vol_id)
    ops = env.ops()

    with pytest.raises(errors.ImageStructureMismatch):
        ops.image_sync_data(chain.img_id, env.pool_id, chain.sd_id, dst, sync.ALL)
    env.run(ops.image_delete(chain.img_id, env.pool_id, dst))


def test_a_prepared_destination_leaf_is_only_synced_internally(
    env: ie.Env, sources: dict[str, ie.Chain]
) -> None:
    """During a mirror the destination leaf is in use: INTERNAL is what
    live migration runs; ALL and LEAF would overwrite the mirror's writes."""
    chain = sources["b1"]
    dst = env.domains["f1"]
    ops = env.ops()
    env.clone(ops, chain, dst)
    with env.prepared(dst, chain.img_id, chain.leaf):
        for sync_type in (sync.ALL, sync.LEAF):
            with pytest.raises(errors.VolumeIsBusy):
                ops.image_sync_data(chain.img_id, env.pool_id, chain.sd_id, dst, sync_type)
        env.sync(ops, chain, dst, sync.INTERNAL)
        # The mirror's reference is still held.
        assert env.storage.images.is_prepared(dst, chain.img_id, chain.leaf)
    assert env.legality(dst, chain.img_id)[chain.leaf] == ILLEGAL
    ie.check_layers(env, chain, dst, chain.vol_ids[:-1])
    env.run(ops.image_delete(chain.img_id, env.pool_id, dst))


def test_nothing_to_sync_internally_in_a_one_volume_image(env: ie.Env) -> None:
    chain = env.make_chain(env.domains["f1"], ie.standard_layers()[:1])
    dst = env.domains["f2"]
    ops = env.ops()
    env.clone(ops, chain, dst)

    env.sync(ops, chain, dst, sync.INTERNAL)
    assert env.legality(dst, chain.img_id) == {chain.leaf: ILLEGAL}

    env.sync(ops, chain, dst, sync.ALL)
    assert env.legality(dst, chain.img_id) == {chain.leaf: LEGAL}
    ie.check_layers(env, chain, dst, chain.vol_ids)
    env.run(ops.image_delete(chain.img_id, env.pool_id, dst))


def test_qcow2_base_is_copied_without_writing_zeros(env: ie.Env) -> None:
    layers = [
        ie.Layer(ie.new_id(), volume.COW, ["write -P 0x61 0 2M", "write -z 8M 1M"]),
        ie.Layer(ie.new_id(), volume.COW, ["write -P 0x62 1M 1M", "write -z 16M 1M"]),
    ]
    chain = env.make_chain(env.domains["f1"], layers)
    dst = env.domains["b1"]
    ops = env.ops()
    env.clone(ops, chain, dst)

    env.sync(ops, chain, dst, sync.ALL)

    ie.check_layers(env, chain, dst, chain.vol_ids[1:])
    with env.prepared_chain(chain.sd_id, chain.img_id, chain.leaf) as src_paths, \
            env.prepared_chain(dst, chain.img_id, chain.leaf) as dst_paths:
        assert ie.qemuimg.compare(src_paths[0], dst_paths[0], "qcow2", "qcow2")
        # The base's data clusters; its zero clusters need no copy (nothing
        # is under a base), so the destination leaves them unallocated.
        assert ie.data_extents(dst_paths[0], "qcow2") == ie.data_extents(src_paths[0], "qcow2")
        assert [e for e in ie.own_extents(dst_paths[0]) if not e[2]] == []
    env.run(ops.image_delete(chain.img_id, env.pool_id, dst))


def test_the_mirror_can_prepare_and_release_the_leaf_during_an_internal_sync(
    env: ie.Env,
) -> None:
    """INTERNAL holds the destination image shared: the replication's
    prepare/teardown of the leaf (shared) need not wait for the copy,
    while a deletion (exclusive) waits for it."""
    layers = ie.standard_layers()[:3]
    layers[0].ops.append("write -P 0x14 40M 16M")
    chain = env.make_chain(env.domains["f1"], layers)
    dst = env.domains["f2"]
    slow = env.ops(copy_rate_limit_mb=1)
    env.clone(slow, chain, dst)
    tasks = env.storage.pool(env.pool_id).tasks
    assert tasks is not None
    link_dir = env.storage.images.image_dir(dst, chain.img_id)

    task_id = slow.image_sync_data(chain.img_id, env.pool_id, chain.sd_id, dst, sync.INTERNAL)
    _wait_for_qemu_img(link_dir, tasks, task_id)
    env.storage.prepare(env.pool_id, dst, chain.img_id, chain.leaf, allow_illegal=True)
    env.storage.teardown(env.pool_id, dst, chain.img_id, chain.leaf)
    assert tasks.get_status(task_id)["taskState"] == task.RUNNING
    with pytest.raises(errors.ResourceTimeout):
        delete = env.job(image_delete.KIND, {"sd": dst, "img": chain.img_id})
        env.storage.resources.acquire(delete.locks(), timeout=0.5)

    tasks.stop(task_id)
    assert env.wait(task_id)["code"] == errors.TaskAborted.name
    env.storage.task_clear(task_id)
    env.run(slow.image_delete(chain.img_id, env.pool_id, dst))
