"""storage.image_ops: what the image verbs check before a task exists, and
which job they submit, on real domains (the jobs themselves: test_clone.py,
test_sync.py, test_image_delete.py).

ImageOps runs here on :class:`Recorder`, a storage (image_ops.Storage) that
answers with the real provider's domains and prepared images but records
the jobs instead of running them, and reports the task states a test sets.
"""

from __future__ import annotations

import collections.abc
from typing import Any

import pytest

from storage import clone, errors, image_delete, image_ops, sd, sync, task
from tests.storage import conftest
from tests.storage import image_env as ie

pytestmark = [conftest.requires_root, pytest.mark.timeout(300)]


class Recorder:
    """image_ops.Storage over a real provider; submit_job only records."""

    def __init__(self, env: ie.Env) -> None:
        self.env = env
        self.images = env.storage.images
        self.submitted: list[tuple[str, str, dict[str, Any]]] = []
        self.states: dict[str, str] = {}

    def spm_domain(self, pool_id: str, sd_id: str) -> sd.StorageDomain:
        return self.env.storage.spm_domain(pool_id, sd_id)

    def submit_job(self, pool_id: str, kind: str, params: dict[str, Any]) -> str:
        task_id = ie.new_id()
        self.submitted.append((pool_id, kind, params))
        self.states[task_id] = task.INIT
        return task_id

    def task_state(self, task_id: str) -> str | None:
        return self.states.get(task_id)


@pytest.fixture(scope="module")
def env() -> collections.abc.Iterator[ie.Env]:
    with ie.real_storage() as (workdir, make_loop_device), \
            ie.make_env(workdir, make_loop_device) as e:
        yield e


@pytest.fixture(scope="module")
def source(env: ie.Env) -> ie.Chain:
    """A chain on f1, never changed by the tests."""
    return env.make_chain(env.domains["f1"], ie.standard_layers()[:2])


@pytest.fixture(scope="module")
def cloned(env: ie.Env, source: ie.Chain) -> str:
    """The source's image cloned (really) to f2; the destination's id."""
    dst = env.domains["f2"]
    env.clone(env.ops(), source, dst)
    return dst


@pytest.fixture
def recorder(env: ie.Env) -> Recorder:
    return Recorder(env)


def test_clone_submits_its_job_with_the_source_chain(
    env: ie.Env, source: ie.Chain, recorder: Recorder
) -> None:
    dst = env.domains["b1"]
    ops = image_ops.ImageOps(recorder)
    task_id = ops.image_clone_structure(source.img_id, env.pool_id, source.sd_id, dst)
    [(pool_id, kind, params)] = recorder.submitted
    assert (pool_id, kind) == (env.pool_id, clone.KIND)
    assert {k: v for k, v in params.items() if k != "submitted"} == {
        "src_sd": source.sd_id, "dst_sd": dst, "img": source.img_id, "vols": source.vol_ids,
    }
    assert task_id in recorder.states
    assert env.dom(dst).manifest.list_volumes(source.img_id) == []  # nothing ran


def test_a_second_clone_waits_for_the_first_to_finish(
    env: ie.Env, source: ie.Chain, recorder: Recorder
) -> None:
    dst = env.domains["b1"]
    ops = image_ops.ImageOps(recorder)
    first = ops.image_clone_structure(source.img_id, env.pool_id, source.sd_id, dst)
    for state in (task.INIT, task.RUNNING, task.CLEANING):
        recorder.states[first] = state
        with pytest.raises(errors.VolumeAlreadyExists) as e:
            ops.image_clone_structure(source.img_id, env.pool_id, source.sd_id, dst)
        assert first in str(e.value)
    # Another destination is another clone.
    ops.image_clone_structure(source.img_id, env.pool_id, source.sd_id, env.domains["b2"])
    recorder.states[first] = task.FINISHED  # e.g. failed and rolled back
    second = ops.image_clone_structure(source.img_id, env.pool_id, source.sd_id, dst)
    del recorder.states[second]  # cleared, or lost with the SPM role
    ops.image_clone_structure(source.img_id, env.pool_id, source.sd_id, dst)
    assert [kind for _, kind, _ in recorder.submitted] == [clone.KIND] * 4


def test_sync_and_delete_submit_their_jobs(
    env: ie.Env, source: ie.Chain, cloned: str, recorder: Recorder
) -> None:
    ops = image_ops.ImageOps(recorder)
    for sync_type in sync.SYNC_TYPES:
        ops.image_sync_data(source.img_id, env.pool_id, source.sd_id, cloned, sync_type)
    ops.image_delete(source.img_id, env.pool_id, cloned)
    assert recorder.submitted == [
        *[(env.pool_id, sync.KIND, sync.make_params(source.sd_id, cloned, source.img_id, t))
          for t in sync.SYNC_TYPES],
        (env.pool_id, image_delete.KIND, image_delete.make_params(cloned, source.img_id)),
    ]


def test_what_is_invalid_on_its_face_is_refused_before_any_task(
    env: ie.Env, source: ie.Chain, cloned: str, recorder: Recorder
) -> None:
    ops = image_ops.ImageOps(recorder)
    pool, src, img = env.pool_id, source.sd_id, source.img_id
    unknown = ie.new_id()
    refusals: list[tuple[type[Exception], collections.abc.Callable[[], object]]] = [
        (errors.SameSourceAndDestination, lambda: ops.image_clone_structure(img, pool, src, src)),
        (errors.SameSourceAndDestination,
         lambda: ops.image_sync_data(img, pool, src, src, sync.ALL)),
        (errors.ImageDoesNotExistInSD,
         lambda: ops.image_clone_structure(unknown, pool, src, cloned)),
        (errors.VolumeAlreadyExists, lambda: ops.image_clone_structure(img, pool, src, cloned)),
        (errors.ImageDoesNotExistInSD,  # not cloned there yet
         lambda: ops.image_sync_data(img, pool, src, env.domains["b2"], sync.ALL)),
        (errors.InvalidSyncType, lambda: ops.image_sync_data(img, pool, src, cloned, "all")),
        (errors.ImageDoesNotExistInSD, lambda: ops.image_delete(unknown, pool, cloned)),
        (errors.StorageDomainDoesNotExist,
         lambda: ops.image_clone_structure(img, pool, src, unknown)),
        (errors.StoragePoolUnknown, lambda: ops.image_delete(img, unknown, cloned)),
    ]
    for error, call in refusals:
        with pytest.raises(error):
            call()
    assert recorder.submitted == []


def test_an_image_in_use_is_neither_overwritten_nor_deleted(
    env: ie.Env, source: ie.Chain, cloned: str, recorder: Recorder
) -> None:
    ops = image_ops.ImageOps(recorder)
    env.storage.prepare(env.pool_id, cloned, source.img_id, source.leaf, allow_illegal=True)
    try:
        for sync_type in (sync.ALL, sync.LEAF):
            with pytest.raises(errors.VolumeIsBusy):
                ops.image_sync_data(source.img_id, env.pool_id, source.sd_id, cloned, sync_type)
        with pytest.raises(errors.VolumeIsBusy):
            ops.image_delete(source.img_id, env.pool_id, cloned)
        # INTERNAL leaves the leaf (the mirror's) alone.
        ops.image_sync_data(source.img_id, env.pool_id, source.sd_id, cloned, sync.INTERNAL)
    finally:
        env.storage.teardown(env.pool_id, cloned, source.img_id, source.leaf)
    assert [kind for _, kind, _ in recorder.submitted] == [sync.KIND]


def test_only_the_spm_serves_the_image_verbs(env: ie.Env, source: ie.Chain, cloned: str) -> None:
    ops = image_ops.ImageOps(env.storage)
    pool, src, img = env.pool_id, source.sd_id, source.img_id
    env.storage.storage_pool_spm_stop(pool)
    try:
        with pytest.raises(errors.SpmStatusError):
            ops.image_clone_structure(img, pool, src, env.domains["b1"])
        with pytest.raises(errors.SpmStatusError):
            ops.image_sync_data(img, pool, src, cloned, sync.ALL)
        with pytest.raises(errors.SpmStatusError):
            ops.image_delete(img, pool, cloned)
    finally:
        env.storage.storage_pool_spm_start(pool)
    assert env.storage.host_get_all_tasks_statuses() == {}
