"""The verifier against blocks written by the real writer, run on the host.

The writer is the same static binary the guest runs; here it writes into a
raw file (with O_DIRECT and fdatasync, as in the guest), and its stdout
stands for the serial log. The guest itself is booted in test_guest.py.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import pytest

from contrib import guest
from contrib.guest import verifier
from storage import commands

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_writer(art: guest.Artifacts, disk: str, serial_log: str, **params: object) -> str:
    """Run the writer on disk, append its output to serial_log, return it."""
    args = guest.writer_params(dev=disk, **params)  # type: ignore[arg-type]
    proc = commands.run([art.writer, args], timeout=60, check=False)
    out = proc.stdout.decode()
    with open(serial_log, "a") as f:
        f.write(out)
    assert proc.returncode == 0, out
    return out


def make_disk(workdir: str, name: str = "disk.raw", size_mb: int = 4) -> str:
    path = os.path.join(workdir, name)
    with open(path, "wb") as f:
        f.truncate(size_mb << 20)
    return path


def qemu_io_write(image: str, fmt: str, offset: int, length: int = 4096) -> None:
    commands.run(
        ["qemu-io", "-f", fmt, "-c", f"write -P 0x5a {offset} {length}", image], timeout=60
    )


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "contrib.guest.verifier", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_every_acked_write_is_verified(artifacts: guest.Artifacts, workdir: str) -> None:
    disk = make_disk(workdir)
    serial_log = os.path.join(workdir, "serial.log")
    run_writer(artifacts, disk, serial_log, count=100, span_mb=4)

    parsed = verifier.parse_log(serial_log)
    result = verifier.verify(serial_log, disk, "raw")

    assert result.acks == 100
    assert result.lost == 0, result.details
    assert result.verified == len({ack.block for ack in parsed.acks})


def test_span_offset_and_block_size_come_from_the_log(
    artifacts: guest.Artifacts, workdir: str
) -> None:
    disk = make_disk(workdir, size_mb=6)
    serial_log = os.path.join(workdir, "serial.log")
    run_writer(artifacts, disk, serial_log, count=40, span_mb=4, offset_mb=2, bs=128 * 1024)

    assert verifier.verify(serial_log, disk, "raw").lost == 0
    # The same blocks looked for at offset 0 are not there.
    wrong = verifier.verify(serial_log, disk, "raw", span_offset=0)
    assert wrong.verified == 0
    assert wrong.lost > 0


@pytest.mark.parametrize(
    "where,reason",
    [(0, "no block header"), (8192, "checksum mismatch")],
    ids=["header", "filler"],
)
def test_corrupted_acked_block_is_lost(
    artifacts: guest.Artifacts, workdir: str, where: int, reason: str
) -> None:
    disk = make_disk(workdir)
    serial_log = os.path.join(workdir, "serial.log")
    run_writer(artifacts, disk, serial_log, count=50, span_mb=4)
    victim = verifier.parse_log(serial_log).acks[-1]
    qemu_io_write(disk, "raw", victim.block * 65536 + where)

    result = verifier.verify(serial_log, disk, "raw")

    assert result.lost == 1
    assert result.details[0].block == victim.block
    assert result.details[0].acked_seq == victim.seq
    assert reason in result.details[0].reason


def test_cli_reports_loss_and_exits_nonzero(artifacts: guest.Artifacts, workdir: str) -> None:
    disk = make_disk(workdir)
    serial_log = os.path.join(workdir, "serial.log")
    run_writer(artifacts, disk, serial_log, count=30, span_mb=1, pattern="seq")

    ok = cli("--log", serial_log, "--image", disk, "--format", "raw")
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip() == "verified 16 blocks, 0 lost"

    qemu_io_write(disk, "raw", 3 * 65536 + 4096)
    bad = cli("--log", serial_log, "--image", disk, "--format", "raw")
    assert bad.returncode == 1
    assert bad.stdout.strip() == "verified 15 blocks, 1 lost"
    assert "block 3 " in bad.stderr


def test_cli_cannot_verify_a_missing_image(artifacts: guest.Artifacts, workdir: str) -> None:
    disk = make_disk(workdir)
    serial_log = os.path.join(workdir, "serial.log")
    run_writer(artifacts, disk, serial_log, count=5, span_mb=1)

    res = cli("--log", serial_log, "--image", os.path.join(workdir, "missing.qcow2"))

    assert res.returncode == 2
    assert "cannot verify" in res.stderr


def test_truncated_last_line_is_ignored(artifacts: guest.Artifacts, workdir: str) -> None:
    disk = make_disk(workdir)
    serial_log = os.path.join(workdir, "serial.log")
    run_writer(artifacts, disk, serial_log, count=20, span_mb=1, pattern="seq")
    last = verifier.parse_log(serial_log).acks[-1]
    # A write the guest was acknowledging when the log was cut: not on disk.
    partial = f"ACK {last.seq + 1} {last.block} {last.ms + 1}"

    with open(serial_log, "a") as f:
        f.write(partial)
    result = verifier.verify(serial_log, disk, "raw")
    assert result.acks == 20
    assert result.lost == 0

    # The same line, complete, would be a loss: the block holds an older seq.
    with open(serial_log, "a") as f:
        f.write("\r\n")
    result = verifier.verify(serial_log, disk, "raw")
    assert result.acks == 21
    assert result.lost == 1
    assert "older seq" in result.details[0].reason


def test_block_holding_an_older_write_is_lost(artifacts: guest.Artifacts, workdir: str) -> None:
    # Same run id and pattern: disk_a stops after the first pass over the
    # span, disk_b (whose log we check) goes on to rewrite every block.
    params = dict(span_mb=1, bs=262144, pattern="seq", run=7)
    disk_a = make_disk(workdir, "a.raw")
    disk_b = make_disk(workdir, "b.raw")
    run_writer(artifacts, disk_a, os.path.join(workdir, "a.log"), count=4, **params)
    log_b = os.path.join(workdir, "b.log")
    run_writer(artifacts, disk_b, log_b, count=8, **params)

    assert verifier.verify(log_b, disk_b, "raw").lost == 0
    result = verifier.verify(log_b, disk_a, "raw")
    assert result.lost == 4
    assert all("older seq" in lost.reason for lost in result.details)


def test_block_holding_another_index_is_lost(artifacts: guest.Artifacts, workdir: str) -> None:
    disk = make_disk(workdir)
    serial_log = os.path.join(workdir, "serial.log")
    run_writer(artifacts, disk, serial_log, count=2, span_mb=1, pattern="seq")
    with open(disk, "r+b") as f:
        f.seek(65536)
        block1 = f.read(65536)
        f.seek(0)
        f.write(block1)

    result = verifier.verify(serial_log, disk, "raw")

    assert result.lost == 1
    assert result.details[0].block == 0
    assert "holds block 1" in result.details[0].reason


def test_later_run_supersedes_earlier_one(artifacts: guest.Artifacts, workdir: str) -> None:
    params = dict(span_mb=1, bs=262144, pattern="seq")
    disk = make_disk(workdir)
    log_a = os.path.join(workdir, "a.log")
    log_ab = os.path.join(workdir, "ab.log")
    run_writer(artifacts, disk, log_a, count=6, run=1, **params)
    with open(log_a) as f:
        a_text = f.read()
    with open(log_ab, "w") as f:
        f.write(a_text)
    snapshot = os.path.join(workdir, "after-a.raw")
    commands.run(["cp", "--sparse=always", disk, snapshot], timeout=60)

    # A second boot rewrites blocks 0 and 1 with low seqs of a new run.
    run_writer(artifacts, disk, log_ab, count=2, run=2, **params)

    assert verifier.verify(log_ab, disk, "raw").lost == 0
    stale = verifier.verify(log_ab, snapshot, "raw")
    assert sorted(lost.block for lost in stale.details) == [0, 1]
    assert all("earlier run" in lost.reason for lost in stale.details)


def test_decode_block_checks_header_and_checksum(artifacts: guest.Artifacts, workdir: str) -> None:
    disk = make_disk(workdir)
    serial_log = os.path.join(workdir, "serial.log")
    run_writer(artifacts, disk, serial_log, count=1, span_mb=1, pattern="seq", run=42)
    with open(disk, "rb") as f:
        data = bytearray(f.read(65536))

    block = verifier.decode_block(bytes(data))
    assert block is not None
    assert (block.seq, block.block, block.run_id, block.block_size) == (1, 0, 42, 65536)

    data[40000] ^= 1
    assert verifier.decode_block(bytes(data)) is None


def test_log_without_acks_verifies_nothing(workdir: str) -> None:
    serial_log = os.path.join(workdir, "serial.log")
    with open(serial_log, "w") as f:
        f.write("GUEST READY dev=/dev/vda\n")

    result = verifier.verify(serial_log, "/nonexistent", "raw")

    assert (result.verified, result.lost, result.acks) == (0, 0, 0)


def test_garbled_ack_lines_are_counted_not_used(workdir: str) -> None:
    serial_log = os.path.join(workdir, "serial.log")
    with open(serial_log, "w") as f:
        f.write("ACK 1 2 3\r\n[    1.0] NET: Registered PF_PACKET\r\nACK 2 5[  2.0] x\r\n")

    parsed = verifier.parse_log(serial_log)

    assert parsed.acks == [verifier.Ack(1, 2, 3, -1)]
    assert parsed.garbled == 1


def test_largest_gap_is_measured_within_a_run() -> None:
    acks = [
        verifier.Ack(1, 0, 100, 0),
        verifier.Ack(2, 0, 130, 0),
        verifier.Ack(3, 0, 135, 0),
        verifier.Ack(1, 0, 9000, 1),
        verifier.Ack(2, 0, 9010, 1),
    ]
    assert verifier.largest_gap_ms(acks) == 30


def test_wait_for_acks_returns_once_enough(workdir: str) -> None:
    serial_log = os.path.join(workdir, "serial.log")
    with open(serial_log, "w") as f:
        f.write("ACK 1 0 1\nACK 2 1 2\nACK 3 2 3\n")

    assert len(verifier.wait_for_acks(serial_log, 3, timeout=30).acks) == 3
    with pytest.raises(TimeoutError, match="3/4 ACKs"):
        verifier.wait_for_acks(serial_log, 4, timeout=0.3, interval=0.1)
    with pytest.raises(RuntimeError, match="gone"):
        verifier.wait_for_acks(serial_log, 4, timeout=30, alive=lambda: False)


def test_wait_for_acks_fails_fast_on_guest_error(workdir: str) -> None:
    serial_log = os.path.join(workdir, "serial.log")
    with open(serial_log, "w") as f:
        f.write("GUEST ERROR no block device /dev/vda\n")

    with pytest.raises(RuntimeError, match="no block device"):
        verifier.wait_for_acks(serial_log, 1, timeout=30)


@pytest.mark.parametrize(
    "params,error",
    [
        ("lsm.bs=1000", "must be a multiple of 4096"),
        ("lsm.span_mb=64", "does not fit"),
        ("lsm.pattern=zigzag", "bad value lsm.pattern"),
        ("lsm.count=many", "bad value lsm.count"),
    ],
)
def test_writer_refuses_bad_parameters(
    artifacts: guest.Artifacts, workdir: str, params: str, error: str
) -> None:
    disk = make_disk(workdir)
    proc = commands.run([artifacts.writer, f"lsm.dev={disk} {params}"], timeout=60, check=False)
    out = proc.stdout.decode()
    assert proc.returncode == 2
    assert "WRITER ERROR" in out and error in out
    assert "ACK" not in out


def test_writer_paces_writes_at_the_requested_rate(
    artifacts: guest.Artifacts, workdir: str
) -> None:
    disk = make_disk(workdir)
    serial_log = os.path.join(workdir, "serial.log")
    out = run_writer(artifacts, disk, serial_log, count=6, span_mb=1, rate=20)

    # Write n starts no sooner than (n-1)/rate s after the writer's start,
    # so 6 writes take at least 5 intervals of 50 ms.
    done = re.search(r"WRITER DONE count=6 ms=(\d+)", out)
    assert done is not None, out
    assert int(done[1]) >= 5 * 50
    assert verifier.verify(serial_log, disk, "raw").lost == 0


def test_writer_params_rejects_unknown_pattern() -> None:
    with pytest.raises(ValueError):
        guest.writer_params(pattern="zigzag")


@pytest.mark.root
def test_writer_retries_on_enospc_until_the_write_completes(
    artifacts: guest.Artifacts, workdir: str
) -> None:
    """A write that fails with ENOSPC is retried, not skipped nor fatal."""
    if os.getuid() != 0:
        pytest.skip("mounting a file system needs root")
    fs_image = os.path.join(workdir, "fs.img")
    mnt = os.path.join(workdir, "mnt")
    os.mkdir(mnt)
    with open(fs_image, "wb") as f:
        f.truncate(16 << 20)
    commands.run(["mkfs.ext4", "-q", "-F", fs_image], timeout=60)
    commands.run(["mount", "-o", "loop", fs_image, mnt], timeout=60)
    writer = None
    try:
        disk = make_disk(mnt, "disk.raw", size_mb=2)
        commands.run(["fallocate", "-l", "64M", os.path.join(mnt, "fill")], check=False)
        serial_log = os.path.join(workdir, "serial.log")
        args = guest.writer_params(dev=disk, span_mb=1, count=4, pattern="seq")
        with open(serial_log, "wb") as out:
            writer = subprocess.Popen([artifacts.writer, args], stdout=out)
        _wait_for_text(serial_log, "errno=28")
        assert "ACK" not in _read(serial_log)

        os.unlink(os.path.join(mnt, "fill"))
        assert writer.wait(60) == 0
        result = verifier.verify(serial_log, disk, "raw")
        assert (result.acks, result.lost) == (4, 0)
    finally:
        if writer is not None and writer.poll() is None:
            writer.kill()
            writer.wait()
        commands.run(["umount", mnt], timeout=60)


def _read(path: str) -> str:
    with open(path, errors="replace") as f:
        return f.read()


def _wait_for_text(path: str, text: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while text not in _read(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{text!r} not in {path}: {_read(path)!r}")
        time.sleep(0.1)


def test_acks_between_reads_a_window_of_whole_lines(tmp_path):
    lines = [b"boot\n", b"WRITER START run=1 bs=65536 offset=0 span_blocks=10\n"]
    lines += [f"ACK {i} {i % 10} {i * 10}\n".encode() for i in range(100)]
    lines += [b"WRITER START run=2 bs=65536 offset=0 span_blocks=10\n", b"ACK 0 0 5\n"]
    data = b"".join(lines)
    path = tmp_path / "serial.log"
    path.write_bytes(data + b"ACK 1 1 1")  # a last line without its newline
    at = data.find(b"ACK 50 ")

    assert [a.seq for a in verifier.acks_between(path, at, at + 1)] == [50]
    window = verifier.acks_between(path, at + 1, at + 30)  # from the next whole line
    assert [a.seq for a in window] == [51, 52, 53]
    assert verifier.largest_gap_ms(window) == 10
    # A restart of the writer inside the window is not measured as a gap.
    tail = verifier.acks_between(path, data.find(b"ACK 98 "), len(data) + 9)
    assert [a.seq for a in tail] == [98, 99, 0]
    assert verifier.largest_gap_ms(tail) == 10
