"""storage.task: a task's status and persisted record, job kinds, a job's context.

The task manager that runs tasks is tested in test_task_manager.py.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from storage import errors, task

TASK_ID = "7d4bdb4e-8a4c-4bc4-9f3b-0c5c1c1e2f10"


class PersistedJob:
    kind = "marker"

    def __init__(self, params: dict[str, Any]) -> None:
        self.params = params

    def run(self, ctx: task.Context) -> None:
        pass

    def rollback(self, ctx: task.Context) -> None:
        pass


class MemoryJob:
    kind = None

    def __init__(self, params: dict[str, Any]) -> None:
        self.params = params

    def run(self, ctx: task.Context) -> None:
        pass

    def rollback(self, ctx: task.Context) -> None:
        pass


def test_a_new_task_is_queued_with_no_result() -> None:
    t = task.Task(TASK_ID, "Volume.create", PersistedJob({}))
    assert t.status() == {"taskID": TASK_ID, "taskState": task.INIT, "taskResult": "",
                          "code": "", "message": "", "progress": 0}
    assert t.info() == {"id": TASK_ID, "verb": "Volume.create"}
    assert not t.finished


def test_status_code_is_the_error_name() -> None:
    t = task.Task(TASK_ID, "Image.syncData", PersistedJob({}))
    t.state, t.result = task.FINISHED, task.CLEAN_FAILURE
    t.code, t.message = errors.TaskAborted.name, "stopped"
    status = t.status()
    assert (status["code"], status["message"]) == ("TaskAborted", "stopped")
    assert "error" not in status  # the rpc layer adds the name beside the number
    assert t.finished


def test_record_round_trip_keeps_every_field() -> None:
    t = task.Task(TASK_ID, "Image.cloneStructure", PersistedJob({"img": "i", "vols": ["a"]}))
    t.state, t.result, t.code, t.message, t.progress = (
        task.CLEANING, "", "VolumeAlreadyExists", "exists", 40)
    record = json.loads(json.dumps(t.record()))  # what the store writes is JSON
    assert record["job"] == {"kind": "marker", "params": {"img": "i", "vols": ["a"]}}
    assert record["updated"] >= record["created"]

    loaded = task.Task.from_record(record)
    assert loaded.status() == t.status()
    assert loaded.info() == t.info()
    assert loaded.created == t.created
    assert loaded.job is None  # recovery rebuilds it from job_record
    assert loaded.job_record == record["job"]
    # Saved again before its job is rebuilt, the job is not lost.
    assert loaded.record()["job"] == record["job"]


def test_a_job_without_kind_is_not_persisted() -> None:
    t = task.Task(TASK_ID, "Volume.create", MemoryJob({"x": 1}))
    assert t.record()["job"] is None


def test_record_of_an_old_file_gets_defaults() -> None:
    loaded = task.Task.from_record({"id": TASK_ID})
    assert loaded.status() == {"taskID": TASK_ID, "taskState": task.INIT, "taskResult": "",
                               "code": "", "message": "", "progress": 0}
    assert loaded.verb == ""


def test_job_kind_refuses_an_unknown_recovery() -> None:
    assert task.JobKind(PersistedJob).recovery == task.ROLLBACK
    assert task.JobKind(PersistedJob, task.RERUN).recovery == task.RERUN
    with pytest.raises(ValueError, match="retry"):
        task.JobKind(PersistedJob, "retry")


def test_context_reports_progress_and_abort() -> None:
    t = task.Task(TASK_ID, "Image.syncData", PersistedJob({}))
    seen: list[tuple[str, float]] = []
    ctx = task.Context(t, lambda reported, pct: seen.append((reported.id, pct)))
    assert (ctx.task_id, ctx.verb, ctx.recovering) == (TASK_ID, "Image.syncData", False)
    ctx.progress(12.5)
    assert seen == [(TASK_ID, 12.5)]
    ctx.check_abort()  # not stopped: nothing
    t.aborted.set()
    assert ctx.aborted.is_set()
    with pytest.raises(errors.TaskAborted) as e:
        ctx.check_abort()
    assert e.value.name == "TaskAborted"
    assert task.Context(t, lambda *_: None, recovering=True).recovering
