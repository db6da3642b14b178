"""storage.activation: loop mode on real lvm2 and loop devices; dm mode
where the kernel has device-mapper."""

from __future__ import annotations

import collections.abc
import os

import pytest

from storage import activation, commands, errors, loop, lvm, lvm_model, qemuimg, qemuimg_copy
from tests.storage import conftest

pytestmark = [pytest.mark.root, conftest.requires_root]

MiB = conftest.MiB
VGFactory = collections.abc.Callable[..., conftest.LoopVG]


@pytest.fixture
def vg(vg_factory: VGFactory) -> conftest.LoopVG:
    """A metadata-only VG (as without device-mapper) of 4 MiB extents."""
    return vg_factory(pv_size=512 * MiB, extent_size_mb=4, lvm_activation=False)


@pytest.fixture
def run_dir(storage_tmpdir: str) -> str:
    path = os.path.join(storage_tmpdir, "run")
    os.mkdir(path)
    return path


@pytest.fixture
def act(vg: conftest.LoopVG, run_dir: str) -> collections.abc.Iterator[activation.LoopActivation]:
    a = activation.open("loop", vg.lvm, run_dir)
    assert isinstance(a, activation.LoopActivation)
    yield a
    for lv in a.active_lvs(vg.name):
        a.deactivate(vg.name, lv)


def pv_read(vg: conftest.LoopVG, first_pe: int, length: int) -> bytes:
    """Bytes at the start of extent first_pe of the VG's first PV."""
    pe_start = vg.lvm.vg_info(vg.name).pvs[0].pe_start
    with open(vg.devices[0], "rb") as f:
        f.seek(pe_start + first_pe * vg.extent_size)
        return f.read(length)


def dev_write(dev: str, offset: int, data: bytes) -> None:
    fd = os.open(dev, os.O_WRONLY)
    try:
        assert os.pwrite(fd, data, offset) == len(data)
        os.fsync(fd)
    finally:
        os.close(fd)


@pytest.mark.skipif(activation.dm_available(), reason="this host has device-mapper")
def test_auto_is_loop_without_device_mapper(vg: conftest.LoopVG, run_dir: str) -> None:
    assert activation.open("auto", vg.lvm, run_dir).mode == "loop"
    with pytest.raises(errors.ActivationModeUnavailable):
        activation.open("dm", vg.lvm, run_dir)
    with pytest.raises(ValueError):
        activation.open("magic", vg.lvm, run_dir)


def test_activate_maps_the_lv_range(vg: conftest.LoopVG, act: activation.LoopActivation) -> None:
    pv = vg.devices[0]
    vg.lvm.lvcreate(vg.name, "before", 10, pv_range=lvm_model.pv_range(pv, 0, 9))
    vg.lvm.lvcreate(vg.name, "vol", 5, pv_range=lvm_model.pv_range(pv, 10, 14))

    dev = act.activate(vg.name, "vol")

    assert loop.size(dev) == 5 * vg.extent_size
    dev_write(dev, 0, b"A" * 4096)
    dev_write(dev, 5 * vg.extent_size - 4096, b"Z" * 4096)
    assert pv_read(vg, 10, 4096) == b"A" * 4096
    assert pv_read(vg, 9, 4096) == b"\0" * 4096  # the LV before is untouched
    with open(pv, "rb") as f:
        f.seek(vg.lvm.vg_info(vg.name).pvs[0].pe_start + 15 * vg.extent_size - 4096)
        assert f.read(4096) == b"Z" * 4096
    assert act.is_active(vg.name, "vol")
    assert act.active_path(vg.name, "vol") == dev
    assert not act.is_active(vg.name, "before")


def test_activate_is_idempotent_and_survives_a_restart(
    vg: conftest.LoopVG, run_dir: str, act: activation.LoopActivation
) -> None:
    vg.lvm.lvcreate(vg.name, "vol", 2)
    dev = act.activate(vg.name, "vol")
    assert act.activate(vg.name, "vol") == dev
    assert os.path.isfile(os.path.join(run_dir, "loop", vg.name, "vol"))

    # A new daemon with the same run_dir finds the device again.
    restarted = activation.open("loop", vg.lvm, run_dir)
    assert restarted.active_path(vg.name, "vol") == dev
    assert restarted.active_lvs(vg.name) == ["vol"]
    assert restarted.activate(vg.name, "vol") == dev

    restarted.deactivate(vg.name, "vol")

    assert loop.status(dev) is None or not loop.status(dev).backed_by(vg.devices[0])  # type: ignore[union-attr]
    assert not act.is_active(vg.name, "vol")
    assert not os.path.exists(os.path.join(run_dir, "loop", vg.name, "vol"))
    assert conftest.stacked_loop_devices(vg.devices[0]) == []
    restarted.deactivate(vg.name, "vol")  # not active: nothing to do


def test_qemu_io_through_the_activated_lv(
    vg: conftest.LoopVG, act: activation.LoopActivation
) -> None:
    vg.lvm.lvcreate(vg.name, "vol", 8)
    dev = act.activate(vg.name, "vol")
    qemuimg.create(dev, qemuimg.QCOW2, size=64 * MiB)
    commands.run(["qemu-io", "-f", "qcow2", "-t", "none", "-c", "write -P 0x5a 1M 1M", dev])
    act.deactivate(vg.name, "vol")

    dev = act.activate(vg.name, "vol")

    out = commands.run(
        ["qemu-io", "-f", "qcow2", "-t", "none", "-c", "read -P 0x5a 1M 1M", dev]
    ).stdout.decode()
    assert "Pattern verification failed" not in out
    assert qemuimg.info(dev, fmt=qemuimg.QCOW2)["virtual-size"] == 64 * MiB


def test_extend_into_the_reservation_and_refresh_is_seen_by_a_holder(
    vg: conftest.LoopVG, act: activation.LoopActivation
) -> None:
    # Reserve 10 extents, create the LV on the first 4, grow it in place.
    reservation = vg.lvm.find_free_range(vg.name, 10)
    first = reservation.first_pe
    vg.lvm.lvcreate(
        vg.name, "vol", 4, pv_range=lvm_model.pv_range(reservation.pv, first, first + 3)
    )
    dev = act.activate(vg.name, "vol")
    fd = os.open(dev, os.O_RDWR)  # like QEMU holding its disk
    try:
        assert loop.fd_size(fd) == 4 * vg.extent_size
        assert act.refresh(vg.name, "vol") == 4 * vg.extent_size  # nothing changed

        vg.lvm.lvextend(
            vg.name, "vol", 8, pv_range=lvm_model.pv_range(reservation.pv, first + 4, first + 7)
        )
        new_size = act.refresh(vg.name, "vol")

        assert new_size == 8 * vg.extent_size
        assert loop.fd_size(fd) == 8 * vg.extent_size
        assert os.pwrite(fd, b"E" * 4096, 7 * vg.extent_size) == 4096
        os.fsync(fd)
    finally:
        os.close(fd)
    assert pv_read(vg, first + 7, 4096) == b"E" * 4096
    assert act.active_path(vg.name, "vol") == dev


def test_lv_not_in_one_range_is_refused(
    vg: conftest.LoopVG, run_dir: str, act: activation.LoopActivation
) -> None:
    pv = vg.devices[0]
    vg.lvm.lvcreate(vg.name, "vol", 2, pv_range=lvm_model.pv_range(pv, 0, 1))
    vg.lvm.lvextend(vg.name, "vol", 4, pv_range=lvm_model.pv_range(pv, 50, 51))

    with pytest.raises(errors.LogicalVolumeNotContiguous) as e:
        act.activate(vg.name, "vol")

    assert f"{pv}:0-1" in str(e.value) and f"{pv}:50-51" in str(e.value)
    assert not act.is_active(vg.name, "vol")
    assert conftest.stacked_loop_devices(pv) == []


def test_extension_elsewhere_makes_refresh_fail(
    vg: conftest.LoopVG, act: activation.LoopActivation
) -> None:
    pv = vg.devices[0]
    vg.lvm.lvcreate(vg.name, "vol", 2, pv_range=lvm_model.pv_range(pv, 0, 1))
    dev = act.activate(vg.name, "vol")
    vg.lvm.lvextend(vg.name, "vol", 3, pv_range=lvm_model.pv_range(pv, 60, 60))
    with pytest.raises(errors.LogicalVolumeNotContiguous):
        act.refresh(vg.name, "vol")
    assert loop.size(dev) == 2 * vg.extent_size  # left as it was


def test_refresh_or_activate_what_is_not_there(
    vg: conftest.LoopVG, act: activation.LoopActivation
) -> None:
    vg.lvm.lvcreate(vg.name, "vol", 1)
    with pytest.raises(errors.LogicalVolumeRefreshError):
        act.refresh(vg.name, "vol")
    with pytest.raises(errors.LogicalVolumeDoesNotExistError):
        act.activate(vg.name, "missing")
    assert act.active_lvs(vg.name) == []
    with pytest.raises(ValueError):
        act.activate(vg.name, "../../etc")


def test_stale_state_is_dropped(vg: conftest.LoopVG, act: activation.LoopActivation) -> None:
    vg.lvm.lvcreate(vg.name, "vol", 1)
    dev = act.activate(vg.name, "vol")
    loop.detach(dev)  # behind the daemon's back

    assert act.active_path(vg.name, "vol") is None
    new = act.activate(vg.name, "vol")
    assert loop.status(new).backed_by(vg.devices[0])  # type: ignore[union-attr]


def test_two_hosts_on_one_kernel_get_their_own_devices(
    vg: conftest.LoopVG, storage_tmpdir: str, act: activation.LoopActivation
) -> None:
    other = activation.open("loop", vg.lvm, os.path.join(storage_tmpdir, "other-host"))
    vg.lvm.lvcreate(vg.name, "vol", 1)
    mine = act.activate(vg.name, "vol")
    try:
        theirs = other.activate(vg.name, "vol")
        assert theirs != mine

        act.deactivate(vg.name, "vol")

        assert other.active_path(vg.name, "vol") == theirs
        assert loop.status(theirs) is not None
    finally:
        other.deactivate(vg.name, "vol")


def test_deactivate_while_open_releases_on_last_close(
    vg: conftest.LoopVG, act: activation.LoopActivation
) -> None:
    vg.lvm.lvcreate(vg.name, "vol", 1)
    dev = act.activate(vg.name, "vol")
    fd = os.open(dev, os.O_RDONLY)
    try:
        act.deactivate(vg.name, "vol")
        assert not act.is_active(vg.name, "vol")
    finally:
        os.close(fd)
    st = loop.status(dev)
    assert st is None or not st.backed_by(vg.devices[0])


def test_devices_carry_the_owner_tag_of_their_host(
    vg: conftest.LoopVG, storage_tmpdir: str, act: activation.LoopActivation
) -> None:
    vg.lvm.lvcreate(vg.name, "vol", 1)
    vg.lvm.lvcreate(vg.name, "big", 4)
    dev = act.activate(vg.name, "vol")
    st = loop.status(dev)
    assert st is not None and st.file_name == act.owner
    assert act.owner.startswith("vdsm-lsm:") and len(act.owner) < loop.LO_NAME_SIZE
    # losetup still shows the PV as the backing file.
    shown = {d["name"]: d for d in conftest.loop_devices()}
    assert shown[dev]["back-file"] == vg.devices[0]
    # Another run dir is another owner; the same run dir (restarted) the same.
    other = activation.open("loop", vg.lvm, os.path.join(storage_tmpdir, "other-host"))
    assert isinstance(other, activation.LoopActivation) and other.owner != act.owner
    assert activation.owner_tag(os.path.dirname(act.state_dir)) == act.owner
    # A size change keeps the tag.
    big = act.activate(vg.name, "big")
    loop.set_size_limit(big, 2 * vg.extent_size)
    assert loop.status(big).file_name == act.owner  # type: ignore[union-attr]


def test_a_recorded_device_bound_by_another_host_is_not_ours(
    vg: conftest.LoopVG, storage_tmpdir: str, act: activation.LoopActivation
) -> None:
    # The daemon recorded a candidate device and died before binding it;
    # another host bound that very device to the same LV since.
    other = activation.open("loop", vg.lvm, os.path.join(storage_tmpdir, "other-host"))
    vg.lvm.lvcreate(vg.name, "vol", 1)
    theirs = other.activate(vg.name, "vol")
    try:
        theirs_state = other._read_state(vg.name, "vol")  # type: ignore[attr-defined]
        act._write_state(vg.name, "vol", dict(theirs_state, owner=act.owner))

        assert act.active_path(vg.name, "vol") is None  # not adopted, state dropped
        act.deactivate(vg.name, "vol")
        act.deactivate_all(vg.name, vg.devices)
        assert other.active_path(vg.name, "vol") == theirs  # still theirs, still bound
        mine = act.activate(vg.name, "vol")
        assert mine != theirs
    finally:
        other.deactivate(vg.name, "vol")


def test_state_without_owner_is_trusted(
    vg: conftest.LoopVG, act: activation.LoopActivation
) -> None:
    # State written before owner tags existed: device, backing and offset decide.
    vg.lvm.lvcreate(vg.name, "vol", 1)
    dev = act.activate(vg.name, "vol")
    state = act._read_state(vg.name, "vol")  # type: ignore[attr-defined]
    del state["owner"]
    act._write_state(vg.name, "vol", state)
    assert act.active_path(vg.name, "vol") == dev


def test_deactivate_all_releases_unrecorded_devices_of_this_host_only(
    vg: conftest.LoopVG, storage_tmpdir: str, act: activation.LoopActivation
) -> None:
    other = activation.open("loop", vg.lvm, os.path.join(storage_tmpdir, "other-host"))
    for name in ("a", "b"):
        vg.lvm.lvcreate(vg.name, name, 1)
    recorded = act.activate(vg.name, "a")
    lost = act.activate(vg.name, "b")
    act._remove_state(vg.name, "b")  # its state is lost
    theirs = other.activate(vg.name, "a")
    untagged = loop.attach(vg.devices[0], offset=0, sizelimit=vg.extent_size)
    try:
        assert [st.device for st in act.tagged_devices(vg.devices)] == sorted(
            [recorded, lost], key=lambda d: int(d[len("/dev/loop"):]))

        act.deactivate_all(vg.name, vg.devices)

        assert loop.status(recorded) is None and loop.status(lost) is None
        assert loop.status(theirs) is not None and loop.status(untagged) is not None
        assert not os.path.exists(os.path.join(act.state_dir, vg.name))
    finally:
        other.deactivate(vg.name, "a")
        loop.detach(untagged)


def test_adopt_records_a_device_of_this_host(
    vg: conftest.LoopVG, act: activation.LoopActivation
) -> None:
    vg.lvm.lvcreate(vg.name, "vol", 1)
    dev = act.activate(vg.name, "vol")
    state = act._read_state(vg.name, "vol")  # type: ignore[attr-defined]
    act._remove_state(vg.name, "vol")
    assert act.active_path(vg.name, "vol") is None

    assert act.adopt(vg.name, "vol", dev, state["backing"], state["offset"]) is True
    assert act.active_path(vg.name, "vol") == dev
    assert act.activate(vg.name, "vol") == dev  # no second device
    assert act.adopt(vg.name, "vol", dev, state["backing"], state["offset"]) is False
    # Not at another offset, not a device without our tag.
    act._remove_state(vg.name, "vol")
    assert act.adopt(vg.name, "vol", dev, state["backing"], state["offset"] + 512) is False
    act.release_device(dev)
    assert loop.status(dev) is None


@conftest.requires_dm
def test_dm_mode_lifecycle(vg_factory: VGFactory, run_dir: str) -> None:
    vg = vg_factory(lvm_activation=True)
    act = activation.open("dm", vg.lvm, run_dir)
    assert activation.open("auto", vg.lvm, run_dir).mode == "dm"
    vg.lvm.lvcreate(vg.name, "vol", 2)
    path = act.activate(vg.name, "vol")
    try:
        assert path == f"/dev/{vg.name}/vol"
        assert loop.size(path) == 2 * vg.extent_size
        vg.lvm.lvextend(vg.name, "vol", 3)
        assert act.refresh(vg.name, "vol") == 3 * vg.extent_size
        assert act.active_lvs(vg.name) == ["vol"]
    finally:
        act.deactivate(vg.name, "vol")
    assert not act.is_active(vg.name, "vol")


def test_copy_a_chain_into_activated_lvs(
    vg: conftest.LoopVG, storage_tmpdir: str, act: activation.LoopActivation
) -> None:
    # The product's path: a chain on files copied layer by layer into LVs
    # reached through links named by volume (qcow2 backing references are
    # bare names, resolved in the link directory), with O_DIRECT.
    src = os.path.join(storage_tmpdir, "src")
    links = os.path.join(storage_tmpdir, "links")
    os.makedirs(src)
    os.makedirs(links)
    qemuimg.create(os.path.join(src, "base"), qemuimg.RAW, size=16 * MiB)
    commands.run(["qemu-io", "-f", "raw", "-c", "write -P 1 0 16M", os.path.join(src, "base")])
    qemuimg.create(os.path.join(src, "top"), qemuimg.QCOW2, backing="base", backing_fmt=qemuimg.RAW)
    commands.run(
        [
            "qemu-io",
            "-f",
            "qcow2",
            "-c",
            "write -P 2 1M 64k",
            "-c",
            "write -z 2M 64k",
            os.path.join(src, "top"),
        ]
    )
    vg.lvm.lvcreate(vg.name, "base", 4)  # 16 MiB, preallocated RAW
    vg.lvm.lvcreate(vg.name, "top", 1)  # a thin COW volume's first chunk
    for name in ("base", "top"):
        os.symlink(act.activate(vg.name, name), os.path.join(links, name))
    qemuimg.create(
        os.path.join(links, "top"),
        qemuimg.QCOW2,
        size=16 * MiB,
        backing="base",
        backing_fmt=qemuimg.RAW,
    )

    qemuimg_copy.copy_layer(os.path.join(src, "base"), os.path.join(links, "base"), qemuimg.RAW)
    qemuimg_copy.copy_layer(os.path.join(src, "top"), os.path.join(links, "top"), qemuimg.QCOW2)

    assert qemuimg.compare(
        os.path.join(src, "top"), os.path.join(links, "top"), qemuimg.QCOW2, qemuimg.QCOW2
    )
    own = [
        (e["start"], e["length"], e["zero"])
        for e in qemuimg.map(os.path.join(links, "top"), fmt=qemuimg.QCOW2)
        if e["depth"] == 0
    ]
    assert own == [(1 * MiB, 64 * 1024, False), (2 * MiB, 64 * 1024, True)]


class Counter:
    """Counts commands.run calls while installed."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.argv: list[list[str]] = []
        real = commands.run

        def counting(argv: list[str], *args: object, **kwargs: object) -> object:
            self.argv.append(list(argv))
            return real(argv, *args, **kwargs)  # type: ignore[arg-type]

        monkeypatch.setattr(commands, "run", counting)


def test_activate_maps_from_a_current_reading_without_commands(
    vg: conftest.LoopVG, act: activation.LoopActivation, monkeypatch: pytest.MonkeyPatch
) -> None:
    pv = vg.devices[0]
    vg.lvm.lvcreate(vg.name, "before", 10, pv_range=lvm_model.pv_range(pv, 0, 9))
    vg.lvm.lvcreate(vg.name, "vol", 5, pv_range=lvm_model.pv_range(pv, 10, 14))
    state = vg.lvm.vg_state(vg.name)
    expected = vg.lvm.lv_layout(vg.name, "vol")
    counter = Counter(monkeypatch)

    dev = act.activate(vg.name, "vol", vg_state=state)

    assert [a[:2] for a in counter.argv if a[0] == "lvm"] == []
    st = loop.status(dev)
    assert st is not None and st.backed_by(pv)
    assert st.offset == expected.offset(expected.segments[0])
    assert st.offset == vg.lvm.vg_info(vg.name).pv(pv).pe_start + 10 * vg.extent_size
    assert loop.size(dev) == 5 * vg.extent_size


def test_activate_reads_the_layout_when_the_reading_is_stale(
    vg: conftest.LoopVG, act: activation.LoopActivation, monkeypatch: pytest.MonkeyPatch
) -> None:
    pv = vg.devices[0]
    vg.lvm.lvcreate(vg.name, "vol", 5, pv_range=lvm_model.pv_range(pv, 10, 14))
    state = vg.lvm.vg_state(vg.name)
    vg.lvm.lvextend(vg.name, "vol", 7, pv_range=lvm_model.pv_range(pv, 15, 16))
    counter = Counter(monkeypatch)

    dev = act.activate(vg.name, "vol", vg_state=state)

    assert [a[1] for a in counter.argv if a[0] == "lvm"] == ["pvs"]  # lv_layout
    assert loop.size(dev) == 7 * vg.extent_size


@pytest.mark.parametrize("name", ["vol\n", "\nvol", "vol/..", "v\u0663"])
def test_lv_and_device_names_are_matched_whole(
    vg: conftest.LoopVG, act: activation.LoopActivation, name: str
) -> None:
    # fullmatch: a "$"-anchored pattern would take the trailing newline.
    vg.lvm.lvcreate(vg.name, "vol", 1)
    with pytest.raises(ValueError, match="Invalid LVM name"):
        act.activate(vg.name, name)
    with pytest.raises(ValueError, match="Unsupported device path"):
        lvm.LVM([vg.devices[0] + "\n"])
    assert act.active_lvs(vg.name) == []
