"""virt/pivot.py: pivot on readiness, flaps retried, every failure classified.

The guest cases are real (libvirtd, a TCG guest writing checksummed blocks,
two file domains); faults are injected at the libvirt boundary (a refused
pivot, a mirror libvirt no longer calls ready) or made for real (the mirror
cancelled behind the daemon's back).  The rate/ETA arithmetic is unit-tested.
"""

from __future__ import annotations

import uuid

import libvirt
import pytest

from contrib.guest import verifier
from tests.virt import conftest
from tests.virt.test_replication import live_disk, lsm, replicate, vm_stats  # noqa: F401
from virt import drive as drive_mod
from virt import errors, mirror, pivot

MiB = conftest.MiB


def mirrored_guest(env, api, vm_params, sync: bool = True, **writer):
    """A writing guest on base <- leaf, mirrored to the destination (synced); ready."""
    img, base, leaf = (str(uuid.uuid4()) for _ in range(3))
    env.create(img, base, 64 * MiB, "RAW")
    env.create(img, leaf, 64 * MiB, "COW", parent=base)
    g = vm_params([env.drive(img, leaf)], **writer)
    api.vm_create(g.vm_id, g.params)
    g.wait_acks(20)
    src, dst = env.disk(img, leaf), env.disk(img, leaf, dst=True)
    env.clone(img)
    api.vm_disk_replicate_start(g.vm_id, src, dst)
    if sync:
        env.sync(img, "INTERNAL")
    conftest.wait_for(lambda: replicate(api, g)["state"] == "ready", 90, "mirror ready")
    return g, img, leaf, src, dst


def verify_on(env, g, img, leaf, dst: bool) -> None:
    if dst:
        with env.dst_prepared(img, leaf) as path:
            res = verifier.verify(g.serial_log, path, "qcow2")
    else:
        with env.prepared(img, leaf) as path:
            res = verifier.verify(g.serial_log, path, "qcow2")
    assert res.lost == 0, res.details[:5]
    assert res.verified > 0


# Real guests


@pytest.mark.root
@pytest.mark.libvirt
@pytest.mark.guest
def test_pivot_while_the_guest_writes_flat_out(make_api, lsm, vm_params):  # noqa: F811
    env = lsm
    api = make_api(env)
    # rate=0: as fast as the guest can (O_DIRECT + fdatasync, 64 KiB blocks).
    g, img, leaf, src, dst = mirrored_guest(env, api, vm_params, rate=0)
    rep = replicate(api, g)
    assert rep["state"] == "ready"
    acks = g.acks()

    # Ready is enough, whatever cur and end say now: QEMU copies the rest.
    assert api.vm_disk_replicate_finish(g.vm_id, src, dst) is True

    assert live_disk(g.vm_id).path == env.dst_link_path(img, leaf)
    g.wait_acks(acks + 50)
    api.vm_destroy(g.vm_id)
    verify_on(env, g, img, leaf, dst=True)


@pytest.mark.root
@pytest.mark.libvirt
@pytest.mark.guest
def test_refused_pivot_is_retryable_and_a_flap_is_waited_for(
    make_api, lsm, vm_params, monkeypatch  # noqa: F811
):
    env = lsm
    api = make_api(env)
    g, img, leaf, src, dst = mirrored_guest(env, api, vm_params, rate=40)
    real_abort = libvirt.virDomain.blockJobAbort
    pivots = []

    def refusing_abort(dom, disk, flags=0):
        if flags & libvirt.VIR_DOMAIN_BLOCK_JOB_ABORT_PIVOT:
            pivots.append(flags)
            raise libvirt.libvirtError("injected: Job 'copy-vda' in state 'standby' "
                                       "cannot accept command verb 'complete'")
        return real_abort(dom, disk, flags)

    # QEMU keeps refusing while the job runs: retried within the window, then
    # changeDisk (41): retryable, the mirror still runs.
    monkeypatch.setattr(pivot, "PIVOT_WINDOW", 1.0)
    with monkeypatch.context() as m:
        m.setattr(libvirt.virDomain, "blockJobAbort", refusing_abort)
        with pytest.raises(errors.PivotError) as e:
            api.vm_disk_replicate_finish(g.vm_id, src, dst)
    assert e.value.name == "changeDisk"
    assert len(pivots) >= 2
    assert replicate(api, g)["state"] == "ready"
    assert live_disk(g.vm_id).path == env.link_path(img, leaf)

    # A flap: libvirt says "not ready" twice, and QEMU refuses the first
    # pivot; Finish waits, tries again and pivots, within one call.
    real_ready = mirror.live_ready
    answers = [False, False]
    refusals = [1]

    def flapping_ready(vm, d):
        return answers.pop(0) if answers else real_ready(vm, d)

    def refusing_once(dom, disk, flags=0):
        if flags & libvirt.VIR_DOMAIN_BLOCK_JOB_ABORT_PIVOT and refusals:
            refusals.pop()
            raise libvirt.libvirtError("injected: job not ready")
        return real_abort(dom, disk, flags)

    with monkeypatch.context() as m:
        m.setattr(mirror, "live_ready", flapping_ready)
        m.setattr(libvirt.virDomain, "blockJobAbort", refusing_once)
        assert api.vm_disk_replicate_finish(g.vm_id, src, dst) is True
    assert answers == [] and refusals == []
    assert live_disk(g.vm_id).path == env.dst_link_path(img, leaf)
    assert "replicate" not in vm_stats(api, g)["disks"]["vda"]
    g.wait_acks(g.acks() + 10)
    api.vm_destroy(g.vm_id)
    verify_on(env, g, img, leaf, dst=True)


@pytest.mark.root
@pytest.mark.libvirt
@pytest.mark.guest
def test_a_flap_that_lasts_answers_unavail(make_api, lsm, vm_params, monkeypatch):  # noqa: F811
    env = lsm
    api = make_api(env)
    g, img, leaf, src, dst = mirrored_guest(env, api, vm_params, rate=40)
    monkeypatch.setattr(pivot, "READY_WAIT", 0.5)
    with monkeypatch.context() as m:
        m.setattr(mirror, "live_ready", lambda vm, d: False)
        with pytest.raises(errors.ReplicaNotReadyError) as e:
            api.vm_disk_replicate_finish(g.vm_id, src, dst)
    assert e.value.name == "unavail" and "flap" in str(e.value)
    # The state follows libvirt back: copying, then ready again.
    assert replicate(api, g)["state"] == "copying"
    assert api.vm_disk_replicate_finish(g.vm_id, src, dst) is True
    assert live_disk(g.vm_id).path == env.dst_link_path(img, leaf)
    api.vm_destroy(g.vm_id)
    verify_on(env, g, img, leaf, dst=True)


@pytest.mark.root
@pytest.mark.libvirt
@pytest.mark.guest
def test_a_mirror_gone_behind_our_back_is_abort_only(make_api, lsm, vm_params):  # noqa: F811
    env = lsm
    api = make_api(env)
    g, img, leaf, src, dst = mirrored_guest(env, api, vm_params, rate=40)
    # Someone else cancels the job (a real one, through its own connection).
    conn = conftest.libvirt_connection()
    try:
        conn.lookupByUUIDString(g.vm_id).blockJobAbort("vda", 0)
    finally:
        conn.close()
    conftest.wait_for(lambda: not api.get_vm(g.vm_id).call(
        lambda dom: dom.blockJobInfo("vda", 0)), 30, "job gone")

    with pytest.raises(errors.PivotImpossibleError) as e:
        api.vm_disk_replicate_finish(g.vm_id, src, dst)

    assert e.value.name == "PivotImpossible"
    assert live_disk(g.vm_id).path == env.link_path(img, leaf)
    # The abort it asks for works with no job left, and releases the replica.
    assert api.vm_disk_replicate_finish(g.vm_id, src, src) is True
    assert replicate(api, g) is None
    assert env.dst_refs(img, leaf) == 0
    g.wait_acks(g.acks() + 10)
    api.vm_destroy(g.vm_id)
    verify_on(env, g, img, leaf, dst=False)


# The rate and ETA of VM.getStats' replicate


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_rate_and_eta_of_a_converging_mirror():
    clock = Clock()
    rate = drive_mod.MirrorRate(window=10, clock=clock)
    assert rate.sample(0, 100 * MiB) == (0, drive_mod.NO_ETA)
    clock.now += 2
    # 20 MiB copied in 2 s while the guest dirtied 4 MiB: 16 MiB less to go.
    r, eta = rate.sample(20 * MiB, 104 * MiB)
    assert r == 10 * MiB
    assert eta == 11  # 84 MiB at 8 MiB/s, rounded up
    assert rate.sample(104 * MiB, 104 * MiB, ready=True)[1] == 0


def test_no_eta_when_the_guest_outruns_the_mirror():
    clock = Clock()
    rate = drive_mod.MirrorRate(window=10, clock=clock)
    rate.sample(0, 10 * MiB)
    clock.now += 1
    r, eta = rate.sample(5 * MiB, 20 * MiB)  # copied 5, dirtied 10
    assert r == 5 * MiB and eta == drive_mod.NO_ETA


def test_rate_is_over_the_window_and_restarts_with_a_new_job():
    clock = Clock()
    rate = drive_mod.MirrorRate(window=10, clock=clock)
    for i in range(30):
        rate.sample(i * MiB, 100 * MiB)
        clock.now += 1
    # Older readings are dropped: the rate is the recent one, 1 MiB/s.
    assert rate.sample(30 * MiB, 100 * MiB)[0] == MiB
    # cur going back is a new job: no rate until a second reading.
    assert rate.sample(0, 100 * MiB)[0] == 0


# [replication] api: from the daemon's config to virt's


def test_replication_api_is_configured_and_checked():
    from vdsm_lsm import app
    from vdsm_lsm import config as config_mod

    assert app.virt_config(config_mod.load("/nonexistent")).replication_api == "blockcopy"
    cfg = config_mod.load("/nonexistent", {"replication": {"api": "blockrebase"}})
    assert app.virt_config(cfg).replication_api == mirror.BLOCKREBASE
    with pytest.raises(config_mod.ConfigError):
        config_mod.load("/nonexistent", {"replication": {"api": "blockpull"}})
    # blockRebase cannot block writes: refused before anything is prepared.
    with pytest.raises(errors.SyncWritesUnsupportedError) as e:
        mirror.check_api(mirror.BLOCKREBASE, True, "vda", "vm")
    assert e.value.name == "SyncWritesUnsupported"
    mirror.check_api(mirror.BLOCKREBASE, False, "vda", "vm")
    mirror.check_api(mirror.BLOCKCOPY, True, "vda", "vm")


def test_job_and_libvirtd_timeouts_are_configured():
    from vdsm_lsm import app
    from vdsm_lsm import config as config_mod

    default = app.virt_config(config_mod.load("/nonexistent"))
    assert default.job_timeouts == pivot.Timeouts(job_stall=10.0, job_end=60.0)
    assert default.libvirt_unavailable_wait == 30.0
    cfg = config_mod.load("/nonexistent", {
        "replication": {"job_stall_timeout": "2.5", "job_end_timeout": "120"},
        "libvirt": {"unavailable_wait": "90"}})
    virt = app.virt_config(cfg)
    assert virt.job_timeouts == pivot.Timeouts(job_stall=2.5, job_end=120.0)
    assert virt.libvirt_unavailable_wait == 90.0
    for bad in ({"replication": {"job_stall_timeout": "0"}},
                {"replication": {"job_end_timeout": "soon"}},
                {"libvirt": {"unavailable_wait": "-1"}}):
        with pytest.raises(config_mod.ConfigError):
            config_mod.load("/nonexistent", bad)
