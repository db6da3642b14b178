"""Live migration of a VM to another host, source side: VM.migrate, its status, cancel.

Live storage migration without shared storage (DESIGN section 1, second
table): host A runs the VM and cannot see the destination domain, host B
can.  The SPM has cloned the image's structure onto the destination and
copied its internal volumes (``Image.syncData INTERNAL``); only the leaf is
left to copy, and it travels with the VM::

    A: VM.migrate(vmID, {dst, diskMappings, maxBandwidth})
       1. checks the VM and the mapping (each srcDisk a drive's leaf, each
          dstDisk the same image and leaf on another domain of the pool)
       2. calls B's VM.migrationCreate with the VM as B will run it (its
          vmParams read from the live domain XML, the mapped drives on the
          destination chain): B prepares that chain (ILLEGAL leaf allowed,
          internal volumes LEGAL) and answers the destination domain XML,
          its libvirt URI and the unix sockets of the streams
       3. in the background: virDomainMigrateToURI3(B's libvirt URI,
          {MIGRATE_DISKS: the mapped drives, DEST_XML, URI, DISKS_URI,
          BANDWIDTH}, LIVE | PEER2PEER | ABORT_ON_ERROR | NON_SHARED_INC):
          QEMU copies the leaf over NBD while the guest writes
          (``copying-disks``), then memory (``memory``), then switches
    done:  A tears its source chain down and forgets the VM; if A is the
           SPM it marks the destination leaves LEGAL (else the engine's
           Volume.setLegality, or B if B is the SPM)
    error: the VM keeps running on A on its source chain; B is told to let
           go (its VM.destroy of the incoming VM); the status says why
           (``failed`` or ``canceled``, with the error's name)

Refusals happen before anything moves, in the call: a bad mapping
(``migrateErr``), a destination that cannot be reached (``noConPeer``),
or B's own refusal under B's code (the chain not cloned:
``ImageDoesNotExistInSD`` / ``VolumeDoesNotExist``; not synced:
``DestinationChainNotSynced``).  While it runs, a monitor thread reads
``virDomainGetJobStats`` (phase, progress, data remaining, rate) and pings
B's daemon; if B's daemon does not answer for ``peer_timeout`` seconds the
migration is aborted (code ``noConPeer``), so the VM stays where a daemon
manages it.  ``VM.migrateCancel`` aborts the job (``virDomainAbortJob``).

The running job is :class:`virt.migration_job.Migration`; the destination
side is :mod:`virt.migration_dest`.  virt never imports the transport: the
daemon gives a :data:`virt.migration_job.Connect` factory ((address,
timeout) -> :class:`virt.migration_job.Peer`) whose ``call`` raises the
destination's coded error as a ``common.errors.Error`` under the
destination's name, or ``OSError`` when it cannot be reached.

Not done here: a thin block destination leaf is not extended while the VM
arrives (no watermark monitor runs for a VM that is not there yet); it has
its initial size (one chunk) for the copy, and a copy that needs more
fails the migration, the VM staying on A.
"""

from __future__ import annotations

import logging
import threading
import xml.etree.ElementTree as ET
from collections.abc import Callable
from typing import Any

from virt import drive as drive_mod
from virt import errors, migration_job, storage_iface
from virt import vm as vm_mod

log = logging.getLogger("virt.migration")

MiB = 1024**2
# Finished migrations kept for VM.getMigrationStatus (the oldest go first).
KEEP_FINISHED = 64

_ACCELS = {"kvm": "kvm", "qemu": "tcg"}
_UNITS = {"b": 1, "bytes": 1, "KiB": 1024, "k": 1024, "MiB": MiB, "M": MiB, "GiB": 1024**3}


class Outgoing:
    """The migrations that leave this host, by VM id; the last one of each
    VM is kept after it ended, so its status stays readable."""

    def __init__(self, connect: migration_job.Connect | None, config: migration_job.Config,
                 spm: storage_iface.SpmRequests, on_done: Callable[[vm_mod.VM], None]) -> None:
        """connect: how to reach another host's daemon (None: migration refused);
        on_done(vm): the VM left, release its source and forget it."""
        self._connect = connect
        self._config = config
        self._spm = spm
        self._on_done = on_done
        self._lock = threading.Lock()
        self._migrations: dict[str, migration_job.Migration] = {}

    def set_connect(self, connect: migration_job.Connect | None) -> None:
        """How to reach other hosts' daemons (the daemon's wiring sets it)."""
        self._connect = connect

    def migrate(self, vm: vm_mod.VM, params: dict[str, Any]) -> None:
        """VM.migrate: refuse what cannot work, ask the destination to expect
        the VM, then migrate in the background."""
        dst = str(params["dst"])
        with vm.lock:
            if vm.status == vm_mod.DOWN:
                raise errors.MigrationError("the VM is down", vm_id=vm.id)
            mappings = check_mappings(vm, params.get("diskMappings") or [])
            vm_params = destination_params(vm, mappings, params.get("serialLog"))
        m = migration_job.Migration(vm, dst, mappings, int(params.get("maxBandwidth") or 0),
                                    self._connect, self._config, self._spm, self._on_done)
        with self._lock:
            old = self._migrations.get(vm.id)
            if old is not None and old.running:
                raise errors.MigrationInProgressError(vm_id=vm.id)
            self._migrations[vm.id] = m  # reserved: a second VM.migrate is refused
        try:
            answer = self._create_on_destination(m, vm_params)
        except BaseException:
            with self._lock:
                if old is not None:
                    self._migrations[vm.id] = old
                else:
                    self._migrations.pop(vm.id, None)
            raise
        m.start(answer)
        self._prune()

    def _create_on_destination(self, m: migration_job.Migration,
                               vm_params: dict[str, Any]) -> dict[str, Any]:
        vm_id = m.vm.id
        log.info("Asking %s to expect vm=%s drives=%s", m.dst, vm_id,
                 [(x.drive.name, x.dst["domainID"]) for x in m.mappings])
        answer = dict(migration_job.call_peer(self._connect, m.dst, "VM.migrationCreate",
                                              vmID=vm_id, params=vm_params) or {})
        answer["libvirtUri"] = answer.get("libvirtUri") or default_libvirt_uri(m.dst)
        missing = [k for k in ("libvirtUri", "domainXml") if not answer.get(k)]
        if missing:
            m.release_destination()
            raise errors.MigrationError(
                f"the destination's answer lacks {', '.join(missing)} (is its [libvirt] "
                "migration_uri set?)", vm_id=vm_id)
        return answer

    def status(self, vm_id: str) -> dict[str, Any] | None:
        """The status of the VM's last migration from this host, None if none."""
        with self._lock:
            m = self._migrations.get(vm_id)
        return m.status() if m is not None else None

    def cancel(self, vm_id: str) -> None:
        """VM.migrateCancel: abort the running migration (it ends ``canceled``)."""
        with self._lock:
            m = self._migrations.get(vm_id)
        if m is None or not m.running:
            raise errors.MigrationNotInProgressError(vm_id=vm_id)
        m.cancel()

    def running(self, vm_id: str) -> bool:
        with self._lock:
            m = self._migrations.get(vm_id)
        return m is not None and m.running

    def wait(self, vm_id: str, timeout: float | None = None) -> bool:
        """Wait until the VM's migration ended (True) or timeout (False)."""
        with self._lock:
            m = self._migrations.get(vm_id)
        return True if m is None else m.wait(timeout)

    def _prune(self) -> None:
        with self._lock:
            done = [k for k, m in self._migrations.items() if not m.running]
            for k in done[: max(0, len(done) - KEEP_FINISHED)]:
                del self._migrations[k]


# The VM as the destination will run it


def destination_params(vm: vm_mod.VM, mappings: list[migration_job.Mapping],
                       serial_log: str | None = None) -> dict[str, Any]:
    """vmParams (VM.create's shape) of vm with the mapped drives on their destination.

    Read from the live domain XML, the truth of what runs; serial_log
    replaces the console file (default: the same path on the destination).
    """
    root = ET.fromstring(vm.call(lambda dom: dom.XMLDesc(0)))
    memory = root.find("memory")
    if memory is None or not (memory.text or "").strip().isdigit():
        raise errors.MigrationError("the domain XML has no memory size", vm_id=vm.id)
    mem_bytes = int(memory.text or "0") * _UNITS.get(memory.get("unit", "KiB"), 1024)
    accel = _ACCELS.get(root.get("type", ""))
    if accel is None:
        raise errors.MigrationError(f"domain type {root.get('type')!r} unknown", vm_id=vm.id)
    params: dict[str, Any] = {
        "vmName": root.findtext("name") or vm.name,
        "memSize": mem_bytes // MiB,
        "smp": int(root.findtext("vcpu") or "1"),
        "accel": accel,
        "kernel": root.findtext("os/kernel") or "",
        "kernelArgs": root.findtext("os/cmdline") or "",
    }
    initrd = root.findtext("os/initrd")
    if initrd:
        params["initrd"] = initrd
    source = root.find("./devices/serial[@type='file']/source")
    if serial_log or source is not None:
        params["serialLog"] = serial_log or (source.get("path") if source is not None else "")
    moved = {m.drive.name: m.dst for m in mappings}
    drives = []
    for i, d in enumerate(vm.drives):
        if d.name != drive_mod.target_name(i):
            raise errors.MigrationError(f"drive {i} is {d.name}, not "
                                        f"{drive_mod.target_name(i)}", vm_id=vm.id)
        ids = moved.get(d.name) or {"poolID": d.pool_id, "domainID": d.domain_id,
                                    "imageID": d.image_id, "volumeID": d.volume_id}
        drives.append({"poolID": ids["poolID"], "domainID": ids["domainID"],
                       "imageID": ids["imageID"], "volumeID": ids["volumeID"],
                       "device": "disk", "iface": d.iface, "format": d.format,
                       "propagateErrors": d.propagate_errors})
    params["drives"] = drives
    return params


def check_mappings(
    vm: vm_mod.VM, disk_mappings: list[dict[str, Any]]
) -> list[migration_job.Mapping]:
    """The drives to move and where; MigrationError (or ImageError) for a bad mapping."""
    def bad(reason: str) -> errors.MigrationError:
        return errors.MigrationError(reason, vm_id=vm.id)

    for drive in vm.drives:
        if drive.replica is not None:
            raise bad(f"drive {drive.name} is being replicated to {drive.replica.domain_id}")
    mappings: list[migration_job.Mapping] = []
    for m in disk_mappings:
        src, dst = m["srcDisk"], m["dstDisk"]
        d = vm.find_drive(src["domainID"], src["imageID"], src["volumeID"])
        if d is None:
            raise errors.ImageError(f"no drive of VM {vm.id} runs this volume",
                                    sd_id=src["domainID"], img_id=src["imageID"],
                                    vol_id=src["volumeID"])
        if any(x.drive is d for x in mappings):
            raise bad(f"drive {d.name} is mapped twice")
        if dst["domainID"] == d.domain_id:
            raise bad(f"the destination of {d.name} is its own domain")
        if (dst["imageID"], dst["volumeID"]) != (d.image_id, d.volume_id):
            raise bad(f"the destination {dst['imageID']}/{dst['volumeID']} of {d.name} is not "
                      f"its leaf {d.image_id}/{d.volume_id}")
        if dst["poolID"] != d.pool_id:
            raise bad(f"the destination pool {dst['poolID']} is not {d.name}'s {d.pool_id}")
        mappings.append(migration_job.Mapping(d, dict(dst)))
    return mappings


def default_libvirt_uri(dst: str) -> str:
    """qemu+tls://HOST/system for "HOST:PORT" (VDSM's default); "" for a unix address."""
    if dst.startswith("unix:"):
        return ""
    host = dst.rsplit(":", 1)[0] if not dst.startswith("[") else dst[: dst.index("]") + 1]
    return f"qemu+tls://{host}/system"
