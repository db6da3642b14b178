"""Error codes as VDSM has them: a name VDSM has keeps VDSM's number, our own
names sit in a range of our own that no VDSM module uses.

VDSM's numbers are kept here, transcribed from oVirt VDSM's
``lib/vdsm/common/exception.py`` (class names), ``lib/vdsm/common/define.py``
(the legacy ``errCode`` names such as ``noVM``) and
``lib/vdsm/storage/exception.py``; not only the names the schema uses today,
so that an error added later under a VDSM name must take VDSM's number.
"""

from __future__ import annotations

import pytest

from rpc import schema
from vdsm_lsm import api_schema


def _table(text: str) -> dict[str, int]:
    """``code name[, code name...]`` lines; ``#`` starts a comment."""
    table: dict[str, int] = {}
    for line in text.splitlines():
        line = line.partition("#")[0]
        for entry in filter(None, (e.strip() for e in line.split(","))):
            code, name = entry.split()
            assert name not in table, f"{name} listed twice"
            table[name] = int(code)
    return table


VDSM_CODES = _table("""
# lib/vdsm/common/exception.py, by class name
1 NoSuchVM, 3 AccessTimeout, 4 VMExists, 5 UnsupportedVMType, 6 VMIsDown, 7 CopyFailed
8 CannotCreateSparse, 9 CannotCreateVM, 10 NoConnectionToPeer, 11 MissingParameter
12 MigrationError, 13 ImageFileNotFound, 14 OutOfMemory, 16 UnexpectedError
17 UnsupportedImageFormat, 18 SpiceTicketError, 19 NonResponsiveGuestAgent
40 ResourceUnavailable, 41 ChangeDiskFailed, 42 VMDestroyFailed, 43 UnsupportedFenceAgent
44 MethodNotImplemented, 45 HotplugDiskFailed, 46 HotunplugDiskFailed
47 MigrationCancelationFailed, 48 SnapshotFailed, 49 HotplugNicFailed, 50 HotunplugNicFailed
51 MigrationInProgress, 52 MergeFailed, 53 BalloonError, 54 MOMPolicyUpdateFailed
55 ReplicaError, 56 UpdateDeviceFailed, 57 CannotRetrieveHWInfo, 58 BadDiskResizeParameter
59 TransientError, 60 SetNumberOfCpusFailed, 61 SetHAPolicyFailed, 62 CpuTuneError
63 UpdateVMPolicyFailed, 64 UpdateIOTuneError, 65 V2VConnectionError, 66 NoSuchJob
67 V2VNoSuchOVF, 68 JobNotDone, 69 JobExists, 70 HotplugMemFailed, 71 KSMUpdateFailed
72 BadSecretRequest, 73 SecretRegistrationFailed, 74 SecretUnregistrationFailed
76 FreezeGuestFSFailed, 77 ThawGuestFSFailed, 78 HookFailed, 79 DestinationVolumeTooSmall
80 AbortNotSupported, 81 MigrationNotInProgress, 82 MigrationLimitExceeded
83 HostdevDetachFailed, 84 JobNotActive, 85 HotunplugMemFailed, 86 HotplugLeaseFailed
87 HotunplugLeaseFailed, 88 ReplicationNotInProgress, 89 ExternalDataFailed, 90 ResetFailed
99 RecoveryInProgress, 100 GeneralException, 101 InvalidConfiguration, 443 ActionStopped
1100 ResourceExhausted, 1500 HookError, 1600 BackupError, 1601 NoSuchBackupError
1610 CheckpointError, 1611 NoSuchCheckpointError, 1612 InconsistentCheckpointError
1620 AddBitmapError, 1621 MergeBitmapError, 1622 RemoveBitmapError, 1630 CannotPrepareImage
# lib/vdsm/common/define.py errCode names (the virt verbs answer these)
1 noVM, 3 nfsErr, 4 exist, 5 noVmType, 6 down, 7 copyerr, 8 sparse, 9 createErr
10 noConPeer, 11 MissParam, 12 migrateErr, 13 imageErr, 14 outOfMem, 16 unexpected
17 unsupFormat, 18 ticketErr, 19 nonresp, 40 unavail, 41 changeDisk, 42 destroyErr
43 fenceAgent, 44 noimpl, 45 hotplugDisk, 46 hotunplugDisk, 47 migCancelErr, 48 snapshotErr
49 hotplugNic, 50 hotunplugNic, 51 migInProgress, 52 mergeErr, 53 balloonErr, 54 momErr
55 replicaErr, 56 updateDevice, 57 hwInfoErr, 58 resizeErr, 59 transientErr
60 setNumberOfCpusErr, 61 haErr, 62 cpuTuneErr, 63 updateVmPolicyErr, 64 updateIoTuneErr
65 V2VConnection, 67 V2VNoSuchOvf, 70 hotplugMem, 71 ksmErr, 72 secretBadRequestErr
73 secretRegisterErr, 74 secretUnregisterErr, 75 unsupportedOperationErr, 76 freezeErr
77 thawErr, 78 hookError, 79 destVolumeTooSmall, 81 migNotInProgress, 82 migrateLimit
99 recovery, 83 hostdevDetachErr
# lib/vdsm/storage/exception.py
1000 InvalidParameterException, 1001 InvalidDefaultExceptionException, 200 StorageException
3000 ResourceException, 4000 VolumeGeneralException, 4900 UnicodeArgumentException
2000 MiscNotImplementedException, 2001 MiscFileReadException, 2002 MiscFileWriteException
2003 MiscBlockReadException, 2004 MiscBlockWriteException, 2005 MiscOperationInProgress
2006 MiscBlockWriteIncomplete, 2007 MiscBlockReadIncomplete, 2008 MiscDirCleanupFailure
201 VolumeDoesNotExist, 202 IncorrectFormat, 203 VolumeIsBusy, 204 VolumeImageHasChildren
205 VolumeCreationError, 206 VolumeExtendingError, 207 VolumeMetadataReadError
208 VolumeMetadataWriteError, 209 VolumeAccessError, 210 VolumeUnlinkError
211 OrphanVolumeError, 212 VolumeAlreadyExists, 213 VolumeNonWritable, 214 VolumeNonShareable
215 VolumeOwnershipError, 216 VolumeCannotGetParent, 217 CannotCloneVolume
218 CannotShareVolume, 219 SharedVolumeNonWritable, 220 InternalVolumeNonWritable
221 CannotModifyVolumeTime, 222 CannotDeleteVolume, 223 CannotDeleteSharedVolume
224 NonLeafVolumeNotWritable, 225 VolumeCopyError, 226 createIllegalVolumeSnapshotError
227 prepareIllegalVolumeError, 229 createVolumeSizeError
230 VolumeWasNotPreparedBeforeTeardown, 231 IncorrectType, 232 VolumeResizeValueError
233 VolumeNotSparse, 234 CannotSparsifyVolume, 235 InvalidVolumeUpdate
250 ImagesActionError, 251 TemplateCreationError, 252 MergeSnapshotsError, 253 MoveImageError
254 ImagePathError, 255 ImageValidationError, 256 ImageDeleteError
259 SourceImageActionError, 260 DestImageActionError, 261 CopyImageError
262 ImageIsNotLegalChain, 263 CouldNotValideTemplateOnTargetDomain
264 MultipleMoveImageError, 265 OverwriteImageError, 266 MoveTemplateImageError
268 ImageDoesNotExistInSD
300 StoragePoolActionError, 301 StoragePoolCreationError, 302 StoragePoolConnectionError
303 StoragePoolDisconnectionError, 304 StoragePoolMasterNotFound, 305 StorageUpdateVmError
306 ReconstructMasterError, 307 StoragePoolTooManyMasters, 308 StoragePoolDestroyingError
309 StoragePoolUnknown, 310 StoragePoolHasPotentialMaster, 311 StoragePoolInternalError
312 ImageMissingFromVm, 313 StoragePoolNotConnected, 316 StoragePoolAlreadyExists
317 IsoCannotBeMasterDomain, 318 StoragePoolCheckError, 319 BackupCannotBeMasterDomain
320 MissingOvfFileFromVM, 321 ImageNotOnTargetDomain, 322 VMPathNotExists
323 CannotConnectMultiplePools, 324 StoragePoolWrongMaster, 325 StoragePoolConnected
326 StoragePoolHigherVersionMasterFound, 327 StoragePoolDescriptionTooLongError
328 TooManyDomainsInStoragePoolError, 329 ImagesNotSupportedError, 330 GetFileStatsError
348 StorageDomainBlockSizeMismatch, 349 DiscardIsNotSupported, 350 StorageDomainActionError
351 StorageDomainCreationError, 352 StorageDomainFormatError, 353 StorageDomainNotInPool
354 StorageDomainAttachError, 355 StorageDomainMasterError, 356 StorageDomainDetachError
357 StorageDomainDeactivateError, 358 StorageDomainDoesNotExist
359 StorageDomainActivateError, 360 StorageDomainFSNotMounted, 361 StorageDomainNotEmpty
362 StorageDomainMetadataCreationError, 363 StorageDomainMetadataFileMissing
364 StorageDomainMetadataNotFound, 365 StorageDomainAlreadyExists
366 StorageDomainMasterUnmountError, 367 BlockStorageDomainMasterFSCKError
368 BlockStorageDomainMasterMountError, 369 StorageDomainNotActive
370 StorageDomainMasterCopyError, 371 StorageDomainLayoutError, 372 StorageDomainTypeError
373 GetStorageDomainListError, 374 VolumesZeroingError, 375 StorageDomainNotMemberOfPool
376 StorageDomainStatusError, 377 StorageDomainCheckError, 378 StorageDomainTypeNotBackup
379 StorageDomainAccessError, 380 StorageDomainAlreadyAttached
381 StorageDomainStateTransitionIllegal, 382 StorageDomainActive
383 CannotDetachMasterStorageDomain, 384 FileStorageDomainStaleNFSHandle
385 StorageDomainInsufficientPermissions, 386 StorageDomainClassError
387 StorageDomainDescriptionTooLongError, 389 TooManyPVsInVG
390 StorageDomainIllegalRemotePath, 391 CannotFormatAttachedStorageDomain
392 CannotFormatStorageDomainInConnectedPool, 393 StorageDomainRefreshError
394 UnsupportedDomainVersion, 395 CurrentVersionTooAdvancedError, 396 PoolUpgradeInProgress
397 NoSpaceLeftOnDomain, 398 MixedSDVersionError, 399 StorageDomainTargetUnsupported
400 InvalidTask, 401 UnknownTask, 402 TaskClearError, 403 TaskNotFinished
404 InvalidTaskType, 405 AddTaskError, 406 TaskInProgress, 407 TaskMetaDataSaveError
408 TaskMetaDataLoadError, 409 TaskDirError, 410 TaskStateError, 411 TaskAborted
412 UnmanagedTask, 413 TaskPersistError, 420 InvalidJob, 430 InvalidRecovery
440 InvalidTaskMng, 441 TaskStateTransitionError, 442 TaskHasRefs
450 StorageServerActionError, 451 StorageServerConnectionError
452 StorageServerDisconnectionError, 453 StorageServerValidationError
454 StorageServeriSCSIError, 455 MultipathReloadError, 456 GetiSCSISessionListError
457 AddiSCSIPortalError, 458 RemoveiSCSIPortalError, 459 RemoveiSCSINodeError
460 AddiSCSINodeError, 461 SetiSCSIAuthError, 462 SetiSCSIUsernameError
463 SetiSCSIPasswdError, 464 iSCSILoginError, 465 iSCSISetupError, 467 MultipathSetupError
468 StorageTypeError, 469 StorageServerAccessPermissionError, 470 MountTypeError
471 MountParsingError, 472 InvalidIpAddress, 473 iSCSIifaceError, 474 iSCSILogoutError
475 iSCSIDiscoveryError, 476 iSCSILoginAuthError, 477 MountError
478 StorageServerConnectionRefIdAlreadyInUse, 479 StorageServerConnectionRefIdDoesNotExist
480 UnsupportedGlusterVolumeReplicaCountError, 481 ImageTicketsError, 482 ImageDaemonError
483 ImageDaemonUnsupported, 484 ImageVerificationError
500 VolumeGroupActionError, 501 VolumeGroupPermissionsError, 502 VolumeGroupCreateError
503 VolumeGroupExtendError, 504 VolumeGroupSizeError, 505 VolumeGroupAlreadyExistsError
506 VolumeGroupDoesNotExist, 507 VolumeGroupRenameError, 508 VolumeGroupRemoveError
509 VolumeGroupUninitialized, 510 VolumeGroupReadTagError, 513 VolumeGroupScanError
514 GetVolumeGroupListError, 515 VolumeGroupHasDomainTag, 516 VolumeGroupReplaceTagError
517 VolumeGroupBlockSizeError, 518 DeviceBlockSizeError, 519 VolumeGroupReduceError
550 CannotCreateLogicalVolume, 551 CannotRemoveLogicalVolume
552 CannotDeactivateLogicalVolume, 553 CannotAccessLogicalVolume
554 LogicalVolumeExtendError, 555 LogicalVolumesListError, 556 LogicalVolumeRefreshError
557 LogicalVolumeScanError, 558 CannotActivateLogicalVolume
559 LogicalVolumePermissionsError, 560 LogicalVolumeAddTagError
561 LogicalVolumeRemoveTagError, 562 GetLogicalVolumeTagError
563 GetLogicalVolumesByTagError, 564 GetAllLogicalVolumeTagsError
565 GetLogicalVolumeDevError, 566 LogicalVolumeRenameError
567 CannotWriteAccessLogialVolume, 568 CannotSetRWLogicalVolume, 569 LogicalVolumesScanError
570 CannotActivateLogicalVolumes, 571 GetLogicalVolumeDataError
572 LogicalVolumeReplaceTagError, 600 BlockDeviceActionError, 601 PhysDevInitializationError
602 LVMSetupError, 603 CouldNotRetrievePhysicalVolumeList, 604 LogicalVolumeAlreadyExists
605 CouldNotRetrieveLogicalVolumesList, 606 InaccessiblePhysDev, 607 PartitionedPhysDev
608 MkfsError, 609 MissingTagOnLogicalVolume, 610 LogicalVolumeDoesNotExistError
611 LogicalVolumeCachingError, 612 LogicalVolumeWrongTagError, 613 VgMetadataCriticallyFull
614 SmallVgMetadata, 615 CouldNotResizePhysicalVolume, 616 UnexpectedVolumeGroupMetadata
617 ForbiddenPhysicalVolumeOperation, 618 CouldNotMovePVData, 619 NoSuchPhysicalVolume
620 NoSuchDestinationPhysicalVolumes
650 SpmStartError, 651 AcquireLockFailure, 652 SpmParamsMismatch, 653 SpmStopError
654 SpmStatusError, 656 IsSpm, 657 DomainAlreadyLocked, 658 DomainLockDoesNotExist
660 ReleaseLockFailure, 661 AcquireHostIdFailure, 662 ReleaseHostIdFailure
700 HostIdMismatch, 701 ClusterLockInitError, 702 InquireNotSupportedError
749 MetaDataGeneralError, 750 MetaDataKeyError, 751 MetaDataKeyNotFoundError
752 MetaDataSealIsBroken, 753 MetaDataValidationError, 754 MetaDataMappingError
756 MetadataOverflowError, 757 MetadataCleared
800 ImportError, 801 ImportInfoError, 802 ImportUnknownType, 803 ExportError
850 ResourceNamespaceNotEmpty, 851 ResourceTimeout, 852 ResourceDoesNotExist
853 InvalidResourceName, 854 ResourceReferenceInvalid, 855 ResourceAcqusitionFailed
900 StorageDomainIsMemberOfPool, 910 DomainHasGarbage, 911 GenerationMismatch
920 VolumeIsNotInChain, 921 WrongParentVolume, 922 UnexpectedVolumeState
925 ManagedVolumeNotSupported, 926 ManagedVolumeHelperFailed
927 ManagedVolumeAlreadyAttached, 928 ManagedVolumeUnsupportedDevice
929 ManagedVolumeConnectionMismatch, 936 NoSuchLease
""")

# One name, two numbers in VDSM: common's UnsupportedOperation is 75, storage's 2009.
VDSM_AMBIGUOUS = {"UnsupportedOperation": {75, 2009}}

# The names the schema shares with VDSM today: callers match on these numbers.
SHARED = """
noVM exist createErr imageErr unavail changeDisk noimpl snapshotErr replicaErr
ReplicationNotInProgress RecoveryInProgress GeneralException ActionStopped
StorageException VolumeDoesNotExist IncorrectFormat VolumeIsBusy VolumeImageHasChildren
VolumeAlreadyExists VolumeExtendingError VolumeMetadataReadError VolumeMetadataWriteError
prepareIllegalVolumeError IncorrectType ImagePathError ImageIsNotLegalChain
ImageDoesNotExistInSD StoragePoolCreationError StoragePoolMasterNotFound StoragePoolUnknown
StoragePoolAlreadyExists CannotConnectMultiplePools StoragePoolWrongMaster
StorageDomainCreationError StorageDomainNotInPool StorageDomainDoesNotExist
StorageDomainMetadataNotFound StorageDomainAlreadyExists StorageDomainAlreadyAttached
CannotDetachMasterStorageDomain StorageDomainIllegalRemotePath
CannotFormatAttachedStorageDomain NoSpaceLeftOnDomain UnknownTask TaskNotFinished
AddTaskError TaskMetaDataSaveError TaskAborted StorageServerConnectionError
StorageServerDisconnectionError StorageServerValidationError VolumeGroupCreateError
VolumeGroupSizeError VolumeGroupAlreadyExistsError VolumeGroupDoesNotExist
VolumeGroupRemoveError CannotCreateLogicalVolume CannotRemoveLogicalVolume
CannotDeactivateLogicalVolume LogicalVolumeExtendError LogicalVolumeRefreshError
CannotActivateLogicalVolume LogicalVolumeReplaceTagError PhysDevInitializationError
LogicalVolumeAlreadyExists LogicalVolumeDoesNotExistError AcquireLockFailure SpmStopError
SpmStatusError ReleaseLockFailure AcquireHostIdFailure ClusterLockInitError
MetadataOverflowError ResourceTimeout
""".split()

# JSON-RPC 2.0's own errors (VDSM's yajsonrpc has the same numbers).
JSONRPC_CODES = {
    "ParseError": -32700, "InvalidRequest": -32600, "MethodNotFound": -32601,
    "InvalidParams": -32602,
}

# Every range VDSM uses or reserves, inclusive.  Its modules group codes in
# blocks; a block VDSM has started counts as VDSM's even where its numbers
# are not all used yet.
VDSM_RANGES = [
    (-32768, -32000),  # JSON-RPC, reserved by the spec (yajsonrpc)
    (0, 199),  # common/exception.py: virt 1-99 (20-35 network), 100 General, 101
    (200, 999),  # storage/exception.py: volumes ... VM leases (443 ActionStopped)
    (1000, 1199),  # InvalidParameterException 1000-1001, ResourceExhausted 1100
    (1500, 1699),  # HookError 1500, backups, checkpoints, bitmaps, images 1600-1639
    (2000, 2099),  # storage Misc* 2000-2009
    (3000, 3099),  # ResourceException 3000
    (4000, 4999),  # VolumeGeneralException 4000, gluster 4100-4800, Unicode 4900
    (5000, 2**31 - 1),  # "DO NOT USE CODES GREATER THAN 5000": the engine's
]

# The project's own range: VDSM leaves all of it free.
PROJECT_RANGE = range(3100, 4000)


@pytest.fixture(scope="module")
def api() -> schema.Schema:
    return api_schema.load()


def _in_vdsm_range(code: int) -> bool:
    return any(low <= code <= high for low, high in VDSM_RANGES)


def test_table_of_vdsm_codes_lies_in_vdsm_ranges():
    # The ranges are what the table says VDSM uses: nothing outside them.
    outside = {n: c for n, c in VDSM_CODES.items() if not _in_vdsm_range(c)}
    assert not outside
    # ... and the project's range overlaps none of them.
    last = PROJECT_RANGE.stop - 1
    assert all(high < PROJECT_RANGE.start or low > last for low, high in VDSM_RANGES)


def test_every_vdsm_name_has_vdsm_number(api):
    wrong = {
        name: (code, VDSM_CODES[name])
        for name, code in api.errors.items()
        if name in VDSM_CODES and code != VDSM_CODES[name]
    }
    assert not wrong, "schema code, VDSM's code"
    for name, codes in VDSM_AMBIGUOUS.items():
        assert name not in api.errors or api.errors[name] in codes


def test_shared_names_are_in_the_schema(api):
    missing = [name for name in SHARED if name not in api.errors]
    assert not missing
    assert api.errors["VolumeAlreadyExists"] == 212  # 205 is VolumeCreationError
    assert set(SHARED) <= set(VDSM_CODES)


def test_jsonrpc_codes(api):
    for name, code in JSONRPC_CODES.items():
        assert api.errors[name] == code, name


def test_own_codes_lie_in_the_project_range(api):
    own = {
        name: code
        for name, code in api.errors.items()
        if name not in VDSM_CODES and name not in VDSM_AMBIGUOUS and name not in JSONRPC_CODES
    }
    assert own
    outside = {n: c for n, c in own.items() if c not in PROJECT_RANGE}
    assert not outside, f"own codes must be in {PROJECT_RANGE}"
    in_vdsm = {n: c for n, c in own.items() if _in_vdsm_range(c)}
    assert not in_vdsm
    taken = set(VDSM_CODES.values()) | set().union(*VDSM_AMBIGUOUS.values())
    assert not {n: c for n, c in own.items() if c in taken}


def test_only_the_unexpected_is_100(api):
    assert [n for n, c in api.errors.items() if c == 100] == ["GeneralException"]
