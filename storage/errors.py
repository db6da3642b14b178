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


# Storage primitives: qemu-img, lvm2, loop devices, LV activation
# (storage/qemuimg.py, lvm.py, loop.py, activation.py).  LVM errors carry
# the failed command's cmd, rc and err as fields when a command failed.


class ConvertAborted(Error):
    name = "ActionStopped"
    msg = "Copy of {src} to {dst} was aborted"


class LayerMismatch(Error):
    name = "LayerMismatch"
    msg = "Cannot copy layer {src} to {dst}"


class VolumeGroupCreateError(Error):
    name = "VolumeGroupCreateError"
    msg = "Cannot create volume group {vg} on {devices}"


class VolumeGroupSizeError(Error):
    name = "VolumeGroupSizeError"
    msg = "Volume group {vg} has not enough free extents"


class VolumeGroupAlreadyExistsError(Error):
    name = "VolumeGroupAlreadyExistsError"
    msg = "Volume group {vg} already exists"


class VolumeGroupDoesNotExist(Error):
    name = "VolumeGroupDoesNotExist"
    msg = "Volume group {vg} does not exist"


class VolumeGroupRemoveError(Error):
    name = "VolumeGroupRemoveError"
    msg = "Cannot remove volume group {vg}"


class CannotCreateLogicalVolume(Error):
    name = "CannotCreateLogicalVolume"
    msg = "Cannot create logical volume {vg}/{lv}"


class CannotRemoveLogicalVolume(Error):
    name = "CannotRemoveLogicalVolume"
    msg = "Cannot remove logical volume {vg}/{lv}"


class CannotDeactivateLogicalVolume(Error):
    name = "CannotDeactivateLogicalVolume"
    msg = "Cannot deactivate logical volume {vg}/{lv}"


class LogicalVolumeExtendError(Error):
    name = "LogicalVolumeExtendError"
    msg = "Cannot extend logical volume {vg}/{lv} to {extents} extents"


class LogicalVolumeRefreshError(Error):
    name = "LogicalVolumeRefreshError"
    msg = "Cannot refresh logical volume {vg}/{lv}"


class CannotActivateLogicalVolume(Error):
    name = "CannotActivateLogicalVolume"
    msg = "Cannot activate logical volume {vg}/{lv}"


class LogicalVolumeReplaceTagError(Error):
    name = "LogicalVolumeReplaceTagError"
    msg = "Cannot change tags of {vg}/{lv}"


class PhysDevInitializationError(Error):
    name = "PhysDevInitializationError"
    msg = "Cannot initialize physical devices {devices}"


class LogicalVolumeAlreadyExists(Error):
    name = "LogicalVolumeAlreadyExists"
    msg = "Logical volume {vg}/{lv} already exists"


class LogicalVolumeDoesNotExistError(Error):
    name = "LogicalVolumeDoesNotExistError"
    msg = "Logical volume {vg}/{lv} does not exist"


class LogicalVolumeNotContiguous(Error):
    name = "LogicalVolumeNotContiguous"
    msg = "Logical volume {vg}/{lv} is not one contiguous range of one PV: {segments}"


class LoopDeviceError(Error):
    name = "LoopDeviceError"
    msg = "Loop device {dev}: {op} failed"


class ActivationModeUnavailable(Error):
    name = "ActivationModeUnavailable"
    msg = "Activation mode {mode} is not available on this host"
