"""storage.task_manager: the SPM task manager (states, rollback, stop, persistence,
recovery)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from common import errors as common_errors
from storage import errors, oop, task, task_manager, taskstore

PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WAIT = 60  # generous bound for "eventually"; nothing asserts on timing


class FakeVolumeExists(common_errors.Error):
    name = "VolumeAlreadyExists"
    msg = "Volume {vol} already exists"


class GateJob:
    """A job a test drives step by step with events."""

    kind = None
    params: dict[str, Any] = {}

    def __init__(self, error: Exception | None = None, rollback_error: Exception | None = None,
                 wait_abort: bool = False) -> None:
        self.error = error
        self.rollback_error = rollback_error
        self.wait_abort = wait_abort
        self.started = threading.Event()
        self.proceed = threading.Event()
        self.saw_abort = threading.Event()
        self.rolling_back = threading.Event()
        self.finish_rollback = threading.Event()
        self.finish_rollback.set()
        self.ran = False
        self.rolled_back = False

    def run(self, ctx: task.Context) -> None:
        self.ran = True
        ctx.progress(42)
        self.started.set()
        if self.wait_abort:
            ctx.aborted.wait()
            self.saw_abort.set()
        self.proceed.wait()
        ctx.check_abort()
        if self.error:
            raise self.error

    def rollback(self, ctx: task.Context) -> None:
        self.rolling_back.set()
        self.finish_rollback.wait()
        self.rolled_back = True
        if self.rollback_error:
            raise self.rollback_error


def wait_until(condition: Callable[[], bool]) -> None:
    pause = threading.Event()
    for _ in range(WAIT * 100):
        if condition():
            return
        pause.wait(0.01)
    raise AssertionError("condition never became true")


@pytest.fixture
def manager() -> Iterator[task_manager.TaskManager]:
    m = task_manager.TaskManager(workers=4)
    try:
        yield m
    finally:
        m.shutdown(wait=False, abort=True)


@pytest.fixture
def store_dir() -> Iterator[str]:
    path = tempfile.mkdtemp(prefix="test-task-", dir="/var/tmp")
    try:
        yield os.path.join(path, "tasks")
    finally:
        shutil.rmtree(path, ignore_errors=True)


def read_record(store_dir: str, task_id: str) -> dict[str, Any]:
    with open(os.path.join(store_dir, task_id + ".task")) as f:
        return json.load(f)


def test_lifecycle_success(manager: task_manager.TaskManager) -> None:
    job = GateJob()
    task_id = manager.submit("Volume.create", job)
    job.started.wait()
    status = manager.get_status(task_id)
    assert status == {"taskID": task_id, "taskState": "running", "taskResult": "",
                      "code": "", "message": "", "progress": 42}
    assert manager.get_info(task_id) == {"id": task_id, "verb": "Volume.create"}
    job.proceed.set()
    status = manager.wait(task_id, timeout=WAIT)
    assert status == {"taskID": task_id, "taskState": "finished", "taskResult": "success",
                      "code": "", "message": "", "progress": 100}
    assert not job.rolled_back
    assert manager.all_statuses() == {task_id: status}
    assert manager.all_info() == {task_id: {"id": task_id, "verb": "Volume.create"}}


def test_submit_with_given_id(manager: task_manager.TaskManager) -> None:
    job = GateJob()
    job.proceed.set()
    task_id = "7d4bdb4e-8a4c-4bc4-9f3b-0c5c1c1e2f10"
    assert manager.submit("Image.delete", job, task_id=task_id) == task_id
    manager.wait(task_id, timeout=WAIT)
    with pytest.raises(errors.AddTaskError):
        manager.submit("Image.delete", GateJob(), task_id=task_id)


def test_failure_runs_rollback_and_ends_clean_failure(manager: task_manager.TaskManager) -> None:
    job = GateJob(error=FakeVolumeExists(vol="v1"))
    job.finish_rollback.clear()
    task_id = manager.submit("Volume.create", job)
    job.proceed.set()
    job.rolling_back.wait()
    status = manager.get_status(task_id)
    assert status["taskState"] == "cleaning"
    assert status["taskResult"] == ""
    job.finish_rollback.set()
    status = manager.wait(task_id, timeout=WAIT)
    assert status["taskState"] == "finished"
    assert status["taskResult"] == "cleanFailure"
    assert status["code"] == "VolumeAlreadyExists"
    assert status["message"] == "Volume v1 already exists"
    assert job.rolled_back


def test_failed_rollback_still_clean_failure(manager: task_manager.TaskManager) -> None:
    job = GateJob(error=FakeVolumeExists(vol="v1"), rollback_error=OSError(5, "I/O error"))
    job.proceed.set()
    status = manager.wait(manager.submit("Volume.create", job), timeout=WAIT)
    assert status["taskResult"] == "cleanFailure"
    assert status["code"] == "VolumeAlreadyExists"
    assert "rollback failed" in status["message"]
    assert "I/O error" in status["message"]


def test_unexpected_exception_is_general_exception(manager: task_manager.TaskManager) -> None:
    job = GateJob(error=RuntimeError("boom"))
    job.proceed.set()
    status = manager.wait(manager.submit("Volume.create", job), timeout=WAIT)
    assert status["taskResult"] == "cleanFailure"
    assert status["code"] == "GeneralException"
    assert status["message"] == "boom"
    assert job.rolled_back


def test_stop_running_task(manager: task_manager.TaskManager) -> None:
    job = GateJob(wait_abort=True)
    task_id = manager.submit("Image.syncData", job)
    job.started.wait()
    manager.stop(task_id)
    job.saw_abort.wait()
    assert manager.get_status(task_id)["taskState"] == "aborting"
    manager.stop(task_id)  # already stopping: nothing more
    job.proceed.set()
    status = manager.wait(task_id, timeout=WAIT)
    assert status["taskState"] == "finished"
    assert status["taskResult"] == "cleanFailure"
    assert status["code"] == "TaskAborted"
    assert job.rolled_back


def test_stop_queued_task_never_runs() -> None:
    manager = task_manager.TaskManager(workers=1)
    try:
        first = GateJob()
        first_id = manager.submit("Volume.create", first)
        first.started.wait()
        second = GateJob()
        second_id = manager.submit("Volume.create", second)
        assert manager.get_status(second_id)["taskState"] == "init"
        manager.stop(second_id)
        status = manager.get_status(second_id)
        assert status["taskState"] == "finished"
        assert status["taskResult"] == "cleanFailure"
        assert status["code"] == "TaskAborted"
        first.proceed.set()
        manager.wait(first_id, timeout=WAIT)
        # A later task runs on the same single worker: the stopped one was skipped.
        third = GateJob()
        third.proceed.set()
        manager.wait(manager.submit("Volume.create", third), timeout=WAIT)
        assert not second.ran
    finally:
        manager.shutdown(wait=False, abort=True)


def test_stop_finished_task_is_a_no_op(manager: task_manager.TaskManager) -> None:
    job = GateJob()
    job.proceed.set()
    task_id = manager.submit("Volume.create", job)
    manager.wait(task_id, timeout=WAIT)
    manager.stop(task_id)
    assert manager.get_status(task_id)["taskResult"] == "success"


def test_clear_rules(manager: task_manager.TaskManager) -> None:
    with pytest.raises(errors.UnknownTask) as e:
        manager.clear("00000000-0000-4000-8000-000000000000")
    assert e.value.name == "UnknownTask"
    with pytest.raises(errors.UnknownTask):
        manager.get_status("00000000-0000-4000-8000-000000000000")
    with pytest.raises(errors.UnknownTask):
        manager.stop("00000000-0000-4000-8000-000000000000")

    job = GateJob()
    task_id = manager.submit("Volume.create", job)
    job.started.wait()
    with pytest.raises(errors.TaskNotFinished) as e:
        manager.clear(task_id)
    assert e.value.name == "TaskNotFinished"
    job.proceed.set()
    manager.wait(task_id, timeout=WAIT)
    manager.clear(task_id)
    with pytest.raises(errors.UnknownTask):
        manager.get_status(task_id)
    assert manager.all_statuses() == {}


def test_workers_are_bounded() -> None:
    workers = 2
    manager = task_manager.TaskManager(workers=workers)
    lock = threading.Lock()
    running = [0]
    peak = [0]
    release = threading.Event()

    class CountingJob:
        kind = None
        params: dict[str, Any] = {}

        def run(self, ctx: task.Context) -> None:
            with lock:
                running[0] += 1
                peak[0] = max(peak[0], running[0])
            release.wait()
            with lock:
                running[0] -= 1

        def rollback(self, ctx: task.Context) -> None:
            pass

    try:
        ids = [manager.submit("Volume.create", CountingJob()) for _ in range(workers + 5)]
        wait_until(lambda: running[0] == workers)
        states = sorted(manager.get_status(i)["taskState"] for i in ids)
        assert states == ["init"] * 5 + ["running"] * workers
        release.set()
        for i in ids:
            assert manager.wait(i, timeout=WAIT)["taskResult"] == "success"
        assert peak[0] == workers
    finally:
        release.set()
        manager.shutdown(wait=True)


def test_submit_after_shutdown_is_refused() -> None:
    manager = task_manager.TaskManager(workers=1)
    manager.shutdown()
    with pytest.raises(errors.AddTaskError):
        manager.submit("Volume.create", GateJob())


class MarkerJob:
    """Persistable job: creates a file (clone-like, rolled back on recovery)."""

    kind = "marker"

    def __init__(self, params: dict[str, Any]) -> None:
        self.params = params
        self.started = threading.Event()
        self.proceed = threading.Event()
        self.proceed.set()

    def run(self, ctx: task.Context) -> None:
        with open(self.params["path"], "w") as f:
            f.write("created")
        self.started.set()
        self.proceed.wait()

    def rollback(self, ctx: task.Context) -> None:
        if os.path.exists(self.params["path"]):
            os.unlink(self.params["path"])


class AppendJob:
    """Persistable job: appends a line (sync-like, re-run on recovery)."""

    kind = "append"

    def __init__(self, params: dict[str, Any]) -> None:
        self.params = params

    def run(self, ctx: task.Context) -> None:
        with open(self.params["log"], "a") as f:
            f.write("run\n")

    def rollback(self, ctx: task.Context) -> None:
        with open(self.params["log"], "a") as f:
            f.write("rollback\n")


# What a recovering manager is built with: how to rebuild each persisted kind.
KINDS = {
    "marker": task.JobKind(MarkerJob, task.ROLLBACK),
    "append": task.JobKind(AppendJob, task.RERUN),
}


def test_persisted_file_content(store_dir: str) -> None:
    manager = task_manager.TaskManager(workers=2, store_dir=store_dir, progress_interval=0)
    try:
        marker = os.path.join(os.path.dirname(store_dir), "marker")
        job = MarkerJob({"path": marker})
        job.proceed.clear()
        task_id = manager.submit("Image.cloneStructure", job)
        job.started.wait()
        record = read_record(store_dir, task_id)
        assert record["id"] == task_id
        assert record["verb"] == "Image.cloneStructure"
        assert record["state"] == "running"
        assert record["job"] == {"kind": "marker", "params": {"path": marker}}
        assert record["version"] == taskstore.RECORD_VERSION
        job.proceed.set()
        manager.wait(task_id, timeout=WAIT)
        record = read_record(store_dir, task_id)
        assert (record["state"], record["result"], record["progress"]) == (
            "finished", "success", 100)
        # Atomic writes leave no temp files behind.
        assert os.listdir(store_dir) == [task_id + ".task"]
        manager.clear(task_id)
        assert os.listdir(store_dir) == []
    finally:
        manager.shutdown(wait=False, abort=True)


def test_progress_is_saved(store_dir: str) -> None:
    manager = task_manager.TaskManager(workers=1, store_dir=store_dir, progress_interval=0)
    job = GateJob()
    try:
        task_id = manager.submit("Image.syncData", job)
        job.started.wait()
        assert read_record(store_dir, task_id)["progress"] == 42
    finally:
        job.proceed.set()
        manager.shutdown(wait=True)


def test_unserializable_params_refused(store_dir: str) -> None:
    manager = task_manager.TaskManager(workers=1, store_dir=store_dir)
    job = MarkerJob({"path": object()})
    with pytest.raises(errors.AddTaskError):
        manager.submit("Volume.create", job)
    assert manager.all_statuses() == {}
    manager.shutdown()


def test_save_failure_on_submit_refuses_task(store_dir: str) -> None:
    os.makedirs(os.path.dirname(store_dir), exist_ok=True)
    with open(store_dir, "w"):
        pass  # a file where the directory should be
    manager = task_manager.TaskManager(workers=1, store_dir=store_dir)
    with pytest.raises(errors.TaskMetaDataSaveError):
        manager.submit("Volume.create", MarkerJob({"path": "/nonexistent"}))
    assert manager.all_statuses() == {}
    manager.shutdown()


def test_store_through_oop_pool(store_dir: str) -> None:
    with oop.Pool(max_workers=1, timeout=30) as files:
        manager = task_manager.TaskManager(workers=1, store_dir=store_dir, files=files)
        log = os.path.join(os.path.dirname(store_dir), "log")
        task_id = manager.submit("Image.syncData", AppendJob({"log": log}))
        manager.wait(task_id, timeout=WAIT)
        manager.shutdown()
        assert read_record(store_dir, task_id)["result"] == "success"


def write_record(store_dir: str, task_id: str, state: str, kind: str | None,
                 params: dict[str, Any], **fields: Any) -> None:
    os.makedirs(store_dir, exist_ok=True)
    record = {"version": 1, "id": task_id, "verb": "Test.verb", "state": state, "result": "",
              "code": "", "message": "", "progress": 30, "created": 0, "updated": 0,
              "job": {"kind": kind, "params": params} if kind else None}
    record.update(fields)
    with open(os.path.join(store_dir, task_id + ".task"), "w") as f:
        json.dump(record, f)


def test_recover_after_simulated_crash(store_dir: str) -> None:
    base = os.path.dirname(store_dir)
    marker = os.path.join(base, "marker")
    open(marker, "w").close()
    log = os.path.join(base, "log")
    ids = {name: f"00000000-0000-4000-8000-00000000000{n}" for n, name in enumerate(
        ["clone", "sync", "done", "queued", "stopping", "unknown", "cleaning"])}
    write_record(store_dir, ids["clone"], "running", "marker", {"path": marker})
    write_record(store_dir, ids["sync"], "running", "append", {"log": log})
    write_record(store_dir, ids["done"], "finished", "append", {"log": log},
                 result="success", progress=100)
    write_record(store_dir, ids["queued"], "init", "marker", {"path": marker + ".q"})
    write_record(store_dir, ids["stopping"], "aborting", "append", {"log": log})
    write_record(store_dir, ids["unknown"], "running", "gone", {})
    write_record(store_dir, ids["cleaning"], "cleaning", "marker", {"path": marker + ".c"},
                 code="VolumeAlreadyExists", message="Volume v1 already exists")
    with open(os.path.join(store_dir, "corrupt.task"), "w") as f:
        f.write("{not json")

    manager = task_manager.TaskManager(workers=2, store_dir=store_dir, kinds=KINDS)
    try:
        recovered = manager.recover()
        assert sorted(recovered) == sorted(i for k, i in ids.items() if k != "done")
        statuses = {k: manager.wait(i, timeout=WAIT) for k, i in ids.items()}
        for s in statuses.values():
            assert s["taskState"] == "finished"

        assert statuses["done"]["taskResult"] == "success"
        # Rollback kind: undone, reported failed with a dedicated code.
        assert statuses["clone"]["taskResult"] == "cleanFailure"
        assert statuses["clone"]["code"] == "TaskInterrupted"
        assert not os.path.exists(marker)
        assert statuses["queued"]["code"] == "TaskInterrupted"
        # Rerun kind: ran again and finished.
        assert statuses["sync"]["taskResult"] == "success"
        assert statuses["sync"]["progress"] == 100
        # A stop in progress is completed, whatever the kind.
        assert statuses["stopping"]["taskResult"] == "cleanFailure"
        assert statuses["stopping"]["code"] == "TaskAborted"
        with open(log) as f:
            assert sorted(f.read().split()) == ["rollback", "run"]
        # No factory for the kind: reported failed.
        assert statuses["unknown"]["code"] == "TaskInterrupted"
        assert "gone" in statuses["unknown"]["message"]
        # Interrupted while cleaning: keeps the original failure.
        assert statuses["cleaning"]["code"] == "VolumeAlreadyExists"
        # The store says the same; the corrupt file is left for a person.
        assert read_record(store_dir, ids["clone"])["state"] == "finished"
        assert os.path.exists(os.path.join(store_dir, "corrupt.task"))
        # Recovering again adds nothing.
        assert manager.recover() == []
    finally:
        manager.shutdown(wait=True)


def test_detach_keeps_files_for_the_next_spm(store_dir: str) -> None:
    log = os.path.join(os.path.dirname(store_dir), "log")
    manager = task_manager.TaskManager(workers=1, store_dir=store_dir)
    task_id = manager.submit("Image.syncData", AppendJob({"log": log}))
    manager.wait(task_id, timeout=WAIT)
    manager.detach()
    assert manager.all_statuses() == {}
    with pytest.raises(errors.AddTaskError):
        manager.submit("Image.syncData", AppendJob({"log": log}))
    successor = task_manager.TaskManager(workers=1, store_dir=store_dir)
    assert successor.recover() == []
    assert successor.get_status(task_id)["taskResult"] == "success"
    successor.shutdown()


# A daemon stand-in: runs two persisted tasks and blocks in both, to be killed.
CRASHING_DAEMON = """
import sys, threading
from storage import task_manager

class Marker:
    kind = "marker"
    def __init__(self, params):
        self.params = params
    def run(self, ctx):
        with open(self.params["path"], "w") as f:
            f.write("created")
        print("started", ctx.task_id, flush=True)
        threading.Event().wait()
    def rollback(self, ctx):
        pass

class Append:
    kind = "append"
    def __init__(self, params):
        self.params = params
    def run(self, ctx):
        with open(self.params["log"], "a") as f:
            f.write("run\\n")
        print("started", ctx.task_id, flush=True)
        threading.Event().wait()
    def rollback(self, ctx):
        pass

manager = task_manager.TaskManager(workers=2, store_dir=sys.argv[1])
manager.submit("Image.cloneStructure", Marker({"path": sys.argv[2]}))
manager.submit("Image.syncData", Append({"log": sys.argv[3]}))
threading.Event().wait()
"""


def test_recover_after_kill_9(store_dir: str) -> None:
    base = os.path.dirname(store_dir)
    marker = os.path.join(base, "marker")
    log = os.path.join(base, "log")
    proc = subprocess.Popen([sys.executable, "-c", CRASHING_DAEMON, store_dir, marker, log],
                            cwd=PROJECT_ROOT, stdout=subprocess.PIPE, text=True)
    try:
        started = [proc.stdout.readline().split() for _ in range(2)]
        assert [s[0] for s in started] == ["started", "started"]
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
    assert os.path.exists(marker)
    records = {r["job"]["kind"]: r for r in taskstore.TaskStore(store_dir).load_all()}
    assert records["marker"]["state"] == "running"
    assert records["append"]["state"] == "running"

    manager = task_manager.TaskManager(workers=2, store_dir=store_dir, kinds=KINDS)
    try:
        assert len(manager.recover()) == 2
        clone = manager.wait(records["marker"]["id"], timeout=WAIT)
        assert (clone["taskState"], clone["taskResult"], clone["code"]) == (
            "finished", "cleanFailure", "TaskInterrupted")
        assert not os.path.exists(marker)
        sync = manager.wait(records["append"]["id"], timeout=WAIT)
        assert (sync["taskState"], sync["taskResult"]) == ("finished", "success")
        with open(log) as f:
            assert f.read().split() == ["run", "run"]
        assert manager.get_info(clone["taskID"]) == {
            "id": clone["taskID"], "verb": "Image.cloneStructure"}
    finally:
        manager.shutdown(wait=True)


def test_a_task_cleared_while_its_last_save_is_written_stays_cleared(store_dir: str) -> None:
    # The worker marks the task finished, then writes it: a caller polling
    # the state can clear it in between.  The file must not come back (a
    # restarted SPM would list the cleared task again).
    manager = task_manager.TaskManager(workers=1, store_dir=store_dir, progress_interval=0)
    store = manager._store
    assert store is not None
    real_save = store.save
    in_save, release = threading.Event(), threading.Event()

    def slow_save(record: dict[str, Any]) -> None:
        if record["state"] == "finished":
            in_save.set()
            release.wait(WAIT)
        real_save(record)

    store.save = slow_save  # type: ignore[method-assign]
    try:
        job = GateJob()
        task_id = manager.submit("Image.syncData", job)
        job.proceed.set()
        assert in_save.wait(WAIT)
        assert manager.get_status(task_id)["taskState"] == "finished"
        clearing = threading.Thread(target=manager.clear, args=(task_id,))
        clearing.start()
        clearing.join(0.2)
        release.set()
        clearing.join(WAIT)
        assert not clearing.is_alive()
        assert os.listdir(store_dir) == []
    finally:
        release.set()
        manager.shutdown(wait=False, abort=True)
    again = task_manager.TaskManager(workers=1, store_dir=store_dir)
    try:
        assert again.recover() == [] and again.all_info() == {}
    finally:
        again.shutdown(wait=False, abort=True)
