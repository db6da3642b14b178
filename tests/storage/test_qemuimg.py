"""storage.qemuimg against the real qemu-img (and qemu-io to write data)."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from typing import Any

import pytest

from storage import commands, errors, qemuimg, qemuimg_copy
from tests.storage import conftest

MiB = conftest.MiB
KiB = 1024
CLUSTER = 64 * KiB


def qemu_io(path: str, fmt: str, *ops: str) -> None:
    cmd = ["qemu-io", "-f", fmt]
    for op in ops:
        cmd += ["-c", op]
    commands.run([*cmd, path])


def read_pattern(path: str, fmt: str, offset: int, length: int, pattern: int) -> bool:
    cmd = ["qemu-io", "-r", "-f", fmt, "-c", f"read -P {pattern} {offset} {length}", path]
    out = commands.run(cmd).stdout.decode()
    return "Pattern verification failed" not in out


def own_extents(path: str, fmt: str = qemuimg.QCOW2) -> list[tuple[int, int, bool, bool]]:
    """(start, length, data, zero) of the clusters path itself holds,
    neighbours of the same kind joined (map splits them where their host
    offsets are not contiguous)."""
    result: list[tuple[int, int, bool, bool]] = []
    for e in qemuimg.map(path, fmt=fmt):
        if e["depth"] != 0 or not e["present"]:
            continue
        if result:
            start, length, data, zero = result[-1]
            if start + length == e["start"] and (data, zero) == (e["data"], e["zero"]):
                result[-1] = (start, length + e["length"], data, zero)
                continue
        result.append((e["start"], e["length"], e["data"], e["zero"]))
    return result


@pytest.fixture
def workdir(storage_tmpdir: str) -> str:
    return storage_tmpdir


def test_create_and_info(workdir: str) -> None:
    base = os.path.join(workdir, "base")
    top = os.path.join(workdir, "top")
    qemuimg.create(base, qemuimg.RAW, size=8 * MiB)
    qemuimg.create(top, qemuimg.QCOW2, backing="base", backing_fmt=qemuimg.RAW)

    info = qemuimg.info(top, fmt=qemuimg.QCOW2)

    assert info["format"] == "qcow2"
    assert info["virtual-size"] == 8 * MiB  # inherited from the backing
    assert info["cluster-size"] == CLUSTER
    assert info["backing-filename"] == "base"  # bare name: relative to top's dir
    assert info["backing-filename-format"] == "raw"
    assert info["format-specific"]["data"]["compat"] == "1.1"

    chain = qemuimg.info(top, fmt=qemuimg.QCOW2, backing_chain=True)
    assert [i["filename"] for i in chain] == [top, os.path.join(workdir, "base")]

    other = os.path.join(workdir, "other")
    qemuimg.create(other, qemuimg.QCOW2, size=16 * MiB, cluster_size=128 * KiB)
    assert qemuimg.info(other)["cluster-size"] == 128 * KiB

    with pytest.raises(ValueError):
        qemuimg.create(other, qemuimg.QCOW2, backing="base")  # no backing format
    with pytest.raises(errors.CommandFailed) as e:
        qemuimg.info(os.path.join(workdir, "missing"))
    assert e.value.rc != 0 and "missing" in e.value.err


def test_info_of_an_image_in_use_needs_force_share(workdir: str) -> None:
    path = os.path.join(workdir, "busy")
    qemuimg.create(path, qemuimg.QCOW2, size=MiB)
    # qemu-io holds a write lock on the image like a running VM.
    holder_log = open(os.path.join(workdir, "qemu-io.log"), "w+b")  # noqa: SIM115
    holder = subprocess.Popen(
        ["qemu-io", "-f", "qcow2", "-c", "sleep 600000", path],
        stdin=subprocess.DEVNULL,
        stdout=holder_log,
        stderr=subprocess.STDOUT,
    )
    try:
        _wait_locked(path, holder, holder_log)
        assert qemuimg.info(path, force_share=True)["format"] == "qcow2"
        with pytest.raises(errors.CommandFailed) as e:
            qemuimg.info(path, force_share=False)
        assert "lock" in e.value.err
    finally:
        holder.kill()
        holder.wait()
        holder_log.close()


def _wait_locked(path: str, holder: subprocess.Popen[bytes], holder_log: Any) -> None:
    # Not a timing assertion: wait for the holder to have locked the image.
    # Watch /proc/locks rather than probing with qemu-img: a probe holds a
    # shared lock of its own, and qemu-io opening the image at that moment
    # fails to get its write lock.
    inode = os.stat(path).st_ino
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        with open("/proc/locks") as f:
            if any(line.split()[5].endswith(f":{inode}") for line in f if len(line.split()) > 5):
                return
        if holder.poll() is not None:
            holder_log.seek(0)
            output = holder_log.read().decode(errors="replace")
            raise AssertionError(f"qemu-io exited rc={holder.returncode}: {output}")
        threading.Event().wait(0.02)
    raise AssertionError("qemu-io never locked the image")


def test_map_measure_check_resize(workdir: str) -> None:
    path = os.path.join(workdir, "img")
    qemuimg.create(path, qemuimg.QCOW2, size=16 * MiB)
    qemu_io(path, "qcow2", "write -P 1 0 1M", "write -z 4M 64k")

    extents = own_extents(path)
    assert (0, MiB, True, False) in extents
    assert (4 * MiB, CLUSTER, False, True) in extents

    m = qemuimg.measure(path, fmt=qemuimg.QCOW2)
    assert MiB < m["required"] < 16 * MiB
    assert m["fully-allocated"] >= 16 * MiB
    assert qemuimg.measure(size=16 * MiB)["required"] < MiB

    report = qemuimg.check(path)
    assert report["check-errors"] == 0
    assert "corruptions" not in report
    assert report["image-end-offset"] > MiB
    raw = os.path.join(workdir, "raw")
    qemuimg.create(raw, qemuimg.RAW, size=MiB)
    with pytest.raises(errors.CommandFailed):
        qemuimg.check(raw, fmt=qemuimg.RAW)  # raw has no checks

    qemuimg.resize(path, 32 * MiB, qemuimg.QCOW2)
    assert qemuimg.info(path)["virtual-size"] == 32 * MiB


def test_measure_of_one_layer_excludes_its_backing(workdir: str) -> None:
    base, top = _chain(workdir)
    whole = qemuimg.measure(top, fmt=qemuimg.QCOW2)["required"]
    layer = qemuimg.measure(top, fmt=qemuimg.QCOW2, backing=False)["required"]
    assert layer < whole
    assert layer < qemuimg.measure(base, fmt=qemuimg.QCOW2)["required"]


def test_compare(workdir: str) -> None:
    a = os.path.join(workdir, "a")
    b = os.path.join(workdir, "b")
    qemuimg.create(a, qemuimg.QCOW2, size=4 * MiB)
    qemuimg.create(b, qemuimg.RAW, size=4 * MiB)
    assert qemuimg.compare(a, b, qemuimg.QCOW2, qemuimg.RAW)
    qemu_io(b, "raw", "write -z 0 64k")  # still zeros
    assert qemuimg.compare(a, b, qemuimg.QCOW2, qemuimg.RAW)
    qemu_io(b, "raw", "write -P 7 1M 4k")
    assert not qemuimg.compare(a, b, qemuimg.QCOW2, qemuimg.RAW)
    with pytest.raises(errors.CommandFailed):
        qemuimg.compare(a, os.path.join(workdir, "missing"))


def test_convert_reports_progress(workdir: str) -> None:
    src = os.path.join(workdir, "src")
    dst = os.path.join(workdir, "dst")
    qemuimg.create(src, qemuimg.RAW, size=64 * MiB)
    qemu_io(src, "raw", "write -P 3 0 32M", "write -P 4 40M 8M")
    seen: list[float] = []

    qemuimg_copy.convert(src, dst, qemuimg.RAW, qemuimg.QCOW2, create=True, progress=seen.append)

    assert seen and seen[-1] == 100.0
    assert seen == sorted(seen)
    assert all(0.0 <= v <= 100.0 for v in seen)
    assert qemuimg.compare(src, dst, qemuimg.RAW, qemuimg.QCOW2)
    # Zero areas stay unallocated in the new image.
    data = [e for e in own_extents(dst) if e[2]]
    assert sum(e[1] for e in data) == 40 * MiB


def test_convert_into_an_existing_target(workdir: str) -> None:
    src = os.path.join(workdir, "src")
    dst = os.path.join(workdir, "dst")
    qemuimg.create(src, qemuimg.RAW, size=8 * MiB)
    qemu_io(src, "raw", "write -P 5 0 1M")
    # The target holds garbage where the source is zero.
    with open(dst, "wb") as f:
        f.write(os.urandom(8 * MiB))

    qemuimg_copy.convert(src, dst, qemuimg.RAW, qemuimg.RAW)

    assert qemuimg.compare(src, dst, qemuimg.RAW, qemuimg.RAW)


def test_convert_abort_kills_qemu_img(workdir: str) -> None:
    src = os.path.join(workdir, "src")
    dst = os.path.join(workdir, "dst")
    qemuimg.create(src, qemuimg.RAW, size=256 * MiB)
    qemu_io(src, "raw", "write -P 9 0 256M")
    abort = threading.Event()

    def progress(value: float) -> None:
        if value > 0:
            abort.set()

    with pytest.raises(errors.ConvertAborted) as e:
        # Rate limited so it cannot finish before the abort is seen.
        qemuimg_copy.convert(
            src,
            dst,
            qemuimg.RAW,
            qemuimg.QCOW2,
            create=True,
            rate_limit_bps=8 * MiB,
            progress=progress,
            abort=abort,
        )

    assert e.value.src == src and e.value.dst == dst
    assert not _qemu_img_running(dst)


def test_convert_abort_before_start(workdir: str) -> None:
    src = os.path.join(workdir, "src")
    qemuimg.create(src, qemuimg.RAW, size=MiB)
    abort = threading.Event()
    abort.set()
    with pytest.raises(errors.ConvertAborted):
        qemuimg_copy.convert(src, src + ".out", qemuimg.RAW, qemuimg.RAW, create=True, abort=abort)
    assert not _qemu_img_running(src + ".out")


def _qemu_img_running(path: str) -> bool:
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].endswith(b"qemu-img") and os.fsencode(path) in argv:
            return True
    return False


def test_convert_failure_carries_stderr(workdir: str) -> None:
    with pytest.raises(errors.CommandFailed) as e:
        qemuimg_copy.convert(
            os.path.join(workdir, "missing"),
            os.path.join(workdir, "out"),
            qemuimg.RAW,
            qemuimg.RAW,
            create=True,
        )
    assert e.value.rc == 1
    assert "missing" in e.value.err
    assert e.value.cmd[:2] == ["qemu-img", "convert"]


def test_convert_refuses_unsafe_option_combinations(workdir: str) -> None:
    with pytest.raises(ValueError):
        qemuimg_copy.convert("a", "b", "qcow2", "qcow2", target_is_zero=True, backing="base")
    with pytest.raises(ValueError):
        qemuimg_copy.convert("a", "b", "raw", "raw", create=True, target_is_zero=True)
    with pytest.raises(ValueError):
        qemuimg_copy.convert("a", "b", "raw", "qcow2", cluster_size=CLUSTER)


# copy_layer: the structure-keeping copy of Image.syncData.


def _chain(directory: str) -> tuple[str, str]:
    """base <- top (qcow2): base full of 0xaa; top holds a few clusters."""
    os.makedirs(directory, exist_ok=True)
    base = os.path.join(directory, "base")
    top = os.path.join(directory, "top")
    qemuimg.create(base, qemuimg.QCOW2, size=8 * MiB)
    qemu_io(base, "qcow2", "write -P 0xaa 0 8M")
    qemuimg.create(top, qemuimg.QCOW2, backing="base", backing_fmt=qemuimg.QCOW2)
    qemu_io(
        top,
        "qcow2",
        "write -P 0xbb 64k 64k",  # data
        "write -z 1M 128k",  # zero clusters hiding base's data
        "write -P 0xcc 3M 256k",  # data
        "write -P 0 6M 64k",  # data that happens to be zeros
    )
    return base, top


def _empty_like(directory: str, base_size: int = 8 * MiB) -> tuple[str, str]:
    """The same structure, empty (as Image.cloneStructure makes it)."""
    os.makedirs(directory, exist_ok=True)
    base = os.path.join(directory, "base")
    top = os.path.join(directory, "top")
    qemuimg.create(base, qemuimg.QCOW2, size=base_size)
    qemuimg.create(top, qemuimg.QCOW2, backing="base", backing_fmt=qemuimg.QCOW2)
    return base, top


def test_copy_layer_keeps_the_structure(workdir: str) -> None:
    src_base, src_top = _chain(os.path.join(workdir, "src"))
    dst_base, dst_top = _empty_like(os.path.join(workdir, "dst"))
    seen: list[float] = []

    # Top first: the order does not matter.
    qemuimg_copy.copy_layer(src_top, dst_top, qemuimg.QCOW2, progress=seen.append)
    qemuimg_copy.copy_layer(src_base, dst_base, qemuimg.QCOW2)

    assert seen and seen[-1] == 100.0
    # Only top's own clusters are in the destination top: unallocated ones
    # still show the backing.
    dst_own = own_extents(dst_top)
    allocated = sum(length for _, length, _, _ in dst_own)
    assert allocated == 64 * KiB + 128 * KiB + 256 * KiB + 64 * KiB
    assert (64 * KiB, 64 * KiB, True, False) in dst_own
    assert (3 * MiB, 256 * KiB, True, False) in dst_own
    # Zero clusters are kept as zero clusters, not left to show base's 0xaa.
    assert (1 * MiB, 128 * KiB, False, True) in dst_own
    assert read_pattern(dst_top, "qcow2", 1 * MiB, 128 * KiB, 0)
    assert read_pattern(dst_top, "qcow2", 6 * MiB, 64 * KiB, 0)
    assert read_pattern(dst_top, "qcow2", 2 * MiB, 64 * KiB, 0xAA)
    # The chains read the same, and so do the layers' own contents.
    assert qemuimg.compare(src_top, dst_top, qemuimg.QCOW2, qemuimg.QCOW2)
    assert qemuimg.compare(src_base, dst_base, qemuimg.QCOW2, qemuimg.QCOW2)
    assert own_extents(dst_base) == own_extents(src_base)
    assert qemuimg.info(dst_top)["backing-filename"] == "base"
    assert qemuimg.check(dst_top)["check-errors"] == 0


def test_copy_layer_again_is_harmless(workdir: str) -> None:
    src_base, src_top = _chain(os.path.join(workdir, "src"))
    dst_base, dst_top = _empty_like(os.path.join(workdir, "dst"))
    for _ in range(2):
        qemuimg_copy.copy_layer(src_base, dst_base, qemuimg.QCOW2)
        qemuimg_copy.copy_layer(src_top, dst_top, qemuimg.QCOW2)
    assert qemuimg.compare(src_top, dst_top, qemuimg.QCOW2, qemuimg.QCOW2)
    assert sum(e[1] for e in own_extents(dst_top)) == 512 * KiB


def test_copy_layer_of_a_raw_base_overwrites_garbage(workdir: str) -> None:
    src = os.path.join(workdir, "src.raw")
    dst = os.path.join(workdir, "dst.raw")
    qemuimg.create(src, qemuimg.RAW, size=4 * MiB)
    qemu_io(src, "raw", "write -P 1 1M 1M")
    with open(dst, "wb") as f:  # a reused LV is not zeroed
        f.write(os.urandom(4 * MiB))

    qemuimg_copy.copy_layer(src, dst, qemuimg.RAW)

    assert qemuimg.compare(src, dst, qemuimg.RAW, qemuimg.RAW)


def test_copy_layer_refuses_a_different_structure(workdir: str) -> None:
    _, src_top = _chain(os.path.join(workdir, "src"))
    other = os.path.join(workdir, "other")
    os.makedirs(other)
    qemuimg.create(os.path.join(other, "parent"), qemuimg.QCOW2, size=8 * MiB)
    wrong_backing = os.path.join(other, "top")
    qemuimg.create(wrong_backing, qemuimg.QCOW2, backing="parent", backing_fmt=qemuimg.QCOW2)
    small = os.path.join(other, "small")
    qemuimg.create(small, qemuimg.QCOW2, size=MiB)
    _, big_clusters = _empty_like(os.path.join(workdir, "big"))
    qemuimg.create(
        big_clusters,
        qemuimg.QCOW2,
        backing="base",
        backing_fmt=qemuimg.QCOW2,
        cluster_size=256 * KiB,
    )

    for dst in (wrong_backing, small, big_clusters):
        with pytest.raises(errors.LayerMismatch):
            qemuimg_copy.copy_layer(src_top, dst, qemuimg.QCOW2)


def test_copy_layer_abort(workdir: str) -> None:
    src = os.path.join(workdir, "src")
    dst = os.path.join(workdir, "dst")
    qemuimg.create(src, qemuimg.QCOW2, size=256 * MiB)
    qemu_io(src, "qcow2", "write -P 2 0 256M")
    qemuimg.create(dst, qemuimg.QCOW2, size=256 * MiB)
    abort = threading.Event()

    def progress(value: float) -> None:
        if value > 0:
            abort.set()

    with pytest.raises(errors.ConvertAborted):
        qemuimg_copy.copy_layer(
            src, dst, qemuimg.QCOW2, rate_limit_bps=8 * MiB, progress=progress, abort=abort
        )
    assert not _qemu_img_running(dst)


def test_a_raw_source_larger_than_its_volume_is_copied_up_to_its_size(workdir: str) -> None:
    # A raw base on a block domain: its LV is whole extents (128 MiB by
    # default), more than the volume's capacity, which a file destination has.
    src = os.path.join(workdir, "lv,of,extents")
    dst = os.path.join(workdir, "file-volume")
    data = os.urandom(MiB)
    with open(src, "wb") as f:
        f.truncate(8 * MiB)
        f.seek(3 * MiB)
        f.write(data)
        f.seek(6 * MiB)
        f.write(b"beyond the volume")
    for target_is_zero in (True, False):
        with open(dst, "wb") as f:
            f.truncate(4 * MiB)
        with pytest.raises(errors.Error):  # the whole LV does not fit
            qemuimg_copy.convert(src, dst, qemuimg.RAW, qemuimg.RAW)

        if target_is_zero:
            qemuimg_copy.convert(src, dst, qemuimg.RAW, qemuimg.RAW, target_is_zero=True,
                                 src_size=4 * MiB)
        else:
            qemuimg_copy.copy_layer(src, dst, qemuimg.RAW, src_size=4 * MiB)

        with open(dst, "rb") as f:
            copied = f.read()
        assert len(copied) == 4 * MiB and copied[3 * MiB:] == data
        assert copied[: 3 * MiB] == bytes(3 * MiB)
    with pytest.raises(ValueError):
        qemuimg_copy.convert(src, dst, qemuimg.QCOW2, qemuimg.RAW, src_size=4 * MiB)
