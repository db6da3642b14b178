"""Real storage for tests: sparse files, loop devices, LVM volume groups.

Everything made here lives on the root file system under /var/tmp (direct
I/O works there, not on tmpfs) and is removed at the end of the test, also
when the test fails:

- ``storage_tmpdir``: a fresh directory under /var/tmp; a loop device
  still bound to a file in it at the end is a leak and errors the test.
- ``sparse_file_factory(size)``: a sparse file of size bytes.
- ``loop_device_factory(size)``: a loop device over a new sparse file.  At
  teardown any LVM metadata on it is wiped (also a VG the code under test
  made), and loop devices stacked on it (LVs activated in loop mode) are
  detached -- and reported as a leak: the test errors in teardown.
- ``vg_factory(...)``: a VG on one or more new loop devices, with the
  metadata-only (or dm) ``storage.lvm.LVM`` for it.

The fixtures use the plain ``losetup``/``lvm`` commands, not the code under
test, so a bug there cannot hide a leak.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import json
import logging
import os
import shutil
import tempfile
import uuid

import pytest

from storage import activation, commands, lvm

log = logging.getLogger("tests.storage")

VAR_TMP = "/var/tmp"
MiB = 1024**2
GiB = 1024**3

requires_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (loop devices, lvm2)")
requires_dm = pytest.mark.skipif(
    not activation.dm_available(),
    reason="no device-mapper in this kernel (/dev/mapper/control cannot be opened)",
)


@dataclasses.dataclass
class LoopVG:
    """A VG made by vg_factory."""

    name: str
    devices: list[str]
    lvm: lvm.LVM
    extent_size: int


@pytest.fixture
def storage_tmpdir() -> collections.abc.Iterator[str]:
    """A directory on the root file system (not tmpfs), removed afterwards."""
    path = tempfile.mkdtemp(prefix="vdsm-lsm-test-", dir=VAR_TMP)
    yield path
    leaks = [d["name"] for d in loop_devices() if _under(d.get("back-file") or "", path)]
    for dev in leaks:
        log.error("Leaked loop device %s over a file in %s", dev, path)
        commands.run(["losetup", "--detach", dev], check=False)
    shutil.rmtree(path, ignore_errors=True)
    if leaks:
        pytest.fail(f"loop devices leaked over test files: {leaks}", pytrace=False)


@pytest.fixture
def sparse_file_factory(storage_tmpdir: str) -> collections.abc.Callable[[int], str]:
    """Make sparse files of a given size in storage_tmpdir."""
    count = 0

    def make(size: int) -> str:
        nonlocal count
        count += 1
        path = os.path.join(storage_tmpdir, f"disk{count}.img")
        with open(path, "wb") as f:
            f.truncate(size)
        return path

    return make


@pytest.fixture
def loop_device_factory(
    sparse_file_factory: collections.abc.Callable[[int], str],
) -> collections.abc.Iterator[collections.abc.Callable[..., str]]:
    """Make loop devices over new sparse files: make(size, **losetup_opts).

    Options: read_only=False, direct_io=False.  Everything is undone at the
    end; a loop device stacked on one of ours is a leak and errors the test.
    """
    made: list[str] = []

    def make(size: int = GiB, read_only: bool = False, direct_io: bool = False) -> str:
        path = sparse_file_factory(size)
        cmd = ["losetup", "--find", "--show"]
        if read_only:
            cmd.append("--read-only")
        if direct_io:
            cmd.append("--direct-io=on")
        cmd.append(path)
        dev = commands.run(cmd).stdout.decode().strip()
        made.append(dev)
        return dev

    yield make

    leaks = []
    for dev in made:
        leaks.extend(stacked_loop_devices(dev))
    for child in leaks:
        log.error("Leaked loop device %s over a test device", child)
        commands.run(["losetup", "--detach", child], check=False)
    if made:
        wipe_lvm(made)
    for dev in made:
        commands.run(["losetup", "--detach", dev], check=False)
    if leaks:
        pytest.fail(f"loop devices leaked over test devices: {leaks}", pytrace=False)


@pytest.fixture
def vg_factory(
    loop_device_factory: collections.abc.Callable[..., str],
) -> collections.abc.Callable[..., LoopVG]:
    """Make VGs on new loop devices: make(pv_count=1, pv_size=1 GiB,
    extent_size_mb=4, tags=(), lvm_activation=<dm available>, name=<random>).

    Removed at teardown by loop_device_factory (it wipes LVM on its devices).
    """

    def make(
        pv_count: int = 1,
        pv_size: int = GiB,
        extent_size_mb: int = 4,
        tags: collections.abc.Iterable[str] = (),
        lvm_activation: bool | None = None,
        name: str | None = None,
    ) -> LoopVG:
        if lvm_activation is None:
            lvm_activation = activation.dm_available()
        devices = [loop_device_factory(pv_size) for _ in range(pv_count)]
        vg_name = name or f"test-{uuid.uuid4().hex[:12]}"
        lvm_ = lvm.LVM(devices, activation=lvm_activation)
        lvm_.pvcreate(devices, metadata_size=4 * MiB)
        lvm_.vgcreate(vg_name, devices, extent_size_mb=extent_size_mb, tags=tags)
        return LoopVG(vg_name, devices, lvm_, extent_size_mb * MiB)

    return make


def loop_devices() -> list[dict]:
    """``losetup --list --json``: bound loop devices."""
    out = commands.run(["losetup", "--list", "--json"]).stdout
    if not out.strip():
        return []
    return json.loads(out).get("loopdevices", [])


def stacked_loop_devices(dev: str) -> list[str]:
    """Loop devices whose backing file is dev."""
    return [d["name"] for d in loop_devices() if d.get("back-file") == dev]


def _under(path: str, directory: str) -> bool:
    return path.startswith(directory + os.sep)


def wipe_lvm(devices: list[str]) -> None:
    """Remove every VG on devices and wipe their PV labels (best effort)."""
    config = lvm.LVM(devices, activation=activation.dm_available()).config()
    env = {"LVM_SUPPRESS_FD_WARNINGS": "1"}
    out = commands.run(
        ["lvm", "pvs", "--config", config, "--reportformat", "json", "-o", "pv_name,vg_name"],
        env=env,
        check=False,
    ).stdout
    try:
        rows = json.loads(out)["report"][0]["pv"]
    except (ValueError, KeyError, IndexError):
        rows = []
    for vg in sorted({r["vg_name"] for r in rows if r.get("vg_name")}):
        commands.run(["lvm", "vgremove", "--config", config, "-ff", "-y", vg], env=env, check=False)
    commands.run(
        ["lvm", "pvremove", "--config", config, "-ff", "-y", *devices], env=env, check=False
    )
