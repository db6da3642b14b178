"""Prove that every write the test guest acknowledged is on a disk image.

The guest's writer (``contrib/guest/writer.c``) logs on its serial console::

    WRITER START run=<id> dev=/dev/vda bs=<bytes> offset=<bytes> span_blocks=<n> ...
    ACK <seq> <block> <guest-monotonic-ms>

and each block it writes describes itself (magic, seq, block index, run id,
block size, crc32 of the block). For every block index the verifier takes the
last acknowledged seq, reads the blocks from the image (or chain) through
``qemu-img dd -U`` (never by parsing qcow2), and accepts a block when it
holds that write or a later self-consistent one: valid checksum, the right
block index, and a seq at least the acknowledged one (or a write of a later
run in the same log).

Usage::

    python -m contrib.guest.verifier --log SERIAL.log --image PATH [--format qcow2]

prints ``verified N blocks, M lost`` and exits 1 on loss (the lost blocks are
listed on stderr), 2 when it cannot verify at all.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import re
import stat
import struct
import sys
import tempfile
import time
import zlib
from collections.abc import Callable, Sequence

from storage import commands
from storage import errors as storage_errors

log = logging.getLogger("contrib.guest.verifier")

MAGIC = b"LSMBLK1\0"
HEADER_VERSION = 1
# magic, seq, block, run, block size, version, ms, reserved, crc32, reserved
HEADER = struct.Struct("<8sQQQIIQQII")
CRC_OFFSET = 56
DEFAULT_BLOCK_SIZE = 65536
QEMU_IMG_TIMEOUT = 300.0

_ACK_RE = re.compile(rb"^ACK (\d+) (\d+) (\d+)$")
_START_RE = re.compile(rb"^WRITER START (.*)$")
_GARBLED_ACK_RE = re.compile(rb"ACK \d")


@dataclasses.dataclass(frozen=True)
class Ack:
    seq: int
    block: int
    ms: int
    run: int  # index into SerialLog.runs, -1 before any WRITER START


@dataclasses.dataclass(frozen=True)
class Run:
    run_id: int
    block_size: int
    offset: int
    span_blocks: int
    params: dict[str, str]


@dataclasses.dataclass
class SerialLog:
    runs: list[Run]
    acks: list[Ack]
    garbled: int  # lines mentioning ACK that did not parse
    text: str  # the complete lines, decoded, for diagnostics

    def last_acked(self) -> dict[int, Ack]:
        """The last acknowledged write of each block index."""
        last: dict[int, Ack] = {}
        for ack in self.acks:
            last[ack.block] = ack
        return last


@dataclasses.dataclass(frozen=True)
class Block:
    seq: int
    block: int
    run_id: int
    block_size: int
    ms: int


@dataclasses.dataclass(frozen=True)
class LostBlock:
    block: int
    acked_seq: int
    reason: str

    def __str__(self) -> str:
        return f"block {self.block} (acked seq {self.acked_seq}): {self.reason}"


@dataclasses.dataclass
class Result:
    verified: int
    lost: int
    details: list[LostBlock]
    acks: int = 0
    garbled: int = 0

    @property
    def ok(self) -> bool:
        return self.lost == 0

    def __str__(self) -> str:
        return f"verified {self.verified} blocks, {self.lost} lost"


LogPaths = str | os.PathLike[str] | Sequence[str | os.PathLike[str]]


def parse_log(serial_log_path: LogPaths) -> SerialLog:
    """Parse a serial log; a last line without its newline is ignored.

    Several paths are one console in turn (a VM that migrated wrote its
    console on each host): read as if concatenated, so a line the first
    host's log ends within continues in the next one's.
    """
    paths = ([serial_log_path] if isinstance(serial_log_path, (str, os.PathLike))
             else list(serial_log_path))
    data = b""
    for path in paths:
        with open(path, "rb") as f:
            data += f.read()
    end = data.rfind(b"\n")
    return _parse(data[: end + 1] if end >= 0 else b"")


def _parse(complete: bytes) -> SerialLog:
    """The runs and ACKs of whole lines of a serial log."""
    runs: list[Run] = []
    acks: list[Ack] = []
    garbled = 0
    for raw in complete.split(b"\n"):
        line = raw.strip(b"\r")
        m = _ACK_RE.match(line)
        if m:
            acks.append(Ack(int(m[1]), int(m[2]), int(m[3]), len(runs) - 1))
            continue
        m = _START_RE.match(line)
        if m:
            run = _parse_start(m[1].decode("ascii", "replace"))
            if run is not None:
                runs.append(run)
                continue
        if _GARBLED_ACK_RE.search(line):
            garbled += 1
    return SerialLog(runs, acks, garbled, complete.decode("utf-8", "replace"))


def acks_between(serial_log_path: str | os.PathLike[str], start: int, end: int) -> list[Ack]:
    """The ACKs logged between byte offsets start and end of a serial log.

    For a window of the log noted while the guest runs (its size at two
    moments): the line start falls within is skipped unless start is 0, the
    line end falls within is kept when complete.  The ACKs' run indexes
    count from the window's start, so :func:`largest_gap_ms` never measures
    across a restart of the writer.
    """
    with open(serial_log_path, "rb") as f:
        f.seek(max(start - 1, 0))
        data = f.read(end - max(start - 1, 0) + 4096)
    if start > 0:
        # data begins with the byte before start: a newline there means start
        # is the first byte of a line.
        data = data[data.find(b"\n") + 1:]
    stop = data.find(b"\n", max(end - start, 0))
    return _parse(data[: stop + 1] if stop >= 0 else data[: data.rfind(b"\n") + 1]).acks


def _parse_start(text: str) -> Run | None:
    params = dict(word.split("=", 1) for word in text.split() if "=" in word)
    try:
        return Run(
            run_id=int(params["run"]),
            block_size=int(params["bs"]),
            offset=int(params["offset"]),
            span_blocks=int(params["span_blocks"]),
            params=params,
        )
    except (KeyError, ValueError):
        return None


def decode_block(data: bytes) -> Block | None:
    """The header of a self-consistent block, or None (bad magic or checksum)."""
    if len(data) < HEADER.size or not data.startswith(MAGIC):
        return None
    _, seq, block, run_id, block_size, version, ms, _, crc, _ = HEADER.unpack_from(data)
    if version != HEADER_VERSION or block_size != len(data):
        return None
    computed = zlib.crc32(data[:CRC_OFFSET])
    computed = zlib.crc32(b"\0\0\0\0", computed)
    computed = zlib.crc32(memoryview(data)[CRC_OFFSET + 4 :], computed)
    if computed != crc:
        return None
    return Block(seq, block, run_id, block_size, ms)


def verify(
    serial_log_path: LogPaths,
    image_path: str | os.PathLike[str],
    image_format: str | None = None,
    span_offset: int | None = None,
    block_size: int | None = None,
    tmp_dir: str | None = None,
) -> Result:
    """Check every block's last acknowledged write against the image.

    image_path is the image (for a chain, its top: qemu-img follows the
    backing chain). span_offset (bytes) and block_size default to the values
    in the log's WRITER START line, else to 0 and 64 KiB.
    """
    serial = parse_log(serial_log_path)
    if serial.runs:
        geometry = {(r.block_size, r.offset) for r in serial.runs}
        if len(geometry) > 1 and (span_offset is None or block_size is None):
            raise ValueError(f"runs with different geometry in {serial_log_path}: {geometry}")
        last_run = serial.runs[-1]
        if span_offset is None:
            span_offset = last_run.offset
        if block_size is None:
            block_size = last_run.block_size
    span_offset = 0 if span_offset is None else span_offset
    block_size = DEFAULT_BLOCK_SIZE if block_size is None else block_size

    last = serial.last_acked()
    result = Result(0, 0, [], acks=len(serial.acks), garbled=serial.garbled)
    if not last:
        log.warning("No ACK lines in log=%s", serial_log_path)
        return result

    # Order of runs in the log: a block rewritten by a later run is newer.
    run_order = {run.run_id: i for i, run in enumerate(serial.runs)}
    nblocks = max(last) + 1
    with tempfile.TemporaryDirectory(prefix="verify-", dir=tmp_dir) as tmp:
        raw = os.path.join(tmp, "span.raw")
        _read_span(image_path, image_format, span_offset, block_size * nblocks, raw)
        with open(raw, "rb") as f:
            for index in sorted(last):
                ack = last[index]
                f.seek(index * block_size)
                data = f.read(block_size)
                reason = _check(data, index, ack, block_size, serial.runs, run_order)
                if reason is None:
                    result.verified += 1
                else:
                    result.lost += 1
                    result.details.append(LostBlock(index, ack.seq, reason))
    log.info(
        "Verified log=%s image=%s acks=%d verified=%d lost=%d",
        serial_log_path,
        image_path,
        result.acks,
        result.verified,
        result.lost,
    )
    return result


def _check(
    data: bytes,
    index: int,
    ack: Ack,
    block_size: int,
    runs: Sequence[Run],
    run_order: dict[int, int],
) -> str | None:
    """Why data does not hold ack's write or a later one; None if it does."""
    if len(data) < block_size:
        return "beyond the end of the image"
    found = decode_block(data)
    if found is None:
        if not data.startswith(MAGIC):
            return "no block header (never written or overwritten)"
        return "checksum mismatch (torn or corrupted block)"
    if found.block != index:
        return f"holds block {found.block} (seq {found.seq})"
    if ack.run < 0:
        # No WRITER START before this ACK: no run to compare with.
        return None if found.seq >= ack.seq else f"holds older seq {found.seq}"
    acked_order = ack.run
    found_order = run_order.get(found.run_id)
    if found_order is None:
        return f"holds seq {found.seq} of run {found.run_id}, not in the log"
    if found_order < acked_order:
        return f"holds seq {found.seq} of an earlier run {found.run_id}"
    if found_order == acked_order and found.seq < ack.seq:
        return f"holds older seq {found.seq}"
    return None


def _read_span(
    image_path: str | os.PathLike[str],
    image_format: str | None,
    offset: int,
    length: int,
    out_path: str,
) -> None:
    """Copy [offset, offset+length) of the image's guest view into a raw file.

    qemu-img reads the image and its backing chain, sharing it with a
    running QEMU (-U); a raw node with offset and size on top of the image
    selects the span. The output is shorter when the image ends earlier.
    """
    path = os.fspath(image_path)
    info = json.loads(
        commands.run(
            ["qemu-img", "info", "-U", "--output", "json", *_format_args(image_format), path],
            timeout=QEMU_IMG_TIMEOUT,
        ).stdout
    )
    fmt = image_format or info["format"]
    length = max(0, min(length, info["virtual-size"] - offset))
    if length == 0:
        open(out_path, "wb").close()
        return
    protocol = "host_device" if stat.S_ISBLK(os.stat(path).st_mode) else "file"
    opts = ",".join(
        [
            "driver=raw",
            f"offset={offset}",
            f"size={length}",
            f"file.driver={fmt}",
            f"file.file.driver={protocol}",
            f"file.file.filename={path.replace(',', ',,')}",
        ]
    )
    commands.run(
        ["qemu-img", "convert", "-U", "--image-opts", opts, "-O", "raw", out_path],
        timeout=QEMU_IMG_TIMEOUT,
    )


def _format_args(image_format: str | None) -> list[str]:
    return ["-f", image_format] if image_format else []


def largest_gap_ms(acks: Sequence[Ack]) -> int:
    """The largest interval between consecutive ACKs of one run (guest ms)."""
    gap = 0
    for prev, cur in zip(acks, acks[1:], strict=False):
        if prev.run == cur.run:
            gap = max(gap, cur.ms - prev.ms)
    return gap


def wait_for_acks(
    serial_log_path: str | os.PathLike[str],
    count: int,
    timeout: float,
    alive: Callable[[], bool] | None = None,
    interval: float = 0.2,
) -> SerialLog:
    """Poll the serial log until it holds count ACK lines; return it parsed.

    Raises TimeoutError after timeout seconds, and RuntimeError at once when
    the guest reports an error or alive() says the guest is gone; both carry
    the tail of the log.
    """
    deadline = time.monotonic() + timeout
    while True:
        serial = parse_log(serial_log_path) if os.path.exists(serial_log_path) else None
        if serial is not None and len(serial.acks) >= count:
            return serial
        text = serial.text if serial else ""
        if "GUEST ERROR" in text or re.search(r"GUEST WRITER EXITED rc=[1-9]", text):
            raise RuntimeError(f"guest failed; log tail:\n{_tail(text)}")
        if alive is not None and not alive():
            raise RuntimeError(f"guest is gone; log tail:\n{_tail(text)}")
        if time.monotonic() > deadline:
            got = len(serial.acks) if serial else 0
            raise TimeoutError(
                f"{got}/{count} ACKs in {serial_log_path} after {timeout}s; "
                f"log tail:\n{_tail(text)}"
            )
        time.sleep(interval)


def _tail(text: str, lines: int = 20) -> str:
    return "\n".join(text.rstrip("\n").splitlines()[-lines:])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m contrib.guest.verifier",
        description="Prove every write the test guest acknowledged is on the image.",
    )
    parser.add_argument("--log", required=True, action="append",
                        help="the guest's serial log (again for a VM that migrated: each "
                        "host's log, in order)")
    parser.add_argument("--image", required=True, help="the image, or the top of its chain")
    parser.add_argument("--format", help="image format (qcow2, raw); probed when omitted")
    parser.add_argument("--offset", type=int, help="span offset in bytes (default: from log)")
    parser.add_argument("--block-size", type=int, help="block size (default: from log)")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        result = verify(args.log, args.image, args.format, args.offset, args.block_size)
    except (OSError, ValueError, storage_errors.Error) as e:
        print(f"verifier: cannot verify: {e}", file=sys.stderr)
        return 2
    for lost in result.details:
        print(f"lost {lost}", file=sys.stderr)
    if result.garbled:
        print(f"warning: {result.garbled} garbled ACK lines ignored", file=sys.stderr)
    print(result)
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
