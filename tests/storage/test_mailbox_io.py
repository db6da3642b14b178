"""The storage mailbox on real storage: direct I/O on files and on LVs.

:class:`storage.mailbox_spm.SpmMailbox` and
:class:`storage.mailbox_hsm.HsmMailbox` talk through two real files under
/var/tmp (O_DIRECT, through oop helpers or in-process) with an extension
function the test controls: served requests, several at once from one
host, a resend answered from memory, a torn request ignored and its resend
served, requests left by a dead SPM served by the next, timeouts, errors
and the used range of the scan.  Then two storage providers as two hosts
(tests/storage/test_roles.py's way) with the mailbox in a file master's
``dom_md`` and in a block master's LVs: the HSM's ``extend`` of a thin
volume runs on the SPM and the HSM's refresh sees it.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator

import pytest

from storage import errors, mailbox, mailbox_hsm, mailbox_spm, sd
from tests.storage.conftest import requires_root
from tests.storage.domain_helpers import create_volume, make_pool, new_id

pytest_plugins = ["tests.storage.domain_fixtures"]

MiB = 1024**2
BLANK = sd.BLANK_UUID
FAST = mailbox.Settings(idle_interval=0.02, busy_interval=0.01, full_scan_interval=0.2,
                        reply_interval=0.005, retry_interval=0.3, request_timeout=10.0,
                        workers=8, io_timeout=5.0)


class FakeExtend:
    """The SPM's extension: records calls, answers max(size, known size);
    blocks while gate is clear; raises error if set."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, str, int]] = []
        self.sizes: dict[str, int] = {}
        self.gate = threading.Event()
        self.gate.set()
        self.error: Exception | None = None
        self.running = 0
        self.most = 0
        self._lock = threading.Lock()

    def __call__(self, sd_id: str, img_id: str, vol_id: str, size: int) -> int:
        with self._lock:
            self.calls.append((sd_id, img_id, vol_id, size))
            self.running += 1
            self.most = max(self.most, self.running)
        try:
            self.gate.wait(30)
            if self.error is not None:
                raise self.error
            with self._lock:
                self.sizes[vol_id] = max(self.sizes.get(vol_id, 0), size)
                return self.sizes[vol_id]
        finally:
            with self._lock:
                self.running -= 1


class Files:
    """inbox and outbox files (1 MiB, zeros) and the mailboxes on them."""

    def __init__(self, root: str) -> None:
        self.paths = (os.path.join(root, "inbox"), os.path.join(root, "outbox"))
        for path in self.paths:
            with open(path, "wb") as f:
                f.truncate(MiB)
        self.extend = FakeExtend()
        self.started: list[mailbox_spm.SpmMailbox | mailbox_hsm.HsmMailbox] = []

    def boxes(self, box: type[mailbox.Box] = mailbox.Box) -> tuple[mailbox.Box, mailbox.Box]:
        ops = mailbox.local_ops()
        return box(self.paths[0], ops, 5.0), mailbox.Box(self.paths[1], ops, 5.0)

    def spm(self, settings: mailbox.Settings = FAST) -> mailbox_spm.SpmMailbox:
        inbox, outbox = mailbox.open_boxes(self.paths, settings, "test-spm")  # oop helpers
        spm = mailbox_spm.SpmMailbox("test", inbox, outbox, self.extend, settings).start()
        self.started.append(spm)
        return spm

    def hsm(self, host_id: int, settings: mailbox.Settings = FAST,
            box: type[mailbox.Box] = mailbox.Box) -> mailbox_hsm.HsmMailbox:
        client = mailbox_hsm.HsmMailbox("pool", host_id, *self.boxes(box), settings).start()
        self.started.append(client)
        return client

    def region(self, which: int, host_id: int) -> bytes:
        return mailbox.Box(self.paths[which], mailbox.local_ops(), 5.0).read(host_id, host_id)

    def stop(self, m: mailbox_spm.SpmMailbox | mailbox_hsm.HsmMailbox, **kw: bool) -> None:
        self.started.remove(m)
        m.stop(**kw)


@pytest.fixture
def files(storage_tmpdir: str) -> Iterator[Files]:
    f = Files(storage_tmpdir)
    try:
        yield f
    finally:
        f.extend.gate.set()
        for m in reversed(f.started):
            m.stop()


def ids() -> tuple[str, str, str]:
    return str(uuid.uuid4()), str(uuid.uuid4()), str(uuid.uuid4())


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def in_thread(fn: Callable[[], object]) -> tuple[threading.Thread, list[object]]:
    out: list[object] = []

    def run() -> None:
        try:
            out.append(fn())
        except Exception as e:  # the test asserts on it
            out.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, out


def test_request_is_served_and_both_slots_emptied(files):
    files.spm()
    hsm = files.hsm(2)
    sd_id, img_id, vol_id = ids()
    result = hsm.extend_timed(sd_id, img_id, vol_id, 24 * MiB)
    assert result.size == 24 * MiB and result.attempts == 1
    assert files.extend.calls == [(sd_id, img_id, vol_id, 24 * MiB)]
    assert 0 < result.total < 1.0 and result.seen >= result.sent and result.done >= result.seen
    # The HSM frees its slot (its HELLO stays); the SPM then frees the reply.
    def freed() -> bool:
        inbox = files.region(0, 2)
        return all(mailbox.slot_of(inbox, s) == mailbox.EMPTY for s in mailbox.REQUEST_SLOTS)

    wait_for(freed, what="request freed")
    hello = mailbox.decode(mailbox.slot_of(files.region(0, 2), 0), 2, 0)
    assert hello is not None and hello.kind == mailbox.HELLO
    wait_for(lambda: files.region(1, 2) == bytes(mailbox.REGION_SIZE), what="reply freed")


def test_several_requests_of_one_host_wait_at_once(files):
    """Seven slots per host: seven extensions run together on the SPM, an
    eighth request waits for a free slot, and all are served."""
    files.spm()
    hsm = files.hsm(3)
    files.extend.gate.clear()
    vols = [ids() for _ in range(8)]
    threads = [in_thread(lambda v=v: hsm.extend(*v, 8 * MiB)) for v in vols]
    wait_for(lambda: files.extend.running == 7, what="seven extensions running")
    time.sleep(0.1)
    assert files.extend.running == 7 and hsm.outstanding() == 7
    files.extend.gate.set()
    for t, _ in threads:
        t.join(10)
    assert [out for _, out in threads] == [[8 * MiB]] * 8
    assert sorted(c[2] for c in files.extend.calls) == sorted(v[2] for v in vols)
    assert files.extend.most == 7


def test_resent_request_is_answered_again_from_memory(files):
    spm = files.spm()
    host = 4
    inbox, outbox = files.boxes()
    msg = mailbox.Message(mailbox.REQUEST, host, 1, request_id=new_id(), sd_id=new_id(),
                          img_id=new_id(), vol_id=new_id(), size=16 * MiB, sent=time.time())
    region = bytearray(mailbox.REGION_SIZE)
    mailbox.put_slot(region, 1, mailbox.encode(msg))
    inbox.write(host, bytes(region))

    def reply() -> mailbox.Message | None:
        return mailbox.decode(mailbox.slot_of(outbox.read(host, host), 1), host, 1)

    wait_for(lambda: reply() is not None, what="the reply")
    assert reply() == msg.reply(16 * MiB, reply().seen, reply().done)  # type: ignore[union-attr]
    # The reply is lost (zeroed here); the HSM resends: same id, next attempt.
    outbox.write(host, bytes(mailbox.REGION_SIZE))
    again = mailbox.Message(**{**msg.__dict__, "attempt": 1})
    mailbox.put_slot(region, 1, mailbox.encode(again))
    inbox.write(host, bytes(region))
    wait_for(lambda: reply() is not None, what="the reply again")
    assert reply().request_id == msg.request_id  # type: ignore[union-attr]
    assert spm.resent == 1 and len(files.extend.calls) == 1


class TornFirstRequest(mailbox.Box):
    """An inbox whose first write carrying a request is torn: the request's
    sector keeps only its first 64 bytes (the rest as before: zeros)."""

    torn = 0

    def write(self, first: int, data: bytes) -> None:
        if not TornFirstRequest.torn and mailbox.slot_of(data, 1) != mailbox.EMPTY:
            TornFirstRequest.torn += 1
            region = bytearray(data)
            region[mailbox.SLOT_SIZE + 64:2 * mailbox.SLOT_SIZE] = bytes(
                mailbox.SLOT_SIZE - 64)
            data = bytes(region)
        super().write(first, data)


def test_torn_request_is_ignored_and_the_resend_served(files, caplog):
    caplog.set_level(logging.INFO, logger="storage.mailbox")
    spm = files.spm()
    hsm = files.hsm(5, box=TornFirstRequest)
    sd_id, img_id, vol_id = ids()
    wait_for(lambda: spm.cycles > 3, what="a few scans")
    result = hsm.extend_timed(sd_id, img_id, vol_id, 32 * MiB)
    assert TornFirstRequest.torn == 1
    assert result.attempts == 2 and result.size == 32 * MiB
    assert files.extend.calls == [(sd_id, img_id, vol_id, 32 * MiB)]  # once, the resend
    assert spm.corrupt == 1
    corrupt = [r.getMessage() for r in caplog.records
               if "Ignoring corrupt mailbox message" in r.getMessage()]
    assert len(corrupt) == 1 and "host=5 slot=1: bad checksum" in corrupt[0]
    assert any("resending" in r.getMessage() for r in caplog.records)


def test_requests_left_by_a_dead_spm_are_served_by_the_next(files):
    files.extend.gate.clear()
    first = files.spm()
    hsm = files.hsm(2)
    vol = ids()
    t, out = in_thread(lambda: hsm.extend_timed(*vol, 40 * MiB))
    wait_for(lambda: files.extend.running == 1, what="the first SPM extending")
    files.stop(first, fence=True)  # its lease is lost: it writes nothing more
    files.extend.gate.set()
    time.sleep(0.2)
    assert out == [] and files.region(1, 2) == bytes(mailbox.REGION_SIZE)
    files.spm()  # another host takes the SPM role
    t.join(10)
    result = out[0]
    assert isinstance(result, mailbox_hsm.Result) and result.size == 40 * MiB
    assert [c[2] for c in files.extend.calls] == [vol[2], vol[2]]


def test_no_reply_times_out_and_frees_the_slot(files):
    settings = mailbox.Settings(**{**FAST.__dict__, "request_timeout": 0.5})
    hsm = files.hsm(6, settings)
    with pytest.raises(errors.SpmRequestUnavailable, match="no reply from the SPM in 0.5 s"):
        hsm.extend(*ids(), 8 * MiB)
    region = files.region(0, 6)
    assert mailbox.slot_of(region, 0) != mailbox.EMPTY
    assert region[mailbox.SLOT_SIZE:] == bytes(mailbox.REGION_SIZE - mailbox.SLOT_SIZE)
    assert hsm.outstanding() == 0


def test_spm_error_comes_back_with_its_name(files):
    files.spm()
    hsm = files.hsm(2)
    files.extend.error = errors.VolumeDoesNotExist(vol_id="v", sd_id="d")
    with pytest.raises(mailbox.RemoteError) as e:
        hsm.extend(*ids(), 8 * MiB)
    assert e.value.name == "VolumeDoesNotExist"
    assert "Volume v does not exist in domain d" in str(e.value)


class CountingBox(mailbox.Box):
    reads: list[int] = []

    def read(self, first: int, last: int) -> bytes:
        CountingBox.reads.append(last - first + 1)
        return super().read(first, last)


def test_scan_reads_the_used_range_one_read_per_cycle(files):
    """Hosts 1 and 20 connected: each cycle reads 20 + 8 regions, a full
    scan (every full_scan_interval) 250; host 20 gone: 1 + 8; a new host
    within those 8 is served at once."""
    files.hsm(1)
    h20 = files.hsm(20)
    inbox = CountingBox(files.paths[0], mailbox.local_ops(), 5.0)
    outbox = mailbox.Box(files.paths[1], mailbox.local_ops(), 5.0)
    spm = mailbox_spm.SpmMailbox("count", inbox, outbox, files.extend, FAST).start()
    files.started.append(spm)
    time.sleep(0.5)
    reads = list(CountingBox.reads)
    assert reads[0] == mailbox.MAX_HOST_ID
    assert set(reads) == {28, mailbox.MAX_HOST_ID} and reads.count(28) > reads.count(250)
    files.stop(h20)
    time.sleep(0.5)
    assert CountingBox.reads[-3:].count(9) >= 2
    # Host 9 connects (an SPM that scans in full once a minute): inside the
    # headroom, its first request is read at once.
    files.stop(spm)
    slow = mailbox.Settings(**{**FAST.__dict__, "full_scan_interval": 60.0,
                               "retry_interval": 30.0})
    spm = mailbox_spm.SpmMailbox("count", inbox, outbox, files.extend, slow).start()
    files.started.append(spm)
    wait_for(lambda: spm.cycles > 2, what="the first scans")
    CountingBox.reads.clear()
    h9 = files.hsm(9, slow)
    result = h9.extend_timed(*ids(), 8 * MiB)
    assert result.attempts == 1 and result.spm_wait < 0.1
    assert set(CountingBox.reads) == {9}


def test_stop_wakes_the_callers_and_zeroes_the_region(files):
    hsm = files.hsm(7)
    t, out = in_thread(lambda: hsm.extend(*ids(), 8 * MiB))
    wait_for(lambda: hsm.outstanding() == 1, what="a request out")
    files.stop(hsm)
    t.join(5)
    assert isinstance(out[0], errors.SpmRequestUnavailable)
    assert files.region(0, 7) == bytes(mailbox.REGION_SIZE)


# Two storage providers as two hosts: the mailbox in the master domain.


@pytest.fixture(params=[sd.FILE, sd.BLOCK], ids=["file-master", "block-master"])
def two_hosts(request, api_factory, file_domain_factory, block_domain_factory,
              storage_tmpdir):
    """a: SPM of a pool whose master is a file or a block domain, with a
    block domain for thin volumes; b: host 2, connected."""
    a, b = api_factory("a"), api_factory("b")
    block_id = block_domain_factory(a, name="block")
    if request.param == sd.FILE:
        master = file_domain_factory(a, name="master")
        domains = [master, block_id]
    else:
        master = block_id
        domains = [block_id]
    pool_id = make_pool(a, master, domains)
    dev = a.cache.registry.get(block_id)["devices"][0]
    if request.param == sd.FILE:
        mnt = os.path.join(storage_tmpdir, "mnt")
        b.storage_pool_connect_storage_server(BLANK, "file", [
            {"id": new_id(), "connection": mnt}])
    b.storage_pool_connect_storage_server(BLANK, "block", [{"id": new_id(), "connection": dev}])
    assert b.storage_pool_connect(pool_id, 2, master) is True
    return a, b, pool_id, block_id


@requires_root
def test_hsm_extends_a_thin_volume_through_the_mailbox(two_hosts, caplog):
    caplog.set_level(logging.INFO)
    a, b, pool_id, block_id = two_hosts
    img, vol = new_id(), new_id()
    create_volume(a, pool_id, block_id, img, vol, 64 * MiB)
    prep = b.image_prepare(pool_id, block_id, img, vol)
    try:
        before = b.volume_get_info(pool_id, block_id, img, vol)["apparentsize"]
        assert b.is_spm(pool_id) is False
        size = b.extend(pool_id, block_id, img, vol, before + 8 * MiB)
        assert size == before + 8 * MiB
        assert b.refresh(pool_id, block_id, img, vol) == size  # b's device follows
        fd = os.open(os.path.realpath(prep["path"]), os.O_RDONLY)
        try:
            assert os.lseek(fd, 0, os.SEEK_END) == size
        finally:
            os.close(fd)
        lvextends = [r for r in caplog.records if r.getMessage().startswith("Extending volume")]
        assert len(lvextends) == 1
        # A request for a size it has: answered, no lvextend.
        assert b.extend(pool_id, block_id, img, vol, before + 4 * MiB) == size
        assert len([r for r in caplog.records
                    if r.getMessage().startswith("Extending volume")]) == 1
        # What the SPM refuses comes back with its code's name.
        with pytest.raises(mailbox.RemoteError) as e:
            b.extend(pool_id, block_id, img, new_id(), 16 * MiB)
        assert e.value.name in ("VolumeDoesNotExist", "LogicalVolumeDoesNotExistError")
        # set legality stays an SPM-only request.
        with pytest.raises(errors.SpmRequestUnavailable):
            b.set_volume_legality(pool_id, block_id, img, vol, False)
    finally:
        b.image_teardown(pool_id, block_id, img, vol)
