"""Virt errors. Each names its code in the schema's error table (vdsm_lsm/api.yml).

Exception tree::

    common.errors.Error
     +-- Error                  base of virt errors (never raised itself)
          +-- NoVMError          noVM 1
          +-- VMExistsError          exist 4
          +-- CreateError      createErr 9 (libvirt refused the domain)
          +-- ImageError        imageErr 13 (a drive's volume cannot be prepared)
          +-- SnapshotError    snapshotErr 48
          +-- RecoveryInProgress  RecoveryInProgress 99
          +-- InvalidVMParamsError   VMParamsInvalid 3400 (semantics; the schema checks types)
          +-- OperationError   VMOperationFailed 3401 (cont/destroy refused by libvirt)
          +-- LibvirtUnavailableError  LibvirtConnectionError 3402
          +-- ReplicaNotReadyError  unavail 40 (mirror not ready: retry Finish)
          +-- PivotError       changeDisk 41 (pivot failed: retry or abort)
          +-- ReplicaError     replicaErr 55 (blockCopy refused, already replicating)
          +-- ReplicationNotInProgressError  ReplicationNotInProgress 88
          +-- DestinationNotSyncedError  DestinationChainNotSynced 3403
                               (an internal destination volume is not LEGAL)
          +-- NoConnectionToPeerError  noConPeer 10 (the destination daemon cannot be reached)
          +-- MigrationError   migrateErr 12 (refused or failed; virt/migration.py)
          +-- MigrationInProgressError  migInProgress 51
          +-- MigrationNotInProgressError  migNotInProgress 81
          +-- MigrationCancelError  migCancelErr 47
          +-- PivotImpossibleError  PivotImpossible 3404 (abort-only: the mirror
                               is gone or failed; abort the replication)
          +-- SyncWritesUnsupportedError  SyncWritesUnsupported 3405
                               (syncWrites with [replication] api = blockrebase)

Errors keep their root cause as ``__cause__`` (``raise ... from e``).
"""

from __future__ import annotations

from common import errors


class Error(errors.Error):
    name = "GeneralException"
    msg = "Virt error"


class NoVMError(Error):
    name = "noVM"
    msg = "Virtual machine {vm_id} does not exist"


class VMExistsError(Error):
    name = "exist"
    msg = "Virtual machine {vm_id} already exists"


class CreateError(Error):
    name = "createErr"
    msg = "Error creating virtual machine {vm_id}"


class ImageError(Error):
    name = "imageErr"
    msg = "Drive image of volume {vol_id} in image {img_id} domain {sd_id} could not be prepared"


class SnapshotError(Error):
    name = "snapshotErr"
    msg = "Snapshot of virtual machine {vm_id} failed"


class RecoveryInProgressError(Error):
    name = "RecoveryInProgress"
    msg = "Recovery of running virtual machines is in progress"


class InvalidVMParamsError(Error):
    name = "VMParamsInvalid"
    msg = "Invalid vmParams for virtual machine {vm_id}"


class OperationError(Error):
    name = "VMOperationFailed"
    msg = "Operation {op} on virtual machine {vm_id} failed"


class LibvirtUnavailableError(Error):
    name = "LibvirtConnectionError"
    msg = "Cannot connect to libvirt at {uri}"


class ReplicaNotReadyError(Error):
    name = "unavail"
    msg = "Replica of drive {drive} of virtual machine {vm_id} is not ready"


class PivotError(Error):
    name = "changeDisk"
    msg = "Pivot of drive {drive} of virtual machine {vm_id} failed"


class ReplicaError(Error):
    name = "replicaErr"
    msg = "Replication of drive {drive} of virtual machine {vm_id} failed"


class ReplicationNotInProgressError(Error):
    name = "ReplicationNotInProgress"
    msg = "No replication of drive {drive} of virtual machine {vm_id} is in progress"


class DestinationNotSyncedError(Error):
    name = "DestinationChainNotSynced"
    msg = (
        "Volume {vol_id} of the destination chain in domain {sd_id} is not synced "
        "(legality {legality}): run Image.syncData INTERNAL first"
    )


class PivotImpossibleError(Error):
    name = "PivotImpossible"
    msg = (
        "Pivot of drive {drive} of virtual machine {vm_id} is impossible: "
        "abort the replication (diskReplicateFinish with dstDisk = srcDisk)"
    )


class SyncWritesUnsupportedError(Error):
    name = "SyncWritesUnsupported"
    msg = (
        "syncWrites needs [replication] api = blockcopy, not {api} "
        "(drive {drive} of virtual machine {vm_id})"
    )


class NoConnectionToPeerError(Error):
    name = "noConPeer"
    msg = "Cannot reach the destination host {dst}"


class MigrationError(Error):
    name = "migrateErr"
    msg = "Migration of virtual machine {vm_id} failed"


class MigrationInProgressError(Error):
    name = "migInProgress"
    msg = "Virtual machine {vm_id} is being migrated"


class MigrationNotInProgressError(Error):
    name = "migNotInProgress"
    msg = "No migration of virtual machine {vm_id} is in progress"


class MigrationCancelError(Error):
    name = "migCancelErr"
    msg = "Canceling the migration of virtual machine {vm_id} failed"
