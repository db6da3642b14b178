"""virt/metadata.py: what survives a daemon restart, in the domain's metadata."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

from virt import drive as drive_mod
from virt import metadata


def make_drive() -> drive_mod.Drive:
    return drive_mod.Drive(
        name="vdb",
        pool_id="p",
        domain_id="sd",
        image_id="img",
        volume_id="leaf",
        format="cow",
        chain=[
            drive_mod.Volume("base", "/r/sd/img/base", "RAW"),
            drive_mod.Volume("leaf", "/r/sd/img/leaf", "COW"),
        ],
        disk_type=drive_mod.BLOCK,
        propagate_errors="on",
        prepared=["base", "leaf"],
    )


def test_round_trip():
    d = make_drive()
    d.replica = drive_mod.Replica(
        pool_id="p",
        domain_id="sd2",
        image_id="img",
        volume_id="leaf",
        chain=[drive_mod.Volume("leaf", "/r/sd2/img/leaf", "COW")],
        disk_type=drive_mod.BLOCK,
        state=drive_mod.READY,
        bandwidth=50,
        sync_writes=True,
    )

    (back,) = metadata.from_xml(metadata.to_xml([d]))

    assert back == d
    assert back.replica == d.replica


def test_set_metadata_form_is_not_namespaced():
    # libvirt puts the element in our namespace itself and refuses a
    # namespace declared in the text.
    assert "xmlns" not in metadata.to_xml([make_drive()])


@pytest.mark.parametrize(
    "text",
    [
        "<not-xml",
        "<other/>",
        "<vm><drive name='vda'/></vm>",
        "<vm><drive name='vda' poolID='p' domainID='s' imageID='i' volumeID='v' format='cow'/>"
        "</vm>",
    ],
)
def test_malformed_metadata_is_value_error(text):
    with pytest.raises(ValueError):
        metadata.from_xml(text)


# The pause code of a pause the daemon made (the watermark monitor's)


def test_pause_code_round_trip():
    d = make_drive()

    record = metadata.parse(metadata.to_xml([d], "ENOSPC"))

    assert record == metadata.Record([d], "ENOSPC")
    assert metadata.from_xml(metadata.to_xml([d], "ENOSPC")) == [d]  # the drives alone


def test_the_element_libvirt_gives_back_keeps_the_pause_code():
    # libvirt answers the element in our namespace, with its prefix.
    text = ET.tostring(metadata.to_element([make_drive()], pause_code="ENOSPC"),
                       encoding="unicode")
    assert "lsm:vm" in text
    assert metadata.parse(text).pause_code == "ENOSPC"


def test_older_metadata_without_a_pause_code_is_read_as_nothing_recorded():
    text = ("<vm><drive name='vda' poolID='p' domainID='s' imageID='i' volumeID='v' "
            "format='cow'><volume volumeID='v' path='/r/s/i/v' format='COW'/></drive></vm>")

    record = metadata.parse(text)

    assert record.pause_code is None
    assert [(d.name, d.volume_id) for d in record.drives] == [("vda", "v")]
    assert "pauseCode" not in metadata.to_xml([make_drive()])
