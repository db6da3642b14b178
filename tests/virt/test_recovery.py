"""virt/recovery.py: a restarted daemon finds its running VMs again."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
import uuid

import pytest

from contrib.guest import verifier
from tests.virt import conftest
from virt import api as virt_api
from virt import drive as drive_mod
from virt import errors, metadata
from virt import vm as vm_mod

pytestmark = [pytest.mark.root, pytest.mark.libvirt, pytest.mark.guest]

MiB = conftest.MiB
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def two_volume_image(env) -> tuple[str, str, str]:
    img, base, leaf = str(uuid.uuid4()), str(uuid.uuid4()), str(uuid.uuid4())
    env.create(img, base, 64 * MiB, "COW", initial_size=32 * MiB)
    env.create(img, leaf, 64 * MiB, "COW", parent=base, initial_size=32 * MiB)
    return img, base, leaf


def snap(env, img, base, leaf):
    return [{"domainID": env.sd_id, "imageID": img, "baseVolumeID": base, "volumeID": leaf}]


def test_restarted_daemon_recovers_vm(make_api, file_env, vm_params):
    env = file_env
    img, base, leaf = two_volume_image(env)
    first = make_api(env)
    g = vm_params([env.drive(img, base)], rate=20)
    first.vm_create(g.vm_id, g.params)
    first.vm_snapshot(g.vm_id, snap(env, img, base, leaf))
    g.wait_acks(10)
    first.stop()  # the daemon goes away; the VM keeps running

    env2 = env.restart()
    second = make_api(env2)

    assert [(v["vmId"], v["status"]) for v in second.host_get_vm_list()] == [(g.vm_id, vm_mod.UP)]
    stats = second.vm_get_stats(g.vm_id)[0]
    disk = stats["disks"]["vda"]
    assert stats["vmName"] == g.params["vmName"]
    assert disk["volumeID"] == leaf
    assert disk["volumeChain"] == [
        {"volumeID": base, "path": env.link_path(img, base)},
        {"volumeID": leaf, "path": env.link_path(img, leaf)},
    ]
    # The references the VM held are taken again, once each (base is in
    # both prepared chains).
    assert env2.held() == {base: 2, leaf: 1}
    # Undisturbed: the guest kept writing.
    acks = g.acks()
    g.wait_acks(acks + 5)

    second.vm_destroy(g.vm_id)
    assert env2.held() == {}
    assert second.host_get_vm_list() == []


def test_recovery_follows_live_chain_when_metadata_lags(make_api, file_env, vm_params):
    # The daemon died after libvirt switched to the new leaf but before the
    # metadata was written: the live domain XML wins.
    env = file_env
    img, base, leaf = two_volume_image(env)
    first = make_api(env)
    g = vm_params([env.drive(img, base)], rate=20)
    first.vm_create(g.vm_id, g.params)
    stale = [
        drive_mod.Drive(
            name=d.name,
            pool_id=d.pool_id,
            domain_id=d.domain_id,
            image_id=d.image_id,
            volume_id=d.volume_id,
            format=d.format,
            chain=list(d.chain),
            disk_type=d.disk_type,
            prepared=list(d.prepared),
        )
        for d in first.get_vm(g.vm_id).drives
    ]
    first.vm_snapshot(g.vm_id, snap(env, img, base, leaf))
    first.get_vm(g.vm_id).call(lambda dom: metadata.write(dom, stale))
    first.stop()

    env2 = env.restart()
    second = make_api(env2)

    disk = second.vm_get_stats(g.vm_id)[0]["disks"]["vda"]
    assert disk["volumeID"] == leaf
    assert [v["volumeID"] for v in disk["volumeChain"]] == [base, leaf]
    # The new leaf's reference is taken again too, so destroy releases all.
    second.vm_destroy(g.vm_id)
    assert env2.held() == {}


def test_foreign_domains_are_not_recovered(make_api, file_env, domains):
    conn = conftest.libvirt_connection()
    vm_id = str(uuid.uuid4())
    domains.append(vm_id)
    try:
        name = f"lsmtest-virt-foreign-{vm_id[:8]}"
        conn.createXML(
            f"<domain type='qemu'><name>{name}</name><uuid>{vm_id}</uuid>"
            "<memory unit='MiB'>64</memory><os><type arch='x86_64'>hvm</type></os>"
            "</domain>",
            0,
        )
    finally:
        conn.close()

    api = make_api(file_env)

    assert vm_id not in [v["vmId"] for v in api.host_get_vm_list()]


def test_kill_9_daemon_then_recover(make_api, any_env, vm_params):
    env = any_env
    img, base, leaf = two_volume_image(env)
    g = vm_params([env.drive(img, base)], count=300, rate=30, poweroff=True)
    spec = {
        "run_dir": env.run_dir,
        "vm_id": g.vm_id,
        "params": g.params,
        "snapshot": snap(env, img, base, leaf),
    }
    env.close()  # the daemon that made the volumes stops; the agent takes over
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.virt.agent", json.dumps(spec)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_ready(proc, timeout=120)
        g.wait_acks(20)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)

    env2 = env.reopen()
    api = make_api(env2)

    assert [(v["vmId"], v["status"]) for v in api.host_get_vm_list()] == [(g.vm_id, vm_mod.UP)]
    disk = api.vm_get_stats(g.vm_id)[0]["disks"]["vda"]
    assert [v["volumeID"] for v in disk["volumeChain"]] == [base, leaf]
    assert env2.held() == {base: 2, leaf: 1}
    # Events reach the recovered VM: the guest powers off after its writes.
    g.wait_acks(300, timeout=180)
    conftest.wait_for(lambda: api.get_vm(g.vm_id).status == vm_mod.DOWN, 60, "guest poweroff")
    assert verifier.verify(g.serial_log, env.link_path(img, leaf), "qcow2").lost == 0
    api.vm_destroy(g.vm_id)
    assert env2.held() == {}


def _wait_ready(proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"agent exited rc={proc.returncode}")
        ready, _, _ = select.select([proc.stdout], [], [], 0.5)
        if ready and proc.stdout.readline().strip() == b"READY":
            return
    raise TimeoutError("agent did not create its VM")


def test_verbs_wait_for_recovery(make_api, file_env, vm_params):
    # While recovery re-prepares the running VMs' volumes, the verbs answer
    # RecoveryInProgress instead of a partial VM list.
    env = file_env
    img, vol = env.new_image()
    first = make_api(env)
    g = vm_params([env.drive(img, vol)], rate=20)
    first.vm_create(g.vm_id, g.params)
    first.stop()
    env2 = env.restart()

    class SlowStorage:
        # Fault injection: storage that stalls until the test lets it go.
        def __init__(self) -> None:
            self.entered = threading.Event()
            self.release = threading.Event()

        def prepare(self, *ids):
            self.entered.set()
            assert self.release.wait(60)
            return env2.prepare(*ids)

        def teardown(self, *ids):
            env2.teardown(*ids)

    slow = SlowStorage()
    second = virt_api.API(slow, conftest.config_for(env2))
    starter = threading.Thread(target=second.start)
    starter.start()
    try:
        assert slow.entered.wait(60)
        with pytest.raises(errors.RecoveryInProgressError) as e:
            second.host_get_vm_list()
        assert e.value.name == "RecoveryInProgress"
        with pytest.raises(errors.RecoveryInProgressError):
            second.vm_get_stats(g.vm_id)[0]
    finally:
        slow.release.set()
        starter.join(60)
    try:
        listed = [(v["vmId"], v["status"]) for v in second.host_get_vm_list()]
        assert listed == [(g.vm_id, vm_mod.UP)]
        second.vm_destroy(g.vm_id)
        assert env2.held() == {}
    finally:
        second.stop()
