"""virt/snapshot.py: live snapshot of a writing guest onto a pre-created leaf."""

from __future__ import annotations

import uuid

import pytest

from contrib.guest import verifier
from storage import errors as storage_errors
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


def snap(img: str, base: str, new: str, env) -> list[dict[str, str]]:
    return [{"domainID": env.sd_id, "imageID": img, "baseVolumeID": base, "volumeID": new}]


def test_snapshot_while_writing(make_api, any_env, vm_params):
    env = any_env
    api = make_api(env)
    img, base, leaf = str(uuid.uuid4()), str(uuid.uuid4()), str(uuid.uuid4())
    env.create(img, base, 64 * MiB, "COW", initial_size=32 * MiB)
    g = vm_params([env.drive(img, base)], count=400, rate=40, poweroff=True)
    api.vm_create(g.vm_id, g.params)
    g.wait_acks(60)
    # The engine creates the new leaf first (Volume.create, parent = leaf).
    env.create(img, leaf, 64 * MiB, "COW", parent=base, initial_size=32 * MiB)
    acks_before = g.acks()

    assert api.vm_snapshot(g.vm_id, snap(img, base, leaf, env)) is True

    disk = api.vm_get_stats(g.vm_id)[0]["disks"]["vda"]
    assert disk["volumeID"] == leaf
    assert [v["volumeID"] for v in disk["volumeChain"]] == [base, leaf]
    assert live_source(g.vm_id) == env.link_path(img, leaf)
    # The chain is persisted for recovery.
    (persisted,) = live_metadata(g.vm_id)
    assert [v.volume_id for v in persisted.chain] == [base, leaf]
    assert persisted.prepared == [base, leaf]
    # The guest kept writing across the snapshot, then powers off.
    serial = g.wait_acks(400, timeout=180)
    assert acks_before < 400
    conftest.wait_for(lambda: api.get_vm(g.vm_id).status == vm_mod.DOWN, 60, "guest poweroff")

    res = verifier.verify(g.serial_log, env.link_path(img, leaf), "qcow2")
    assert res.lost == 0
    assert res.verified > 0
    # Writes after the snapshot went to the new leaf, not the old one.
    old = verifier.verify(g.serial_log, env.link_path(img, base), "qcow2")
    assert old.lost > 0
    assert len(serial.acks) >= 400

    api.vm_destroy(g.vm_id)
    assert env.held() == {}


def test_snapshot_refused_by_libvirt_keeps_old_leaf(api, file_env, vm_params):
    env = file_env
    img, base, bad = str(uuid.uuid4()), str(uuid.uuid4()), str(uuid.uuid4())
    env.create(img, base, 64 * MiB, "COW")
    g = vm_params([env.drive(img, base)], rate=20)
    api.vm_create(g.vm_id, g.params)
    g.wait_acks(5)
    env.create(img, bad, 64 * MiB, "COW", parent=base)
    # Fault injection: the new leaf's qcow2 header is destroyed, so QEMU
    # cannot open it as the overlay.
    with env.prepared(img, bad) as path:
        with open(path, "r+b") as f:
            f.write(b"\0" * 4096)

    with pytest.raises(errors.SnapshotError) as e:
        api.vm_snapshot(g.vm_id, snap(img, base, bad, env))

    assert e.value.name == "snapshotErr"
    assert env.refs(img, bad) == 0
    assert env.held() == {base: 1}
    assert api.vm_get_stats(g.vm_id)[0]["disks"]["vda"]["volumeID"] == base
    assert live_source(g.vm_id) == env.link_path(img, base)
    # The guest still runs and writes.
    acks = g.acks()
    g.wait_acks(acks + 5)
    assert api.get_vm(g.vm_id).status == vm_mod.UP


def test_snapshot_is_idempotent_and_checks_base(api, file_env, vm_params):
    img, base, leaf = str(uuid.uuid4()), str(uuid.uuid4()), str(uuid.uuid4())
    file_env.create(img, base, 64 * MiB, "COW")
    g = vm_params([file_env.drive(img, base)], rate=20)
    api.vm_create(g.vm_id, g.params)
    file_env.create(img, leaf, 64 * MiB, "COW", parent=base)
    api.vm_snapshot(g.vm_id, snap(img, base, leaf, file_env))
    prepares = file_env.calls.count(("prepare", leaf))

    # Repeating the same request is a no-op (the VM already runs on it).
    api.vm_snapshot(g.vm_id, snap(img, base, leaf, file_env))
    assert file_env.calls.count(("prepare", leaf)) == prepares

    # A base that is not the drive's leaf is refused, nothing prepared.
    other = str(uuid.uuid4())
    with pytest.raises(errors.SnapshotError):
        api.vm_snapshot(g.vm_id, snap(img, base, other, file_env))
    assert ("prepare", other) not in file_env.calls


def test_snapshot_chain_must_extend_the_drive(api, file_env, vm_params):
    # The VM runs on base; the new volume's parent is another child of base:
    # switching to it would skip a layer, so it is refused.
    env = file_env
    img, base, mid, new = (str(uuid.uuid4()) for _ in range(4))
    env.create(img, base, 64 * MiB, "COW")
    g = vm_params([env.drive(img, base)], rate=20)
    api.vm_create(g.vm_id, g.params)
    env.create(img, mid, 64 * MiB, "COW", parent=base)
    env.create(img, new, 64 * MiB, "COW", parent=mid)

    with pytest.raises(errors.SnapshotError):
        api.vm_snapshot(g.vm_id, snap(img, base, new, env))

    assert env.held() == {base: 1}
    assert api.vm_get_stats(g.vm_id)[0]["disks"]["vda"]["volumeID"] == base


def test_snapshot_of_unknown_volume(api, file_env, vm_params):
    img, base = str(uuid.uuid4()), str(uuid.uuid4())
    file_env.create(img, base, 64 * MiB, "COW")
    g = vm_params([file_env.drive(img, base)], rate=20)
    api.vm_create(g.vm_id, g.params)

    with pytest.raises(storage_errors.Error) as e:
        api.vm_snapshot(g.vm_id, snap(img, base, str(uuid.uuid4()), file_env))

    assert e.value.name == "VolumeDoesNotExist"
    assert api.get_vm(g.vm_id).status == vm_mod.UP
