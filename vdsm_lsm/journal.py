"""move-disk's journal: what a migration of one drive has done, on disk.

One JSON file per VM drive, ``<state_dir>/<vmID>-<drive>.json``, written
before and after every step of :mod:`vdsm_lsm.move_disk` that changes
something: the ids the flow chose or was given (the snapshot leaf, SPM task
ids), the steps completed, whether a rollback began.  Each write goes to a
temporary file that is fsync'd and renamed over the journal, and the
directory is fsync'd: a reader finds the old record or the new one, whole,
whenever the writer is killed.  A move that ends (done or rolled back)
removes its journal; a journal found at start means a previous run of
move-disk for that drive was killed, and the new run resumes from it.

While a run holds a journal it holds ``<vmID>-<drive>.lock`` (``flock``):
a second move-disk of the same drive is refused, and a killed run's lock
goes with its process.  The lock file is removed with the journal.

Record::

    {"version": 1, "vmID", "drive", "poolID", "srcDomainID", "dstDomainID",
     "imageID", "parentVolumeID" (the leaf before the snapshot),
     "leafVolumeID" (the snapshot leaf, chosen before Volume.create),
     "options": {"deleteSource", "bandwidth", "syncWrites" (auto|on|off)},
     "steps": [step, ...], "tasks": {step: taskID}, "syncWrites": bool
     (the running mirror's), "rollingBack": bool}

For tests, ``VDSM_LSM_MOVE_DISK_STOP_AFTER=<step>`` makes the run stop
(sleep, forever) right after recording that step, so a test can kill it
there for real (``SIGKILL``).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

log = logging.getLogger("vdsm_lsm.journal")

VERSION = 1
SUFFIX = ".json"
LOCK_SUFFIX = ".lock"
STOP_AFTER_ENV = "VDSM_LSM_MOVE_DISK_STOP_AFTER"
SYSTEM_DIR = "/var/lib/vdsm-lsm-client"


class JournalError(Exception):
    """The journal cannot be used: unreadable, or held by another run."""


class Busy(JournalError):
    """Another move-disk holds the journal's lock."""


def default_dir() -> str:
    """/var/lib/vdsm-lsm-client for root, else $XDG_STATE_HOME/vdsm-lsm
    (~/.local/state/vdsm-lsm)."""
    if os.geteuid() == 0:
        return SYSTEM_DIR
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(
        os.path.expanduser("~"), ".local", "state")
    return os.path.join(base, "vdsm-lsm")


def name_of(vm_id: str, drive: str) -> str:
    return f"{vm_id}-{drive}"


class Journal:
    """The journal of one VM drive's migration under state_dir."""

    def __init__(self, state_dir: str, vm_id: str, drive: str) -> None:
        self.state_dir = state_dir
        self.vm_id = vm_id
        self.drive = drive
        self.path = os.path.join(state_dir, name_of(vm_id, drive) + SUFFIX)
        self.record: dict[str, Any] = {}
        self._lock_fd: int | None = None

    # The lock

    def lock(self) -> None:
        """Hold the drive's lock for this process (Busy if another run has it)."""
        try:
            self._lock()
        except OSError as e:
            raise JournalError(f"cannot lock {self._lock_path}: {e}") from e

    def _lock(self) -> None:
        os.makedirs(self.state_dir, mode=0o700, exist_ok=True)
        while True:
            fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise Busy(f"another move-disk of {self.vm_id} {self.drive} is running "
                               f"(it holds {self._lock_path})") from None
                raise
            # The holder before us may have removed the file as it let go:
            # then the lock we got is on a file nobody else can find.
            try:
                same = os.stat(self._lock_path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self._lock_fd = fd
                return
            os.close(fd)

    def unlock(self) -> None:
        """Let go; the lock file goes too when no journal is left (nothing to resume)."""
        if self._lock_fd is None:
            return
        if not self.exists():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._lock_path)
        os.close(self._lock_fd)
        self._lock_fd = None

    @property
    def _lock_path(self) -> str:
        return os.path.join(self.state_dir, name_of(self.vm_id, self.drive) + LOCK_SUFFIX)

    @contextlib.contextmanager
    def locked(self) -> Iterator[Journal]:
        self.lock()
        try:
            yield self
        finally:
            self.unlock()

    # The record

    def exists(self) -> bool:
        return os.path.exists(self.path)

    def load(self) -> dict[str, Any]:
        self.record = read(self.path)
        return self.record

    def begin(self, **fields: Any) -> None:
        """A new record (steps and tasks empty), written at once."""
        self.record = {"version": VERSION, "vmID": self.vm_id, "drive": self.drive,
                       "steps": [], "tasks": {}, "syncWrites": False, "rollingBack": False}
        self.record.update(fields)
        self._write()

    def done(self, step: str) -> bool:
        return step in self.record.get("steps", [])

    def task(self, step: str) -> str | None:
        task_id = self.record.get("tasks", {}).get(step)
        return str(task_id) if task_id else None

    def step(self, step: str, task_id: str | None = None, **fields: Any) -> None:
        """Record step as completed (and its task id, and fields); written at once."""
        if step not in self.record["steps"]:
            self.record["steps"].append(step)
        if task_id is not None:
            self.record["tasks"][step] = task_id
        self.record.update(fields)
        self._write()
        log.debug("Journal %s: step %s", self.path, step)
        _stop_after(step)

    def update(self, **fields: Any) -> None:
        self.record.update(fields)
        self._write()

    def forget(self, *steps: str) -> None:
        """Steps to run again (what they made is gone)."""
        self.record["steps"] = [s for s in self.record["steps"] if s not in steps]
        for s in steps:
            self.record["tasks"].pop(s, None)
        self._write()

    def remove(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        _fsync_dir(self.state_dir)
        self.record = {}
        log.debug("Journal %s removed", self.path)

    def _write(self) -> None:
        try:
            self._write_file()
        except OSError as e:
            raise JournalError(f"cannot write the journal {self.path}: {e}") from e

    def _write_file(self) -> None:
        os.makedirs(self.state_dir, mode=0o700, exist_ok=True)
        self.record["updated"] = time.time()
        fd, tmp = tempfile.mkstemp(prefix=".", suffix=".tmp", dir=self.state_dir)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(self.record, f, indent=1, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            os.rename(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        _fsync_dir(self.state_dir)


class MemoryJournal(Journal):
    """A journal kept in memory only: a flow that cannot be resumed (tests,
    the demo; the CLI always keeps one on disk)."""

    def __init__(self, vm_id: str = "", drive: str = "") -> None:
        super().__init__("", vm_id, drive)

    def lock(self) -> None:
        pass

    def exists(self) -> bool:
        return False

    def remove(self) -> None:
        self.record = {}

    def _write(self) -> None:
        self.record["updated"] = time.time()


def read(path: str) -> dict[str, Any]:
    """A journal file's record (JournalError if unreadable or not ours)."""
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
    except (OSError, ValueError) as e:
        raise JournalError(f"cannot read the journal {path}: {e}") from e
    if not isinstance(record, dict) or record.get("version") != VERSION:
        raise JournalError(f"{path} is not a move-disk journal of version {VERSION}")
    return record


def all_records(state_dir: str) -> list[dict[str, Any]]:
    """Every readable journal under state_dir (what --cleanup leaves alone)."""
    try:
        names = sorted(os.listdir(state_dir))
    except FileNotFoundError:
        return []
    records = []
    for name in names:
        if not name.endswith(SUFFIX) or name.startswith("."):
            continue
        try:
            records.append(read(os.path.join(state_dir, name)))
        except JournalError as e:
            log.warning("%s", e)
    return records


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except FileNotFoundError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _stop_after(step: str) -> None:
    """The test hook: stop here (until killed) if asked to by the environment."""
    if os.environ.get(STOP_AFTER_ENV) != step:
        return
    sys.stderr.write(f"move-disk: test hook: stopped after step {step}\n")
    sys.stderr.flush()
    while True:
        time.sleep(3600)
