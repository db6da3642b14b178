"""The VM verbs: VM.create, destroy, cont, getStats, snapshot, diskReplicateStart,
diskReplicateFinish, migrate, migrationCreate, getMigrationStatus, migrateCancel
(virt/migration.py, virt/migration_dest.py), and Host.getVMList.

:class:`API` is the provider object the daemon wires into dispatch: verb
``VM.getStats`` is served by :meth:`API.vm_get_stats` with snake-cased
keyword params (DESIGN section 4). It owns the libvirt connection, the event
dispatcher and the registry of VMs::

    api = virt.api.API(storage, virt.api.Config(accel="tcg"))
    api.start()     # connect to libvirt, recover running VMs
    ...
    api.stop()      # close the connection; VMs keep running

``storage`` is the host-side storage service and ``spm`` the path to the pool's
SPM (virt/storage_iface.py); ``API(provider, config)`` uses storage's for both.
Verbs raise coded errors (virt/errors.py, or storage's own); during recovery
every verb answers RecoveryInProgress.  Status and replication changes are
told to the notifier given to :meth:`API.set_notifier` (virt/notify.py).

A VM whose QEMU died has its storage released, replica included, then is
Down with VDSM's exit info, listed until ``VM.destroy``; after a reconnect
to libvirtd every VM's status and mirror are read again (virt/outages.py).

``VM.getStats`` answers a list of one stats dict and ``Host.getVMList``
entries carry ``statusTime``, as VDSM's do.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
import typing
from typing import Any

import libvirt

from common import errors as common_errors
from virt import (
    connection,
    domain_def,
    errors,
    events,
    migration,
    migration_dest,
    migration_job,
    notify,
    outages,
    pivot,
    recovery,
    replication,
    snapshot,
    storage_iface,
    thinp,
    vmparams,
)
from virt import drive as drive_mod
from virt import vm as vm_mod

log = logging.getLogger("virt.api")


@dataclasses.dataclass(frozen=True)
class Config:
    """What virt is told by whoever builds it (the daemon: vdsm_lsm/app.py)."""

    libvirt_uri: str = "qemu:///system"
    # Default of vmParams.accel ([vm] accel): "kvm", or "tcg" without KVM.
    accel: str = "kvm"
    # The watermark monitor's settings (virt/thinp.py); None: no monitor.
    thinp: thinp.Config | None = None
    # Where this host's prepare links start: recovery adopts only domains whose
    # drives are all under it (a shared libvirtd runs others'). Empty: any ours.
    drive_root: str = ""
    # The call that starts a mirror ([replication] api): blockcopy or blockrebase.
    replication_api: str = "blockcopy"
    # How long a pivot or abort waits for its block job ([replication]).
    job_timeouts: pivot.Timeouts = pivot.DEFAULT
    # How long a call waits for libvirtd to answer again ([libvirt]).
    libvirt_unavailable_wait: float = connection.UNAVAILABLE_WAIT
    # Live migration to other hosts (virt/migration.py, virt/migration_dest.py).
    migration: migration_job.Config = migration_job.Config()


def status_time() -> str:
    """VDSM's statusTime: milliseconds of a monotonic clock, as a string."""
    return str(int(time.monotonic() * 1000))


class API:
    @typing.overload
    def __init__(self, storage: storage_iface.Storage, config: Config) -> None: ...

    @typing.overload
    def __init__(
        self, storage: storage_iface.HostStorage, config: Config, spm: storage_iface.SpmRequests
    ) -> None: ...

    def __init__(
        self,
        storage: storage_iface.HostStorage,
        config: Config,
        spm: storage_iface.SpmRequests | None = None,
    ) -> None:
        """storage: the host-side service; spm: the SPM-request path (omitted:
        storage is a storage_iface.Storage and serves both, see the overloads)."""
        self._storage = storage
        self._spm = spm if spm is not None else typing.cast(storage_iface.SpmRequests, storage)
        self._config = config
        self._lock = threading.Lock()
        self._vms: dict[str, vm_mod.VM] = {}
        # VMs being created: reserved ids (None until the VM object exists);
        # events reach them, the verbs do not see them.
        self._creating: dict[str, vm_mod.VM | None] = {}
        self._recovering = False
        self.events = events.Dispatcher(self._event_target)
        self.exits = outages.Exits(self._is_ours, self._teardown_drive)
        self.events.on_down = self.exits.on_down
        # Told of status and replication changes (virt/notify.py): set_notifier.
        self.notifier: notify.Notifier = notify.NOBODY
        self.connection = connection.Connection(
            config.libvirt_uri, dispatch=self.events, on_reconnect=self._resync,
            unavailable_wait=config.libvirt_unavailable_wait,
        )
        self.thinp: thinp.Monitor | None = None
        if config.thinp is not None:
            self.thinp = thinp.Monitor(storage, self._spm, self.vms, config.thinp)
            self.events.threshold_hooks.append(self.thinp.on_threshold)
            self.events.io_error_hooks.append(self.thinp.on_io_error)
        # Migrations leaving this host (peer transport: outgoing.set_connect)
        # and VMs expected to arrive.
        self.outgoing = migration.Outgoing(None, config.migration, self._spm,
                                           self._migrated_away)
        self.incoming = migration_dest.Incoming(
            self.connection, storage, self._spm, config.migration, config.accel,
            self._prepare_drive, self._teardown_drive, self._adopt)

    # Life cycle

    def start(self) -> None:
        """Connect to libvirt and recover the running VMs that are ours."""
        self._recovering = True
        try:
            self.connection.open()
            for vm in recovery.recover(
                self.connection, self._storage, self._spm, self._config.drive_root
            ):
                self._own(vm)
                with self._lock:
                    self._vms[vm.id] = vm
        finally:
            self._recovering = False
        if self.thinp is not None:
            self.thinp.start()

    def stop(self) -> None:
        """Close the connection; running VMs keep running (recovered at next start)."""
        if self.thinp is not None:
            self.thinp.stop()
        self.connection.close()

    def set_notifier(self, notifier: notify.Notifier) -> None:
        """Who is told of VM status and replication changes (the daemon's events)."""
        self.notifier = self.events.notifier = notifier
        for vm in self.vms():
            vm.notifier = notifier

    def get_vm(self, vm_id: str) -> vm_mod.VM:
        self._check_ready()
        with self._lock:
            vm = self._vms.get(vm_id)
        if vm is None:
            raise errors.NoVMError(vm_id=vm_id)
        return vm

    def vms(self) -> list[vm_mod.VM]:
        with self._lock:
            return list(self._vms.values())

    # Verbs

    def vm_create(self, vm_id: str, vm_params: dict[str, Any]) -> dict[str, Any]:
        self._check_ready()
        params = vmparams.parse(vm_id, vm_params, self._config.accel)
        with self._lock:
            if vm_id in self._vms or vm_id in self._creating:
                raise errors.VMExistsError(vm_id=vm_id)
            self._creating[vm_id] = None
        try:
            domain_def.check_free(self.connection, vm_id)
            vm = self._create(vm_id, params)
            with self._lock:
                self._vms[vm_id] = vm
        finally:
            with self._lock:
                self._creating.pop(vm_id, None)
        try:
            vm.refresh_state()
        except (libvirt.libvirtError, errors.Error) as e:
            log.warning("Cannot read state of new vm=%s: %s", vm_id, e)
        log.info("Created vm=%s name=%s status=%s", vm_id, vm.name, vm.status)
        return {"vmId": vm_id, "status": vm.status}

    def vm_destroy(self, vm_id: str, graceful_attempts: int = 1) -> bool:
        """Destroy at once (graceful_attempts: VDSM's, ignored: no guest agent here)."""
        if self.incoming.get(vm_id) is not None:
            self.incoming.abort(vm_id)  # an expected VM: release it
            return True
        vm = self.get_vm(vm_id)
        with vm.lock:
            vm.destroy_domain()
            for d in vm.drives:
                self._teardown_drive(vm.id, d)
        with self._lock:
            self._vms.pop(vm_id, None)
        log.info("Destroyed vm=%s", vm_id)
        return True

    def vm_cont(self, vm_id: str) -> bool:
        self.get_vm(vm_id).cont()
        return True

    def vm_get_stats(self, vm_id: str) -> list[dict[str, Any]]:
        """As VDSM's: a list of one stats dict."""
        return [self._stats(self.get_vm(vm_id))]

    def _stats(self, vm: vm_mod.VM) -> dict[str, Any]:
        stats = replication.add_rates(vm, vm.stats())
        stats["statusTime"] = status_time()
        migrating = self.outgoing.status(vm.id)
        if migrating is not None:
            # code: the error's name; the schema answers its number.
            stats["migration"] = dict(migrating, code=migrating["error"])
        return stats

    def vm_snapshot(
        self,
        vm_id: str,
        snap_drives: list[dict[str, Any]],
        snap_memory: str | None = None,
        frozen: bool = False,
        job_uuid: str | None = None,
        timeout: int = 30,
        freeze_timeout: int = 8,
    ) -> bool:
        """Disk-only live snapshot.  VDSM's snapMemory (a memory snapshot) is
        refused; frozen, jobUUID and the time-outs are accepted and ignored
        (no guest agent to freeze, no VM jobs)."""
        vm = self.get_vm(vm_id)
        if snap_memory:
            raise errors.SnapshotError("memory snapshots are not supported", vm_id=vm_id)
        snapshot.snapshot(vm, self._storage, snap_drives)
        if self.thinp is not None:  # the new leaves' thresholds, at once
            self.thinp.wake()
        return True

    def vm_disk_replicate_start(
        self,
        vm_id: str,
        src_disk: dict[str, Any],
        dst_disk: dict[str, Any],
        need_extend: bool = True,
        bandwidth: int = 0,
        sync_writes: bool = False,
    ) -> bool:
        replication.start(
            self.get_vm(vm_id), self._storage, src_disk, dst_disk, need_extend, bandwidth,
            sync_writes, before_copy=self.thinp.prepare_replica if self.thinp else None,
            api=self._config.replication_api,
        )
        if self.thinp is not None:
            self.thinp.wake()
        return True

    def vm_disk_replicate_finish(
        self, vm_id: str, src_disk: dict[str, Any], dst_disk: dict[str, Any]
    ) -> bool:
        vm = self.get_vm(vm_id)
        try:
            timeouts = self._config.job_timeouts
            if self.thinp is not None:
                timeouts = dataclasses.replace(timeouts, while_waiting=self.thinp.checker(vm))
            replication.finish(vm, self._storage, self._spm, src_disk, dst_disk, timeouts)
        except errors.ReplicationNotInProgressError as e:
            why = vm.exit
            if why is None or dst_disk.get("domainID") == src_disk.get("domainID"):
                raise
            # QEMU died, its mirror with it (the replica was released): as pivot's own check.
            raise errors.PivotImpossibleError(
                f"the VM is down: {why.info()['exitMessage']}", drive=e.fields.get("drive"),
                vm_id=vm_id) from e
        return True

    def vm_migrate(self, vm_id: str, params: dict[str, Any]) -> bool:
        self.outgoing.migrate(self.get_vm(vm_id), params)
        return True

    def vm_migration_create(self, vm_id: str, params: dict[str, Any]) -> dict[str, Any]:
        self._check_ready()
        with self._lock:
            if vm_id in self._vms or vm_id in self._creating or self.incoming.get(vm_id):
                raise errors.VMExistsError(vm_id=vm_id)
            self._creating[vm_id] = None
        try:
            return self.incoming.create(vm_id, params)
        finally:
            with self._lock:
                self._creating.pop(vm_id, None)

    def vm_get_migration_status(self, vm_id: str) -> dict[str, Any]:
        status = self.outgoing.status(vm_id)
        if status is None:
            self.get_vm(vm_id)  # noVM for a VM never seen here
            raise errors.MigrationNotInProgressError(vm_id=vm_id)
        return dict(status, code=status["error"])

    def vm_migrate_cancel(self, vm_id: str) -> bool:
        self.outgoing.cancel(vm_id)
        return True

    def host_get_vm_list(
        self, full_status: bool = False, vm_list: list[str] | None = None, only_uuid: bool = False
    ) -> list[Any]:
        """[{vmId, status, statusTime}] as VDSM's; vm_list filters, only_uuid
        answers the ids alone, full_status each VM's VM.getStats entry."""
        self._check_ready()
        vms = [vm for vm in self.vms() if not vm_list or vm.id in vm_list]
        if only_uuid and not full_status:
            return [vm.id for vm in vms]
        if full_status:
            return [self._stats(vm) for vm in vms]
        return [
            {"vmId": vm.id, "status": vm.status, "statusTime": status_time()} for vm in vms
        ]

    # Creating

    def _create(self, vm_id: str, params: vmparams.VMParams) -> vm_mod.VM:
        drives: list[drive_mod.Drive] = []
        try:
            for i, spec in enumerate(params.drives):
                drives.append(self._prepare_drive(vm_id, i, spec))
            vm = vm_mod.VM(vm_id, params.name, drives, self.connection)
            self._own(vm)
            with self._lock:
                self._creating[vm_id] = vm
            xml = domain_def.xml(vm_id, params, drives)
            log.info("Creating vm=%s name=%s accel=%s", vm_id, params.name, params.accel)
            log.debug("Domain vm=%s xml=%s", vm_id, xml)
            try:
                self.connection.call(lambda c: c.createXML(xml, 0), retry=False)
            except libvirt.libvirtError as e:
                raise errors.CreateError(str(e), vm_id=vm_id) from e
        except BaseException:
            self._destroy_leftover(vm_id)
            for d in reversed(drives):
                self._teardown_drive(vm_id, d)
            raise
        return vm

    def _prepare_drive(self, vm_id: str, index: int, spec: vmparams.DriveSpec,
                       allow_illegal: bool = False) -> drive_mod.Drive:
        ids = (spec.pool_id, spec.domain_id, spec.image_id, spec.volume_id)
        try:
            if allow_illegal:  # an incoming migration's leaf (virt/migration_dest.py)
                result = self._storage.prepare(*ids, allow_illegal=True)
            else:
                result = self._storage.prepare(*ids)
        except common_errors.Error:
            raise
        except Exception as e:
            raise errors.ImageError(
                str(e), sd_id=spec.domain_id, img_id=spec.image_id, vol_id=spec.volume_id
            ) from e
        try:
            chain = drive_mod.chain_from_prepare(result)
            leaf = chain[-1]
            if leaf.volume_id != spec.volume_id:
                raise errors.ImageError(
                    f"prepare returned chain ending in {leaf.volume_id}",
                    sd_id=spec.domain_id,
                    img_id=spec.image_id,
                    vol_id=spec.volume_id,
                )
            if leaf.format.lower() != spec.format:
                raise errors.InvalidVMParamsError(
                    f"drives[{index}].format is {spec.format} but the volume is {leaf.format}",
                    vm_id=vm_id,
                )
        except BaseException:
            try:
                self._storage.teardown(*ids)
            except Exception:
                log.exception("Teardown failed vm=%s volume=%s", vm_id, spec.volume_id)
            raise
        return drive_mod.Drive(
            name=drive_mod.target_name(index),
            pool_id=spec.pool_id,
            domain_id=spec.domain_id,
            image_id=spec.image_id,
            volume_id=spec.volume_id,
            format=spec.format,
            chain=chain,
            disk_type=drive_mod.disk_type(leaf.path),
            iface=spec.iface,
            propagate_errors=spec.propagate_errors,
            prepared=[spec.volume_id],
        )

    def _teardown_drive(self, vm_id: str, d: drive_mod.Drive) -> None:
        r = d.replica
        if r is not None:
            # The mirror died with QEMU; release the destination's reference.
            try:
                self._storage.teardown(r.pool_id, r.domain_id, r.image_id, r.volume_id)
            except Exception:
                log.exception("Teardown failed vm=%s replica=%s", vm_id, r.volume_id)
            d.replica = None
        for vol_id in reversed(d.prepared):
            try:
                self._storage.teardown(d.pool_id, d.domain_id, d.image_id, vol_id)
            except Exception:
                log.exception("Teardown failed vm=%s drive=%s volume=%s", vm_id, d.name, vol_id)
        d.prepared = []

    def _destroy_leftover(self, vm_id: str) -> None:
        """Destroy a domain a failed create may have started (its UUID was free)."""
        try:
            self.connection.call(lambda c: c.lookupByUUIDString(vm_id).destroy())
        except (libvirt.libvirtError, errors.Error):
            return
        log.warning("Destroyed domain of failed create vm=%s", vm_id)

    # Migrations: a VM that left, a VM that arrived

    def _migrated_away(self, vm: vm_mod.VM) -> None:
        with vm.lock:
            for d in vm.drives:
                self._teardown_drive(vm.id, d)
        with self._lock:
            self._vms.pop(vm.id, None)
        log.info("Forgot vm=%s: it runs on another host now", vm.id)

    def _adopt(self, vm: vm_mod.VM) -> None:
        self._own(vm)
        with self._lock:
            self._vms[vm.id] = vm
        notify.safely(self.notifier.vm_status, vm.id, vm.status, vm.pause_code)
        if self.thinp is not None:
            self.thinp.wake()

    # A VM whose QEMU is gone (virt/outages.py)

    def _own(self, vm: vm_mod.VM) -> None:
        """vm reports to this API: its notifier, and what to do when its domain is gone."""
        vm.notifier = self.notifier
        vm.on_gone = self.exits.gone

    def _is_ours(self, vm: vm_mod.VM) -> bool:
        with self._lock:
            return self._vms.get(vm.id) is vm

    # Events and reconnects

    def _event_target(self, vm_id: str) -> vm_mod.VM | None:
        # Expected VMs first: one being adopted is in the registry before it
        # leaves their table (virt/migration_dest.py).
        incoming = self.incoming.get(vm_id)
        with self._lock:
            return self._vms.get(vm_id) or self._creating.get(vm_id) or incoming

    def _resync(self) -> None:
        """After a reconnect: events may have been missed (virt/outages.py)."""
        outages.resync(self.vms(), self.notifier)

    def _check_ready(self) -> None:
        if self._recovering:
            raise errors.RecoveryInProgressError()
