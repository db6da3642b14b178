"""storage.loop against real loop devices over sparse files in /var/tmp."""

from __future__ import annotations

import collections.abc
import os
import threading

import pytest

from storage import errors, loop
from tests.storage import conftest

pytestmark = [pytest.mark.root, conftest.requires_root]

MiB = conftest.MiB


@pytest.fixture
def attached() -> collections.abc.Iterator[list[str]]:
    """Devices a test attached with storage.loop; detached at the end."""
    devices: list[str] = []
    yield devices
    for dev in devices:
        loop.detach(dev)


def test_attach_maps_the_range_and_detach_releases(
    sparse_file_factory: collections.abc.Callable[[int], str], attached: list[str]
) -> None:
    path = sparse_file_factory(64 * MiB)
    dev = loop.attach(path, offset=8 * MiB, sizelimit=16 * MiB)
    attached.append(dev)

    assert loop.size(dev) == 16 * MiB
    st = loop.status(dev)
    assert st is not None
    assert st.offset == 8 * MiB and st.sizelimit == 16 * MiB
    assert st.backed_by(path)
    assert not st.read_only and not st.autoclear
    listed = {d.name: d for d in loop.list()}
    assert listed[dev].backing == os.path.realpath(path)
    assert listed[dev].offset == 8 * MiB
    assert loop.find(path, 8 * MiB) == dev
    assert loop.find(path, 0) is None

    # A write at the device's start lands at the offset in the file.
    fd = os.open(dev, os.O_RDWR)
    try:
        os.pwrite(fd, b"X" * 4096, 0)
        os.fsync(fd)
    finally:
        os.close(fd)
    with open(path, "rb") as f:
        f.seek(8 * MiB)
        assert f.read(4096) == b"X" * 4096

    loop.detach(dev)
    assert loop.status(dev) is None
    assert dev not in {d.name for d in loop.list()}
    assert loop.find(path, 8 * MiB) is None


def test_grown_size_limit_is_seen_at_once_by_an_open_holder(
    sparse_file_factory: collections.abc.Callable[[int], str], attached: list[str]
) -> None:
    path = sparse_file_factory(64 * MiB)
    dev = loop.attach(path, offset=1 * MiB, sizelimit=4 * MiB)
    attached.append(dev)
    fd = os.open(dev, os.O_RDWR)  # like QEMU holding its disk
    try:
        assert loop.fd_size(fd) == 4 * MiB
        with pytest.raises(OSError):
            os.pwrite(fd, b"Y" * 512, 6 * MiB)  # beyond the end: ENOSPC

        assert loop.set_size_limit(dev, 12 * MiB) == 12 * MiB

        assert loop.fd_size(fd) == 12 * MiB
        assert os.pwrite(fd, b"Y" * 512, 6 * MiB) == 512
        os.fsync(fd)
    finally:
        os.close(fd)
    assert loop.status(dev).sizelimit == 12 * MiB  # type: ignore[union-attr]
    with open(path, "rb") as f:
        f.seek(1 * MiB + 6 * MiB)
        assert f.read(512) == b"Y" * 512


def test_read_only_device_refuses_writes(
    sparse_file_factory: collections.abc.Callable[[int], str], attached: list[str]
) -> None:
    path = sparse_file_factory(8 * MiB)
    dev = loop.attach(path, read_only=True)
    attached.append(dev)
    assert loop.status(dev).read_only  # type: ignore[union-attr]
    try:
        fd = os.open(dev, os.O_RDWR)
    except OSError:
        return  # refused at open: fine
    try:
        with pytest.raises(OSError):
            os.pwrite(fd, b"Z" * 512, 0)
    finally:
        os.close(fd)


def test_direct_io_flag(
    sparse_file_factory: collections.abc.Callable[[int], str], attached: list[str]
) -> None:
    path = sparse_file_factory(8 * MiB)
    dev = loop.attach(path, direct_io=True)
    attached.append(dev)
    assert loop.status(dev).direct_io  # type: ignore[union-attr]
    assert next(d for d in loop.list() if d.name == dev).direct_io


def test_on_device_sees_the_device_before_it_is_returned(
    sparse_file_factory: collections.abc.Callable[[int], str], attached: list[str]
) -> None:
    path = sparse_file_factory(8 * MiB)
    seen: list[tuple[str, bool]] = []

    def on_device(dev: str) -> None:
        seen.append((dev, loop.status(dev) is None))

    dev = loop.attach(path, on_device=on_device)
    attached.append(dev)
    # Offered while still unbound; the last offer is the device we got.
    assert seen[-1] == (dev, True)


def test_more_devices_are_created_when_all_are_bound(
    sparse_file_factory: collections.abc.Callable[[int], str], attached: list[str]
) -> None:
    nodes = [n for n in os.listdir("/sys/block") if n.startswith("loop")]
    bound = {d.name for d in loop.list()}
    unbound = len(nodes) - len(bound)
    for _ in range(unbound + 2):
        attached.append(loop.attach(sparse_file_factory(MiB)))
    assert len(set(attached)) == len(attached)
    assert all(loop.status(dev) is not None for dev in attached)
    assert len([n for n in os.listdir("/sys/block") if n.startswith("loop")]) > len(nodes)


def test_concurrent_attaches_get_distinct_devices(
    sparse_file_factory: collections.abc.Callable[[int], str], attached: list[str]
) -> None:
    paths = [sparse_file_factory(MiB) for _ in range(6)]
    results: dict[str, str] = {}
    failures: list[BaseException] = []
    barrier = threading.Barrier(len(paths))

    def worker(path: str) -> None:
        barrier.wait()
        try:
            results[path] = loop.attach(path)
        except BaseException as e:  # reported below
            failures.append(e)

    threads = [threading.Thread(target=worker, args=(p,)) for p in paths]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    attached.extend(results.values())
    assert not failures
    assert len(set(results.values())) == len(paths)
    for path, dev in results.items():
        assert loop.status(dev).backed_by(path)  # type: ignore[union-attr]


def test_detach_while_open_is_deferred_to_the_last_close(
    sparse_file_factory: collections.abc.Callable[[int], str],
) -> None:
    dev = loop.attach(sparse_file_factory(8 * MiB))
    fd = os.open(dev, os.O_RDONLY)
    try:
        loop.detach(dev)
        st = loop.status(dev)
        assert st is not None and st.autoclear
    finally:
        os.close(fd)
    assert loop.status(dev) is None


def test_detach_of_an_unbound_device_is_a_no_op(
    sparse_file_factory: collections.abc.Callable[[int], str],
) -> None:
    dev = loop.attach(sparse_file_factory(MiB))
    loop.detach(dev)
    loop.detach(dev)
    assert loop.status(dev) is None


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        loop.detach("/dev/sda")
    with pytest.raises(ValueError):
        loop.set_size_limit("/dev/loop0", -1)
    with pytest.raises(errors.LoopDeviceError):
        loop.attach("/var/tmp/no-such-file-for-loop-test")


def test_a_name_tags_the_device(
    sparse_file_factory: collections.abc.Callable[[int], str], attached: list[str]
) -> None:
    path = sparse_file_factory(16 * MiB)
    dev = loop.attach(path, name="vdsm-lsm:owner")
    attached.append(dev)
    st = loop.status(dev)
    assert st is not None and st.file_name == "vdsm-lsm:owner" and st.backed_by(path)
    assert {d.name: d.backing for d in loop.list()}[dev] == os.path.realpath(path)
    plain = loop.attach(path, offset=MiB)
    attached.append(plain)
    assert loop.status(plain).file_name == path[:63]  # type: ignore[union-attr]
    with pytest.raises(ValueError):
        loop.attach(path, name="x" * loop.LO_NAME_SIZE)


@pytest.mark.parametrize(
    "dev", ["/dev/loop0\n", "/dev/loop0 ", "/dev/loop\u0663", "/dev/loop", "/dev/loop0/../sda",
            "\n/dev/loop0", "/dev/loop-control"],
)
def test_device_names_are_matched_whole(dev: str) -> None:
    for call in (loop.status, loop.detach):
        with pytest.raises(ValueError, match="Not a loop device path"):
            call(dev)
    with pytest.raises(ValueError, match="Not a loop device path"):
        loop.set_size_limit(dev, 0)
