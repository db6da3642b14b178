"""Live migration of a VM to another host, destination side: VM.migrationCreate.

The source daemon (:mod:`virt.migration`) calls ``VM.migrationCreate`` as
VDSM's source does; this host then knows the VM and expects it::

    VM.migrationCreate(vmID, params)     params: the VM as this host will run
                                         it (VM.create's vmParams), its drives
                                         on the chains this host sees
      1. the params are checked as VM.create checks them (virt/vmparams.py)
      2. every drive is prepared with its chain, ILLEGAL allowed (a moved
         leaf stays ILLEGAL until the copy is done), but every volume below
         a leaf must be LEGAL: a chain the SPM has not synced is refused
         (DestinationChainNotSynced), one it has not cloned is refused by
         storage (ImageDoesNotExistInSD, VolumeDoesNotExist)
      3. the domain XML is built as VM.create builds it (virt/domain_def.py),
         on this host's prepare links, with our metadata inside
      4. answer {vmId, status: "Migration Destination", domainXml,
         libvirtUri ([libvirt] migration_uri), migrateUri?, disksUri?}:
         with [libvirt] migration_socket_dir set, the memory and NBD streams
         listen on unix sockets there (unix:///DIR/<vmID>.{migration,nbd}.sock)

A watcher thread then follows the libvirt domain of that UUID:

- it appears paused with reason ``migration``: the VM is arriving;
- it leaves that state (running, or paused by the user when the source was
  paused): the VM is **adopted**: it joins the VM registry (its events, the
  watermark monitor, the VM verbs), its new leaves are marked LEGAL if this
  host is the SPM (otherwise the engine's ``Volume.setLegality`` does it);
- it disappears after it was seen (libvirt destroys an incoming domain whose
  migration failed or was aborted), or none appears within
  ``destination_timeout``: the VM is **released**: its chains torn down.

``VM.destroy`` of an expected VM (the source calls it when its migration
failed) releases it at once, destroying a domain that is arriving.
A daemon restarted meanwhile forgets what it expected; a domain arriving
later is recovered at start as any running domain with our metadata is.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import libvirt

from common import errors as common_errors
from virt import (
    connection,
    domain_def,
    errors,
    migration_job,
    replication,
    storage_iface,
    vmparams,
)
from virt import drive as drive_mod
from virt import vm as vm_mod

log = logging.getLogger("virt.migration_dest")

POLL = 0.2
# Domain states of a VM still arriving.
_ARRIVING = (
    libvirt.VIR_DOMAIN_PAUSED_MIGRATION,
    libvirt.VIR_DOMAIN_PAUSED_STARTING_UP,
)

PrepareDrive = Callable[[str, int, vmparams.DriveSpec, bool], drive_mod.Drive]
TeardownDrive = Callable[[str, drive_mod.Drive], None]


@dataclasses.dataclass
class Expected:
    """A VM this host expects: prepared, its domain not (fully) here yet."""

    vm: vm_mod.VM
    sockets: list[str]
    deadline: float
    seen: bool = False
    stop: threading.Event = dataclasses.field(default_factory=threading.Event)


class Incoming:
    """The VMs this host expects, by id; adopts or releases each."""

    def __init__(
        self,
        conn: connection.Connection,
        storage: storage_iface.HostStorage,
        spm: storage_iface.SpmRequests,
        config: migration_job.Config,
        default_accel: str,
        prepare_drive: PrepareDrive,
        teardown_drive: TeardownDrive,
        adopt: Callable[[vm_mod.VM], None],
    ) -> None:
        """prepare_drive(vm_id, index, spec, allow_illegal) / teardown_drive(vm_id,
        drive): how VM.create prepares and releases a drive; adopt(vm): add
        an arrived VM to the registry."""
        self._conn = conn
        self._storage = storage
        self._spm = spm
        self._config = config
        self._accel = default_accel
        self._prepare_drive = prepare_drive
        self._teardown_drive = teardown_drive
        self._adopt = adopt
        self._lock = threading.Lock()
        self._expected: dict[str, Expected] = {}

    def get(self, vm_id: str) -> vm_mod.VM | None:
        """The expected VM (its events reach it), None if not expected."""
        with self._lock:
            exp = self._expected.get(vm_id)
        return exp.vm if exp is not None else None

    def vm_ids(self) -> list[str]:
        with self._lock:
            return list(self._expected)

    # VM.migrationCreate

    def create(self, vm_id: str, params: dict[str, Any]) -> dict[str, Any]:
        """Prepare for vm_id; the caller has reserved the id (no VM, no other create)."""
        checked = vmparams.parse(vm_id, params, self._accel)
        domain_def.check_free(self._conn, vm_id)
        drives: list[drive_mod.Drive] = []
        try:
            for i, spec in enumerate(checked.drives):
                drives.append(self._prepare_drive(vm_id, i, spec, True))
            for d in drives:
                self._check_synced(d)
            xml = domain_def.xml(vm_id, checked, drives)
            sockets = self._sockets(vm_id)
        except BaseException:
            for d in reversed(drives):
                self._teardown_drive(vm_id, d)
            raise
        vm = vm_mod.VM(vm_id, checked.name, drives, self._conn)
        exp = Expected(vm, sockets, time.monotonic() + self._config.destination_timeout)
        with self._lock:
            self._expected[vm_id] = exp
        threading.Thread(target=self._watch, args=(exp,), name=f"incoming-{vm_id[:8]}",
                         daemon=True).start()
        log.info("Expecting vm=%s name=%s drives=%s", vm_id, checked.name,
                 [(d.name, d.domain_id, d.volume_id) for d in drives])
        log.debug("Destination domain vm=%s xml=%s", vm_id, xml)
        answer = {
            "vmId": vm_id,
            "status": migration_job.DESTINATION_STATUS,
            "domainXml": xml,
            "libvirtUri": self._config.libvirt_uri,
        }
        if sockets:
            answer["migrateUri"] = "unix://" + sockets[0]
            answer["disksUri"] = "unix://" + sockets[1]
        return answer

    def _check_synced(self, d: drive_mod.Drive) -> None:
        unsynced = self._storage.unsynced_volumes(d.pool_id, d.domain_id, d.image_id,
                                                  d.volume_id)
        if unsynced:
            first = unsynced[0]
            log.warning("Refusing incoming drive on unsynced chain sd=%s img=%s vol=%s "
                        "legality=%s", d.domain_id, d.image_id, first["volumeID"],
                        first.get("legality"))
            raise errors.DestinationNotSyncedError(
                vol_id=first["volumeID"], sd_id=d.domain_id, legality=first.get("legality"))

    def _sockets(self, vm_id: str) -> list[str]:
        """The unix sockets the incoming streams will listen on (none: TCP)."""
        base = self._config.socket_dir
        if not base:
            return []
        os.makedirs(base, exist_ok=True)
        paths = [os.path.join(base, f"{vm_id}.{kind}.sock") for kind in ("migration", "nbd")]
        _remove(paths)
        return paths

    # VM.destroy of an expected VM

    def abort(self, vm_id: str) -> None:
        """Release an expected VM now (destroying a domain that is arriving)."""
        with self._lock:
            exp = self._expected.pop(vm_id, None)
        if exp is None:
            raise errors.NoVMError(vm_id=vm_id)
        exp.stop.set()
        self._release(exp, "VM.destroy")

    # Watching

    def _watch(self, exp: Expected) -> None:
        vm_id = exp.vm.id
        while not exp.stop.wait(POLL):
            try:
                state, reason = self._conn.call(
                    lambda c: c.lookupByUUIDString(vm_id).state(0))
            except libvirt.libvirtError as e:
                if e.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                    log.warning("Cannot read incoming vm=%s: %s", vm_id, e)
                    continue
                if exp.seen:
                    self._give_up(exp, "the incoming domain is gone: the migration failed")
                    return
                if time.monotonic() > exp.deadline:
                    self._give_up(exp, f"no domain arrived in {self._config.destination_timeout}s")
                    return
                continue
            except common_errors.Error as e:
                log.warning("Cannot read incoming vm=%s: %s", vm_id, e)
                continue
            if not exp.seen:
                log.info("Incoming domain appeared vm=%s state=%s reason=%s", vm_id, state,
                         reason)
                exp.seen = True
            if state in (libvirt.VIR_DOMAIN_PAUSED, libvirt.VIR_DOMAIN_NOSTATE) and (
                state == libvirt.VIR_DOMAIN_NOSTATE or reason in _ARRIVING
            ):
                continue
            if state in (libvirt.VIR_DOMAIN_SHUTOFF, libvirt.VIR_DOMAIN_CRASHED):
                self._give_up(exp, f"the incoming domain stopped (state {state})", destroy=True)
                return
            self._arrived(exp)
            return

    def _take(self, exp: Expected) -> bool:
        """Whether this caller decides exp's fate (VM.destroy may have already)."""
        with self._lock:
            if self._expected.get(exp.vm.id) is not exp:
                return False
            del self._expected[exp.vm.id]
            return True

    def _arrived(self, exp: Expected) -> None:
        vm = exp.vm
        try:
            vm.refresh_state()
        except (libvirt.libvirtError, common_errors.Error) as e:
            log.warning("Cannot read state of arrived vm=%s: %s", vm.id, e)
        with self._lock:
            if self._expected.get(vm.id) is not exp:
                return
            # In the registry before it leaves this table: an event looking
            # here first, then there, always finds it.
            self._adopt(vm)
            del self._expected[vm.id]
        _remove(exp.sockets)
        for d in vm.drives:
            replication.mark_leaf_legal(self._spm, vm.id, d.name, d.pool_id, d.domain_id,
                                        d.image_id, d.volume_id)
        log.info("Adopted migrated vm=%s status=%s drives=%s", vm.id, vm.status,
                 [(d.name, d.domain_id, d.volume_id) for d in vm.drives])

    def _give_up(self, exp: Expected, reason: str, destroy: bool = False) -> None:
        if self._take(exp):
            self._release(exp, reason, destroy)

    def _release(self, exp: Expected, reason: str, destroy: bool = True) -> None:
        vm = exp.vm
        log.warning("Releasing expected vm=%s: %s", vm.id, reason)
        if destroy:
            try:
                vm.destroy_domain()
            except common_errors.Error as e:
                log.error("Cannot destroy incoming domain vm=%s: %s", vm.id, e)
        for d in reversed(vm.drives):
            self._teardown_drive(vm.id, d)
        _remove(exp.sockets)


def _remove(paths: list[str]) -> None:
    for path in paths:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as e:
            log.warning("Cannot remove migration socket %s: %s", path, e)
