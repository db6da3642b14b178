"""Storage errors. Each names its code in the schema's error table."""

from __future__ import annotations

from rpc import errors


class Error(errors.Error):
    name = "StorageException"
    msg = "Storage error"


class CommandFailed(Error):
    name = "CommandFailed"
    msg = "Command {cmd} failed rc={rc} err={err!r}"


class CommandTimeout(Error):
    name = "CommandTimeout"
    msg = "Command {cmd} timed out after {timeout}s"


# Storage infrastructure: out-of-process file operations, resource locks,
# the cluster lock (SPM lease) and SPM tasks (storage/oop.py, resource.py,
# clusterlock.py, task.py).


class OopTimeout(Error):
    name = "OopTimeout"
    msg = "File operation {op} on {path} timed out after {timeout}s"


class OopError(Error):
    name = "OopError"
    msg = "File operation {op} on {path} failed"


class ResourceTimeout(Error):
    name = "ResourceTimeout"
    msg = "Timed out after {timeout}s acquiring resource {namespace}/{resource} ({mode})"


class AcquireLockFailure(Error):
    name = "AcquireLockFailure"
    msg = "Cannot obtain lock {lease}"


class ReleaseLockFailure(Error):
    name = "ReleaseLockFailure"
    msg = "Cannot release lock {lease}"


class AcquireHostIdFailure(Error):
    name = "AcquireHostIdFailure"
    msg = "Cannot acquire host id {host_id} in lockspace {lockspace}"


class ClusterLockInitError(Error):
    name = "ClusterLockInitError"
    msg = "Could not initialize cluster lock {lease}"


class ClusterLockUnavailable(Error):
    name = "ClusterLockUnavailable"
    msg = "Cluster lock {mode} is not available on this host"


class UnknownTask(Error):
    name = "UnknownTask"
    msg = "Task id unknown: {task_id}"


class TaskNotFinished(Error):
    name = "TaskNotFinished"
    msg = "Task {task_id} is not finished (state {state})"


class TaskAborted(Error):
    name = "TaskAborted"
    msg = "Task {task_id} was aborted"


class TaskInterrupted(Error):
    name = "TaskInterrupted"
    msg = "Task {task_id} was interrupted by a restart while {state}"


class AddTaskError(Error):
    name = "AddTaskError"
    msg = "Cannot add task {task_id}"


class TaskMetaDataSaveError(Error):
    name = "TaskMetaDataSaveError"
    msg = "Cannot save task {task_id} to {path}"
