"""virt/snapshot.py: live snapshot of a writing guest onto a pre-created leaf."""

from __future__ import annotations

import json
import uuid

import pytest

from contrib.guest import verifier
from tests.virt import conftest
from virt import domxml, errors, metadata
from virt import vm as vm_mod

pytestmark = [pytest.mark.root, pytest.mark.libvirt, pytest.mark.guest]

MiB = conftest.MiB


def live_metadata(vm_id: str):
    conn = conftest.libvirt_connection()
    try:
        return metadata.read(conn.lookupByUUIDString(vm_id))
    finally:
        conn.close()


def live_source(vm_id: str) -> str:
    conn = conftest.libvirt_connection()
    try:
        xml = conn.lookupByUUIDString(vm_id).XMLDesc(0)
    finally:
        conn.close()
    return domxml.parse_disks(xml)["vda"].path


def snap(img: str, base: str, new: str, store) -> list[dict[str, str]]:
    return [{"domainID": store.sd_id, "imageID": img, "baseVolumeID": base, "volumeID": new}]


@pytest.mark.parametrize("block", [False, True], ids=["file", "block"])
def test_snapshot_while_writing(api, store, vm_params, block):
    img, base, leaf = str(uuid.uuid4()), str(uuid.uuid4()), str(uuid.uuid4())
    block_size = 64 * MiB if block else None
    store.create(img, base, 64 * MiB, "COW", block_size=block_size)
    g = vm_params([store.drive(img, base)], count=400, rate=40, poweroff=True)
    api.vm_create(g.vm_id, g.params)
    g.wait_acks(60)
    # The engine creates the new leaf first (Volume.create, parent = leaf).
    store.create(img, leaf, 64 * MiB, "COW", parent=base, block_size=block_size)
    acks_before = g.acks()

    assert api.vm_snapshot(g.vm_id, snap(img, base, leaf, store)) is True

    disk = api.vm_get_stats(g.vm_id)["disks"]["vda"]
    assert disk["volumeID"] == leaf
    assert [v["volumeID"] for v in disk["volumeChain"]] == [base, leaf]
    assert live_source(g.vm_id) == store.link_path(img, leaf)
    # The chain is persisted for recovery.
    (persisted,) = live_metadata(g.vm_id)
    assert [v.volume_id for v in persisted.chain] == [base, leaf]
    assert persisted.prepared == [base, leaf]
    # The guest kept writing across the snapshot, then powers off.
    serial = g.wait_acks(400, timeout=180)
    assert acks_before < 400
    conftest.wait_for(lambda: api.get_vm(g.vm_id).status == vm_mod.DOWN, 60, "guest poweroff")

    res = verifier.verify(g.serial_log, store.link_path(img, leaf), "qcow2")
    assert res.lost == 0
    assert res.verified > 0
    # Writes after the snapshot went to the new leaf, not the old one.
    old = verifier.verify(g.serial_log, store.link_path(img, base), "qcow2")
    assert old.lost > 0
    assert len(serial.acks) >= 400

    api.vm_destroy(g.vm_id)
    assert store.held() == {}


def test_snapshot_refused_by_libvirt_keeps_old_leaf(api, store, vm_params):
    img, base, bad = str(uuid.uuid4()), str(uuid.uuid4()), str(uuid.uuid4())
    store.create(img, base, 64 * MiB, "COW")
    g = vm_params([store.drive(img, base)], rate=20)
    api.vm_create(g.vm_id, g.params)
    g.wait_acks(5)
    # A "COW" volume that is really raw: QEMU cannot open it as the overlay.
    store.create(img, bad, 64 * MiB, "RAW")
    with open(store.volume_path(img, bad) + ".json", "w") as f:
        json.dump({"parent": base, "format": "COW"}, f)

    with pytest.raises(errors.SnapshotError) as e:
        api.vm_snapshot(g.vm_id, snap(img, base, bad, store))

    assert e.value.name == "snapshotErr"
    assert store.refs(bad) == 0
    assert store.refs(base) == 1
    assert api.vm_get_stats(g.vm_id)["disks"]["vda"]["volumeID"] == base
    assert live_source(g.vm_id) == store.link_path(img, base)
    # The guest still runs and writes.
    acks = g.acks()
    g.wait_acks(acks + 5)
    assert api.get_vm(g.vm_id).status == vm_mod.UP


def test_snapshot_is_idempotent_and_checks_base(api, store, vm_params):
    img, base, leaf = str(uuid.uuid4()), str(uuid.uuid4()), str(uuid.uuid4())
    store.create(img, base, 64 * MiB, "COW")
    g = vm_params([store.drive(img, base)], rate=20)
    api.vm_create(g.vm_id, g.params)
    store.create(img, leaf, 64 * MiB, "COW", parent=base)
    api.vm_snapshot(g.vm_id, snap(img, base, leaf, store))
    prepares = store.calls.count(("prepare", leaf))

    # Repeating the same request is a no-op (the VM already runs on it).
    api.vm_snapshot(g.vm_id, snap(img, base, leaf, store))
    assert store.calls.count(("prepare", leaf)) == prepares

    # A base that is not the drive's leaf is refused, nothing prepared.
    other = str(uuid.uuid4())
    with pytest.raises(errors.SnapshotError):
        api.vm_snapshot(g.vm_id, snap(img, base, other, store))
    assert ("prepare", other) not in store.calls


def test_snapshot_chain_must_extend_the_drive(api, store, vm_params):
    # A new volume whose parent is not the drive's leaf would fork the image.
    img, base, stray = str(uuid.uuid4()), str(uuid.uuid4()), str(uuid.uuid4())
    store.create(img, base, 64 * MiB, "COW")
    g = vm_params([store.drive(img, base)], rate=20)
    api.vm_create(g.vm_id, g.params)
    store.create(img, stray, 64 * MiB, "COW")

    with pytest.raises(errors.SnapshotError):
        api.vm_snapshot(g.vm_id, snap(img, base, stray, store))

    assert store.refs(stray) == 0
    assert api.vm_get_stats(g.vm_id)["disks"]["vda"]["volumeID"] == base


def test_snapshot_of_unknown_volume(api, store, vm_params):
    img, base = str(uuid.uuid4()), str(uuid.uuid4())
    store.create(img, base, 64 * MiB, "COW")
    g = vm_params([store.drive(img, base)], rate=20)
    api.vm_create(g.vm_id, g.params)

    with pytest.raises(errors.ImageError):
        api.vm_snapshot(g.vm_id, snap(img, base, str(uuid.uuid4()), store))

    assert api.get_vm(g.vm_id).status == vm_mod.UP
