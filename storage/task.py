"""SPM tasks: their states, what a job is, and what a running job sees.

SPM verbs that change storage (``Volume.create``, ``Image.cloneStructure``
...) answer a task id at once; the work runs later in the task manager
(:mod:`storage.task_manager`).  A task goes through these states
(``taskState``)::

    init --> running --> finished (success)
      |         |  \\
      |         |   `--> cleaning --> finished (cleanFailure)   job failed
      |         `--> aborting --> cleaning --> finished         Task.stop
      `--> finished (cleanFailure, TaskAborted)                 stopped while queued

A job (:class:`Job`) has ``run(ctx)`` and ``rollback(ctx)``; ``rollback``
undoes what ``run`` did when it failed or was stopped, so a failed task
leaves nothing half-done.  ``ctx.progress(pct)`` reports progress,
``ctx.aborted`` is set by ``Task.stop`` and ``ctx.check_abort()`` raises
``TaskAborted`` then.

A failed task reports the error's *name* in ``code`` ("" while none) and
its text in ``message``; the rpc layer turns the name into the API's
number.  A job that is to survive a restart has a ``kind`` and JSON
``params``; its :class:`JobKind` says how to rebuild it (``factory(params)``)
and how to recover it: :data:`ROLLBACK` (undo; the task ends
``cleanFailure``/``TaskInterrupted``) or :data:`RERUN` (run it again).  The
storage job kinds are declared once, in :mod:`storage.jobs`.

:class:`Task` is the record of one task: its status as ``Task.getStatus``
answers it and the JSON record :mod:`storage.taskstore` persists.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from storage import errors

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
RECOVERIES = (ROLLBACK, RERUN)

DEFAULT_WORKERS = 10
PROGRESS_SAVE_INTERVAL = 5.0


class Job(Protocol):
    """What a task runs. ``kind`` (None: not persisted) and ``params`` are saved."""

    @property
    def kind(self) -> str | None: ...

    @property
    def params(self) -> dict[str, Any]: ...

    def run(self, ctx: Context) -> None: ...

    def rollback(self, ctx: Context) -> None: ...


JobFactory = Callable[[dict[str, Any]], Job]


@dataclasses.dataclass(frozen=True)
class JobKind:
    """How the task manager rebuilds a persisted job and recovers its task."""

    factory: JobFactory
    recovery: str = ROLLBACK

    def __post_init__(self) -> None:
        if self.recovery not in RECOVERIES:
            raise ValueError(f"invalid recovery {self.recovery!r}")


class Context:
    """What a running job sees of its task.

    on_progress: called with the task and a percentage (the manager saves
    it); recovering: the job's rollback runs because a restart interrupted it.
    """

    def __init__(
        self,
        task: Task,
        on_progress: Callable[[Task, float], None],
        recovering: bool = False,
    ) -> None:
        self._task = task
        self._on_progress = on_progress
        self.task_id = task.id
        self.verb = task.verb
        self.aborted: threading.Event = task.aborted
        self.recovering = recovering

    def progress(self, pct: float) -> None:
        """Report progress 0-100 (saved to the store at most every few seconds)."""
        self._on_progress(self._task, pct)

    def check_abort(self) -> None:
        """Raise TaskAborted if Task.stop was called."""
        if self.aborted.is_set():
            raise errors.TaskAborted(task_id=self.task_id)


class Task:
    """One task: its state, result and progress, guarded by ``lock``."""

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
        self.cleared = False  # Task.clear removed its file: never written again
        # Set by recovery: {kind, params} of a job to rebuild, prior state.
        self.job_record: dict[str, Any] | None = None
        self.interrupted_state = ""

    def status(self) -> dict[str, Any]:
        """Task.getStatus: ``code`` is the error's name ("" while none)."""
        with self.lock:
            return {"taskID": self.id, "taskState": self.state, "taskResult": self.result,
                    "code": self.code, "message": self.message, "progress": self.progress}

    @property
    def finished(self) -> bool:
        with self.lock:
            return self.state == FINISHED

    def info(self) -> dict[str, str]:
        return {"id": self.id, "verb": self.verb}

    def record(self) -> dict[str, Any]:
        """The JSON record saved by storage.taskstore."""
        with self.lock:
            job = self.job_record
            if job is None and self.job is not None and self.job.kind:
                job = {"kind": self.job.kind, "params": self.job.params}
            return {"id": self.id, "verb": self.verb, "state": self.state,
                    "result": self.result, "code": self.code, "message": self.message,
                    "progress": self.progress, "job": job, "created": self.created,
                    "updated": time.time()}

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Task:
        """A task loaded from its record (no job yet: recovery rebuilds it)."""
        task = cls(record["id"], record.get("verb", ""), None)
        task.state = record.get("state", INIT)
        task.result = record.get("result", NO_RESULT)
        task.code = record.get("code", "")
        task.message = record.get("message", "")
        task.progress = int(record.get("progress", 0))
        task.created = record.get("created", task.created)
        task.job_record = record.get("job")
        return task
