"""The storage mailbox: extension requests from HSMs to the SPM over shared storage.

A host that runs a VM but is not the pool's SPM cannot extend a thin volume
itself (only the SPM changes LVM metadata, DESIGN section 9).  It asks the
SPM through two files of the pool's master domain (file domain:
``dom_md/inbox`` and ``dom_md/outbox``; block domain: the LVs ``inbox`` and
``outbox``), so nothing but the shared storage lies between them:

- :mod:`storage.mailbox_hsm` (every connected host): writes a request into
  one of its slots in ``inbox`` and waits for the reply in the same slot of
  ``outbox``;
- :mod:`storage.mailbox_spm` (the SPM only): reads every host's inbox slots,
  runs the extension (the in-process path, :mod:`storage.spm_requests`) and
  writes the reply.

This module is what both share: the layout, the message format and the
direct I/O on the two files.

Layout (both files, 1 MiB each: DESIGN's special sizes are enough)::

    offset  host_id * 4096          the host's region (host ids 1..250)
            + slot * 512            one sector: one message
    inbox   slot 0                  HELLO: the host is connected (written at
                                    pool connect, zeroed at disconnect)
            slots 1..7              REQUEST: extend (sd, img, vol) to size
    outbox  slots 1..7              REPLY to the request in the same slot

Region 0 is unused; host 250's region ends at 1,028,096 bytes.  Each host
writes only its own region of ``inbox`` (always all 4 KiB of it, aligned,
so any logical block size works, 4 KiB sectors too); only the SPM writes
``outbox``.  There is no read-modify-write across hosts and no lock.

Message (one 512-byte sector, little endian)::

    0   magic "LSMB", version 1, kind (HELLO, REQUEST, REPLY), status
        (reply: 0 ok, 1 failed), host id (u16), slot (u8), attempt (u8)
    12  request id (16 bytes, a random UUID)
    28  sd, img, vol (16 bytes each)
    76  size (u64): the size asked for / the size the volume has now
    84  sent (f64, the HSM's wall clock), seen, done (the SPM's, replies)
    108 error name (48 bytes) and message (200 bytes), UTF-8, NUL padded
    508 CRC-32 of bytes 0..507

A message is self-checking: :func:`decode` refuses one whose checksum,
magic, version, kind or position (host id and slot must match where it was
read) is wrong, and an all-zero sector is an empty slot.  A sector is the
unit of atomic writes, and a torn 4 KiB region write leaves every sector
either old or new, each still checkable: a torn or corrupt message is
never acted on (the SPM logs it; the HSM resends).

Requests are idempotent: the SPM remembers the last request id it answered
in each slot and answers a resent request (same id, higher attempt) from
memory at once; a new request for a size the volume already has costs one
``lvs`` and no ``lvextend`` (:meth:`storage.block_volume.BlockVolumes.extend`).
Requests live on storage, so an SPM that takes over serves the requests
still waiting there.

Latency, where the time goes: the mailbox must cost little next to the
extension itself.  Measured by contrib/bench/bench_mailbox.py on the
development machine (2 cores, block domain on loop devices, loop
activation, lvm2 2.03, the daemon's default timing; p50 / p99 in ms over
24 extensions, from the threshold event to the volume refreshed)::

    VM on the SPM (in-process)                   185 / 216
      extend: lvs + lvextend + lvs (read back)   143 / 167
      refresh (lvs + loop size limit)             41 /  53
    VM on another host (this mailbox)            201 / 257
      request -> reply                           142 / 203
        SPM poll wait                             12 /  68
        SPM work (the same extend)               122 / 153
        reply wait                                 7 /  11
      refresh on the VM's host                    56 /  74
    first request after the SPM idled            224 / 303 (poll wait 36 / 78)

So the mailbox adds ~15 ms at p50 to the in-process path.  What would
cost more, and is designed out: a reply that waits for a poll interval
(the HSM polls its own 4 KiB only while a request is out, every 10 ms:
VDSM's HSM waits for its 2 s monitor interval); an SPM that polls slowly
(0.02 s while requests flow, 0.1 s idle: the first request of a burst
waits 0.05 s on average); replies batched to the next cycle (each is
written when its extension ends); a resend that runs the extension again
(answered from memory).  What is left is the LVM work, the same as in
process: three lvm2 commands on the SPM and one on the VM's host, ~45 ms
each.  (Two of them could go: the SPM's read-back ``lvs`` after a
successful ``lvextend``, and in loop mode the HSM's ``lvs`` before raising
the loop size limit to the size the reply carries.)

The scan of many hosts is bounded as :mod:`storage.mailbox_spm` says; the
same benchmark's scale figures (simulated hosts, two requests out each, a
no-op extension): 64 hosts ~1,800-2,100 extensions/s, p99 ~150-200 ms;
250 hosts ~700-780/s, p99 ~1.0-1.2 s, the SPM's extension workers being the
queue (two oop round trips per extension, on cores shared with the
simulated hosts).
"""

from __future__ import annotations

import dataclasses
import struct
import uuid
import zlib
from collections.abc import Callable

from storage import errors, oop

REGION_SIZE = 4096
SLOT_SIZE = 512
SLOTS = REGION_SIZE // SLOT_SIZE
HELLO_SLOT = 0
REQUEST_SLOTS = tuple(range(1, SLOTS))
MAX_HOST_ID = 250
SIZE = (MAX_HOST_ID + 1) * REGION_SIZE

MAGIC = b"LSMB"
VERSION = 1
HELLO = 1
REQUEST = 2
REPLY = 3
KINDS = (HELLO, REQUEST, REPLY)
OK = 0
FAILED = 1

_HEAD = struct.Struct("<4sBBBxHBB16s16s16s16sQddd48s200s")
_CRC = struct.Struct("<I")
_PAYLOAD = SLOT_SIZE - _CRC.size
EMPTY = bytes(SLOT_SIZE)
ERROR_NAME_SIZE = 48
ERROR_MESSAGE_SIZE = 200


@dataclasses.dataclass(frozen=True)
class Settings:
    """The mailbox's timing ([mailbox] in the daemon's config).

    idle_interval: the SPM's poll period while no request came for
    busy_linger seconds; busy_interval: while they do.  reply_interval: the
    HSM's poll of its own outbox region while it has a request out.
    retry_interval: an unanswered request is written again after this long;
    request_timeout: the caller gives up (SpmRequestUnavailable) after it.
    workers: extensions the SPM runs at once.  io_timeout: a mailbox read
    or write that takes longer fails (oop; a hung NFS master domain).
    """

    idle_interval: float = 0.1
    busy_interval: float = 0.02
    busy_linger: float = 5.0
    full_scan_interval: float = 5.0
    reply_interval: float = 0.01
    retry_interval: float = 2.0
    request_timeout: float = 20.0
    workers: int = 8
    io_timeout: float = 10.0


@dataclasses.dataclass(frozen=True)
class Services:
    """What a pool runs its mailbox with: the settings, and the SPM's
    in-process extension ``extend(pool_id, sd_id, img_id, vol_id, size)``
    (its size afterwards; storage.spm_requests)."""

    settings: Settings
    extend: Callable[[str, str, str, str, int], int]


@dataclasses.dataclass(frozen=True)
class Message:
    kind: int
    host_id: int
    slot: int
    request_id: str = ""
    attempt: int = 0
    sd_id: str = ""
    img_id: str = ""
    vol_id: str = ""
    size: int = 0
    sent: float = 0.0
    seen: float = 0.0
    done: float = 0.0
    status: int = OK
    error: str = ""
    message: str = ""

    def reply(self, size: int, seen: float, done: float, error: str = "",
              message: str = "") -> Message:
        """The reply to this request: the size reached, or (error) failed."""
        return dataclasses.replace(
            self, kind=REPLY, size=size, seen=seen, done=done,
            status=FAILED if error else OK, error=error, message=message)

    def same_request(self, other: Message) -> bool:
        return self.request_id == other.request_id

    def __str__(self) -> str:
        return (f"host={self.host_id} slot={self.slot} id={self.request_id} "
                f"attempt={self.attempt} sd={self.sd_id} img={self.img_id} "
                f"vol={self.vol_id} size={self.size}")


class CorruptMessage(Exception):
    """A slot that is neither empty nor a valid message (torn or corrupt)."""

    def __init__(self, host_id: int, slot: int, reason: str) -> None:
        self.host_id, self.slot, self.reason = host_id, slot, reason
        super().__init__(f"host={host_id} slot={slot}: {reason}")


class RemoteError(errors.Error):
    """The error the SPM answered a request with: its name (so its code)
    and its message."""

    msg = "SPM: {message}"

    def __init__(self, name: str, message: str) -> None:
        super().__init__(message=message)
        self.name = name


def _uuid_bytes(value: str) -> bytes:
    return uuid.UUID(value).bytes if value else bytes(16)


def _uuid_text(value: bytes) -> str:
    return str(uuid.UUID(bytes=value)) if any(value) else ""


def _text(value: str, size: int) -> bytes:
    data = value.encode("utf-8")[:size]
    # Cut at a character boundary.
    return data.decode("utf-8", "ignore").encode("utf-8")


def encode(msg: Message) -> bytes:
    """The message as one sector, checksum last."""
    if msg.kind not in KINDS:
        raise ValueError(f"unknown message kind {msg.kind}")
    head = _HEAD.pack(
        MAGIC, VERSION, msg.kind, msg.status, msg.host_id, msg.slot, msg.attempt % 256,
        _uuid_bytes(msg.request_id), _uuid_bytes(msg.sd_id), _uuid_bytes(msg.img_id),
        _uuid_bytes(msg.vol_id), msg.size, msg.sent, msg.seen, msg.done,
        _text(msg.error, ERROR_NAME_SIZE), _text(msg.message, ERROR_MESSAGE_SIZE))
    payload = head.ljust(_PAYLOAD, b"\0")
    return payload + _CRC.pack(zlib.crc32(payload))


def decode(data: bytes, host_id: int, slot: int) -> Message | None:
    """The message of the sector read at (host_id, slot); None if the slot
    is empty; CorruptMessage if it is neither."""
    if len(data) != SLOT_SIZE:
        raise CorruptMessage(host_id, slot, f"{len(data)} bytes")
    if data == EMPTY:
        return None
    payload = data[:_PAYLOAD]
    (crc,) = _CRC.unpack_from(data, _PAYLOAD)
    if zlib.crc32(payload) != crc:
        raise CorruptMessage(host_id, slot, "bad checksum")
    (magic, version, kind, status, msg_host, msg_slot, attempt, request_id, sd_id, img_id,
     vol_id, size, sent, seen, done, error, message) = _HEAD.unpack_from(payload)
    if magic != MAGIC or version != VERSION:
        raise CorruptMessage(host_id, slot, f"magic {magic!r} version {version}")
    if kind not in KINDS or status not in (OK, FAILED):
        raise CorruptMessage(host_id, slot, f"kind {kind} status {status}")
    if (msg_host, msg_slot) != (host_id, slot):
        raise CorruptMessage(host_id, slot, f"written for host={msg_host} slot={msg_slot}")
    return Message(
        kind=kind, host_id=msg_host, slot=msg_slot, request_id=_uuid_text(request_id),
        attempt=attempt, sd_id=_uuid_text(sd_id), img_id=_uuid_text(img_id),
        vol_id=_uuid_text(vol_id), size=size, sent=sent, seen=seen, done=done, status=status,
        error=error.rstrip(b"\0").decode("utf-8", "replace"),
        message=message.rstrip(b"\0").decode("utf-8", "replace"))


def region_offset(host_id: int) -> int:
    check_host_id(host_id)
    return host_id * REGION_SIZE


def check_host_id(host_id: int) -> None:
    if not 1 <= host_id <= MAX_HOST_ID:
        raise ValueError(f"host id must be 1..{MAX_HOST_ID}: {host_id}")


def slot_of(region: bytes | bytearray | memoryview, slot: int) -> bytes:
    return bytes(region[slot * SLOT_SIZE:(slot + 1) * SLOT_SIZE])


def put_slot(region: bytearray | memoryview, slot: int, data: bytes) -> None:
    if len(data) != SLOT_SIZE:
        raise ValueError(f"a slot is {SLOT_SIZE} bytes, not {len(data)}")
    region[slot * SLOT_SIZE:(slot + 1) * SLOT_SIZE] = data


class Box:
    """One mailbox file (``inbox`` or ``outbox``): whole host regions, read
    and written with direct I/O (another host writes it: never the page
    cache) through ops (an oop pool of the mailbox's own, so a hung
    master domain fails a call after io_timeout and never blocks the
    daemon's other file operations)."""

    def __init__(self, path: str, ops: oop.FileOps, io_timeout: float,
                 owns_ops: bool = False) -> None:
        self.path = path
        self.ops = ops
        self.io_timeout = io_timeout
        self.owns_ops = owns_ops

    def __repr__(self) -> str:
        return f"<Box {self.path}>"

    def read(self, first: int, last: int) -> bytes:
        """The regions of host ids first..last, in one read."""
        check_host_id(first)
        check_host_id(last)
        size = (last - first + 1) * REGION_SIZE
        data = self.ops.read_direct(self.path, first * REGION_SIZE, size,
                                    timeout=self.io_timeout)
        if len(data) != size:
            raise errors.OopError(op="read_direct", path=self.path,
                                  reason=f"short read {len(data)} of {size}")
        return data

    def write(self, first: int, data: bytes) -> None:
        """Whole regions from host id first on, in one write."""
        if not data or len(data) % REGION_SIZE:
            raise ValueError(f"not whole regions: {len(data)} bytes")
        check_host_id(first)
        check_host_id(first + len(data) // REGION_SIZE - 1)
        self.ops.write_direct(self.path, first * REGION_SIZE, data, timeout=self.io_timeout)


    def close(self) -> None:
        """Stop the file operations' helpers if they are this box's own."""
        if self.owns_ops and isinstance(self.ops, oop.Pool):
            self.ops.close()


def open_boxes(paths: tuple[str, str], settings: Settings, name: str) -> tuple[Box, Box]:
    """(inbox, outbox) at paths, over one oop pool of their own (two
    helpers: a poll never waits behind the daemon's other file operations,
    nor a reply behind a poll); closed with the boxes."""
    ops = oop.Pool(max_workers=2, timeout=settings.io_timeout, name=name)
    return (Box(paths[0], ops, settings.io_timeout, owns_ops=True),
            Box(paths[1], ops, settings.io_timeout, owns_ops=True))


def local_ops() -> oop.FileOps:
    """Direct I/O in this process (simulated hosts of the benchmark, tests)."""
    return oop.InProcess()

