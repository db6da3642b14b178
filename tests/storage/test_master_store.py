"""The SPM task records of a block domain in its master LV
(storage/master_store.py), on real lvm2 over loop devices."""

from __future__ import annotations

import zlib

import pytest

from storage import master_store
from tests.storage.conftest import requires_root

pytest_plugins = ["tests.storage.domain_fixtures"]

pytestmark = requires_root


class TestMasterStore:
    @pytest.fixture
    def store(self, api, block_domain_factory):
        sd_id = block_domain_factory(api)
        dom = api.cache.get(sd_id)
        _, store = dom.task_store()
        return store

    def test_write_read_replace_unlink(self, store):
        assert store.listdir("tasks") == []
        store.write_file_atomic("tasks/a.task", b"one")
        store.write_file_atomic("tasks/b.task", b"two" * 1000)
        store.write_file_atomic("tasks/a.task", b"three")
        assert store.listdir("tasks") == ["a.task", "b.task"]
        assert store.read_file("tasks/a.task") == b"three"
        assert store.read_file("tasks/b.task") == b"two" * 1000
        store.unlink("tasks/a.task")
        with pytest.raises(FileNotFoundError):
            store.read_file("tasks/a.task")
        with pytest.raises(FileNotFoundError):
            store.unlink("tasks/a.task")

    def test_records_survive_a_new_store(self, store):
        store.write_file_atomic("x.task", b"first")
        store.write_file_atomic("x.task", b"second")
        fresh = master_store.MasterStore(store.device, store.oop)
        assert fresh.listdir("") == ["x.task"]
        assert fresh.read_file("x.task") == b"second"

    def test_newer_copy_wins_after_crash_between_writes(self, store):
        store.write_file_atomic("x.task", b"old")
        slot, seq = store._index["x.task"]
        # A crash after writing the new copy, before clearing the old one:
        # write the new copy by hand into another slot.
        data = b"new"
        header = b"LSMF1 x.task %d %d %d\n" % (seq + 1, len(data), zlib.crc32(data))
        block = header + data
        block += b"\0" * (512 - len(block))
        store.oop.write_direct(store.device, (slot + 5) * master_store.STORE_SLOT, block)
        fresh = master_store.MasterStore(store.device, store.oop)
        assert fresh.read_file("x.task") == b"new"

    def test_torn_record_is_ignored(self, store):
        store.write_file_atomic("x.task", b"good")
        slot, _ = store._index["x.task"]
        raw = bytearray(store.oop.read_direct(store.device, slot * master_store.STORE_SLOT, 512))
        raw[raw.index(b"good")] = ord("X")
        store.oop.write_direct(store.device, slot * master_store.STORE_SLOT, bytes(raw))
        fresh = master_store.MasterStore(store.device, store.oop)
        assert fresh.listdir("") == []

    def test_too_big_record_refused(self, store):
        with pytest.raises(OSError):
            store.write_file_atomic("big.task", b"x" * master_store.STORE_SLOT)
        assert store.listdir("") == []
