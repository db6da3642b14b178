"""storage.volume_jobs: the jobs of Volume.create and Volume.delete, run
directly on real file and block domains (their tasks: test_api.py)."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import pytest

from storage import api as api_mod
from storage import errors, job, jobs, qemuimg, resource, task, volume, volume_jobs
from tests.storage.conftest import requires_root
from tests.storage.domain_helpers import create_volume, domain_state, make_pool, new_id

pytest_plugins = ["tests.storage.domain_fixtures"]

pytestmark = requires_root

MiB = 1024**2


class Run:
    """A job's context outside a task manager, recording progress."""

    def __init__(self, recovering: bool = False) -> None:
        self.progress: list[float] = []
        self.task = task.Task(new_id(), "Volume.create", None)
        self.ctx = task.Context(self.task, lambda _, pct: self.progress.append(pct), recovering)


def create_job(provider: api_mod.StorageAPI, pool_id: str, sd_id: str, img: str, vol: str,
               parent: str = volume.BLANK_UUID, **services: Any) -> volume_jobs.CreateVolume:
    params = volume_jobs.create_params(pool_id, sd_id, img, vol, 16 * MiB, volume.COW,
                                       volume.SPARSE, parent_id=parent, description="job")
    svc = dataclasses.replace(provider.job_services, **services)
    made = jobs.build(volume_jobs.CREATE, svc, params)
    assert isinstance(made, volume_jobs.CreateVolume)
    return made


def delete_job(provider: api_mod.StorageAPI, pool_id: str, sd_id: str, img: str,
               vol: str) -> volume_jobs.DeleteVolume:
    made = jobs.build(volume_jobs.DELETE, provider.job_services,
                      volume_jobs.delete_params(pool_id, sd_id, img, vol))
    assert isinstance(made, volume_jobs.DeleteVolume)
    return made


def info(provider: api_mod.StorageAPI, pool_id: str, sd_id: str, img: str,
         vol: str) -> tuple[str, str]:
    got = provider.volume_get_info(pool_id, sd_id, img, vol)
    return got["voltype"], got["legality"]


@pytest.fixture
def chain(api: api_mod.StorageAPI, domain_factory: Any) -> tuple[str, str, str, str]:
    """(pool, domain, image, base volume): a pool with one volume, SPM."""
    sd_id = domain_factory(api)
    pool_id = make_pool(api, sd_id)
    img, base = new_id(), new_id()
    create_volume(api, pool_id, sd_id, img, base, 16 * MiB)
    return pool_id, sd_id, img, base


def test_create_makes_a_legal_leaf_over_its_parent(api: api_mod.StorageAPI,
                                                   chain: tuple[str, str, str, str]) -> None:
    pool_id, sd_id, img, base = chain
    vol = new_id()
    created = create_job(api, pool_id, sd_id, img, vol, parent=base)
    run = Run()
    created.run(run.ctx)
    assert created.created
    assert run.progress == [100]
    assert info(api, pool_id, sd_id, img, vol) == (volume.LEAF, volume.LEGAL)
    assert info(api, pool_id, sd_id, img, base) == (volume.INTERNAL, volume.LEGAL)
    assert api.volume_get_info(pool_id, sd_id, img, vol)["description"] == "job"


def test_create_stopped_before_it_starts_touches_nothing(
    api: api_mod.StorageAPI, chain: tuple[str, str, str, str]
) -> None:
    pool_id, sd_id, img, base = chain
    before = domain_state(api, sd_id)
    created = create_job(api, pool_id, sd_id, img, new_id(), parent=base)
    run = Run()
    run.task.aborted.set()
    with pytest.raises(errors.TaskAborted):
        created.run(run.ctx)
    created.rollback(run.ctx)  # nothing was made: nothing to undo
    assert not created.created
    assert domain_state(api, sd_id) == before


def test_rollback_of_a_stopped_create_removes_the_volume(
    api: api_mod.StorageAPI, chain: tuple[str, str, str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Task.stop while qemu-img create runs: the finished volume is undone."""
    pool_id, sd_id, img, base = chain
    before = domain_state(api, sd_id)
    vol = new_id()
    created = create_job(api, pool_id, sd_id, img, vol, parent=base)
    run = Run()
    real = qemuimg.create

    def stopping(*args: Any, **kwargs: Any) -> None:
        run.task.aborted.set()
        real(*args, **kwargs)

    monkeypatch.setattr(qemuimg, "create", stopping)
    with pytest.raises(errors.TaskAborted):
        created.run(run.ctx)
    assert created.created
    created.rollback(run.ctx)
    assert domain_state(api, sd_id) == before
    assert info(api, pool_id, sd_id, img, base) == (volume.LEAF, volume.LEGAL)
    with pytest.raises(errors.VolumeDoesNotExist):
        api.volume_get_info(pool_id, sd_id, img, vol)


def test_recovery_rollback_removes_the_volume_whatever_it_got_to(
    api: api_mod.StorageAPI, chain: tuple[str, str, str, str]
) -> None:
    """After a restart the rebuilt job does not know what the crashed run
    made: a volume with its id in its image is its own."""
    pool_id, sd_id, img, base = chain
    before = domain_state(api, sd_id)
    vol = new_id()
    create_job(api, pool_id, sd_id, img, vol, parent=base).run(Run().ctx)
    link = api.images.link_path(sd_id, img, vol)  # a prepare the crash left behind
    os.makedirs(os.path.dirname(link), exist_ok=True)
    os.symlink("/nonexistent", link)
    rebuilt = create_job(api, pool_id, sd_id, img, vol, parent=base)
    assert not rebuilt.created
    rebuilt.rollback(Run(recovering=True).ctx)
    assert domain_state(api, sd_id) == before
    assert info(api, pool_id, sd_id, img, base) == (volume.LEAF, volume.LEGAL)
    assert not os.path.lexists(link)


def test_recovery_rollback_spares_a_volume_of_another_image(
    api: api_mod.StorageAPI, chain: tuple[str, str, str, str]
) -> None:
    pool_id, sd_id, img, base = chain
    before = domain_state(api, sd_id)
    rebuilt = create_job(api, pool_id, sd_id, new_id(), base)  # base's id, another image
    rebuilt.rollback(Run(recovering=True).ctx)
    assert domain_state(api, sd_id) == before
    assert info(api, pool_id, sd_id, img, base) == (volume.LEAF, volume.LEGAL)


def test_delete_removes_the_leaf_and_running_it_again_is_harmless(
    api: api_mod.StorageAPI, chain: tuple[str, str, str, str]
) -> None:
    pool_id, sd_id, img, base = chain
    before = domain_state(api, sd_id)
    vol = new_id()
    create_volume(api, pool_id, sd_id, img, vol, 16 * MiB, parent=base)
    deleting = delete_job(api, pool_id, sd_id, img, vol)
    run = Run()
    deleting.run(run.ctx)
    assert run.progress == [100]
    assert domain_state(api, sd_id) == before
    assert info(api, pool_id, sd_id, img, base) == (volume.LEAF, volume.LEGAL)
    # Rerun after a restart: the volume is already gone.
    again = Run()
    delete_job(api, pool_id, sd_id, img, vol).run(again.ctx)
    assert again.progress == []
    assert domain_state(api, sd_id) == before


def test_jobs_hold_their_image_exclusively(api: api_mod.StorageAPI,
                                           chain: tuple[str, str, str, str]) -> None:
    pool_id, sd_id, img, base = chain
    before = domain_state(api, sd_id)
    created = create_job(api, pool_id, sd_id, img, new_id(), parent=base, lock_timeout=0.2)
    assert created.locks() == job.image_locks(sd_id, img, resource.EXCLUSIVE)
    assert delete_job(api, pool_id, sd_id, img, base).locks() == created.locks()
    with api.lock_image(sd_id, img, resource.SHARED):  # e.g. Image.prepare in progress
        with pytest.raises(errors.ResourceTimeout):
            created.run(Run().ctx)
    assert not created.created
    assert domain_state(api, sd_id) == before
