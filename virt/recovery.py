"""Recovery: running domains become VM objects again when the daemon starts.

Only domains carrying our metadata element are ours. For each one the drives
come from the metadata; the live domain XML is the truth for what QEMU has
open, so a drive whose metadata lags behind the live leaf (the daemon died
between a snapshot or a pivot and the metadata write) takes its chain from
the live XML. Status and pause code come from ``virDomainGetState`` and, for
a VM paused on an I/O error, ``virDomainGetDiskErrors`` (as VDSM does); a VM
the old daemon suspended itself (the watermark monitor, its replica out of
room: "paused by the user" for libvirt) is Paused with the pause code the
metadata records (``pauseCode``), so the monitor resumes it once there is
room; one paused by hand (nothing recorded) stays Paused NOERR.

A replica in the metadata is kept while its mirror job still runs (its state
from the live ``<mirror ready=...>``) and dropped otherwise; a drive found on
another domain than its metadata says finished a pivot, so its leaf is marked
LEGAL when this host is the SPM (the daemon may have died before doing so;
on another host the SPM's ``Volume.setLegality`` does it).

Nothing here changes the guest: no resume, no metadata write. The prepare
references the VM held are taken again through the storage interface (they
lived in the old daemon's memory), an ILLEGAL volume too (QEMU runs it: a
pivot's leaf not marked LEGAL yet); a volume that cannot be prepared now is
logged and not torn down later.
"""

from __future__ import annotations

import logging
import os
import uuid

import libvirt

from virt import connection, domxml, metadata, replication, storage_iface
from virt import drive as drive_mod
from virt import vm as vm_mod

log = logging.getLogger("virt.recovery")


def recover(
    conn: connection.Connection,
    storage: storage_iface.HostStorage,
    spm: storage_iface.SpmRequests,
    drive_root: str = "",
) -> list[vm_mod.VM]:
    """VM objects for the running domains that carry our metadata and, when
    drive_root is given, whose drives all lie under it (this host's)."""
    doms = conn.call(lambda c: c.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE))
    vms = []
    for dom in doms:
        try:
            vm = recover_domain(conn, storage, spm, dom, drive_root)
        except Exception:
            log.exception("Cannot recover domain name=%s", _name(dom))
            continue
        if vm is not None:
            vms.append(vm)
    log.info("Recovered %d VMs of %d running domains", len(vms), len(doms))
    return vms


def recover_domain(
    conn: connection.Connection,
    storage: storage_iface.HostStorage,
    spm: storage_iface.SpmRequests,
    dom: libvirt.virDomain,
    drive_root: str = "",
) -> vm_mod.VM | None:
    """A VM object for dom, or None if dom is not ours."""
    try:
        record = metadata.read_record(dom)
    except ValueError as e:
        log.error("Domain name=%s has unreadable metadata: %s", _name(dom), e)
        return None
    if record is None:
        log.debug("Domain name=%s is not ours", _name(dom))
        return None
    drives = record.drives
    if drive_root and not all(_under(d.path, drive_root) for d in drives):
        log.info("Domain name=%s runs on another host's storage paths; not adopted", _name(dom))
        return None
    vm_id = dom.UUIDString()
    domain_xml = dom.XMLDesc(0)
    live = domxml.parse_disks(domain_xml)
    moved = []
    for d in drives:
        disk = live.get(d.name)
        if disk is None:
            log.warning("Drive not in live domain vm=%s drive=%s", vm_id, d.name)
            continue
        if _reconcile(vm_id, d, disk):
            moved.append(d)
    for d in moved:
        # The daemon died after a pivot: the new leaf may still be ILLEGAL.
        replication.mark_leaf_legal(spm, vm_id, d.name, d.pool_id, d.domain_id, d.image_id,
                                    d.volume_id)
    for d in drives:
        _recover_replica(vm_id, dom, storage, d, domain_xml)
    vm = vm_mod.VM(vm_id, dom.name(), drives, conn, recorded_pause=record.pause_code)
    vm.refresh_state()
    _retake_references(vm, storage)
    log.info(
        "Recovered vm=%s name=%s status=%s pause_code=%s drives=%s",
        vm.id,
        vm.name,
        vm.status,
        vm.pause_code,
        [(d.name, d.volume_id) for d in drives],
    )
    return vm


def _reconcile(vm_id: str, d: drive_mod.Drive, disk: domxml.LiveDisk) -> bool:
    """Make d describe what QEMU has open when the metadata lags behind.

    Returns whether the drive moved to another domain (a pivot happened).
    """
    if disk.path == d.path:
        return False
    paths = [(disk.path, disk.format)] + disk.backing
    chain = [
        drive_mod.Volume(os.path.basename(p), p, "COW" if fmt == "qcow2" else "RAW")
        for p, fmt in reversed(paths)
    ]
    log.warning(
        "Metadata lags behind live domain vm=%s drive=%s metadata_leaf=%s live_leaf=%s",
        vm_id,
        d.name,
        d.path,
        disk.path,
    )
    # Prepare links are <run_dir>/storage/<sdUUID>/<imgUUID>/<volUUID>.
    leaf_dir = os.path.dirname(disk.path)
    img_id = os.path.basename(leaf_dir)
    sd_id = os.path.basename(os.path.dirname(leaf_dir))
    moved = _is_uuid(img_id) and _is_uuid(sd_id) and (sd_id, img_id) != (d.domain_id, d.image_id)
    d.chain = chain
    d.volume_id = chain[-1].volume_id
    d.disk_type = disk.disk_type
    if moved:
        # A pivot to another domain happened: the replica is the drive now.
        d.domain_id, d.image_id = sd_id, img_id
        d.replica = None
        d.prepared = [d.volume_id]
    elif d.volume_id not in d.prepared:
        d.prepared.append(d.volume_id)
    return moved


def _recover_replica(
    vm_id: str,
    dom: libvirt.virDomain,
    storage: storage_iface.HostStorage,
    d: drive_mod.Drive,
    domain_xml: str,
) -> None:
    """After a restart: keep d's replica (from metadata) if its mirror job still runs.

    The replica's prepare reference is taken again; a replica whose job is
    gone (a transient job ends with QEMU's mirror) is dropped.
    """
    r = d.replica
    if r is None:
        return
    try:
        job = dom.blockJobInfo(d.name, 0)
    except libvirt.libvirtError as e:
        log.warning("blockJobInfo failed vm=%s drive=%s error=%s", vm_id, d.name, e)
        job = {}
    if not job or job.get("type") != libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_COPY:
        log.warning(
            "Replica without a mirror job dropped vm=%s drive=%s dst_sd=%s",
            vm_id, d.name, r.domain_id,
        )
        d.replica = None
        return
    ready = replication.live_mirror_ready(domain_xml, d.name)
    if r.state != drive_mod.FAILED:
        r.state = drive_mod.READY if ready else drive_mod.COPYING
    try:
        storage.prepare(r.pool_id, r.domain_id, r.image_id, r.volume_id, allow_illegal=True)
    except Exception as e:
        log.error(
            "Cannot prepare replica of recovered vm=%s drive=%s volume=%s: %s",
            vm_id, d.name, r.volume_id, e,
        )
    log.info(
        "Recovered replica vm=%s drive=%s dst_sd=%s state=%s cur=%s end=%s",
        vm_id, d.name, r.domain_id, r.state, job.get("cur"), job.get("end"),
    )


def _retake_references(vm: vm_mod.VM, storage: storage_iface.HostStorage) -> None:
    """The drives' prepare references, whatever the volumes' legality: QEMU
    runs them already.  (After a pivot whose daemon died before the new
    leaf was marked LEGAL, and before this host is SPM again, that leaf is
    still ILLEGAL: refusing it would leave the running chain unreferenced,
    and start-up would remove its links and lose its devices to no owner.)"""
    for d in vm.drives:
        held = []
        for vol_id in d.prepared:
            try:
                _prepare_running(storage, vm.id, d, vol_id)
            except Exception as e:
                log.error(
                    "Cannot prepare volume of recovered vm=%s drive=%s volume=%s: %s",
                    vm.id,
                    d.name,
                    vol_id,
                    e,
                )
            else:
                held.append(vol_id)
        d.prepared = held


def _prepare_running(
    storage: storage_iface.HostStorage, vm_id: str, d: drive_mod.Drive, vol_id: str
) -> None:
    """Prepare a volume QEMU runs; one storage refuses as ILLEGAL is taken anyway."""
    try:
        storage.prepare(d.pool_id, d.domain_id, d.image_id, vol_id)
    except Exception as e:
        log.warning("Volume of recovered vm=%s drive=%s volume=%s refused (%s): QEMU runs it, "
                    "preparing it as it is", vm_id, d.name, vol_id, e)
        storage.prepare(d.pool_id, d.domain_id, d.image_id, vol_id, allow_illegal=True)


def _under(path: str, root: str) -> bool:
    return os.path.commonpath([os.path.abspath(path), os.path.abspath(root)]) == os.path.abspath(
        root
    )


def _is_uuid(text: str) -> bool:
    try:
        return str(uuid.UUID(text)) == text
    except ValueError:
        return False


def _name(dom: libvirt.virDomain) -> str:
    try:
        return dom.name()
    except libvirt.libvirtError:
        return "?"
