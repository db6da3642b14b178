"""virt/metadata.py: what survives a daemon restart, in the domain's metadata."""

from __future__ import annotations

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
