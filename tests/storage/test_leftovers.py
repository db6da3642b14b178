"""storage.leftovers: a daemon killed with kill -9 and started again adopts
what is still in use and releases the rest, on real loop devices and lvm2.

The previous life is a child process (tests/storage/leftovers_child.py)
that prepares volumes on a block domain, starts a qemu-img copy, and is
SIGKILLed: its loop devices, prepare links and state files stay behind, its
reference counts are gone.  The restarted side is a new StorageAPI on the
same run dir, started as the daemon starts (adopt, reconnect, recovery
re-prepares what a running VM uses, release).
"""

from __future__ import annotations

import collections.abc
import json
import os
import signal
import subprocess
import sys
import time
from typing import Any

import pytest

from storage import activation, block_manifest, block_sd, image, leftovers, loop
from storage import api as api_mod
from tests.storage import conftest
from tests.storage.domain_helpers import API_OPTIONS, create_volume, make_pool, new_id

pytest_plugins = ["tests.storage.domain_fixtures"]

pytestmark = [pytest.mark.root, conftest.requires_root]

MiB = 1024**2
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MARKER = "written by the previous life"


def over(pv: str) -> set[str]:
    """Loop devices bound over pv, as ``losetup -J`` lists them."""
    return set(conftest.stacked_loop_devices(pv))


def settled_over(pv: str, timeout: float = 10.0) -> set[str]:
    """over(pv) once detaching has finished: a device released while its last
    opener (a just-killed qemu-img) was still closing it goes away when that
    close completes (the kernel's autoclear), which a loaded machine delays."""
    deadline = time.monotonic() + timeout
    devices = over(pv)
    while devices and time.monotonic() < deadline:
        time.sleep(0.1)
        devices = over(pv)
    return devices


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


class PreviousLife:
    """The child daemon's ids and devices, read from its JSON line."""

    def __init__(self, info: dict[str, Any]) -> None:
        self.ids: dict[str, str] = info["ids"]
        self.devices: dict[str, str] = info["devices"]
        self.copy_pid: int = info["copy_pid"]

    def __getattr__(self, name: str) -> str:
        return self.ids[name]


@pytest.fixture
def previous_life(
    storage_tmpdir: str, loop_device_factory: collections.abc.Callable[..., str]
) -> collections.abc.Iterator[tuple[PreviousLife, str]]:
    """Run the child daemon on host "a"'s run dir and kill it with SIGKILL."""
    pv = loop_device_factory(2 * 1024**3)
    args = {
        "run_dir": os.path.join(storage_tmpdir, "run-a"),
        "options": API_OPTIONS,
        "pv": pv,
        "marker": MARKER,
        "work": storage_tmpdir,
    }
    child = subprocess.Popen(
        [sys.executable, "-m", "tests.storage.leftovers_child", json.dumps(args)],
        cwd=REPO, stdout=subprocess.PIPE, text=True,
    )
    life = None
    try:
        line = child.stdout.readline()  # type: ignore[union-attr]
        assert line, "the child daemon died before preparing its volumes"
        life = PreviousLife(json.loads(line))
    finally:
        os.kill(child.pid, signal.SIGKILL)  # the daemon only: its qemu-img goes on
        child.wait(60)
    try:
        yield life, pv
    finally:
        if alive(life.copy_pid):
            os.kill(life.copy_pid, signal.SIGKILL)
        # Whatever a failed test left of the previous life's devices.
        act = activation.LoopActivation(None, args["run_dir"])
        for vg in act.recorded_vgs():
            act.deactivate_all(vg, [pv])


def start_like_the_daemon(
    provider: api_mod.StorageAPI, recovery: collections.abc.Callable[[], None]
) -> tuple[leftovers.Report, leftovers.Report]:
    """What vdsm_lsm.app.App.start does: adopt, reconnect, recover VMs, release."""
    adopted = leftovers.adopt(provider)
    provider.recover()
    recovery()
    return adopted, leftovers.release(provider)


def test_restart_adopts_what_is_in_use_and_releases_the_rest(
    previous_life: tuple[PreviousLife, str], api_factory: collections.abc.Callable[..., Any]
) -> None:
    life, pv = previous_life
    left = over(pv)
    # 6 special LVs and a's base and top, b, c: all still attached.
    assert len(left) == len(block_manifest.SPECIAL_LVS) + 4
    assert alive(life.copy_pid)
    restarted = api_factory()  # the same run dir: the daemon started again
    # c's state file is lost (its device carries this host's tag: adopted).
    state_dir = os.path.join(restarted.run_dir, "loop", life.sd)
    os.unlink(os.path.join(state_dir, life.c_base))
    dom = restarted.cache.get(life.sd)
    assert isinstance(dom, block_sd.BlockDomain)
    specials_before = {n: dom.activation.active_path(dom.vg, n) for n in block_manifest.SPECIAL_LVS}

    def vm_recovery() -> None:
        # A running VM's drive is a's top: recovery prepares it again.
        result = restarted.image_prepare(life.pool, life.sd, life.a, life.a_top)
        for entry in result["chain"]:
            assert os.readlink(entry["path"]) == life.devices[entry["volumeID"]]

    adopted, released = start_like_the_daemon(restarted, vm_recovery)

    assert adopted.orphans == [life.copy_pid] and not alive(life.copy_pid)
    assert adopted.adopted == [f"{life.sd}/{life.c_base} {life.devices[life.c_base]}"]
    # a is kept on the very devices its QEMU would hold; the specials too.
    a_devs = {life.devices[life.a_base], life.devices[life.a_top]}
    assert {n: dom.activation.active_path(dom.vg, n) for n in block_manifest.SPECIAL_LVS} \
        == specials_before
    assert over(pv) == a_devs | set(specials_before.values())
    for vol in (life.b_base, life.c_base):
        assert not os.path.lexists(restarted.images.link_path(life.sd, life.b, vol))
        assert not os.path.lexists(restarted.images.link_path(life.sd, life.c, vol))
        assert not dom.activation.is_active(dom.vg, vol)
    assert sorted(r.split()[0] for r in released.released) == ["link"] * 2  # b's and c's
    # The adopted volume keeps working.
    base_link = restarted.images.link_path(life.sd, life.a, life.a_base)
    fd = os.open(base_link, os.O_RDWR)
    try:
        assert os.pread(fd, len(MARKER), 0) == MARKER.encode()
        os.pwrite(fd, b"after the restart", MiB)
        os.fsync(fd)
        assert os.pread(fd, 17, MiB) == b"after the restart"
    finally:
        os.close(fd)

    # Torn down, the pool destroyed, the domain formatted: nothing left over the PV.
    restarted.image_teardown(life.pool, life.sd, life.a, life.a_top)
    assert over(pv) == set(specials_before.values())
    assert restarted.storage_pool_spm_start(life.pool)  # as an engine does after a restart
    assert restarted.storage_pool_destroy(life.pool)
    assert restarted.storage_domain_format(life.sd)
    assert over(pv) == set()
    assert restarted.images.links() == []
    assert not os.path.exists(state_dir)


def test_restart_never_releases_another_hosts_devices(
    previous_life: tuple[PreviousLife, str], api_factory: collections.abc.Callable[..., Any]
) -> None:
    life, pv = previous_life
    # Host b, on the same machine, maps b's volume with its own device; and a
    # device nobody recorded (without our tag) maps c's.
    other = api_factory("b")
    other.learn_domain(life.sd, "block", {"devices": [pv]})
    other_dom = other.cache.get(life.sd)
    other_dom.activation.activate(other_dom.vg, life.b_base)
    theirs = set(other_dom.activation.recorded_devices(other_dom.vg))  # with its metadata LV
    restarted = api_factory()
    dom = restarted.cache.get(life.sd)
    layout = dom.lvm.lv_layout(dom.vg, life.c_base)
    seg = layout.segments[0]
    untagged = loop.attach(pv, offset=layout.offset(seg), sizelimit=seg.count * layout.extent_size)
    try:
        start_like_the_daemon(restarted, lambda: None)

        assert over(pv) >= theirs | {untagged}
        assert set(other_dom.activation.recorded_devices(other_dom.vg)) == theirs
        # Nothing of host a's volumes is left (no VM recovered); specials stay.
        mine = set(life.devices.values())
        assert not over(pv) & mine
        assert restarted.storage_pool_spm_start(life.pool)
        assert restarted.storage_pool_destroy(life.pool)
        assert restarted.storage_domain_format(life.sd)
        assert over(pv) == theirs | {untagged}
    finally:
        loop.detach(untagged)
        other_dom.activation.deactivate_all(other_dom.vg, [pv])
    assert over(pv) == set()


def test_state_of_a_vg_this_host_forgot_is_released(
    previous_life: tuple[PreviousLife, str], api_factory: collections.abc.Callable[..., Any]
) -> None:
    life, pv = previous_life
    restarted = api_factory()
    restarted.cache.forget(life.sd)  # e.g. formatted by another host meanwhile
    os.unlink(os.path.join(restarted.state_dir, "pool.json"))

    leftovers.adopt(restarted)  # stops the qemu-img that holds b open
    report = leftovers.release(restarted)

    assert settled_over(pv) == set()
    assert len([r for r in report.released if r.endswith("(unknown VG)")]) \
        == len(block_manifest.SPECIAL_LVS) + 4
    assert restarted.images.links() == []
    # (The VG itself is still there: the test's clean-up wipes it.)


def test_format_and_disconnect_leave_no_loop_device(
    api: api_mod.StorageAPI,
    block_domain_factory: collections.abc.Callable[..., str],
    loop_device_factory: collections.abc.Callable[..., str],
) -> None:
    sd_id = block_domain_factory(api)
    dom = api.cache.get(sd_id)
    assert isinstance(dom, block_sd.BlockDomain)
    (pv,) = dom.manifest.devices
    pool_id = make_pool(api, sd_id)
    img, vol, lost = new_id(), new_id(), new_id()
    create_volume(api, pool_id, sd_id, img, vol, 16 * MiB)
    create_volume(api, pool_id, sd_id, new_id(), lost, 16 * MiB)
    api.image_prepare(pool_id, sd_id, img, vol)
    # An activation whose state was lost (a crash of an older daemon).
    dom.activation.activate(dom.vg, lost)
    os.unlink(os.path.join(api.run_dir, "loop", dom.vg, lost))
    assert len(over(pv)) == len(block_manifest.SPECIAL_LVS) + 2

    api.image_teardown(pool_id, sd_id, img, vol)
    assert api.storage_pool_disconnect(pool_id, 1, sd_id)
    assert len(over(pv)) == 1  # only the lost one: disconnect closes what it knows
    assert api.storage_pool_connect(pool_id, 1, sd_id)
    assert api.storage_pool_spm_start(pool_id)
    assert api.storage_pool_destroy(pool_id)
    assert api.storage_domain_format(sd_id)
    assert over(pv) == set()


def test_a_leftover_some_process_holds_open_is_kept(
    api: api_mod.StorageAPI, block_domain_factory: collections.abc.Callable[..., str]
) -> None:
    # A VM that recovery could not take back still has its disk open:
    # releasing would not free the device, and a new prepare would map the
    # LV twice (an extension would then not reach the open device).
    sd_id = block_domain_factory(api)
    pool_id = make_pool(api, sd_id)
    img, vol = new_id(), new_id()
    create_volume(api, pool_id, sd_id, img, vol, 16 * MiB)
    path = api.image_prepare(pool_id, sd_id, img, vol)["path"]
    dev = os.readlink(path)
    api.images = image.ImageManager(api.run_dir)  # the restarted daemon's: no references
    fd = os.open(path, os.O_RDONLY)
    try:
        assert os.getpid() in leftovers._busy_devices()[dev]
        leftovers.release(api)
        assert os.readlink(path) == dev and loop.status(dev) is not None
    finally:
        os.close(fd)
    report = leftovers.release(api)
    assert report.released == [f"link {sd_id}/{img}/{vol}"]
    assert loop.status(dev) is None and not os.path.lexists(path)


def test_stop_orphans_kills_only_qemu_img_on_this_run_dir(storage_tmpdir: str) -> None:
    root = os.path.join(storage_tmpdir, "run", "storage")
    other_root = os.path.join(storage_tmpdir, "other", "storage")
    images = []
    for base in (root, other_root):
        os.makedirs(base)
        images.append(os.path.join(base, "disk.raw"))
        with open(images[-1], "wb") as f:
            f.write(os.urandom(16 * MiB))  # data: a rate-limited copy takes hours
    convert = ["qemu-img", "convert", "-r", "1k", "-f", "raw", "-O", "raw"]

    def orphan(src: str) -> int:
        """A qemu-img whose parent is gone (a killed daemon's)."""
        out = subprocess.run(
            ["sh", "-c", '"$@" >/dev/null 2>&1 </dev/null & echo $!', "sh", *convert, src,
             src + ".copy"], check=True, capture_output=True, text=True, timeout=30,
        ).stdout
        return int(out)

    mine, theirs = orphan(images[0]), orphan(images[1])
    child = subprocess.Popen([*convert, images[0], images[0] + ".child"])  # a task's, running
    try:
        time.sleep(0.5)
        assert alive(mine) and alive(theirs)

        assert leftovers.stop_orphans(root) == [mine]

        assert not alive(mine)
        assert alive(theirs) and child.poll() is None
    finally:
        for pid in (mine, theirs):
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        child.kill()
        child.wait(10)


def test_app_start_calls_adopt_and_release_around_recovery(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from vdsm_lsm import app, config

    conf = tmp_path / "vdsm-lsm.conf"
    conf.write_text(
        f"[irs]\nrun_dir = {tmp_path}/run\nstate_dir = {tmp_path}/state\n"
        "[sanlock]\ncluster_lock = local\n"
    )
    a = app.App(config.load(str(conf)))
    calls: list[str] = []
    monkeypatch.setattr(leftovers, "adopt", lambda s: calls.append("adopt"))
    monkeypatch.setattr(leftovers, "release", lambda s: calls.append("release"))
    monkeypatch.setattr(a.storage, "recover", lambda: calls.append("recover"))
    monkeypatch.setattr(a.virt, "start", lambda: calls.append("virt"))
    try:
        a.start()
    finally:
        a.storage.close()
    assert calls == ["adopt", "recover", "virt", "release"]


def test_owner_tag_is_per_run_dir(storage_tmpdir: str) -> None:
    one = activation.owner_tag(os.path.join(storage_tmpdir, "run-a"))
    assert one == activation.owner_tag(os.path.join(storage_tmpdir, "x", "..", "run-a"))
    assert one != activation.owner_tag(os.path.join(storage_tmpdir, "run-b"))
    assert len(one.encode()) < loop.LO_NAME_SIZE
