"""Persistence of SPM tasks: one JSON file per task, written atomically.

The store lives under the pool's master domain (``.../master/tasks/``) so a
restarted daemon, or the next SPM, finds the tasks.  File access goes
through an injected :class:`storage.oop.FileOps` (an ``oop.Pool`` for
shared storage, so a hung mount can't block the task manager), by default
:class:`storage.oop.InProcess`.

A task file ``<task_id>.task`` holds one JSON object (see
``storage.task.Task.record``); each write replaces it atomically (temp
file, fsync, rename, fsync of the directory).
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

from storage import errors, oop

log = logging.getLogger("storage.taskstore")

SUFFIX = ".task"
RECORD_VERSION = 1


class TaskStore:
    def __init__(self, directory: str, files: oop.FileOps | None = None) -> None:
        self.directory = directory
        self.files = files if files is not None else oop.InProcess()
        self._created = False

    def path(self, task_id: str) -> str:
        return os.path.join(self.directory, task_id + SUFFIX)

    def save(self, record: dict[str, Any]) -> None:
        """Write record (with its "id") atomically; TaskMetaDataSaveError on failure."""
        task_id = record["id"]
        path = self.path(task_id)
        data = json.dumps(dict(record, version=RECORD_VERSION), indent=1, sort_keys=True)
        try:
            if not self._created:
                self.files.makedirs(self.directory, mode=0o755, exist_ok=True)
                self._created = True
            self.files.write_file_atomic(path, data.encode() + b"\n", mode=0o644)
        except (OSError, errors.Error) as e:
            raise errors.TaskMetaDataSaveError(task_id=task_id, path=path, reason=str(e)) from e

    def load_all(self) -> list[dict[str, Any]]:
        """Every valid task record in the directory (none if it is missing).

        A file that can't be read or parsed is logged and skipped, and left
        in place for a person to look at.
        """
        try:
            names = self.files.listdir(self.directory)
        except FileNotFoundError:
            return []
        records = []
        for name in sorted(names):
            if not name.endswith(SUFFIX) or name.startswith("."):
                continue  # temp files of interrupted writes, strangers
            path = os.path.join(self.directory, name)
            try:
                record = json.loads(self.files.read_file(path))
                if not isinstance(record, dict) or f"{record.get('id')}{SUFFIX}" != name:
                    raise ValueError("not a task record or id does not match the file name")
            except (OSError, errors.Error, ValueError, TypeError) as e:
                log.error("Skipping unreadable task file path=%s: %s", path, e)
                continue
            records.append(record)
        return records

    def remove(self, task_id: str) -> None:
        """Remove a task's file (a missing file is fine)."""
        try:
            self.files.unlink(self.path(task_id))
        except FileNotFoundError:
            pass
