"""The SPM task manager: runs, persists, stops and recovers tasks.

Tasks (:mod:`storage.task`) run in a bounded pool of worker threads;
others wait in ``init``.  Every state change is saved
(:mod:`storage.taskstore`) when the manager has a store directory.

The manager is built with the job kinds it can rebuild (``kinds``: kind ->
:class:`storage.task.JobKind`; the pool passes :mod:`storage.jobs`' table)
and never learns new ones later.  :meth:`TaskManager.recover` rebuilds
every unfinished task it finds in the store from its persisted
``{kind, params}``: a ``rerun`` kind is queued again, any other (and a
task that was being stopped or cleaned) is rolled back and ends
``cleanFailure``; no task is left ``running`` after a restart.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any

from common import errors as common_errors
from storage import errors, oop, task, taskstore

log = logging.getLogger("storage.task_manager")

_RUN = "run"
_ROLLBACK = "rollback"


class TaskManager:
    """Runs tasks in at most ``workers`` threads; others wait in ``init``.

    ``kinds``: the persisted job kinds it rebuilds on recovery.
    ``store_dir``: where tasks are persisted (None: memory only).
    ``files``: the FileOps used for the store (an oop.Pool on shared
    storage; default in-process).
    ``on_finished``: called with the status of every task that finishes
    here (Task.getStatus' shape; the daemon pushes it as an event), in the
    thread that finished it; its failure is logged.
    """

    def __init__(
        self,
        workers: int = task.DEFAULT_WORKERS,
        store_dir: str | None = None,
        files: oop.FileOps | None = None,
        progress_interval: float = task.PROGRESS_SAVE_INTERVAL,
        kinds: Mapping[str, task.JobKind] | None = None,
        on_finished: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        if workers < 1:
            raise ValueError(f"workers must be >= 1: {workers}")
        self.workers = workers
        self.progress_interval = progress_interval
        self.kinds: Mapping[str, task.JobKind] = dict(kinds or {})
        self._files = files
        self._store = taskstore.TaskStore(store_dir, files) if store_dir else None
        self._tasks: dict[str, task.Task] = {}
        self._cond = threading.Condition()
        self._queue: queue.Queue[tuple[task.Task, str] | None] = queue.Queue()
        self._threads: list[threading.Thread] = []
        self._accepting = True
        self._closing = False
        self._fenced = False
        self.on_finished = on_finished

    # Submission.

    def submit(self, verb: str, job: task.Job, task_id: str | None = None) -> str:
        """Queue job as a new task; returns its id (a new UUID unless given)."""
        task_id = task_id or str(uuid.uuid4())
        new = task.Task(task_id, verb, job)
        if job.kind:
            try:
                json.dumps(job.params)
            except (TypeError, ValueError) as e:
                raise errors.AddTaskError(task_id=task_id,
                                          reason=f"job params are not JSON: {e}") from e
        with self._cond:
            if not self._accepting:
                raise errors.AddTaskError(task_id=task_id, reason="task manager is stopped")
            if task_id in self._tasks:
                raise errors.AddTaskError(task_id=task_id, reason="task id already exists")
            self._tasks[task_id] = new
        try:
            self._save(new, strict=True)
        except BaseException:
            with self._cond:
                del self._tasks[task_id]
            raise
        log.info("Submitted task id=%s verb=%s kind=%s", task_id, verb, job.kind)
        self._enqueue(new, _RUN)
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
        return [t.id for t in self._all() if not t.finished]

    def clear(self, task_id: str) -> None:
        """Forget a finished task and remove its file."""
        found = self._get(task_id)
        with found.lock:
            if found.state != task.FINISHED:
                raise errors.TaskNotFinished(task_id=task_id, state=found.state)
        if self._store:
            # Under save_lock: the worker's last save (it marks the task
            # finished, then writes it) may still be coming; it must not
            # write the file again once removed, or a restart would list
            # the cleared task again.
            with found.save_lock:
                try:
                    self._store.remove(task_id)
                except (OSError, errors.Error) as e:
                    raise errors.TaskMetaDataSaveError(
                        task_id=task_id, path=self._store.path(task_id), reason=str(e)) from e
                found.cleared = True
        with self._cond:
            self._tasks.pop(task_id, None)
        log.info("Cleared task id=%s", task_id)

    def stop(self, task_id: str) -> None:
        """Abort a task: a queued one ends at once, a running one is asked to
        stop (ctx.aborted) and is rolled back. No-op once it is stopping or done."""
        found = self._get(task_id)
        with found.lock:
            state = found.state
            if state == task.INIT:
                found.aborted.set()
                found.state = task.FINISHED
                found.result = task.CLEAN_FAILURE
                found.code = errors.TaskAborted.name
                found.message = str(errors.TaskAborted(task_id=task_id))
            elif state == task.RUNNING:
                found.aborted.set()
                found.state = task.ABORTING
            else:
                log.info("Not stopping task id=%s state=%s", task_id, state)
                return
        log.info("Stopping task id=%s state=%s", task_id, state)
        self._save(found)
        if state == task.INIT:
            with self._cond:
                self._cond.notify_all()
            self._finished(found)

    def wait(self, task_id: str, timeout: float | None = None) -> dict[str, Any]:
        """Wait until the task is finished; its status. TimeoutError if not in time."""
        found = self._get(task_id)
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while not found.finished:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError(f"task {task_id} not finished after {timeout}s")
                self._cond.wait(remaining)
        return found.status()

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
                loaded = task.Task.from_record(record)
                self._tasks[loaded.id] = loaded
            if loaded.state == task.FINISHED:
                log.info("Found finished task id=%s verb=%s result=%s",
                         loaded.id, loaded.verb, loaded.result)
                continue
            recovered.append(loaded.id)
            if self._recover_one(loaded) == task.ROLLBACK:
                rollbacks.append(loaded.id)
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

    def fence(self) -> None:
        """The SPM lease is lost: touch the storage no more.  Nothing new
        runs, running jobs are aborted without rollback and no state is
        saved, so the records stay as they were for the next SPM."""
        with self._cond:
            self._accepting = False
            self._closing = True
            self._fenced = True
            threads = list(self._threads)
        for current in self._all():
            current.aborted.set()
        for _ in threads:
            self._queue.put(None)
        log.warning("Task manager fenced: tasks %s left for the next SPM", self.unfinished())

    def detach(self) -> None:
        """For spmStop: stop accepting tasks, wait for running ones, and
        forget all tasks; their files stay for the next SPM to recover."""
        self.shutdown(wait=True)
        with self._cond:
            self._tasks.clear()

    # Running.

    def _get(self, task_id: str) -> task.Task:
        with self._cond:
            found = self._tasks.get(task_id)
        if found is None:
            raise errors.UnknownTask(task_id=task_id)
        return found

    def _all(self) -> list[task.Task]:
        with self._cond:
            return list(self._tasks.values())

    def _enqueue(self, queued: task.Task, action: str) -> None:
        with self._cond:
            if len(self._threads) < self.workers and not self._closing:
                t = threading.Thread(target=self._worker, name=f"task/{len(self._threads)}",
                                     daemon=True)
                self._threads.append(t)
                t.start()
        self._queue.put((queued, action))

    def _worker(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            current, action = item
            if self._closing:
                continue  # left as it is, for recovery
            try:
                if action == _RUN:
                    self._run(current)
                else:
                    self._recover_rollback(current)
            except Exception:
                log.exception("Unexpected error in task id=%s", current.id)

    def _run(self, current: task.Task) -> None:
        with current.lock:
            if current.state != task.INIT:
                return  # stopped while queued
            current.state = task.RUNNING
            job = current.job
        log.info("Running task id=%s verb=%s", current.id, current.verb)
        self._save(current)
        ctx = task.Context(current, self._set_progress)
        try:
            if job is None:
                raise errors.TaskInterrupted(task_id=current.id, state=task.INIT)
            job.run(ctx)
        except Exception as e:
            self._fail(current, ctx, e)
        else:
            log.info("Task succeeded id=%s verb=%s", current.id, current.verb)
            self._finish(current, task.SUCCESS, "", "", progress=100)

    def _fail(self, current: task.Task, ctx: task.Context, error: Exception) -> None:
        if self._fenced:
            log.warning("Task id=%s stopped, no rollback (fenced): %s", current.id, error)
            return
        code = common_errors.name_of(error)
        message = str(error) or type(error).__name__
        if current.aborted.is_set():
            aborted = errors.TaskAborted(task_id=current.id)
            code = aborted.name
            message = str(aborted)
            if not isinstance(error, errors.TaskAborted):
                message = f"{message}: {error}"
            log.info("Task aborted id=%s verb=%s: %s", current.id, current.verb, error)
        elif isinstance(error, common_errors.Error) and error.expected:
            log.info("Task failed id=%s verb=%s code=%s: %s",
                     current.id, current.verb, code, message)
        else:
            log.exception("Task failed unexpectedly id=%s verb=%s", current.id, current.verb)
        with current.lock:
            current.state = task.CLEANING
            current.code = code
            current.message = message
        self._save(current)
        message = self._rollback(current, ctx, message)
        self._finish(current, task.CLEAN_FAILURE, code, message)

    def _rollback(self, current: task.Task, ctx: task.Context, message: str) -> str:
        if current.job is None:
            return message
        log.info("Rolling back task id=%s verb=%s", current.id, current.verb)
        try:
            current.job.rollback(ctx)
        except Exception as e:
            log.exception("Rollback failed id=%s verb=%s", current.id, current.verb)
            return f"{message}; rollback failed: {e}"
        return message

    def _finish(self, current: task.Task, result: str, code: str, message: str,
                progress: int | None = None) -> None:
        with current.lock:
            current.state = task.FINISHED
            current.result = result
            current.code = code
            current.message = message
            if progress is not None:
                current.progress = progress
        self._save(current)
        with self._cond:
            self._cond.notify_all()
        self._finished(current)

    def _finished(self, current: task.Task) -> None:
        if self.on_finished is None:
            return
        try:
            self.on_finished(current.status())
        except Exception:
            log.exception("on_finished failed for task id=%s", current.id)

    # Recovery of one loaded task.

    def _recover_one(self, loaded: task.Task) -> str:
        """Prepare an unfinished loaded task; returns the recovery chosen."""
        loaded.interrupted_state = loaded.state
        record = loaded.job_record or {}
        kind_name = record.get("kind") or ""
        kind = self.kinds.get(kind_name)
        if kind is None:
            self._finish_interrupted(loaded, f"no recovery for job kind {record.get('kind')!r}")
            return task.ROLLBACK
        try:
            loaded.job = kind.factory(record.get("params") or {})
        except Exception as e:
            log.exception("Cannot rebuild job id=%s kind=%s", loaded.id, kind_name)
            self._finish_interrupted(loaded, f"cannot rebuild job: {e}")
            return task.ROLLBACK
        if kind.recovery == task.RERUN and loaded.state in (task.INIT, task.RUNNING):
            log.info("Recovering task id=%s verb=%s state=%s: rerun",
                     loaded.id, loaded.verb, loaded.state)
            with loaded.lock:
                loaded.state = task.INIT
                loaded.progress = 0
                loaded.code = loaded.message = ""
            self._save(loaded)
            self._enqueue(loaded, _RUN)
            return task.RERUN
        log.info("Recovering task id=%s verb=%s state=%s: rollback",
                 loaded.id, loaded.verb, loaded.state)
        with loaded.lock:
            loaded.state = task.CLEANING
        self._save(loaded)
        self._enqueue(loaded, _ROLLBACK)
        return task.ROLLBACK

    def _recover_rollback(self, loaded: task.Task) -> None:
        ctx = task.Context(loaded, self._set_progress, recovering=True)
        code, message = self._interrupted_error(loaded)
        message = self._rollback(loaded, ctx, message)
        self._finish(loaded, task.CLEAN_FAILURE, code, message)

    def _interrupted_error(self, loaded: task.Task) -> tuple[str, str]:
        if loaded.interrupted_state == task.ABORTING:
            return errors.TaskAborted.name, str(errors.TaskAborted(task_id=loaded.id))
        if loaded.interrupted_state == task.CLEANING and loaded.code:
            return loaded.code, loaded.message  # the original failure
        err = errors.TaskInterrupted(task_id=loaded.id, state=loaded.interrupted_state)
        return err.name, str(err)

    def _finish_interrupted(self, loaded: task.Task, reason: str) -> None:
        code, message = self._interrupted_error(loaded)
        log.error("Cannot recover task id=%s verb=%s: %s", loaded.id, loaded.verb, reason)
        self._finish(loaded, task.CLEAN_FAILURE, code, f"{message}; {reason}")

    # Saving.

    def _set_progress(self, current: task.Task, pct: float) -> None:
        now = time.monotonic()
        with current.lock:
            current.progress = max(0, min(100, int(pct)))
            due = now - current.last_save >= self.progress_interval
        if due:
            self._save(current)

    def _save(self, current: task.Task, strict: bool = False) -> None:
        if self._store is None or self._fenced:
            return
        with current.save_lock:
            if current.cleared:
                return
            record = current.record()
            current.last_save = time.monotonic()
            try:
                self._store.save(record)
            except errors.TaskMetaDataSaveError:
                if strict:
                    raise
                # The task goes on; recovery would see an older state and
                # recover it as unfinished, which is safe.
                log.exception("Cannot save task id=%s state=%s", current.id, record["state"])
