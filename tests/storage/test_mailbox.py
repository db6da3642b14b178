"""storage/mailbox.py: the storage mailbox's layout and message format.

Pure functions, no storage: a message goes through encode/decode unchanged,
an empty slot is empty, and anything else (a flipped bit, a torn write, a
message read where it was not written, a wrong magic behind a good
checksum) is refused as corrupt, never taken for a request.  The I/O and
the protocol on real files and LVs: test_mailbox_io.py.
"""

from __future__ import annotations

import uuid

import pytest

from storage import block_manifest, file_sd, mailbox, mailbox_spm

MiB = 1024**2


def new_id() -> str:
    return str(uuid.uuid4())


def request(**kw: object) -> mailbox.Message:
    fields: dict[str, object] = dict(
        kind=mailbox.REQUEST, host_id=7, slot=3, request_id=new_id(), attempt=2,
        sd_id=new_id(), img_id=new_id(), vol_id=new_id(), size=3 * 1024**4 + 512,
        sent=1712345678.25)
    fields.update(kw)
    return mailbox.Message(**fields)  # type: ignore[arg-type]


def test_layout_fits_250_hosts_in_the_special_files():
    assert mailbox.SLOTS == 8 and mailbox.REQUEST_SLOTS == (1, 2, 3, 4, 5, 6, 7)
    assert mailbox.region_offset(1) == 4096
    assert mailbox.region_offset(250) + mailbox.REGION_SIZE == mailbox.SIZE == 1028096
    # The sizes new domains get: no need to grow them.
    for sizes in (file_sd.SPECIAL_SIZES, block_manifest.SPECIAL_SIZES):
        assert sizes["inbox"] >= mailbox.SIZE and sizes["outbox"] >= mailbox.SIZE
    for bad in (0, 251, -1):
        with pytest.raises(ValueError):
            mailbox.region_offset(bad)


def test_request_round_trip():
    msg = request()
    data = mailbox.encode(msg)
    assert len(data) == mailbox.SLOT_SIZE
    assert mailbox.decode(data, 7, 3) == msg


def test_reply_round_trip_carries_size_times_and_error():
    msg = request()
    ok = msg.reply(5 * MiB, seen=1712345679.5, done=1712345679.75)
    assert mailbox.decode(mailbox.encode(ok), 7, 3) == ok
    assert (ok.kind, ok.status, ok.request_id, ok.size) == (
        mailbox.REPLY, mailbox.OK, msg.request_id, 5 * MiB)
    failed = msg.reply(0, 1.0, 2.0, error="VolumeDoesNotExist", message="Volume x: é" * 40)
    back = mailbox.decode(mailbox.encode(failed), 7, 3)
    assert back is not None and back.status == mailbox.FAILED
    assert back.error == "VolumeDoesNotExist"
    # Long texts are cut to their field, at a character boundary.
    assert failed.message.startswith(back.message)
    assert len(back.message.encode()) <= mailbox.ERROR_MESSAGE_SIZE


def test_hello_round_trip():
    hello = mailbox.Message(mailbox.HELLO, 250, mailbox.HELLO_SLOT, request_id=new_id(),
                            sent=2.5)
    assert mailbox.decode(mailbox.encode(hello), 250, 0) == hello


def test_empty_slot_is_none():
    assert mailbox.decode(mailbox.EMPTY, 1, 1) is None


def test_every_flipped_byte_fails_the_checksum():
    data = mailbox.encode(request())
    for i in range(mailbox.SLOT_SIZE):
        bad = bytearray(data)
        bad[i] ^= 0x10
        with pytest.raises(mailbox.CorruptMessage):
            mailbox.decode(bytes(bad), 7, 3)


def test_torn_write_is_corrupt():
    old = mailbox.encode(request(size=MiB, sent=1.0))
    new = mailbox.encode(request(size=2 * MiB, sent=2.0))
    for cut in (20, 80, 508):  # in the request id, the size, the checksum
        with pytest.raises(mailbox.CorruptMessage, match="checksum"):
            mailbox.decode(new[:cut] + old[cut:], 7, 3)
        with pytest.raises(mailbox.CorruptMessage, match="checksum"):
            mailbox.decode(new[:cut] + bytes(mailbox.SLOT_SIZE - cut), 7, 3)


def test_torn_region_write_leaves_every_sector_checkable():
    """A 4 KiB region written over an older one and torn at a sector
    boundary: each slot is the old or the new message, both valid."""
    old_msgs = [request(host_id=2, slot=s) for s in mailbox.REQUEST_SLOTS]
    new_msgs = [request(host_id=2, slot=s) for s in mailbox.REQUEST_SLOTS]
    old = bytearray(mailbox.REGION_SIZE)
    new = bytearray(mailbox.REGION_SIZE)
    for o, n in zip(old_msgs, new_msgs, strict=True):
        mailbox.put_slot(old, o.slot, mailbox.encode(o))
        mailbox.put_slot(new, n.slot, mailbox.encode(n))
    cut = 4 * mailbox.SLOT_SIZE
    torn = bytes(new[:cut] + old[cut:])
    got = [mailbox.decode(mailbox.slot_of(torn, s), 2, s) for s in mailbox.REQUEST_SLOTS]
    assert got == new_msgs[:3] + old_msgs[3:]


def test_message_read_at_another_place_is_corrupt():
    data = mailbox.encode(request(host_id=7, slot=3))
    with pytest.raises(mailbox.CorruptMessage, match="written for host=7 slot=3"):
        mailbox.decode(data, 7, 4)
    with pytest.raises(mailbox.CorruptMessage, match="written for"):
        mailbox.decode(data, 8, 3)


def test_wrong_magic_version_or_kind_behind_a_good_checksum_is_corrupt():
    import zlib

    def with_byte(offset: int, value: int) -> bytes:
        payload = bytearray(mailbox.encode(request())[:508])
        payload[offset] = value
        return bytes(payload) + zlib.crc32(bytes(payload)).to_bytes(4, "little")

    for offset, value, reason in ((0, ord("X"), "magic"), (4, 9, "version"),
                                  (5, 42, "kind"), (6, 7, "status")):
        with pytest.raises(mailbox.CorruptMessage, match=reason):
            mailbox.decode(with_byte(offset, value), 7, 3)


def test_a_short_slot_is_corrupt():
    with pytest.raises(mailbox.CorruptMessage):
        mailbox.decode(b"\0" * 100, 1, 1)


def test_unknown_kind_is_not_encoded():
    with pytest.raises(ValueError):
        mailbox.encode(request(kind=9))


def test_put_slot_takes_whole_sectors():
    region = bytearray(mailbox.REGION_SIZE)
    with pytest.raises(ValueError):
        mailbox.put_slot(region, 1, b"short")


def test_box_writes_whole_regions_only(tmp_path):
    box = mailbox.Box(str(tmp_path / "inbox"), mailbox.local_ops(), 1.0)
    with pytest.raises(ValueError):
        box.write(1, b"\0" * 512)
    with pytest.raises(ValueError):
        box.write(250, b"\0" * 2 * mailbox.REGION_SIZE)  # past host 250


def test_remote_error_keeps_the_spm_error_name():
    e = mailbox.RemoteError("VolumeDoesNotExist", "Volume v does not exist in domain d")
    assert e.name == "VolumeDoesNotExist"
    assert str(e) == "SPM: Volume v does not exist in domain d"


def test_reply_writes_are_grouped_in_runs():
    assert mailbox_spm._runs([1]) == [(1, 1)]
    assert mailbox_spm._runs([1, 2, 3, 9, 20, 21]) == [(1, 3), (9, 9), (20, 21)]
    assert mailbox_spm._runs([1, 6]) == [(1, 6)]  # a gap of 4 is written through
