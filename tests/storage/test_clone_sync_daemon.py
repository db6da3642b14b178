"""Image.cloneStructure / syncData / delete through the real daemon:
the seed's aliases, coded errors on the wire, and kill -9 in the middle of
a clone, of a sync and of a volume creation, then a restart and spmStart
(DESIGN section 6, "Tasks": a clone or a creation is rolled back, a sync is
run again).  The creation is held at a known point by a qemu-img wrapper on
the daemon's PATH (:class:`HeldCreate`), so its kill never races.
"""

from __future__ import annotations

import collections.abc
import os
import pathlib
import shlex
import shutil
import signal
import threading
from typing import Any

import pytest

from storage import lvm, sync, volume
from tests import daemon as daemon_mod
from tests.storage import conftest
from tests.storage import image_env as ie
from vdsm_lsm import app, client

pytestmark = [conftest.requires_root, pytest.mark.timeout(300)]

MiB = ie.MiB
CAPACITY = 64 * MiB
POLL = 0.05
BLANK = volume.BLANK_UUID


def code(name: str) -> int:
    return app.load_schema().code_of(name)


class Site:
    """A daemon with a pool of two file domains and one block domain, SPM."""

    def __init__(self, daemon: daemon_mod.Daemon, workdir: str, block_device: str) -> None:
        self.daemon = daemon
        self.workdir = workdir
        self.block_device = block_device
        self.pool_id = ie.new_id()
        self.domains: dict[str, str] = {}

    @property
    def run_dir(self) -> str:
        """The daemon's [irs] run_dir: prepared links, named by qemu-img's arguments."""
        return self.daemon.config["irs"]["run_dir"]

    @property
    def rpc(self) -> client.Client:
        return self.daemon.unix(timeout=120)

    def call(self, method: str, **params: Any) -> Any:
        c = self.rpc
        try:
            return c.call(method, **params)
        finally:
            c.close()

    def setup(self) -> None:
        for role in ("f1", "f2"):
            sd_id = ie.new_id()
            path = os.path.join(self.workdir, role)
            os.mkdir(path)
            self.call("StorageDomain.create", storagedomainID=sd_id, domainType="file",
                      typeArgs={"path": path}, name=role)
            self.domains[role] = sd_id
        sd_id = ie.new_id()
        self.call("StorageDomain.create", storagedomainID=sd_id, domainType="block",
                  typeArgs={"devices": [self.block_device]}, name="b1")
        self.domains["b1"] = sd_id
        master = self.domains["f1"]
        self.call("StoragePool.create", storagepoolID=self.pool_id, name="pool",
                  masterSdUUID=master, domainList=list(self.domains.values()))
        self.call("StoragePool.connect", storagepoolID=self.pool_id, hostID=1,
                  masterSdUUID=master)
        self.spm_start()

    def spm_start(self) -> None:
        assert self.call("StoragePool.spmStart", storagepoolID=self.pool_id) is True

    def cleanup(self) -> None:
        """Remove the pool and the domains through the daemon (best effort)."""
        if self.daemon.proc is None:
            return
        try:
            for task_id, status in self.call("Host.getAllTasksStatuses").items():
                if status["taskState"] != "finished":
                    self.call("Task.stop", taskID=task_id)
                self.wait(task_id)
                self.call("Task.clear", taskID=task_id)
            self.call("StoragePool.destroy", storagepoolID=self.pool_id)
        except (client.ClientError, OSError, AssertionError) as e:
            print(f"cannot destroy pool: {e}")
        for sd_id in self.domains.values():
            try:
                self.call("StorageDomain.format", storagedomainID=sd_id)
            except (client.ClientError, OSError) as e:
                print(f"cannot format {sd_id}: {e}")

    # Tasks.

    def wait(self, task_id: str) -> dict[str, Any]:
        for _ in range(int(ie.WAIT / POLL)):
            status = self.call("Task.getStatus", taskID=task_id)
            if status["taskState"] == "finished":
                return status
            threading.Event().wait(POLL)
        raise AssertionError(f"task {task_id} not finished: {status}")

    def run(self, task_id: str) -> dict[str, Any]:
        status = self.wait(task_id)
        assert status["taskResult"] == "success", status
        self.call("Task.clear", taskID=task_id)
        return status

    # Images.

    def make_chain(self, sd_id: str, layers: list[ie.Layer]) -> ie.Chain:
        img_id = ie.new_id()
        parent = BLANK
        for layer in layers:
            self.run(self.call(
                "Volume.create", storagepoolID=self.pool_id, storagedomainID=sd_id,
                imageID=img_id, volumeID=layer.vol_id, size=CAPACITY, volFormat=layer.format,
                preallocate="SPARSE", desc="", srcImgUUID=img_id if parent != BLANK else BLANK,
                srcVolUUID=parent,
            ))
            if layer.ops:
                path = self.prepare(sd_id, img_id, layer.vol_id)["path"]
                try:
                    ie.qemu_io(path, ie.qemuimg_format(layer.format), *layer.ops)
                finally:
                    self.teardown(sd_id, img_id, layer.vol_id)
            parent = layer.vol_id
        return ie.Chain(img_id, sd_id, layers)

    def prepare(self, sd_id: str, img_id: str, vol_id: str) -> dict[str, Any]:
        return self.call("Image.prepare", storagepoolID=self.pool_id, storagedomainID=sd_id,
                         imageID=img_id, volumeID=vol_id)

    def teardown(self, sd_id: str, img_id: str, vol_id: str) -> None:
        self.call("Image.teardown", storagepoolID=self.pool_id, storagedomainID=sd_id,
                  imageID=img_id, volumeID=vol_id)

    def legality(self, sd_id: str, chain: ie.Chain) -> list[str]:
        return [
            self.call("Volume.getInfo", storagepoolID=self.pool_id, storagedomainID=sd_id,
                      imageID=chain.img_id, volumeID=v)["legality"]
            for v in chain.vol_ids
        ]

    def volumes(self, sd_id: str, img_id: str) -> list[str]:
        try:
            return self.call("StorageDomain.getVolumes", storagedomainID=sd_id,
                             storagepoolID=self.pool_id, imageID=img_id)
        except client.ClientError as e:
            assert e.code == code("ImageDoesNotExistInSD"), e
            return []

    def assert_same(self, chain: ie.Chain, dst: str) -> None:
        """Every layer's chain on dst reads like on the source."""
        src_chain = self.prepare(chain.sd_id, chain.img_id, chain.leaf)["chain"]
        try:
            dst_chain = self.prepare(dst, chain.img_id, chain.leaf)["chain"]
            try:
                for layer, s, d in zip(chain.layers, src_chain, dst_chain, strict=True):
                    fmt = ie.qemuimg_format(layer.format)
                    assert ie.qemuimg.compare(s["path"], d["path"], fmt, fmt), layer.vol_id
                    if layer.format == volume.COW:
                        assert ie.own_extents(d["path"]) == ie.own_extents(s["path"])
            finally:
                self.teardown(dst, chain.img_id, chain.leaf)
        finally:
            self.teardown(chain.sd_id, chain.img_id, chain.leaf)

    def kill_orphans(self) -> None:
        """qemu-img children of a killed daemon go on copying: end them
        (by pid; they name this test's run dir)."""
        for pid in ie.qemu_img_pids(self.run_dir):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for _ in range(int(ie.WAIT / POLL)):
            if not ie.qemu_img_pids(self.run_dir):
                return
            threading.Event().wait(POLL)


@pytest.fixture
def site_factory(
    daemon_factory: collections.abc.Callable[..., daemon_mod.Daemon],
    storage_tmpdir: str,
    loop_device_factory: collections.abc.Callable[..., str],
) -> collections.abc.Iterator[collections.abc.Callable[..., Site]]:
    made: list[Site] = []

    def make(copy_rate_limit_mb: int = 0, env: dict[str, str] | None = None) -> Site:
        config = {
            "irs": {
                "volume_utilization_chunk_mb": 16,
                "block_extent_size_mb": 4,
                "copy_rate_limit_mb": copy_rate_limit_mb,
                "run_dir": os.path.join(storage_tmpdir, "run"),
            },
            "lvm": {"activation": "loop"},
            "sanlock": {"cluster_lock": "local"},
        }
        d = daemon_factory(config, start=False)
        d.extra_env.update(env or {})
        d.start()
        s = Site(d, storage_tmpdir, loop_device_factory(2 * 1024 * MiB))
        made.append(s)
        s.setup()
        return s

    yield make
    for s in made:
        s.kill_orphans()
        s.cleanup()
        s.daemon.stop()


def restart(site: Site, **irs: Any) -> None:
    """Start the killed daemon again (with changed [irs] options) and make it SPM."""
    site.kill_orphans()
    site.daemon.config["irs"].update(irs)
    daemon_mod.write_config(site.daemon.conf_path, site.daemon.config)
    site.daemon.start()
    site.spm_start()


def test_aliases_clone_sync_and_delete_through_the_daemon(
    site_factory: collections.abc.Callable[..., Site]
) -> None:
    site = site_factory()
    chain = site.make_chain(site.domains["f1"], ie.standard_layers())
    dst = site.domains["b1"]

    clone_id = site.call("cloneImageStructure", spUUID=site.pool_id, sdUUID=chain.sd_id,
                         imgUUID=chain.img_id, dstSdUUID=dst)
    site.run(clone_id)
    assert site.legality(dst, chain) == ["ILLEGAL"] * 4

    sync_id = site.call("syncImageData", spUUID=site.pool_id, sdUUID=chain.sd_id,
                        imgUUID=chain.img_id, dstSdUUID=dst, syncType="INTERNAL")
    assert site.run(sync_id)["progress"] == 100
    assert site.legality(dst, chain) == ["LEGAL"] * 3 + ["ILLEGAL"]
    site.run(site.call("Image.syncData", imageID=chain.img_id, storagepoolID=site.pool_id,
                       storagedomainID=chain.sd_id, dstSdUUID=dst, syncType="LEAF"))
    assert site.legality(dst, chain) == ["LEGAL"] * 4
    site.assert_same(chain, dst)

    # Moving back needs the old copy deleted first.
    with pytest.raises(client.ClientError) as e:
        site.call("Image.cloneStructure", imageID=chain.img_id, storagepoolID=site.pool_id,
                  storagedomainID=dst, dstSdUUID=chain.sd_id)
    assert e.value.code == code("VolumeAlreadyExists") == 212
    site.run(site.call("Image.delete", imageID=chain.img_id, storagepoolID=site.pool_id,
                       storagedomainID=chain.sd_id))
    assert site.volumes(chain.sd_id, chain.img_id) == []
    site.run(site.call("Image.cloneStructure", imageID=chain.img_id, storagepoolID=site.pool_id,
                       storagedomainID=dst, dstSdUUID=chain.sd_id))
    assert sorted(site.volumes(chain.sd_id, chain.img_id)) == sorted(chain.vol_ids)


def test_bad_input_answers_coded_errors(site_factory: collections.abc.Callable[..., Site]) -> None:
    site = site_factory()
    chain = site.make_chain(site.domains["f1"], ie.standard_layers()[:2])
    f2 = site.domains["f2"]
    before = site.call("Host.getAllTasksStatuses")

    def error(method: str, **params: Any) -> int:
        with pytest.raises(client.ClientError) as e:
            site.call(method, **params)
        return e.value.code

    common = {"storagepoolID": site.pool_id, "storagedomainID": chain.sd_id}
    assert error("Image.syncData", imageID=chain.img_id, dstSdUUID=f2, syncType="SOME",
                 **common) == -32602
    assert error("syncImageData", spUUID=site.pool_id, sdUUID=chain.sd_id,
                 imgUUID=chain.img_id, dstSdUUID=f2, syncType="all") == -32602
    assert error("Image.cloneStructure", imageID=ie.new_id(), dstSdUUID=f2,
                 **common) == code("ImageDoesNotExistInSD") == 268
    assert error("Image.cloneStructure", imageID=chain.img_id, dstSdUUID=chain.sd_id,
                 **common) == code("SameSourceAndDestination")
    assert error("Image.syncData", imageID=chain.img_id, dstSdUUID=chain.sd_id,
                 syncType="ALL", **common) == code("SameSourceAndDestination")
    assert error("Image.syncData", imageID=chain.img_id, dstSdUUID=f2, syncType="ALL",
                 **common) == code("ImageDoesNotExistInSD")  # not cloned yet
    assert error("Image.cloneStructure", imageID="not-a-uuid", dstSdUUID=f2,
                 **common) == -32602
    site.prepare(chain.sd_id, chain.img_id, chain.leaf)
    try:
        assert error("Image.delete", imageID=chain.img_id, **common) == code("VolumeIsBusy")
    finally:
        site.teardown(chain.sd_id, chain.img_id, chain.leaf)

    assert site.call("Host.getAllTasksStatuses") == before
    assert site.volumes(f2, chain.img_id) == []


def test_kill9_during_a_clone_rolls_it_back_after_restart(
    site_factory: collections.abc.Callable[..., Site]
) -> None:
    site = site_factory()
    # Eight volumes onto a block domain: each is an LV and a qcow2 header,
    # slow enough to be caught in the middle.
    layers = [ie.Layer(ie.new_id(), volume.RAW, ["write -P 0x11 0 1M"])]
    layers += [ie.Layer(ie.new_id(), volume.COW, []) for _ in range(7)]
    chain = site.make_chain(site.domains["f1"], layers)
    dst = site.domains["b1"]

    task_id = site.call("Image.cloneStructure", imageID=chain.img_id, storagepoolID=site.pool_id,
                        storagedomainID=chain.sd_id, dstSdUUID=dst)
    status = _wait_until(site, task_id, lambda s: 0 < s["progress"] < 100)
    site.daemon.kill9()
    assert status["taskState"] == "running"

    restart(site)

    status = site.call("Task.getStatus", taskID=task_id)
    assert status["taskState"] == "finished", status
    assert status["taskResult"] == "cleanFailure"
    assert status["code"] == code("TaskInterrupted") and status["error"] == "TaskInterrupted"
    assert site.volumes(dst, chain.img_id) == []
    # No link of a removed volume is left under the run dir.
    assert not os.path.exists(os.path.join(site.run_dir, "storage", dst, chain.img_id))
    site.call("Task.clear", taskID=task_id)
    # Nothing is left in the way: the clone can be done again.
    site.run(site.call("Image.cloneStructure", imageID=chain.img_id,
                       storagepoolID=site.pool_id, storagedomainID=chain.sd_id, dstSdUUID=dst))
    assert sorted(site.volumes(dst, chain.img_id)) == sorted(chain.vol_ids)


def test_kill9_during_a_sync_runs_it_again_after_restart(
    site_factory: collections.abc.Callable[..., Site]
) -> None:
    site = site_factory(copy_rate_limit_mb=1)  # slow enough to be killed mid-copy
    layers = ie.standard_layers()[:3]
    layers[0].ops.append("write -P 0x14 40M 16M")
    chain = site.make_chain(site.domains["f1"], layers)
    dst = site.domains["f2"]
    site.run(site.call("Image.cloneStructure", imageID=chain.img_id, storagepoolID=site.pool_id,
                       storagedomainID=chain.sd_id, dstSdUUID=dst))

    task_id = site.call("Image.syncData", imageID=chain.img_id, storagepoolID=site.pool_id,
                        storagedomainID=chain.sd_id, dstSdUUID=dst, syncType=sync.ALL)
    _wait_until(site, task_id, lambda s: s["progress"] > 0)
    assert ie.qemu_img_pids(site.run_dir)
    site.daemon.kill9()

    restart(site, copy_rate_limit_mb=0)

    status = site.wait(task_id)
    assert status["taskResult"] == "success", status
    assert status["progress"] == 100
    assert site.legality(dst, chain) == ["LEGAL"] * 3
    site.assert_same(chain, dst)


def _wait_until(site: Site, task_id: str,
                condition: collections.abc.Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    for _ in range(int(ie.WAIT / POLL)):
        status = site.call("Task.getStatus", taskID=task_id)
        assert status["taskState"] in ("init", "running"), status
        if condition(status):
            return status
        threading.Event().wait(POLL)
    raise AssertionError(f"task {task_id} never got there: {status}")


class HeldCreate:
    """A ``qemu-img`` first on the daemon's PATH that holds the ``create`` of
    one volume: it writes its pid to ``reached`` and sleeps until killed.
    Every other call runs the real qemu-img.  With it a test stops a
    Volume.create at a known point (the LV and the ILLEGAL metadata exist,
    the qcow2 data does not) and kills the daemon there, every time."""

    SCRIPT = """#!/bin/sh
if [ "$1" = create ] && [ -s {gate} ]; then
    vol=$(cat {gate})
    for arg in "$@"; do
        case "$arg" in
        *"$vol"*)
            echo $$ > {reached}.tmp && mv {reached}.tmp {reached}
            exec sleep 3600 ;;
        esac
    done
fi
exec {real} "$@"
"""

    def __init__(self, workdir: str) -> None:
        real = shutil.which("qemu-img")
        assert real, "qemu-img is not installed"
        bindir = os.path.join(workdir, "bin")
        os.makedirs(bindir)
        self.gate = os.path.join(workdir, "hold-create")
        self.reached = os.path.join(workdir, "create-held")
        script = os.path.join(bindir, "qemu-img")
        with open(script, "w") as f:
            f.write(self.SCRIPT.format(gate=shlex.quote(self.gate),
                                       reached=shlex.quote(self.reached),
                                       real=shlex.quote(real)))
        os.chmod(script, 0o755)
        self.env = {"PATH": f"{bindir}:{os.environ.get('PATH', '/usr/bin:/bin')}"}
        self.pid: int | None = None

    def hold(self, vol_id: str) -> None:
        with open(self.gate, "w") as f:
            f.write(vol_id)

    def wait_held(self, site: Site, task_id: str) -> None:
        """Until qemu-img create of the held volume runs (the task is running)."""
        for _ in range(int(ie.WAIT / POLL)):
            if os.path.exists(self.reached):
                with open(self.reached) as f:
                    self.pid = int(f.read())
                return
            status = site.call("Task.getStatus", taskID=task_id)
            assert status["taskState"] in ("init", "running"), status
            threading.Event().wait(POLL)
        raise AssertionError(f"qemu-img create was never called for task {task_id}")

    def release(self) -> None:
        """Let everything through again and end the held process."""
        os.unlink(self.gate)
        if self.pid is not None:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_kill9_during_volume_create_reports_failure_and_leaves_nothing(
    site_factory: collections.abc.Callable[..., Site], tmp_path: pathlib.Path
) -> None:
    """Issue 3's crash test through the real daemon: a Volume.create killed
    mid-way (its LV and ILLEGAL metadata made, its data not) is failed with
    a code after restart + spmStart, and no partial volume remains (no LV,
    no metadata, no link)."""
    held = HeldCreate(str(tmp_path))
    site = site_factory(env=held.env)
    sd_id = site.domains["b1"]
    chain = site.make_chain(sd_id, [ie.Layer(ie.new_id(), volume.COW, []) for _ in range(2)])
    parent = chain.vol_ids[-1]
    vol_id = ie.new_id()
    held.hold(vol_id)
    task_id = site.call(
        "Volume.create", storagepoolID=site.pool_id, storagedomainID=sd_id,
        imageID=chain.img_id, volumeID=vol_id, size=CAPACITY, volFormat=volume.COW,
        preallocate="SPARSE", desc="crash", srcImgUUID=chain.img_id, srcVolUUID=parent,
    )
    try:
        held.wait_held(site, task_id)
        assert site.call("Task.getStatus", taskID=task_id)["taskState"] == "running"
        # Half made: the LV exists and the metadata says ILLEGAL.
        lvs = lvm.LVM([site.block_device], activation=False).lvs(sd_id)
        assert vol_id in {lv.name for lv in lvs}
        info = site.call("Volume.getInfo", storagepoolID=site.pool_id, storagedomainID=sd_id,
                         imageID=chain.img_id, volumeID=vol_id)
        assert info["legality"] == "ILLEGAL"
        site.daemon.kill9()
    finally:
        held.release()

    restart(site)
    status = site.wait(task_id)
    assert status["taskResult"] == "cleanFailure", status
    assert status["code"] == code("TaskInterrupted") and status["error"] == "TaskInterrupted"
    assert vol_id not in site.volumes(sd_id, chain.img_id)
    lvs = lvm.LVM([site.block_device], activation=False).lvs(sd_id)
    assert vol_id not in {lv.name for lv in lvs}
    assert not os.path.exists(os.path.join(site.run_dir, "storage", sd_id, chain.img_id, vol_id))
    # The parent is a leaf again and usable.
    info = site.call("Volume.getInfo", storagepoolID=site.pool_id, storagedomainID=sd_id,
                     imageID=chain.img_id, volumeID=parent)
    assert (info["voltype"], info["legality"]) == ("LEAF", "LEGAL")
    site.call("Task.clear", taskID=task_id)
    # The interrupted creation can be made again.
    site.run(site.call(
        "Volume.create", storagepoolID=site.pool_id, storagedomainID=sd_id,
        imageID=chain.img_id, volumeID=vol_id, size=CAPACITY, volFormat=volume.COW,
        preallocate="SPARSE", desc="again", srcImgUUID=chain.img_id, srcVolUUID=parent,
    ))
    assert vol_id in site.volumes(sd_id, chain.img_id)
