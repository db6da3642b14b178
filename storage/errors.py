"""Storage errors. Each names its code in the schema's error table."""

from __future__ import annotations

from common import errors


class Error(errors.Error):
    name = "StorageException"
    msg = "Storage error"


class InvalidUUID(Error):
    """A value that must be a UUID (it becomes a path or an LV name) is not;
    answered as invalid params (-32602), like the schema's own check."""

    name = "InvalidParams"
    msg = "Not a UUID: {value!r}"


class InvalidDomainArgs(Error):
    """StorageDomain.create's typeArgs do not fit its domainType."""

    name = "InvalidParams"
    msg = "Invalid typeArgs for a {domain_type} domain"


class CommandFailed(Error):
    name = "CommandFailed"
    msg = "Command {cmd} failed rc={rc} err={err!r}"
    # Always given as fields (which become attributes).
    cmd: list[str]
    rc: int
    err: str


class CommandTimeout(Error):
    name = "CommandTimeout"
    msg = "Command {cmd} timed out after {timeout}s"
    cmd: list[str]
    timeout: float | None


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


# Domains, volumes, images and the pool (storage/sd.py, file_sd.py, block_*.py,
# volume.py, image.py, pool.py, extend.py, api.py).


class VolumeDoesNotExist(Error):
    name = "VolumeDoesNotExist"
    msg = "Volume {vol_id} does not exist in domain {sd_id}"


class IncorrectFormat(Error):
    name = "IncorrectFormat"
    msg = "Incorrect volume format {format}"


class VolumeIsBusy(Error):
    name = "VolumeIsBusy"
    msg = "Volume {vol_id} of domain {sd_id} is busy"


class VolumeImageHasChildren(Error):
    name = "VolumeImageHasChildren"
    msg = "Volume {vol_id} of domain {sd_id} has children"


class VolumeAlreadyExists(Error):
    name = "VolumeAlreadyExists"
    msg = "Volume {vol_id} already exists in domain {sd_id} (image {img_id})"


class VolumeExtendingError(Error):
    name = "VolumeExtendingError"
    msg = "Cannot extend volume {vol_id} of domain {sd_id} to {size} bytes"


class VolumeMetadataReadError(Error):
    name = "VolumeMetadataReadError"
    msg = "Cannot read the metadata of volume {vol_id}"


class VolumeMetadataWriteError(Error):
    name = "VolumeMetadataWriteError"
    msg = "Cannot write the metadata of volume {vol_id}"


class prepareIllegalVolumeError(Error):  # noqa: N801 - VDSM's name
    name = "prepareIllegalVolumeError"
    msg = "Cannot prepare ILLEGAL volume {vol_id} of domain {sd_id}"


class IncorrectType(Error):
    name = "IncorrectType"
    msg = "Incorrect volume preallocation type {type}"


class InvalidVolumeSize(Error):
    name = "InvalidVolumeSize"
    msg = "Invalid volume size {size}"


class VolumeCapacityBelowParent(Error):
    name = "VolumeCapacityBelowParent"
    msg = "Capacity {capacity} is below the capacity {parent_capacity} of parent {parent_id}"


class VolumeDescriptionTooLong(Error):
    name = "VolumeDescriptionTooLong"
    msg = "Volume description of {length} characters is longer than {limit}"


class MetadataOverflowError(Error):
    name = "MetadataOverflowError"
    msg = "Metadata of {size} bytes does not fit in {limit} bytes"


class ImageIsNotLegalChain(Error):
    name = "ImageIsNotLegalChain"
    msg = "Image {img_id} of domain {sd_id} is not a legal chain"


class ImageDoesNotExistInSD(Error):
    name = "ImageDoesNotExistInSD"
    msg = "Image {img_id} does not exist in domain {sd_id}"


class StorageDomainDoesNotExist(Error):
    name = "StorageDomainDoesNotExist"
    msg = "Storage domain {sd_id} does not exist"


class StorageDomainAlreadyExists(Error):
    name = "StorageDomainAlreadyExists"
    msg = "Storage domain {sd_id} already exists"


class StorageDomainCreationError(Error):
    name = "StorageDomainCreationError"
    msg = "Cannot create storage domain {sd_id}"


class StorageDomainIllegalRemotePath(Error):
    name = "StorageDomainIllegalRemotePath"
    msg = "Illegal storage domain path {path}"


class StorageDomainMetadataNotFound(Error):
    name = "StorageDomainMetadataNotFound"
    msg = "Metadata of storage domain {sd_id} not found"


class StorageDomainNotInPool(Error):
    name = "StorageDomainNotInPool"
    msg = "Storage domain {sd_id} is not in pool {pool_id}"


class StorageDomainAlreadyAttached(Error):
    name = "StorageDomainAlreadyAttached"
    msg = "Storage domain {sd_id} is already attached to pool {pool_id}"


class CannotDetachMasterStorageDomain(Error):
    name = "CannotDetachMasterStorageDomain"
    msg = "Cannot detach master domain {sd_id} of pool {pool_id}"


class CannotFormatAttachedStorageDomain(Error):
    name = "CannotFormatAttachedStorageDomain"
    msg = "Cannot format storage domain {sd_id}: attached to pool {pool_id}"


class NoSpaceLeftOnDomain(Error):
    name = "NoSpaceLeftOnDomain"
    msg = "No space left on storage domain {sd_id}"


class StoragePoolUnknown(Error):
    name = "StoragePoolUnknown"
    msg = "Unknown pool {pool_id}: not connected"


class StoragePoolCreationError(Error):
    name = "StoragePoolCreationError"
    msg = "Cannot create storage pool {pool_id}"


class StoragePoolAlreadyExists(Error):
    name = "StoragePoolAlreadyExists"
    msg = "Storage pool {pool_id} already exists"


class StoragePoolMasterNotFound(Error):
    name = "StoragePoolMasterNotFound"
    msg = "Master domain {sd_id} of pool {pool_id} not found"


class StoragePoolWrongMaster(Error):
    name = "StoragePoolWrongMaster"
    msg = "Domain {sd_id} is not the master of pool {pool_id}"


class CannotConnectMultiplePools(Error):
    name = "CannotConnectMultiplePools"
    msg = "Cannot connect pool {pool_id}: connected to pool {connected}"


class SpmStatusError(Error):
    name = "SpmStatusError"
    msg = "Not SPM of pool {pool_id}"


class SpmStopError(Error):
    name = "SpmStopError"
    msg = "Cannot stop SPM of pool {pool_id}: unfinished tasks {tasks}"


class SpmRequestUnavailable(Error):
    """A request only the SPM may carry out (extend, set legality) on a host
    that is not SPM: no path to the SPM exists yet (the storage mailbox)."""

    name = "SpmRequestUnavailable"
    msg = "Cannot {request} on pool {pool_id}: this host is not SPM and cannot reach it"


# Storage server connections (storage/connections.py, discovery.py).


class InvalidConnectionParams(Error):
    """connectionParams that are not [{id (a UUID), connection}]; answered as
    invalid params (-32602), like the schema's own check."""

    name = "InvalidParams"
    msg = "Invalid connectionParams: {value!r}"


class StorageServerConnectionError(Error):
    name = "StorageServerConnectionError"
    msg = "Cannot connect to {connection}"


class StorageServerDisconnectionError(Error):
    name = "StorageServerDisconnectionError"
    msg = "Cannot disconnect from {connection}"


class StorageServerValidationError(Error):
    name = "StorageServerValidationError"
    msg = "Not a usable {domain_type} connection: {connection!r}"


# Image.cloneStructure, Image.syncData, Image.delete (storage/clone.py,
# sync.py, image_delete.py, image_ops.py).


class SameSourceAndDestination(Error):
    name = "SameSourceAndDestination"
    msg = "Image {img_id}: source and destination are the same domain {sd_id}"


class ImageStructureMismatch(Error):
    name = "ImageStructureMismatch"
    msg = "Image {img_id} on domain {sd_id} does not have the source's structure"


class InvalidSyncType(Error):
    name = "InvalidSyncType"
    msg = "Invalid sync type {sync_type}"
