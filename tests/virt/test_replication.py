"""virt/replication.py: live storage migration of a writing guest's disk.

Real everything: two domains in one pool, SPM image verbs, libvirt's block
copy of a running TCG guest that writes checksummed blocks, the pivot, and
the verifier on the chain the VM ends on.  Every guest case runs twice, once
per ``[replication] api``: blockCopy and blockRebase(COPY) (the ``make_api``
fixture below; the pivot's readiness and classification: test_pivot.py).
"""

from __future__ import annotations

import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterator

import libvirt
import pytest

from contrib.guest import verifier
from storage import sd
from tests.virt import conftest, lsm_env
from virt import api as virt_api
from virt import domxml, errors, metadata, mirror, replication
from virt import drive as drive_mod
from virt import vm as vm_mod

pytestmark = [pytest.mark.root, pytest.mark.libvirt, pytest.mark.guest]

MiB = conftest.MiB


@pytest.fixture(params=list(mirror.APIS))
def mirror_api(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def make_api(mirror_api: str, domains: list[str]) -> Iterator:
    """conftest's make_api, once per replication api (blockcopy, blockrebase)."""
    apis: list[virt_api.API] = []

    def make(storage) -> virt_api.API:
        config = virt_api.Config(libvirt_uri=conftest.URI, accel="tcg", replication_api=mirror_api)
        a = virt_api.API(storage, config)
        a.start()
        apis.append(a)
        return a

    try:
        yield make
    finally:
        conftest.destroy_domains(domains)
        for a in apis:
            a.stop()


@pytest.fixture(
    params=[(sd.FILE, sd.FILE), (sd.FILE, sd.BLOCK), (sd.BLOCK, sd.FILE)],
    ids=["file-file", "file-block", "block-file"],
)
def any_lsm_env(
    request: pytest.FixtureRequest, workdir: str, domains: list[str]
) -> Iterator[lsm_env.LsmEnv]:
    yield from _env(workdir, domains, *request.param)


@pytest.fixture
def lsm(workdir: str, domains: list[str]) -> Iterator[lsm_env.LsmEnv]:
    yield from _env(workdir, domains, sd.FILE, sd.FILE)


def _env(workdir: str, domains: list[str], src: str, dst: str) -> Iterator[lsm_env.LsmEnv]:
    env, cleanup = lsm_env.make_lsm_env(workdir, src, dst)
    try:
        yield env
    finally:
        conftest.destroy_domains(domains)
        cleanup()


def live_disk(vm_id: str) -> domxml.LiveDisk:
    conn = conftest.libvirt_connection()
    try:
        xml = conn.lookupByUUIDString(vm_id).XMLDesc(0)
    finally:
        conn.close()
    return domxml.parse_disks(xml)["vda"]


def live_metadata(vm_id: str):
    conn = conftest.libvirt_connection()
    try:
        return metadata.read(conn.lookupByUUIDString(vm_id))
    finally:
        conn.close()


def running_guest(env, api, vm_params, **writer):
    """RAW base <- COW leaf, a guest writing to it, then a live snapshot: base <- leaf <- snap."""
    img, base, leaf, snap = (str(uuid.uuid4()) for _ in range(4))
    env.create(img, base, 64 * MiB, "RAW")
    env.create(img, leaf, 64 * MiB, "COW", parent=base)
    writer.setdefault("rate", 40)
    g = vm_params([env.drive(img, leaf)], **writer)
    api.vm_create(g.vm_id, g.params)
    g.wait_acks(20)
    env.create(img, snap, 64 * MiB, "COW", parent=leaf)
    api.vm_snapshot(
        g.vm_id,
        [{"domainID": env.sd_id, "imageID": img, "baseVolumeID": leaf, "volumeID": snap}],
    )
    g.wait_acks(g.acks() + 10)
    return g, img, [base, leaf, snap]


def vm_stats(api, g) -> dict:
    """VM.getStats' dict (the verb answers VDSM's list of one)."""
    stats = api.vm_get_stats(g.vm_id)
    return stats[0] if isinstance(stats, list) else stats


def replicate(api, g) -> dict | None:
    return vm_stats(api, g)["disks"]["vda"].get("replicate")


def wait_ready(api, g, timeout: float = 90) -> None:
    conftest.wait_for(lambda: replicate(api, g)["state"] == "ready", timeout, "mirror ready")


def test_live_storage_migration(make_api, any_lsm_env, vm_params):
    env = any_lsm_env
    api = make_api(env)
    g, img, vols = running_guest(env, api, vm_params)
    snap = vols[-1]
    src, dst = env.disk(img, snap), env.disk(img, snap, dst=True)
    env.clone(img)

    assert api.vm_disk_replicate_start(g.vm_id, src, dst) is True

    rep = replicate(api, g)
    assert rep["state"] in ("copying", "ready")
    assert rep["dstDisk"]["domainID"] == env.dst_sd_id
    assert rep["syncWrites"] is False and rep["bandwidth"] == 0
    (persisted,) = live_metadata(g.vm_id)
    assert persisted.replica is not None and persisted.replica.domain_id == env.dst_sd_id
    env.sync(img, "INTERNAL")
    wait_ready(api, g)
    rep = replicate(api, g)
    # The mirror's rate (bytes/s from successive readings) and ETA (0: ready).
    assert rep["rate"] >= 0 and rep["eta"] == 0
    acks = g.acks()

    assert api.vm_disk_replicate_finish(g.vm_id, src, dst) is True

    disk = vm_stats(api, g)["disks"]["vda"]
    assert "replicate" not in disk
    assert disk["domainID"] == env.dst_sd_id
    assert disk["volumeChain"] == [
        {"volumeID": v, "path": env.dst_link_path(img, v)} for v in vols
    ]
    live = live_disk(g.vm_id)
    assert live.path == env.dst_link_path(img, snap)
    assert [p for p, _ in live.backing] == [env.dst_link_path(img, v) for v in vols[-2::-1]]
    (persisted,) = live_metadata(g.vm_id)
    assert persisted.domain_id == env.dst_sd_id and persisted.replica is None
    assert all(env.legality(env.dst_sd_id, img, v) == "LEGAL" for v in vols)
    # The source chain is released; the drive holds the destination leaf.
    assert env.held() == {}
    assert env.dst_refs(img, snap) == 1

    # The guest keeps writing, now to the destination chain.
    g.wait_acks(acks + 60)
    assert api.get_vm(g.vm_id).status == vm_mod.UP
    api.vm_destroy(g.vm_id)
    assert env.dst_refs(img, snap) == 0

    with env.dst_prepared(img, snap) as path:
        res = verifier.verify(g.serial_log, path, "qcow2")
    assert res.lost == 0, res.details[:5]
    assert res.verified > 0
    # Step 6: the source image is no longer needed.
    env.delete_image(env.sd_id, img)
    assert env.provider.storage_domain_get_images(env.sd_id) == []


def test_finish_refused_before_internal_sync(make_api, lsm, vm_params, monkeypatch):
    env = lsm
    api = make_api(env)
    g, img, vols = running_guest(env, api, vm_params)
    snap = vols[-1]
    src, dst = env.disk(img, snap), env.disk(img, snap, dst=True)
    env.clone(img)
    api.vm_disk_replicate_start(g.vm_id, src, dst)
    wait_ready(api, g)

    # The mirror is ready but the internal volumes were never copied:
    # pivoting now would make the guest read garbage.
    with pytest.raises(errors.DestinationNotSyncedError) as e:
        api.vm_disk_replicate_finish(g.vm_id, src, dst)

    assert e.value.name == "DestinationChainNotSynced"
    assert e.value.vol_id == vols[0]
    disk = vm_stats(api, g)["disks"]["vda"]
    assert disk["domainID"] == env.sd_id
    assert disk["replicate"]["state"] == "ready"
    assert live_disk(g.vm_id).path == env.link_path(img, snap)
    acks = g.acks()
    g.wait_acks(acks + 10)
    assert api.get_vm(g.vm_id).status == vm_mod.UP

    env.sync(img, "INTERNAL")
    # Fault injection: libvirt fails the pivot. changeDisk, the mirror goes on.
    real_abort = libvirt.virDomain.blockJobAbort

    def failing_abort(dom, disk, flags=0):
        if flags & libvirt.VIR_DOMAIN_BLOCK_JOB_ABORT_PIVOT:
            raise libvirt.libvirtError("injected pivot failure")
        return real_abort(dom, disk, flags)

    with monkeypatch.context() as m:
        m.setattr(libvirt.virDomain, "blockJobAbort", failing_abort)
        with pytest.raises(errors.PivotError) as e:
            api.vm_disk_replicate_finish(g.vm_id, src, dst)
    assert e.value.name == "changeDisk"
    assert replicate(api, g)["state"] == "ready"
    assert live_disk(g.vm_id).path == env.link_path(img, snap)

    # Synced and retried, the same request pivots.
    api.vm_disk_replicate_finish(g.vm_id, src, dst)
    assert live_disk(g.vm_id).path == env.dst_link_path(img, snap)
    g.wait_acks(g.acks() + 10)
    api.vm_destroy(g.vm_id)
    with env.dst_prepared(img, snap) as path:
        assert verifier.verify(g.serial_log, path, "qcow2").lost == 0


def test_pivot_on_a_host_that_is_not_spm_leaves_the_leaf_to_the_spm(make_api, lsm, vm_params):
    env = lsm
    env.spm = False  # the VM's host answers as an HSM: its SPM path runs nothing here
    api = make_api(env)
    g, img, vols = running_guest(env, api, vm_params)
    snap = vols[-1]
    src, dst = env.disk(img, snap), env.disk(img, snap, dst=True)
    env.clone(img)
    api.vm_disk_replicate_start(g.vm_id, src, dst)
    wait_ready(api, g)

    # Reading legality still refuses an unsynced chain.
    with pytest.raises(errors.DestinationNotSyncedError):
        api.vm_disk_replicate_finish(g.vm_id, src, dst)
    env.sync(img, "INTERNAL")

    assert api.vm_disk_replicate_finish(g.vm_id, src, dst) is True

    assert live_disk(g.vm_id).path == env.dst_link_path(img, snap)
    # Nothing written by this host: the leaf waits for the SPM's Volume.setLegality.
    assert ("legal", snap) not in env.calls
    assert env.legality(env.dst_sd_id, img, snap) == "ILLEGAL"
    assert [env.legality(env.dst_sd_id, img, v) for v in vols[:-1]] == ["LEGAL", "LEGAL"]
    # The engine's Volume.setLegality on the SPM (this host's provider, a verb).
    env.provider.volume_set_legality(env.pool_id, env.dst_sd_id, img, snap, "LEGAL")
    assert env.legality(env.dst_sd_id, img, snap) == "LEGAL"
    g.wait_acks(g.acks() + 10)
    api.vm_destroy(g.vm_id)
    with env.dst_prepared(img, snap) as path:
        assert verifier.verify(g.serial_log, path, "qcow2").lost == 0


def test_refusals_and_abort(make_api, lsm, vm_params, mirror_api):
    env = lsm
    api = make_api(env)
    g, img, vols = running_guest(env, api, vm_params)
    snap = vols[-1]
    src, dst = env.disk(img, snap), env.disk(img, snap, dst=True)

    # No replication yet.
    with pytest.raises(errors.ReplicationNotInProgressError) as e:
        api.vm_disk_replicate_finish(g.vm_id, src, dst)
    assert e.value.name == "ReplicationNotInProgress"
    # A volume no drive runs.
    with pytest.raises(errors.ImageError):
        api.vm_disk_replicate_start(g.vm_id, env.disk(img, vols[0]), env.disk(img, vols[0], True))

    env.clone(img)
    env.sync(img, "INTERNAL")
    if mirror_api == mirror.BLOCKREBASE:
        # blockRebase has no write-blocking mode: refused before anything is prepared.
        with pytest.raises(errors.SyncWritesUnsupportedError) as e:
            api.vm_disk_replicate_start(g.vm_id, src, dst, sync_writes=True)
        assert e.value.name == "SyncWritesUnsupported"
        assert env.dst_refs(img, snap) == 0 and replicate(api, g) is None
    # 1 MiB/s while the guest dirties ~2.5 MiB/s: the mirror stays copying.
    api.vm_disk_replicate_start(g.vm_id, src, dst, bandwidth=1, sync_writes=False)
    rep = replicate(api, g)
    assert rep["state"] == "copying" and rep["bandwidth"] == 1
    assert env.dst_refs(img, snap) == 1

    with pytest.raises(errors.ReplicaNotReadyError) as e:
        api.vm_disk_replicate_finish(g.vm_id, src, dst)
    assert e.value.name == "unavail"
    with pytest.raises(errors.ReplicaError) as e:
        api.vm_disk_replicate_start(g.vm_id, src, dst)
    assert e.value.name == "replicaErr"

    # Abort: the VM stays on the source, the destination is released.
    assert api.vm_disk_replicate_finish(g.vm_id, src, src) is True

    disk = vm_stats(api, g)["disks"]["vda"]
    assert "replicate" not in disk
    assert disk["domainID"] == env.sd_id
    assert live_disk(g.vm_id).path == env.link_path(img, snap)
    assert env.dst_refs(img, snap) == 0
    (persisted,) = live_metadata(g.vm_id)
    assert persisted.replica is None
    assert env.legality(env.dst_sd_id, img, snap) == "ILLEGAL"
    with pytest.raises(errors.ReplicationNotInProgressError):
        api.vm_disk_replicate_finish(g.vm_id, src, src)
    g.wait_acks(g.acks() + 10)
    assert api.get_vm(g.vm_id).status == vm_mod.UP

    # Destroying a VM while it replicates releases the destination too.
    api.vm_disk_replicate_start(g.vm_id, src, dst, bandwidth=1)
    assert env.dst_refs(img, snap) == 1
    api.vm_destroy(g.vm_id)
    assert env.dst_refs(img, snap) == 0
    assert env.held() == {}
    assert verifier.verify(g.serial_log, _src_path(env, img, snap), "qcow2").lost == 0


def _src_path(env, img, vol):
    return f"{env.workdir}/src/{env.sd_id}/images/{img}/{vol}"


def test_block_copy_refused_releases_destination(make_api, lsm, vm_params):
    env = lsm
    api = make_api(env)
    g, img, vols = running_guest(env, api, vm_params)
    snap = vols[-1]
    env.clone(img)
    # Fault injection: the destination leaf is no qcow2 image, QEMU cannot
    # open it as the mirror target.
    dst_leaf = f"{env.workdir}/dst/{env.dst_sd_id}/images/{img}/{snap}"
    with open(dst_leaf, "r+b") as f:
        f.write(b"\0" * 4096)

    with pytest.raises(errors.ReplicaError) as e:
        api.vm_disk_replicate_start(g.vm_id, env.disk(img, snap), env.disk(img, snap, True))

    assert e.value.name == "replicaErr"
    assert env.dst_refs(img, snap) == 0
    assert "replicate" not in vm_stats(api, g)["disks"]["vda"]
    g.wait_acks(g.acks() + 5)
    assert api.get_vm(g.vm_id).status == vm_mod.UP


def test_replica_recovered_after_restart(make_api, lsm, vm_params):
    env = lsm
    api = make_api(env)
    g, img, vols = running_guest(env, api, vm_params)
    snap = vols[-1]
    src, dst = env.disk(img, snap), env.disk(img, snap, dst=True)
    env.clone(img)
    env.sync(img, "INTERNAL")
    api.vm_disk_replicate_start(g.vm_id, src, dst, bandwidth=100)
    wait_ready(api, g)
    api.stop()

    # A new daemon (same storage): the replica comes back from the metadata
    # and the running mirror job.
    api2 = make_api(env)
    rep = replicate(api2, g)
    assert rep is not None
    assert rep["state"] == "ready" and rep["bandwidth"] == 100
    assert rep["dstDisk"]["domainID"] == env.dst_sd_id

    api2.vm_disk_replicate_finish(g.vm_id, src, dst)
    assert live_disk(g.vm_id).path == env.dst_link_path(img, snap)
    assert env.legality(env.dst_sd_id, img, snap) == "LEGAL"
    g.wait_acks(g.acks() + 10)
    api2.vm_destroy(g.vm_id)


def test_copy_xml_names_the_destination_chain():
    chain = [
        drive_mod.Volume("b", "/run/sd/img/b", "RAW"),
        drive_mod.Volume("l", "/run/sd/img/l", "COW"),
    ]
    r = drive_mod.Replica("p", "sd", "img", "l", chain=chain)

    root = ET.fromstring(replication.copy_xml(r))

    assert root.get("type") == "file"
    assert root.find("source").get("file") == "/run/sd/img/l"
    assert root.find("driver").get("type") == "qcow2"
    backing = root.find("backingStore")
    assert backing.find("source").get("file") == "/run/sd/img/b"
    assert backing.find("format").get("type") == "raw"
    assert backing.find("backingStore").attrib == {}


def test_live_mirror_ready():
    xml = """<domain><devices>
      <disk type='file' device='disk'><target dev='vda'/>
        <mirror type='file' job='copy' ready='yes'/></disk>
      <disk type='file' device='disk'><target dev='vdb'/>
        <mirror type='file' job='copy'/></disk>
      <disk type='file' device='disk'><target dev='vdc'/></disk>
    </devices></domain>"""
    assert replication.live_mirror_ready(xml, "vda") is True
    assert replication.live_mirror_ready(xml, "vdb") is False
    assert replication.live_mirror_ready(xml, "vdc") is None


def test_replica_metadata_round_trip():
    chain = [drive_mod.Volume("l", "/run/sd/img/l", "COW")]
    d = drive_mod.Drive("vda", "p", "sd", "img", "l", "cow", chain, prepared=["l"])
    d.replica = drive_mod.Replica(
        "p", "sd2", "img", "l", chain=[drive_mod.Volume("l", "/run/sd2/img/l", "COW")],
        state=drive_mod.READY, bandwidth=5, sync_writes=True, need_extend=False,
    )

    (back,) = metadata.from_xml(metadata.to_xml([d]))

    assert back.replica == d.replica
