"""The SPM task manager: asynchronous, persisted, recoverable jobs.

SPM verbs that change storage (``Volume.create``, ``Image.cloneStructure``
...) answer a task id at once; the work runs in a bounded pool of worker
threads.  A task goes through these states (``taskState``)::

    init --> running --> finished (success)
      |         |  \\
      |         |   `--> cleaning --> finished (cleanFailure)   job failed
      |         `--> aborting --> cleaning --> finished         Task.stop
      `--> finished (cleanFailure, TaskAborted)                 stopped while queued

A job is an object with ``run(ctx)`` and ``rollback(ctx)``; ``rollback``
undoes what ``run`` did when it failed or was stopped, so a failed task
leaves nothing half-done.  ``ctx.progress(pct)`` reports progress,
``ctx.aborted`` is set by ``Task.stop`` and ``ctx.check_abort()`` raises
``TaskAborted`` then.  A failed task reports the error's ``name`` in
``code`` (the rpc layer maps names to numbers) and its text in
``message``.

Every state change is saved (``storage.taskstore``) when the manager has a
store directory.  A job that is to survive a restart has a ``kind`` and
JSON ``params``; :meth:`TaskManager.register_job_kind` tells how to
rebuild it (``factory(params)``) and how to recover it: ``"rollback"``
(undo, the task ends ``cleanFailure``/``TaskInterrupted``) or ``"rerun"``
(run it again).  :meth:`TaskManager.recover` does that for every unfinished
task found; no task is left ``running`` after a restart.
"""

from __future__ import annotations

import collections
import json
import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any, Protocol

from rpc import errors as rpc_errors
from storage import errors, oop, taskstore

log = logging.getLogger("storage.task")

INIT = "init"
RUNNING = "running"
FINISHED = "finished"
ABORTING = "aborting"
CLEANING = "cleaning"

NO_RESULT = ""
SUCCESS = "success"
CLEAN_SUCCESS = "cleanSuccess"
CLEAN_FAILURE = "cleanFailure"

ROLLBACK = "rollback"
RERUN = "rerun"

DEFAULT_WORKERS = 10
PROGRESS_SAVE_INTERVAL = 5.0


class Job(Protocol):
    """What a task runs. ``kind`` (or None) and ``params`` are persisted."""

    kind: str | None
    params: dict[str, Any]

    def run(self, ctx: Context) -> None: ...

    def rollback(self, ctx: Context) -> None: ...


JobFactory = Callable[[dict[str, Any]], Job]
JobKind = collections.namedtuple("JobKind", "factory recovery")


class Context:
    """What a running job sees of its task."""

    def __init__(self, task: Task, manager: TaskManager, recovering: bool = False) -> None:
        self._task = task
        self._manager = manager
        self.task_id = task.id
        self.verb = task.verb
        self.aborted: threading.Event = task.aborted
        # True when the job's rollback runs because a restart interrupted it.
        self.recovering = recovering

    def progress(self, pct: float) -> None:
        """Report progress 0-100 (saved to the store at most every few seconds)."""
        self._manager._set_progress(self._task, pct)

    def check_abort(self) -> None:
        """Raise TaskAborted if Task.stop was called."""
        if self.aborted.is_set():
            raise errors.TaskAborted(task_id=self.task_id)


class Task:
    def __init__(self, task_id: str, verb: str, job: Job | None) -> None:
        self.id = task_id
        self.verb = verb
        self.job = job
        self.state = INIT
        self.result = NO_RESULT
        self.code = ""
        self.message = ""
        self.progress = 0
        self.created = time.time()
        self.aborted = threading.Event()
        self.lock = threading.Lock()  # guards the fields above
        self.save_lock = threading.Lock()  # serializes snapshots + writes
        self.last_save = 0.0
        # Set by recovery: (kind, params) of a job to rebuild, prior state.
        self.job_record: dict[str, Any] | None = None
        self.interrupted_state = ""

    def status(self) -> dict[str, Any]:
        with self.lock:
            return {"taskID": self.id, "taskState": self.state, "taskResult": self.result,
                    "code": self.code, "message": self.message, "progress": self.progress}

    def info(self) -> dict[str, str]:
        return {"id": self.id, "verb": self.verb}

    def record(self) -> dict[str, Any]:
        with self.lock:
            job = self.job_record
            if job is None and self.job is not None and getattr(self.job, "kind", None):
                job = {"kind": self.job.kind, "params": getattr(self.job, "params", {})}
            return {"id": self.id, "verb": self.verb, "state": self.state,
                    "result": self.result, "code": self.code, "message": self.message,
                    "progress": self.progress, "job": job, "created": self.created,
                    "updated": time.time()}

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Task:
        task = cls(record["id"], record.get("verb", ""), None)
        task.state = record.get("state", INIT)
        task.result = record.get("result", NO_RESULT)
        task.code = record.get("code", "")
        task.message = record.get("message", "")
        task.progress = int(record.get("progress", 0))
        task.created = record.get("created", task.created)
        task.job_record = record.get("job")
        return task


class TaskManager:
    """Runs tasks in at most ``workers`` threads; others wait in ``init``.

    ``store_dir``: where tasks are persisted (None: memory only).
    ``files``: the FileOps used for the store (an oop.Pool on shared
    storage; default in-process).
    """

    def __init__(self, workers: int = DEFAULT_WORKERS, store_dir: str | None = None,
                 files: oop.FileOps | None = None,
                 progress_interval: float = PROGRESS_SAVE_INTERVAL) -> None:
        if workers < 1:
            raise ValueError(f"workers must be >= 1: {workers}")
        self.workers = workers
        self.progress_interval = progress_interval
        self._files = files
        self._store = taskstore.TaskStore(store_dir, files) if store_dir else None
        self._kinds: dict[str, JobKind] = {}
        self._tasks: dict[str, Task] = {}
        self._cond = threading.Condition()
        self._queue: queue.Queue[tuple[Task, str] | None] = queue.Queue()
        self._threads: list[threading.Thread] = []
        self._accepting = True
        self._closing = False

    # Registration and submission.

    def register_job_kind(self, kind: str, factory: JobFactory, recovery: str = ROLLBACK) -> None:
        """How to rebuild a persisted job of kind (factory(params)) and recover it."""
        if recovery not in (ROLLBACK, RERUN):
            raise ValueError(f"invalid recovery {recovery!r}")
        self._kinds[kind] = JobKind(factory, recovery)

    def submit(self, verb: str, job: Job, task_id: str | None = None) -> str:
        """Queue job as a new task; returns its id (a new UUID unless given)."""
        task_id = task_id or str(uuid.uuid4())
        task = Task(task_id, verb, job)
        if getattr(job, "kind", None):
            try:
                json.dumps(getattr(job, "params", {}))
            except (TypeError, ValueError) as e:
                raise errors.AddTaskError(task_id=task_id,
                                          reason=f"job params are not JSON: {e}") from e
        with self._cond:
            if not self._accepting:
                raise errors.AddTaskError(task_id=task_id, reason="task manager is stopped")
            if task_id in self._tasks:
                raise errors.AddTaskError(task_id=task_id, reason="task id already exists")
            self._tasks[task_id] = task
        try:
            self._save(task, strict=True)
        except BaseException:
            with self._cond:
                del self._tasks[task_id]
            raise
        log.info("Submitted task id=%s verb=%s kind=%s", task_id, verb, getattr(job, "kind", None))
        self._enqueue(task, "run")
        return task_id

    # API-shaped queries and control.

    def get_status(self, task_id: str) -> dict[str, Any]:
        return self._get(task_id).status()

    def get_info(self, task_id: str) -> dict[str, str]:
        return self._get(task_id).info()

    def all_statuses(self) -> dict[str, dict[str, Any]]:
        return {t.id: t.status() for t in self._all()}

    def all_info(self) -> dict[str, dict[str, str]]:
        return {t.id: t.info() for t in self._all()}

    def unfinished(self) -> list[str]:
        """Ids of tasks not finished yet."""
        return [s["taskID"] for s in self.all_statuses().values() if s["taskState"] != FINISHED]

    def clear(self, task_id: str) -> None:
        """Forget a finished task and remove its file."""
        task = self._get(task_id)
        with task.lock:
            if task.state != FINISHED:
                raise errors.TaskNotFinished(task_id=task_id, state=task.state)
        if self._store:
            try:
                self._store.remove(task_id)
            except (OSError, errors.Error) as e:
                raise errors.TaskMetaDataSaveError(
                    task_id=task_id, path=self._store.path(task_id), reason=str(e)) from e
        with self._cond:
            self._tasks.pop(task_id, None)
        log.info("Cleared task id=%s", task_id)

    def stop(self, task_id: str) -> None:
        """Abort a task: a queued one ends at once, a running one is asked to
        stop (ctx.aborted) and is rolled back. No-op once it is stopping or done."""
        task = self._get(task_id)
        with task.lock:
            state = task.state
            if state == INIT:
                task.aborted.set()
                task.state = FINISHED
                task.result = CLEAN_FAILURE
                task.code = errors.TaskAborted.name
                task.message = str(errors.TaskAborted(task_id=task_id))
            elif state == RUNNING:
                task.aborted.set()
                task.state = ABORTING
            else:
                log.info("Not stopping task id=%s state=%s", task_id, state)
                return
        log.info("Stopping task id=%s state=%s", task_id, state)
        self._save(task)
        if state == INIT:
            with self._cond:
                self._cond.notify_all()

    def wait(self, task_id: str, timeout: float | None = None) -> dict[str, Any]:
        """Wait until the task is finished; its status. TimeoutError if not in time."""
        task = self._get(task_id)
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while task.status()["taskState"] != FINISHED:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError(f"task {task_id} not finished after {timeout}s")
                self._cond.wait(remaining)
        return task.status()

    # Recovery and lifecycle.

    def recover(self, store_dir: str | None = None, wait: bool = True) -> list[str]:
        """Load the tasks persisted in store_dir (default: this manager's store).

        Finished tasks are listed again. Unfinished ones are recovered by
        their job kind: "rerun" queues the job again; "rollback" (and tasks
        that were being stopped or cleaned) runs its rollback and ends
        cleanFailure. With wait, returns once the rollbacks are done.
        Returns the ids of the recovered unfinished tasks.
        """
        if store_dir:
            self._store = taskstore.TaskStore(store_dir, self._files)
        if self._store is None:
            return []
        recovered = []
        rollbacks = []
        for record in self._store.load_all():
            with self._cond:
                if record["id"] in self._tasks:
                    continue
                task = Task.from_record(record)
                self._tasks[task.id] = task
            if task.state == FINISHED:
                log.info("Found finished task id=%s verb=%s result=%s",
                         task.id, task.verb, task.result)
                continue
            recovered.append(task.id)
            if self._recover_one(task) == ROLLBACK:
                rollbacks.append(task.id)
        if wait:
            for task_id in rollbacks:
                self.wait(task_id)
        return recovered

    def shutdown(self, wait: bool = True, abort: bool = False) -> None:
        """Stop accepting tasks and stop the workers. Queued tasks stay in
        init (and in the store, for recovery); running ones finish (or are
        stopped, with abort). With wait, returns when the workers are done."""
        with self._cond:
            self._accepting = False
            self._closing = True
            threads = list(self._threads)
        if abort:
            for task_id in self.unfinished():
                try:
                    self.stop(task_id)
                except errors.UnknownTask:
                    pass
        for _ in threads:
            self._queue.put(None)
        if wait:
            for t in threads:
                t.join()
        log.info("Task manager shut down wait=%s abort=%s", wait, abort)

    def detach(self) -> None:
        """For spmStop: stop accepting tasks, wait for running ones, and
        forget all tasks; their files stay for the next SPM to recover."""
        self.shutdown(wait=True)
        with self._cond:
            self._tasks.clear()

    # Internals.

    def _get(self, task_id: str) -> Task:
        with self._cond:
            task = self._tasks.get(task_id)
        if task is None:
            raise errors.UnknownTask(task_id=task_id)
        return task

    def _all(self) -> list[Task]:
        with self._cond:
            return list(self._tasks.values())

    def _enqueue(self, task: Task, action: str) -> None:
        with self._cond:
            if len(self._threads) < self.workers and not self._closing:
                t = threading.Thread(target=self._worker, name=f"task/{len(self._threads)}",
                                     daemon=True)
                self._threads.append(t)
                t.start()
        self._queue.put((task, action))

    def _worker(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            task, action = item
            if self._closing:
                continue  # left as it is, for recovery
            try:
                if action == "run":
                    self._run(task)
                else:
                    self._recover_rollback(task)
            except Exception:
                log.exception("Unexpected error in task id=%s", task.id)

    def _run(self, task: Task) -> None:
        with task.lock:
            if task.state != INIT:
                return  # stopped while queued
            task.state = RUNNING
        log.info("Running task id=%s verb=%s", task.id, task.verb)
        self._save(task)
        ctx = Context(task, self)
        try:
            task.job.run(ctx)
        except Exception as e:
            self._fail(task, ctx, e)
        else:
            log.info("Task succeeded id=%s verb=%s", task.id, task.verb)
            self._finish(task, SUCCESS, "", "", progress=100)

    def _fail(self, task: Task, ctx: Context, error: Exception) -> None:
        known = isinstance(error, rpc_errors.Error)
        code = error.name if known else rpc_errors.GeneralException.name
        message = str(error) or type(error).__name__
        if task.aborted.is_set():
            aborted = errors.TaskAborted(task_id=task.id)
            code = aborted.name
            message = str(aborted)
            if not isinstance(error, errors.TaskAborted):
                message = f"{message}: {error}"
            log.info("Task aborted id=%s verb=%s: %s", task.id, task.verb, error)
        elif known and error.expected:
            log.info("Task failed id=%s verb=%s code=%s: %s", task.id, task.verb, code, message)
        else:
            log.exception("Task failed unexpectedly id=%s verb=%s", task.id, task.verb)
        with task.lock:
            task.state = CLEANING
            task.code = code
            task.message = message
        self._save(task)
        message = self._rollback(task, ctx, message)
        self._finish(task, CLEAN_FAILURE, code, message)

    def _rollback(self, task: Task, ctx: Context, message: str) -> str:
        rollback = getattr(task.job, "rollback", None)
        if rollback is None:
            return message
        log.info("Rolling back task id=%s verb=%s", task.id, task.verb)
        try:
            rollback(ctx)
        except Exception as e:
            log.exception("Rollback failed id=%s verb=%s", task.id, task.verb)
            return f"{message}; rollback failed: {e}"
        return message

    def _finish(self, task: Task, result: str, code: str, message: str,
                progress: int | None = None) -> None:
        with task.lock:
            task.state = FINISHED
            task.result = result
            task.code = code
            task.message = message
            if progress is not None:
                task.progress = progress
        self._save(task)
        with self._cond:
            self._cond.notify_all()

    def _recover_one(self, task: Task) -> str:
        """Prepare an unfinished loaded task; returns the recovery chosen."""
        task.interrupted_state = task.state
        job = task.job_record or {}
        kind = self._kinds.get(job.get("kind") or "")
        if kind is None:
            self._finish_interrupted(task, f"no recovery for job kind {job.get('kind')!r}")
            return ROLLBACK
        try:
            task.job = kind.factory(job.get("params") or {})
        except Exception as e:
            log.exception("Cannot rebuild job id=%s kind=%s", task.id, job.get("kind"))
            self._finish_interrupted(task, f"cannot rebuild job: {e}")
            return ROLLBACK
        if kind.recovery == RERUN and task.state in (INIT, RUNNING):
            log.info("Recovering task id=%s verb=%s state=%s: rerun",
                     task.id, task.verb, task.state)
            with task.lock:
                task.state = INIT
                task.progress = 0
                task.code = task.message = ""
            self._save(task)
            self._enqueue(task, "run")
            return RERUN
        log.info("Recovering task id=%s verb=%s state=%s: rollback", task.id, task.verb, task.state)
        with task.lock:
            task.state = CLEANING
        self._save(task)
        self._enqueue(task, "rollback")
        return ROLLBACK

    def _recover_rollback(self, task: Task) -> None:
        ctx = Context(task, self, recovering=True)
        code, message = self._interrupted_error(task)
        message = self._rollback(task, ctx, message)
        self._finish(task, CLEAN_FAILURE, code, message)

    def _interrupted_error(self, task: Task) -> tuple[str, str]:
        if task.interrupted_state == ABORTING:
            return errors.TaskAborted.name, str(errors.TaskAborted(task_id=task.id))
        if task.interrupted_state == CLEANING and task.code:
            return task.code, task.message  # the original failure
        err = errors.TaskInterrupted(task_id=task.id, state=task.interrupted_state)
        return err.name, str(err)

    def _finish_interrupted(self, task: Task, reason: str) -> None:
        code, message = self._interrupted_error(task)
        log.error("Cannot recover task id=%s verb=%s: %s", task.id, task.verb, reason)
        self._finish(task, CLEAN_FAILURE, code, f"{message}; {reason}")

    def _set_progress(self, task: Task, pct: float) -> None:
        now = time.monotonic()
        with task.lock:
            task.progress = max(0, min(100, int(pct)))
            due = now - task.last_save >= self.progress_interval
        if due:
            self._save(task)

    def _save(self, task: Task, strict: bool = False) -> None:
        if self._store is None:
            return
        with task.save_lock:
            record = task.record()
            task.last_save = time.monotonic()
            try:
                self._store.save(record)
            except errors.TaskMetaDataSaveError:
                if strict:
                    raise
                # The task goes on; recovery would see an older state and
                # recover it as unfinished, which is safe.
                log.exception("Cannot save task id=%s state=%s", task.id, record["state"])
