"""storage.jobs: the one table of job kinds, what the task manager is built
from, both for a verb's submission and for a new SPM's recovery."""

from __future__ import annotations

import collections.abc
import json
import os
import shutil
import tempfile
from typing import Any

import pytest
import yaml

from storage import (
    clone,
    errors,
    image,
    image_delete,
    job,
    jobs,
    resource,
    sd,
    sync,
    task,
    task_manager,
    volume_jobs,
)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WAIT = 60
SD, DST, IMG, VOL = (f"00000000-0000-4000-8000-00000000000{n}" for n in range(1, 5))

# Minimal params of each kind, as their verbs persist them.
PARAMS: dict[str, dict[str, Any]] = {
    volume_jobs.CREATE: volume_jobs.create_params("p", SD, IMG, VOL, 1024**2, "COW", "SPARSE"),
    volume_jobs.DELETE: volume_jobs.delete_params("p", SD, IMG, VOL),
    clone.KIND: {"src_sd": SD, "dst_sd": DST, "img": IMG, "vols": [VOL], "submitted": 0},
    sync.KIND: sync.make_params(SD, DST, IMG, sync.ALL),
    image_delete.KIND: image_delete.make_params(SD, IMG),
}


class MissingDomains:
    """A domain getter for which every domain is gone; records what was asked."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    def __call__(self, sd_id: str) -> sd.StorageDomain:
        self.asked.append(sd_id)
        raise errors.StorageDomainDoesNotExist(sd_id=sd_id)


@pytest.fixture
def workdir() -> collections.abc.Iterator[str]:
    path = tempfile.mkdtemp(prefix="test-jobs-", dir="/var/tmp")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def services(workdir: str, domains: job.DomainGetter, **kw: Any) -> job.Services:
    return job.Services(domains, image.ImageManager(os.path.join(workdir, "run")),
                        resource.Manager(), lock_timeout=5.0, **kw)


def test_every_kind_is_declared_once_and_names_its_job() -> None:
    names = [kind.name for kind in jobs.KINDS]
    assert len(names) == len(set(names))
    assert set(names) == set(PARAMS)
    for kind in jobs.KINDS:
        assert kind.job.kind == kind.name  # type: ignore[attr-defined]
        assert jobs.get(kind.name) is kind
    with pytest.raises(KeyError):
        jobs.get("image.unknown")


def test_every_kind_serves_a_schema_verb() -> None:
    with open(os.path.join(REPO, "vdsm_lsm", "api.yml")) as f:
        verbs = yaml.safe_load(f)["verbs"]
    for kind in jobs.KINDS:
        assert kind.verb in verbs, kind


def test_recoveries_are_as_documented() -> None:
    recovery = {kind.name: kind.recovery for kind in jobs.KINDS}
    assert recovery == {
        "volume.create": task.ROLLBACK,
        "volume.delete": task.RERUN,
        "image.cloneStructure": task.ROLLBACK,
        "image.syncData": task.RERUN,
        "image.delete": task.RERUN,
    }
    with pytest.raises(ValueError):
        jobs.Kind("x", "X.y", volume_jobs.CreateVolume, "retry")


def test_build_and_task_kinds_make_the_same_job(workdir: str) -> None:
    svc = services(workdir, MissingDomains(), copy_rate_limit_bps=3 * 1024**2)
    bound = jobs.task_kinds(svc)
    assert set(bound) == set(PARAMS)
    for name, params in PARAMS.items():
        built = jobs.build(name, svc, params)
        rebuilt = bound[name].factory(json.loads(json.dumps(params)))
        assert type(built) is type(rebuilt) is jobs.get(name).job
        assert isinstance(rebuilt, job.Job)
        assert (rebuilt.kind, rebuilt.params, rebuilt.services) == (name, params, svc)
        assert bound[name].recovery == jobs.get(name).recovery
    # The sync copies at the services' rate limit.
    syncing = jobs.build(sync.KIND, svc, PARAMS[sync.KIND])
    assert isinstance(syncing, sync.SyncJob)
    assert syncing.rate_limit_bps == 3 * 1024**2
    unlimited = jobs.build(sync.KIND, services(workdir, MissingDomains()), PARAMS[sync.KIND])
    assert isinstance(unlimited, sync.SyncJob)
    assert unlimited.rate_limit_bps is None


def test_a_new_spm_recovers_each_kind_as_the_table_says(workdir: str) -> None:
    """Tasks of every kind left running by a crash: a manager built from the
    table rebuilds each job with its services, rolls back the rollback kinds
    (TaskInterrupted) and runs the rerun kinds again (here they fail: the
    domains are gone, and say so)."""
    store_dir = os.path.join(workdir, "tasks")
    os.makedirs(store_dir)
    ids = {}
    for n, (name, params) in enumerate(PARAMS.items()):
        task_id = f"10000000-0000-4000-8000-00000000000{n}"
        ids[name] = task_id
        record = {"id": task_id, "verb": jobs.get(name).verb, "state": task.RUNNING,
                  "result": "", "code": "", "message": "", "progress": 50,
                  "job": {"kind": name, "params": params}, "created": 0, "updated": 0}
        with open(os.path.join(store_dir, task_id + ".task"), "w") as f:
            json.dump(record, f)

    domains = MissingDomains()
    manager = task_manager.TaskManager(workers=2, store_dir=store_dir,
                                       kinds=jobs.task_kinds(services(workdir, domains)))
    try:
        assert sorted(manager.recover()) == sorted(ids.values())
        statuses = {name: manager.wait(task_id, timeout=WAIT) for name, task_id in ids.items()}
    finally:
        manager.shutdown(wait=True)

    for name, status in statuses.items():
        assert (status["taskState"], status["taskResult"]) == (
            task.FINISHED, task.CLEAN_FAILURE), name
        expected = "TaskInterrupted" if jobs.get(name).recovery == task.ROLLBACK else (
            "StorageDomainDoesNotExist")
        assert status["code"] == expected, (name, status)
        assert manager.get_info(ids[name])["verb"] == jobs.get(name).verb
    # Every job reached storage through the services' domain getter.
    assert set(domains.asked) <= {SD, DST}
    assert len(domains.asked) >= len(PARAMS)
