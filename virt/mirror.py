"""The mirror job itself: starting it in libvirt, reading it, waiting for its end.

Two libvirt calls start the same QEMU mirror (a block job of type COPY) of
a drive's leaf into the destination leaf, selected by ``[replication] api``:

``blockcopy`` (the default)::

    blockCopy(vda, <disk> destination leaf + backing chain </disk>, {bandwidth},
              SHALLOW | REUSE_EXT | TRANSIENT_JOB [| SYNCHRONOUS_WRITES])

``blockrebase`` (the seed's own low-level path)::

    blockRebase(vda, destination leaf, bandwidth MiB/s,
                COPY | SHALLOW | REUSE_EXT [| COPY_DEV])

blockRebase names only the destination leaf (``COPY_DEV`` when it is a
block device); libvirt reads the leaf's backing chain from its qcow2 header
(the bare parent UUID, resolved beside the leaf's prepare link, which
prepare made for the whole chain).  It needs a transient domain, which
ours are (``createXML``).  It has no write-blocking mode: a replica with
``sync_writes`` is refused (:class:`virt.errors.SyncWritesUnsupportedError`)
before anything starts, and so is a leaf without a qcow2 header (libvirt
probes the format: it would take a damaged one for raw).

Either way the job is the same afterwards: BLOCK_JOB_2 READY / FAILED,
``<mirror ready='yes'>`` in the live XML, ``blockJobAbort`` to pivot or
cancel.  :func:`job_info`, :func:`live_mirror_ready`, :func:`live_path` and
:func:`wait_job_end` read it for virt/pivot.py and virt/recovery.py.

**The replica's backing chain is opened at the pivot.**  For a shallow
copy into a reused image libvirt 9.0 opens only the replica's leaf when the
job starts; its backing chain is opened (``blockdev-add``) and put under
the leaf (``blockdev-snapshot``) when the pivot is asked.  If the job then
ends without switching (cancelled in QEMU after a stuck pivot, or failed),
libvirt's abort handler deletes the leaf's nodes only, as if the chain had
never been opened: the replica's internal volumes stay open in QEMU for the
VM's life (on a block domain, their LVs' loop devices cannot be released,
and the LVs would be removed under QEMU).  :func:`release_target` closes
them, through QEMU's monitor.

Write-blocking (``sync_writes``, ``VIR_DOMAIN_BLOCK_COPY_SYNCHRONOUS_WRITES``,
QEMU's ``copy-mode=write-blocking``): every guest write reaches both sides
before it is acknowledged, so a guest writing flat out cannot outrun the
mirror.  QEMU 7.2 cannot switch a running job to it: the caller cancels the
mirror and starts it again.  A cancelled replica is reusable as it is: a
shallow mirror copies every cluster allocated in the source leaf again,
and the source leaf never gives clusters back (our drives have no
``discard``), so nothing stale in the replica's leaf shows through.
"""

from __future__ import annotations

import json
import logging
import time
import xml.etree.ElementTree as ET
from typing import Any

import libvirt
import libvirt_qemu

from virt import domxml, errors
from virt import drive as drive_mod
from virt import vm as vm_mod

log = logging.getLogger("virt.mirror")

MiB = 1024**2

BLOCKCOPY = drive_mod.BLOCKCOPY
BLOCKREBASE = drive_mod.BLOCKREBASE
APIS = (BLOCKCOPY, BLOCKREBASE)

COPY_FLAGS = (
    libvirt.VIR_DOMAIN_BLOCK_COPY_SHALLOW
    | libvirt.VIR_DOMAIN_BLOCK_COPY_REUSE_EXT
    | libvirt.VIR_DOMAIN_BLOCK_COPY_TRANSIENT_JOB
)
REBASE_FLAGS = (
    libvirt.VIR_DOMAIN_BLOCK_REBASE_COPY
    | libvirt.VIR_DOMAIN_BLOCK_REBASE_SHALLOW
    | libvirt.VIR_DOMAIN_BLOCK_REBASE_REUSE_EXT
)

QCOW2_MAGIC = b"QFI\xfb"

# How long to wait for the block job to end after blockJobAbort.
JOB_END_TIMEOUT = 60.0
# How long to wait for libvirt to drop an ended job's <mirror> from the live XML.
MIRROR_GONE_TIMEOUT = 10.0
JOB_ENDED = (
    libvirt.VIR_DOMAIN_BLOCK_JOB_COMPLETED,
    libvirt.VIR_DOMAIN_BLOCK_JOB_FAILED,
    libvirt.VIR_DOMAIN_BLOCK_JOB_CANCELED,
)


def check_api(api: str, sync_writes: bool, drive: str, vm_id: str) -> None:
    """Refuse what the chosen api cannot do, before anything is prepared."""
    if api not in APIS:
        raise errors.ReplicaError(f"unknown replication api {api!r}", drive=drive, vm_id=vm_id)
    if sync_writes and api != BLOCKCOPY:
        raise errors.SyncWritesUnsupportedError(api=api, drive=drive, vm_id=vm_id)


def copy_xml(replica: drive_mod.Replica) -> str:
    """The destination of blockCopy: the replica's leaf and its backing chain."""
    disk = ET.Element("disk", type=replica.disk_type)
    disk.append(domxml.source_element(replica.disk_type, replica.path))
    ET.SubElement(disk, "driver", type="qcow2")
    parent = disk
    for vol in reversed(replica.chain[:-1]):
        vol_type = drive_mod.disk_type(vol.path)
        backing = ET.SubElement(parent, "backingStore", type=vol_type)
        ET.SubElement(backing, "format", type=vol.qemu_format)
        backing.append(domxml.source_element(vol_type, vol.path))
        parent = backing
    ET.SubElement(parent, "backingStore")
    return ET.tostring(disk, encoding="unicode")


def rebase_flags(replica: drive_mod.Replica) -> int:
    flags = REBASE_FLAGS
    if replica.disk_type == drive_mod.BLOCK:
        flags |= libvirt.VIR_DOMAIN_BLOCK_REBASE_COPY_DEV
    return flags


def start_job(vm: vm_mod.VM, d: drive_mod.Drive, replica: drive_mod.Replica) -> None:
    """Start the mirror of d into replica with replica.api; ReplicaError if refused.

    d.replica is set before the call: events may come as soon as the job exists.
    """
    check_api(replica.api, replica.sync_writes, d.name, vm.id)
    d.reset_job_event()
    d.replica = replica
    if replica.api == BLOCKREBASE:
        _check_qcow2(vm, d, replica.path)
        flags = rebase_flags(replica)
        log.debug("blockRebase vm=%s drive=%s dst=%s flags=%#x bandwidth=%d",
                  vm.id, d.name, replica.path, flags, replica.bandwidth)

        def call(dom: libvirt.virDomain) -> Any:
            return dom.blockRebase(d.name, replica.path, replica.bandwidth, flags)
    else:
        xml = copy_xml(replica)
        params: dict[str, Any] = {}
        if replica.bandwidth:
            params[libvirt.VIR_DOMAIN_BLOCK_COPY_BANDWIDTH] = replica.bandwidth * MiB
        flags = COPY_FLAGS
        if replica.sync_writes:
            flags |= libvirt.VIR_DOMAIN_BLOCK_COPY_SYNCHRONOUS_WRITES
        log.debug("blockCopy vm=%s drive=%s xml=%s flags=%#x", vm.id, d.name, xml, flags)

        def call(dom: libvirt.virDomain) -> Any:
            return dom.blockCopy(d.name, xml, params, flags)
    try:
        vm.call(call, retry=False)
    except libvirt.libvirtError as e:
        log.warning("libvirt refused %s vm=%s drive=%s error=%s", replica.api, vm.id, d.name, e)
        raise errors.ReplicaError(str(e), drive=d.name, vm_id=vm.id) from e


def _check_qcow2(vm: vm_mod.VM, d: drive_mod.Drive, path: str) -> None:
    """blockRebase cannot say "qcow2": libvirt probes the leaf's format, and a
    damaged header would be probed as raw and mirrored into as raw."""
    try:
        with open(path, "rb") as f:
            magic = f.read(len(QCOW2_MAGIC))
    except OSError as e:
        raise errors.ReplicaError(f"cannot read {path}: {e}", drive=d.name, vm_id=vm.id) from e
    if magic != QCOW2_MAGIC:
        raise errors.ReplicaError(
            f"destination leaf {path} is not a qcow2 image", drive=d.name, vm_id=vm.id
        )


# Reading the job


def job_info(vm: vm_mod.VM, d: drive_mod.Drive) -> dict[str, Any]:
    """blockJobInfo of the drive: {} when no job runs (or libvirt cannot say)."""
    return job_info_now(vm, d) or {}


def job_info_now(vm: vm_mod.VM, d: drive_mod.Drive) -> dict[str, Any] | None:
    """blockJobInfo of the drive: {} when no job runs (or the domain is gone),
    None when libvirt cannot say now (e.g. another call holds the domain's
    job lock): not a job that ended."""
    try:
        return dict(vm.call(lambda dom: dom.blockJobInfo(d.name, 0)) or {})
    except libvirt.libvirtError as e:
        if e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
            return {}
        log.warning("blockJobInfo failed vm=%s drive=%s error=%s", vm.id, d.name, e)
        return None


def live_mirror_ready(domain_xml: str, name: str) -> bool | None:
    """Whether the disk's mirror is ready; None if the disk has no mirror.

    libvirt writes ``ready='yes'`` once QEMU reported the job ready; ``abort``
    or ``pivot`` while it is being ended, nothing before it is ready.
    """
    root = ET.fromstring(domain_xml)
    for disk in root.findall("./devices/disk"):
        target = disk.find("target")
        if target is None or target.get("dev") != name:
            continue
        mirror = disk.find("mirror")
        if mirror is None:
            return None
        return mirror.get("ready") == "yes"
    return None


def live_ready(vm: vm_mod.VM, d: drive_mod.Drive) -> bool | None:
    """live_mirror_ready of the drive in the live domain XML."""
    return live_mirror_ready(vm.call(lambda dom: dom.XMLDesc(0)), d.name)


def live_path(vm: vm_mod.VM, d: drive_mod.Drive) -> str:
    """The path the live domain's disk runs on now."""
    disks = domxml.parse_disks(vm.call(lambda dom: dom.XMLDesc(0)))
    disk = disks.get(d.name)
    return disk.path if disk is not None else ""


def wait_job_end(
    vm: vm_mod.VM, d: drive_mod.Drive, error: type[errors.Error],
    timeout: float = JOB_END_TIMEOUT,
) -> None:
    """Wait until the drive's block job is gone (BLOCK_JOB_2 end event, blockJobInfo)."""
    deadline = time.monotonic() + timeout
    while job_info(vm, d):
        if time.monotonic() > deadline:
            raise error(f"block job still running after {timeout}s", drive=d.name, vm_id=vm.id)
        d.wait_job(lambda ev: ev is not None and ev[1] in JOB_ENDED, 0.5)


# QEMU behind libvirt: the monitor pass-through


def qmp_answer(vm: vm_mod.VM, command: str, **arguments: Any) -> dict[str, Any]:
    """A QMP command through libvirt-qemu's monitor pass-through (libvirt
    marks the domain tainted); QEMU's whole answer (``return`` or ``error``)."""
    body: dict[str, Any] = {"execute": command}
    if arguments:
        body["arguments"] = arguments
    answer = vm.call(lambda dom: libvirt_qemu.qemuMonitorCommand(dom, json.dumps(body), 0))
    return dict(json.loads(answer))


def qmp(vm: vm_mod.VM, command: str, **arguments: Any) -> Any:
    """A QMP command through libvirt-qemu; its ``return``."""
    return qmp_answer(vm, command, **arguments).get("return")


def release_target(vm: vm_mod.VM, d: drive_mod.Drive, r: drive_mod.Replica) -> list[str]:
    """After a pivot was asked and the job ended without switching: close
    in QEMU every node still open on a volume of the replica's chain that the
    drive does not run on (see the module's doc); the deleted node names.

    Waits (up to :data:`MIRROR_GONE_TIMEOUT`) for libvirt to have handled
    the job's end (no ``<mirror>`` left in the live XML: it deleted the
    replica's leaf then); a node in use by another is deleted after it.
    Never raises: what cannot be closed is logged.
    """
    deadline = time.monotonic() + MIRROR_GONE_TIMEOUT
    try:
        while True:
            xml = vm.call(lambda dom: dom.XMLDesc(0))
            if live_mirror_ready(xml, d.name) is None and not job_info(vm, d):
                break
            if time.monotonic() >= deadline:
                log.error("libvirt still shows the mirror, replica's nodes left open "
                          "vm=%s drive=%s", vm.id, d.name)
                return []
            time.sleep(0.1)
        live = domxml.parse_disks(xml).get(d.name)
        running = {live.path, *(p for p, _ in live.backing)} if live is not None else set()
        paths = {v.path for v in r.chain} - running
        nodes = qmp(vm, "query-named-block-nodes", flat=True) or []
    except (libvirt.libvirtError, errors.Error, ValueError) as e:
        log.error("Cannot look for the replica's nodes in QEMU vm=%s drive=%s: %s",
                  vm.id, d.name, e)
        return []
    left = [str(n["node-name"]) for n in nodes
            if _node_file(n) in paths and not str(n.get("node-name", "#")).startswith("#")]
    deleted: list[str] = []
    while left:
        refused = []
        for name in left:
            try:
                answer = qmp_answer(vm, "blockdev-del", **{"node-name": name})
            except (libvirt.libvirtError, errors.Error, ValueError) as e:
                answer = {"error": {"desc": str(e)}}
            if "error" in answer:
                refused.append((name, answer["error"].get("desc", "")))
            else:
                deleted.append(name)
        if len(refused) == len(left):
            log.error("Replica's nodes left open in QEMU vm=%s drive=%s: %s",
                      vm.id, d.name, refused)
            break
        left = [name for name, _ in refused]
    if deleted:
        log.warning("Closed the replica's nodes libvirt left open vm=%s drive=%s nodes=%s",
                    vm.id, d.name, deleted)
    return deleted


def _node_file(node: dict[str, Any]) -> str:
    """The file a block node reads: its ``file``, or, for a format node with
    a backing (``json:{...}``), the filename of its ``file`` child."""
    name = str(node.get("file", ""))
    if not name.startswith("json:"):
        return name
    try:
        child = json.loads(name[len("json:"):]).get("file")
    except ValueError:
        return ""
    return str(child.get("filename", "")) if isinstance(child, dict) else ""
