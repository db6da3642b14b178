"""The real test guest under QEMU (TCG): it boots, writes, and the verifier agrees."""

from __future__ import annotations

import collections.abc
import dataclasses
import os
import shutil
import subprocess
import sys

import pytest

from contrib import guest
from contrib.guest import qemu, verifier
from storage import commands

pytestmark = pytest.mark.guest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ACKS = 200
BOOT_TIMEOUT = 240  # generous: TCG on a busy machine


@dataclasses.dataclass
class Booted:
    image: str
    serial_log: str
    serial: verifier.SerialLog
    live_result: verifier.Result  # verified while QEMU still had the image open


def create_qcow2(path: str, size: str = "128M", backing: str | None = None) -> None:
    cmd = ["qemu-img", "create", "-q", "-f", "qcow2"]
    if backing:
        cmd += ["-b", backing, "-F", "qcow2"]
    commands.run([*cmd, path, size], timeout=60)


@pytest.fixture(scope="module")
def booted(artifacts: guest.Artifacts, module_workdir: str) -> collections.abc.Iterator[Booted]:
    """One boot of the guest that wrote ACKS blocks (then QEMU was stopped)."""
    image = os.path.join(module_workdir, "disk.qcow2")
    serial_log = os.path.join(module_workdir, "serial.log")
    create_qcow2(image)
    args = guest.kernel_args(count=ACKS, span_mb=16)
    with qemu.Guest(artifacts, image, "qcow2", serial_log, args) as g:
        serial = verifier.wait_for_acks(serial_log, ACKS, timeout=BOOT_TIMEOUT, alive=g.alive)
        live_result = verifier.verify(serial_log, image, "qcow2")
    yield Booted(image, serial_log, serial, live_result)


def test_guest_boots_and_logs_its_writes(booted: Booted) -> None:
    with open(booted.serial_log, errors="replace") as f:
        text = f.read()
    assert "GUEST READY dev=/dev/vda" in text
    assert len(booted.serial.runs) == 1
    run = booted.serial.runs[0]
    assert (run.block_size, run.offset, run.span_blocks) == (65536, 0, 256)
    seqs = [ack.seq for ack in booted.serial.acks]
    assert seqs[:ACKS] == list(range(1, ACKS + 1))
    assert all(0 <= ack.block < 256 for ack in booted.serial.acks)


def test_every_acked_write_is_on_the_image(booted: Booted) -> None:
    result = verifier.verify(booted.serial_log, booted.image, "qcow2")

    assert result.lost == 0, result.details
    assert result.verified == len({ack.block for ack in booted.serial.acks})


def test_image_in_use_by_the_guest_is_verified(booted: Booted) -> None:
    # qemu-img shares the image with the running QEMU (-U).
    assert booted.live_result.lost == 0, booted.live_result.details
    assert booted.live_result.acks >= ACKS


def test_corrupted_block_is_reported_lost(booted: Booted, workdir: str) -> None:
    image = os.path.join(workdir, "corrupt.qcow2")
    shutil.copyfile(booted.image, image)
    victim = booted.serial.last_acked()[booted.serial.acks[0].block]
    offset = victim.block * 65536 + 4096
    commands.run(["qemu-io", "-f", "qcow2", "-c", f"write -P 0x5a {offset} 4k", image], timeout=60)

    res = subprocess.run(
        [
            sys.executable, "-m", "contrib.guest.verifier",
            "--log", booted.serial_log, "--image", image, "--format", "qcow2",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )  # fmt: skip

    assert res.returncode == 1
    assert res.stdout.strip().endswith(", 1 lost")
    assert f"block {victim.block} (acked seq {victim.seq})" in res.stderr
    assert "checksum mismatch" in res.stderr


def test_truncated_last_log_line_is_ignored(booted: Booted, workdir: str) -> None:
    serial_log = os.path.join(workdir, "serial.log")
    shutil.copyfile(booted.serial_log, serial_log)
    last = booted.serial.acks[-1]
    with open(serial_log, "a") as f:
        # Cut while the guest was acknowledging a write that never happened.
        f.write(f"ACK {last.seq + 1000} {last.block} {last.ms}")

    result = verifier.verify(serial_log, booted.image, "qcow2")

    assert result.acks == len(booted.serial.acks)
    assert result.lost == 0


def test_verifier_reads_through_the_backing_chain(
    artifacts: guest.Artifacts, booted: Booted, workdir: str
) -> None:
    # A second boot writes a new run into an overlay: together, the two
    # logs are proved against the chain base <- overlay.
    base = os.path.join(workdir, "base.qcow2")
    overlay = os.path.join(workdir, "overlay.qcow2")
    shutil.copyfile(booted.image, base)
    create_qcow2(overlay, backing="base.qcow2")
    second_log = os.path.join(workdir, "second.log")
    args = guest.kernel_args(count=50, span_mb=16, pattern="seq", poweroff=True)
    with qemu.Guest(artifacts, overlay, "qcow2", second_log, args) as g:
        # The guest powers itself off after its 50 writes.
        assert g.wait(BOOT_TIMEOUT) == 0
    assert "WRITER DONE count=50" in verifier.parse_log(second_log).text

    both = os.path.join(workdir, "both.log")
    with open(both, "wb") as out:
        for path in (booted.serial_log, second_log):
            with open(path, "rb") as f:
                out.write(f.read())

    result = verifier.verify(both, overlay, "qcow2")
    assert result.lost == 0, result.details
    # The base alone lacks the second run's writes.
    stale = verifier.verify(both, base, "qcow2")
    assert stale.lost > 0
