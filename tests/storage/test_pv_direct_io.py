"""Loop activation over a PV that is itself a buffered loop device (a file made
a disk, as make demo and the test rigs do): the PV's direct I/O is turned on
at the first activation, so nothing written to the domain waits in its
backing file's page cache for a flush (QEMU's, at the end of a mirror, while
the guest's I/O is drained: the stall of issue 13's first pivot onto a block
domain).  Real lvm2 and loop devices."""

from __future__ import annotations

import collections.abc
import os

import pytest

from storage import activation, loop
from tests.storage import conftest

pytestmark = [pytest.mark.root, conftest.requires_root]

MiB = conftest.MiB


@pytest.fixture
def buffered_vg(
    vg_factory: collections.abc.Callable[..., conftest.LoopVG],
) -> conftest.LoopVG:
    """A metadata-only VG on a loop device without direct I/O."""
    vg = vg_factory(pv_size=256 * MiB, extent_size_mb=4, lvm_activation=False)
    st = loop.status(vg.devices[0])
    assert st is not None and not st.direct_io
    return vg


@pytest.fixture
def act(
    buffered_vg: conftest.LoopVG, storage_tmpdir: str
) -> collections.abc.Iterator[activation.LoopActivation]:
    run_dir = os.path.join(storage_tmpdir, "run")
    os.mkdir(run_dir)
    a = activation.open("loop", buffered_vg.lvm, run_dir)
    assert isinstance(a, activation.LoopActivation)
    yield a
    for lv in a.active_lvs(buffered_vg.name):
        a.deactivate(buffered_vg.name, lv)


def test_activation_turns_on_direct_io_of_a_buffered_loop_pv(
    buffered_vg: conftest.LoopVG, act: activation.LoopActivation
) -> None:
    vg = buffered_vg
    vg.lvm.lvcreate(vg.name, "lv1", 2)
    vg.lvm.lvcreate(vg.name, "lv2", 2)

    dev = act.activate(vg.name, "lv1")

    pv = loop.status(vg.devices[0])
    assert pv is not None and pv.direct_io
    lv = loop.status(dev)
    assert lv is not None and lv.direct_io
    # The data is where it was: written through the LV, read from the PV's file.
    data = os.urandom(MiB)
    fd = os.open(dev, os.O_WRONLY)
    try:
        os.pwrite(fd, data, 0)
        os.fsync(fd)
    finally:
        os.close(fd)
    # (the LV's device starts at lv.offset of the PV, the PV at 0 of its file)
    backing = next(d.backing for d in loop.list() if d.name == vg.devices[0])
    with open(backing, "rb") as f:
        f.seek(lv.offset)
        assert f.read(MiB) == data
    # Later activations find it done.
    act.activate(vg.name, "lv2")
    pv = loop.status(vg.devices[0])
    assert pv is not None and pv.direct_io


def test_without_direct_io_the_pv_is_left_as_it_is(
    buffered_vg: conftest.LoopVG, storage_tmpdir: str
) -> None:
    vg = buffered_vg
    vg.lvm.lvcreate(vg.name, "lv1", 2)
    run_dir = os.path.join(storage_tmpdir, "run-buffered")
    os.mkdir(run_dir)
    a = activation.open("loop", vg.lvm, run_dir, direct_io=False)
    try:
        a.activate(vg.name, "lv1")
        pv = loop.status(vg.devices[0])
        assert pv is not None and not pv.direct_io
    finally:
        a.deactivate(vg.name, "lv1")


def test_ensure_direct_io_of_what_is_not_a_bound_loop_device() -> None:
    assert not loop.is_device_name("/dev/null")
    assert not loop.ensure_direct_io("/dev/null")
    assert loop.is_device_name("/dev/loop7")
    assert not loop.is_device_name("/dev/loop7\n")
