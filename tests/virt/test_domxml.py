"""virt/domxml.py: the domain XML we hand libvirt, and reading it back."""

from __future__ import annotations

import xml.etree.ElementTree as ET

from virt import domxml, metadata
from virt import drive as drive_mod

VM_ID = "6f1c2a9e-0d4b-4c47-9a43-3f1b2f0a8e11"


def make_drive(chain_formats=("RAW", "COW"), fmt="cow", propagate="off") -> drive_mod.Drive:
    chain = [
        drive_mod.Volume(f"vol{i}", f"/run/vdsm-lsm/storage/sd/img/vol{i}", f)
        for i, f in enumerate(chain_formats)
    ]
    return drive_mod.Drive(
        name="vda",
        pool_id="pool",
        domain_id="sd",
        image_id="0123456789abcdef0123456789",
        volume_id=chain[-1].volume_id,
        format=fmt,
        chain=chain,
        propagate_errors=propagate,
    )


def build(drives, **spec) -> ET.Element:
    args = dict(
        vm_id=VM_ID,
        name="vm1",
        memory_mib=256,
        vcpus=2,
        domain_type="qemu",
        kernel="/k",
        initrd="/i",
        cmdline="console=ttyS0 lsm.count=1",
        serial_log="/var/tmp/serial.log",
    )
    args.update(spec)
    xml = domxml.build(domxml.DomainSpec(**args), drives, metadata.to_element(drives))
    return ET.fromstring(xml)


def test_domain_basics():
    dom = build([make_drive()])
    assert dom.get("type") == "qemu"
    assert dom.findtext("uuid") == VM_ID
    assert dom.findtext("name") == "vm1"
    assert dom.find("memory").get("unit") == "MiB"
    assert dom.findtext("memory") == "256"
    assert dom.findtext("vcpu") == "2"
    assert dom.findtext("os/kernel") == "/k"
    assert dom.findtext("os/initrd") == "/i"
    assert dom.findtext("os/cmdline") == "console=ttyS0 lsm.count=1"
    assert dom.findtext("on_poweroff") == "destroy"
    assert dom.find("devices/serial").get("type") == "file"
    assert dom.find("devices/serial/source").get("path") == "/var/tmp/serial.log"
    assert dom.find("devices/console/target").get("type") == "serial"
    assert dom.find("devices/interface") is None


def test_no_serial_no_initrd():
    dom = build([make_drive()], serial_log=None, initrd=None)
    assert dom.find("devices/serial") is None
    assert dom.find("os/initrd") is None


def test_disk_with_explicit_chain():
    disk = build([make_drive()]).find("devices/disk")
    assert disk.get("type") == "file"
    driver = disk.find("driver")
    assert driver.attrib == {
        "name": "qemu",
        "type": "qcow2",
        "cache": "none",
        "io": "native",
        "error_policy": "stop",
    }
    assert disk.find("source").get("file") == "/run/vdsm-lsm/storage/sd/img/vol1"
    backing = disk.find("backingStore")
    assert backing.find("format").get("type") == "raw"
    assert backing.find("source").get("file") == "/run/vdsm-lsm/storage/sd/img/vol0"
    # The chain ends explicitly: libvirt must not probe further.
    end = backing.find("backingStore")
    assert end is not None and len(end) == 0
    assert disk.find("target").attrib == {"dev": "vda", "bus": "virtio"}
    assert disk.findtext("serial") == "0123456789abcdef0123"
    assert disk.find("alias").get("name") == "ua-vda"


def test_block_disk_and_propagate_errors():
    d = make_drive(chain_formats=("RAW",), fmt="raw", propagate="on")
    d.disk_type = drive_mod.BLOCK
    disk = build([d]).find("devices/disk")
    assert disk.get("type") == "block"
    assert disk.find("source").get("dev") == d.path
    assert disk.find("driver").get("type") == "raw"
    assert disk.find("driver").get("error_policy") == "enospace"


def test_metadata_inside_domain_in_our_namespace():
    dom = build([make_drive()])
    el = dom.find(f"metadata/{{{metadata.NS}}}vm")
    assert el is not None
    (d,) = metadata.from_xml(ET.tostring(el, encoding="unicode"))
    assert [v.volume_id for v in d.chain] == ["vol0", "vol1"]


def test_parse_disks_reads_live_chain():
    d = make_drive(chain_formats=("RAW", "COW", "COW"))
    xml = ET.tostring(build([d]), encoding="unicode")
    (disk,) = domxml.parse_disks(xml).values()
    assert disk.name == "vda"
    assert disk.path == d.path
    assert disk.format == "qcow2"
    assert disk.alias == "ua-vda"
    assert disk.backing == [
        ("/run/vdsm-lsm/storage/sd/img/vol1", "qcow2"),
        ("/run/vdsm-lsm/storage/sd/img/vol0", "raw"),
    ]


def test_snapshot_xml():
    xml = domxml.snapshot_xml([("vda", "block", "/dev/loop3")], ["vdb"])
    root = ET.fromstring(xml)
    vda, vdb = root.findall("disks/disk")
    assert vda.attrib == {"name": "vda", "snapshot": "external", "type": "block"}
    assert vda.find("source").get("dev") == "/dev/loop3"
    assert vda.find("driver").get("type") == "qcow2"
    assert vdb.attrib == {"name": "vdb", "snapshot": "no"}


def test_target_names():
    assert [drive_mod.target_name(i) for i in (0, 1, 25, 26, 27)] == [
        "vda",
        "vdb",
        "vdz",
        "vdaa",
        "vdab",
    ]
