"""Our part of a domain's ``<metadata>``: what the daemon must know after a restart.

libvirt keeps one element per namespace in a domain's metadata; ours is::

    <lsm:vm xmlns:lsm="http://vdsm-lsm/1.0" pauseCode="ENOSPC">   (pauseCode: optional)
      <lsm:drive name="vda" poolID=".." domainID=".." imageID=".." volumeID=".."
                 format="cow" diskType="file" iface="virtio" propagateErrors="off">
        <lsm:volume volumeID=".." path=".." format="RAW"/>   (base first)
        <lsm:volume volumeID=".." path=".." format="COW"/>   (leaf last)
        <lsm:prepared volumeID=".."/>                        (prepare references held)
        <lsm:replica poolID=".." domainID=".." imageID=".." volumeID=".."
                     diskType="block" format="cow" state="copying" bandwidth="0"
                     syncWrites="false" needExtend="true">
          <lsm:volume .../>
        </lsm:replica>
      </lsm:drive>
    </lsm:vm>

It is written into the domain XML at creation and replaced with
``virDomainSetMetadata(VIR_DOMAIN_METADATA_ELEMENT, ..., AFFECT_LIVE)`` when a
drive changes (snapshot, pivot), so a restarted daemon can rebuild its VMs
(virt/recovery.py). Reading ignores namespace prefixes: libvirt re-serializes
the element.

``pauseCode`` records a pause the daemon made itself: the watermark monitor
suspends a VM whose thin replica cannot grow (virt/thinp_pause.py), and
libvirt then says only "paused by the user"; a restarted daemon reads the
code back to know the VM is paused out of space (``VM.refresh_state``). It
is absent otherwise (older metadata has none: nothing recorded). Every
rewrite of the drives carries it (``VM.persist`` passes the VM's).
"""

from __future__ import annotations

import dataclasses
import logging
import xml.etree.ElementTree as ET
from collections.abc import Callable

import libvirt

from virt import drive as drive_mod

log = logging.getLogger("virt.metadata")

NS = "http://vdsm-lsm/1.0"
PREFIX = "lsm"

ET.register_namespace(PREFIX, NS)


def _qname(tag: str, namespaced: bool) -> str:
    return f"{{{NS}}}{tag}" if namespaced else tag


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


@dataclasses.dataclass
class Record:
    """What our element holds: the drives, and the pause code of a pause
    the daemon made (None: nothing recorded)."""

    drives: list[drive_mod.Drive]
    pause_code: str | None = None


def to_element(drives: list[drive_mod.Drive], namespaced: bool = True,
               pause_code: str | None = None) -> ET.Element:
    """Our metadata element; in our namespace for a domain XML, plain for setMetadata."""

    def _q(tag: str) -> str:
        return _qname(tag, namespaced)

    root = ET.Element(_q("vm"))
    if pause_code is not None:
        root.set("pauseCode", pause_code)
    for d in drives:
        el = ET.SubElement(
            root,
            _q("drive"),
            name=d.name,
            poolID=d.pool_id,
            domainID=d.domain_id,
            imageID=d.image_id,
            volumeID=d.volume_id,
            format=d.format,
            diskType=d.disk_type,
            iface=d.iface,
            propagateErrors=d.propagate_errors,
        )
        _add_chain(el, d.chain, _q)
        for vol_id in d.prepared:
            ET.SubElement(el, _q("prepared"), volumeID=vol_id)
        if d.replica is not None:
            r = d.replica
            rel = ET.SubElement(
                el,
                _q("replica"),
                poolID=r.pool_id,
                domainID=r.domain_id,
                imageID=r.image_id,
                volumeID=r.volume_id,
                diskType=r.disk_type,
                format=r.format,
                state=r.state,
                bandwidth=str(r.bandwidth),
                syncWrites="true" if r.sync_writes else "false",
                needExtend="true" if r.need_extend else "false",
            )
            _add_chain(rel, r.chain, _q)
    return root


def _add_chain(parent: ET.Element, chain: list[drive_mod.Volume], q: Callable[[str], str]) -> None:
    for v in chain:
        ET.SubElement(parent, q("volume"), volumeID=v.volume_id, path=v.path, format=v.format)


def to_xml(drives: list[drive_mod.Drive], pause_code: str | None = None) -> str:
    """The element as setMetadata wants it: libvirt puts it in our namespace itself."""
    return ET.tostring(to_element(drives, namespaced=False, pause_code=pause_code),
                       encoding="unicode")


def from_xml(text: str) -> list[drive_mod.Drive]:
    """The drives described by our metadata element (raises ValueError if malformed)."""
    return parse(text).drives


def parse(text: str) -> Record:
    """Our metadata element's drives and recorded pause code (ValueError if malformed)."""
    try:
        root = ET.fromstring(text)
    except ET.ParseError as e:
        raise ValueError(f"malformed metadata: {e}") from e
    if _local(root.tag) != "vm":
        raise ValueError(f"unexpected metadata element {root.tag}")
    drives = []
    for el in root:
        if _local(el.tag) != "drive":
            continue
        try:
            d = drive_mod.Drive(
                name=el.attrib["name"],
                pool_id=el.attrib["poolID"],
                domain_id=el.attrib["domainID"],
                image_id=el.attrib["imageID"],
                volume_id=el.attrib["volumeID"],
                format=el.attrib["format"],
                chain=_read_chain(el),
                disk_type=el.get("diskType", drive_mod.FILE),
                iface=el.get("iface", "virtio"),
                propagate_errors=el.get("propagateErrors", "off"),
                prepared=[p.attrib["volumeID"] for p in el if _local(p.tag) == "prepared"],
            )
            for rel in el:
                if _local(rel.tag) == "replica":
                    d.replica = drive_mod.Replica(
                        pool_id=rel.attrib["poolID"],
                        domain_id=rel.attrib["domainID"],
                        image_id=rel.attrib["imageID"],
                        volume_id=rel.attrib["volumeID"],
                        chain=_read_chain(rel),
                        disk_type=rel.get("diskType", drive_mod.FILE),
                        format=rel.get("format", drive_mod.COW),
                        state=rel.get("state", drive_mod.COPYING),
                        bandwidth=int(rel.get("bandwidth", "0")),
                        sync_writes=rel.get("syncWrites") == "true",
                        need_extend=rel.get("needExtend", "true") == "true",
                    )
        except KeyError as e:
            raise ValueError(f"drive metadata lacks {e}") from e
        if not d.chain:
            raise ValueError(f"drive {d.name} metadata has no chain")
        drives.append(d)
    return Record(drives, root.get("pauseCode") or None)


def _read_chain(parent: ET.Element) -> list[drive_mod.Volume]:
    return [
        drive_mod.Volume(v.attrib["volumeID"], v.attrib["path"], v.attrib["format"])
        for v in parent
        if _local(v.tag) == "volume"
    ]


def write(dom: libvirt.virDomain, drives: list[drive_mod.Drive],
          pause_code: str | None = None) -> None:
    """Replace our metadata element of the running domain: the drives and the
    recorded pause code (None: none; a caller rewriting the drives passes
    the one recorded, as VM.persist does, or it is dropped)."""
    dom.setMetadata(
        libvirt.VIR_DOMAIN_METADATA_ELEMENT,
        to_xml(drives, pause_code),
        PREFIX,
        NS,
        libvirt.VIR_DOMAIN_AFFECT_LIVE,
    )
    log.debug("Wrote metadata vm=%s drives=%d pause_code=%s", dom.UUIDString(), len(drives),
              pause_code)


def read(dom: libvirt.virDomain) -> list[drive_mod.Drive] | None:
    """Our drives of the running domain, or None if it carries no metadata of ours."""
    record = read_record(dom)
    return record.drives if record is not None else None


def read_record(dom: libvirt.virDomain) -> Record | None:
    """Our drives and recorded pause code of the running domain, or None if
    it carries no metadata of ours (raises ValueError if malformed)."""
    try:
        text = dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, NS, libvirt.VIR_DOMAIN_AFFECT_LIVE)
    except libvirt.libvirtError as e:
        if e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN_METADATA:
            return None
        raise
    return parse(text)
