"""Domain XML: built and read with ElementTree, never by string concatenation.

The daemon's domains are transient (createXML): they vanish when QEMU exits
and are never defined in libvirt's config. Each disk gets an explicit
``<backingStore>`` chain from storage's prepare result, so libvirt opens
exactly the volumes storage prepared (through the prepare links) instead of
probing qcow2 headers, and a leaf that is a block device (a loop device in
loop activation mode) becomes ``<disk type='block'>``.

Error policy follows VDSM: ``propagateErrors`` "off" stops the VM on any I/O
error (``error_policy='stop'``: a full thin disk pauses the VM instead of
failing the guest); "on" stops only on ENOSPC and reports other errors to
the guest (``error_policy='enospace'``).
"""

from __future__ import annotations

import dataclasses
import xml.etree.ElementTree as ET

from virt import drive as drive_mod

DOMAIN_TYPES = {"kvm": "kvm", "tcg": "qemu"}


@dataclasses.dataclass
class DomainSpec:
    vm_id: str
    name: str
    memory_mib: int
    vcpus: int
    domain_type: str  # libvirt's: "kvm" or "qemu" (TCG)
    kernel: str
    initrd: str | None = None
    cmdline: str = ""
    serial_log: str | None = None


@dataclasses.dataclass
class LiveDisk:
    """A disk as the running domain's XML shows it."""

    name: str
    disk_type: str
    path: str
    format: str  # qcow2 | raw
    alias: str | None
    backing: list[tuple[str, str]]  # (path, format), parent first, then its parent...


def build(spec: DomainSpec, drives: list[drive_mod.Drive], metadata: ET.Element) -> str:
    """The XML of a transient domain running drives, with our metadata inside."""
    dom = ET.Element("domain", type=spec.domain_type)
    ET.SubElement(dom, "name").text = spec.name
    ET.SubElement(dom, "uuid").text = spec.vm_id
    ET.SubElement(dom, "memory", unit="MiB").text = str(spec.memory_mib)
    ET.SubElement(dom, "currentMemory", unit="MiB").text = str(spec.memory_mib)
    ET.SubElement(dom, "vcpu", placement="static").text = str(spec.vcpus)
    md = ET.SubElement(dom, "metadata")
    md.append(metadata)

    os_el = ET.SubElement(dom, "os")
    ET.SubElement(os_el, "type", arch="x86_64").text = "hvm"
    ET.SubElement(os_el, "kernel").text = spec.kernel
    if spec.initrd:
        ET.SubElement(os_el, "initrd").text = spec.initrd
    if spec.cmdline:
        ET.SubElement(os_el, "cmdline").text = spec.cmdline

    features = ET.SubElement(dom, "features")
    ET.SubElement(features, "acpi")
    ET.SubElement(features, "apic")

    ET.SubElement(dom, "on_poweroff").text = "destroy"
    ET.SubElement(dom, "on_reboot").text = "destroy"
    ET.SubElement(dom, "on_crash").text = "destroy"

    devices = ET.SubElement(dom, "devices")
    for d in drives:
        devices.append(disk_element(d))
    if spec.serial_log:
        serial = ET.SubElement(devices, "serial", type="file")
        ET.SubElement(serial, "source", path=spec.serial_log)
        ET.SubElement(serial, "target", port="0")
        console = ET.SubElement(devices, "console", type="file")
        ET.SubElement(console, "source", path=spec.serial_log)
        ET.SubElement(console, "target", type="serial", port="0")
    ET.SubElement(devices, "controller", type="usb", model="none")
    ET.SubElement(devices, "memballoon", model="none")
    return ET.tostring(dom, encoding="unicode")


def disk_element(d: drive_mod.Drive) -> ET.Element:
    disk = ET.Element("disk", type=d.disk_type, device="disk")
    policy = "enospace" if d.propagate_errors == "on" else "stop"
    ET.SubElement(
        disk,
        "driver",
        name="qemu",
        type=drive_mod.qemu_format(d.format),
        cache="none",
        io="native",
        error_policy=policy,
    )
    disk.append(source_element(d.disk_type, d.path))
    parent = disk
    for vol in reversed(d.chain[:-1]):
        vol_type = drive_mod.disk_type(vol.path)
        backing = ET.SubElement(parent, "backingStore", type=vol_type)
        ET.SubElement(backing, "format", type=vol.qemu_format)
        backing.append(source_element(vol_type, vol.path))
        parent = backing
    # An empty backingStore ends the chain: libvirt must not probe further.
    ET.SubElement(parent, "backingStore")
    ET.SubElement(disk, "target", dev=d.name, bus=d.iface)
    ET.SubElement(disk, "serial").text = d.image_id[:20]
    ET.SubElement(disk, "alias", name=d.alias)
    return disk


def source_element(disk_type: str, path: str) -> ET.Element:
    if disk_type == drive_mod.BLOCK:
        return ET.Element("source", dev=path)
    return ET.Element("source", file=path)


def snapshot_xml(snapshots: list[tuple[str, str, str]], others: list[str]) -> str:
    """A disk-only external snapshot description.

    snapshots: (target name, disk type, new leaf path) for each disk that
    switches to a new (pre-created, reused) qcow2 leaf; others: targets left
    alone (libvirt would otherwise invent overlay files for them).
    """
    root = ET.Element("domainsnapshot")
    disks = ET.SubElement(root, "disks")
    for name, disk_type, path in snapshots:
        disk = ET.SubElement(disks, "disk", name=name, snapshot="external", type=disk_type)
        disk.append(source_element(disk_type, path))
        ET.SubElement(disk, "driver", type="qcow2")
    for name in others:
        ET.SubElement(disks, "disk", name=name, snapshot="no")
    return ET.tostring(root, encoding="unicode")


def parse_disks(domain_xml: str) -> dict[str, LiveDisk]:
    """The disks of a (running) domain's XML, keyed by target name."""
    root = ET.fromstring(domain_xml)
    result = {}
    for disk in root.findall("./devices/disk[@device='disk']"):
        target = disk.find("target")
        if target is None:
            continue
        name = target.get("dev", "")
        driver = disk.find("driver")
        alias = disk.find("alias")
        backing = []
        node = disk.find("backingStore")
        while node is not None and node.find("source") is not None:
            fmt = node.find("format")
            backing.append((_source_path(node), fmt.get("type", "") if fmt is not None else ""))
            node = node.find("backingStore")
        result[name] = LiveDisk(
            name=name,
            disk_type=disk.get("type", drive_mod.FILE),
            path=_source_path(disk),
            format=driver.get("type", "") if driver is not None else "",
            alias=alias.get("name") if alias is not None else None,
            backing=backing,
        )
    return result


def _source_path(el: ET.Element) -> str:
    src = el.find("source")
    if src is None:
        return ""
    return src.get("file") or src.get("dev") or ""
