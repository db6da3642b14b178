"""SPM task records of a block domain: small files in the ``master`` LV.

A block domain that is a pool's master keeps the pool's SPM task records in
its ``master`` LV (:data:`storage.block_manifest.MASTER_LV`), where a file
domain has a directory.  :class:`MasterStore` offers the file operations
:class:`storage.taskstore.TaskStore` uses on them.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import zlib

from common import sizes
from storage import oop

log = logging.getLogger("storage.master_store")

MiB = 1024**2
KiB = 1024

# Slot size of the master LV's record store.
STORE_SLOT = 64 * KiB


class MasterStore:
    """Small files (SPM task records) in slots of the ``master`` LV.

    It offers the file operations :class:`storage.taskstore.TaskStore` uses
    (``makedirs, write_file_atomic, listdir, read_file, unlink``), by base
    name; directories are implied.  Each slot of STORE_SLOT bytes starts
    with a header line ``LSMF1 <name> <seq> <length> <crc32>`` and the data.
    A write goes to a free slot with a higher sequence number and only then
    clears the old slot, so a crash in between leaves both and the newer
    one wins; a torn write fails its checksum and the older copy stays.
    I/O is direct (another host may write the LV) and goes through oop.
    """

    MAGIC = b"LSMF1"

    def __init__(self, device: str, ops: oop.FileOps) -> None:
        self.device = device
        self.oop = ops
        self._lock = threading.Lock()
        self._index: dict[str, tuple[int, int]] | None = None  # name -> (slot, seq)
        self._seq = 0
        self._size = 0

    def makedirs(self, path: str, mode: int = 0o755, exist_ok: bool = True) -> None:
        pass

    def listdir(self, path: str) -> list[str]:
        with self._lock:
            return sorted(self._load())

    def read_file(self, path: str) -> bytes:
        name = os.path.basename(path)
        with self._lock:
            entry = self._load().get(name)
            if entry is None:
                raise FileNotFoundError(errno.ENOENT, "no such record", path)
            record = self._read_slot(entry[0])
        if record is None or record[0] != name:
            raise OSError(errno.EIO, "record changed or corrupt", path)
        return record[2]

    def write_file_atomic(self, path: str, data: bytes, mode: int = 0o644) -> None:
        name = os.path.basename(path)
        if not name or any(c.isspace() for c in name):
            raise OSError(errno.EINVAL, "bad record name", path)
        with self._lock:
            index = self._load()
            used = {slot for slot, _ in index.values()}
            free = next((s for s in range(self._slots()) if s not in used), None)
            if free is None:
                raise OSError(errno.ENOSPC, "no free slot in the master LV", path)
            self._seq += 1
            header = b"%s %s %d %d %d\n" % (
                self.MAGIC, name.encode(), self._seq, len(data), zlib.crc32(data)
            )
            block = header + data
            if len(block) > STORE_SLOT:
                raise OSError(errno.EFBIG, f"record larger than {STORE_SLOT} bytes", path)
            aligned = sizes.round_up(max(len(block), 1), sizes.SECTOR)
            self.oop.write_direct(self.device, free * STORE_SLOT,
                                  block + b"\0" * (aligned - len(block)))
            old = index.get(name)
            index[name] = (free, self._seq)
            if old is not None:
                self._clear(old[0])

    def unlink(self, path: str) -> None:
        name = os.path.basename(path)
        with self._lock:
            entry = self._load().pop(name, None)
            if entry is None:
                raise FileNotFoundError(errno.ENOENT, "no such record", path)
            self._clear(entry[0])

    def _slots(self) -> int:
        return self._size // STORE_SLOT

    def _load(self) -> dict[str, tuple[int, int]]:
        if self._index is not None:
            return self._index
        self._size = sizes.device_size(self.device)
        index: dict[str, tuple[int, int]] = {}
        for offset in range(0, self._slots() * STORE_SLOT, MiB):
            chunk = self.oop.read_direct(self.device, offset, min(MiB, self._size - offset))
            for pos in range(0, len(chunk) - STORE_SLOT + 1, STORE_SLOT):
                record = self._parse(offset // STORE_SLOT + pos // STORE_SLOT,
                                     chunk[pos : pos + STORE_SLOT])
                if record is None:
                    continue
                name, seq, _ = record
                slot = (offset + pos) // STORE_SLOT
                self._seq = max(self._seq, seq)
                if name not in index or index[name][1] < seq:
                    index[name] = (slot, seq)
        self._index = index
        return index

    def _read_slot(self, slot: int) -> tuple[str, int, bytes] | None:
        return self._parse(slot, self.oop.read_direct(self.device, slot * STORE_SLOT, STORE_SLOT))

    def _parse(self, slot: int, block: bytes) -> tuple[str, int, bytes] | None:
        if not block.startswith(self.MAGIC + b" "):
            return None
        line, sep, rest = block.partition(b"\n")
        try:
            _, name, seq, length, crc = line.decode().split(" ")
            seq_n, length_n, crc_n = int(seq), int(length), int(crc)
        except ValueError:
            return None
        data = rest[:length_n]
        if not sep or len(data) != length_n or zlib.crc32(data) != crc_n:
            log.warning("Ignoring torn record in master LV slot=%d", slot)
            return None
        return name, seq_n, data

    def _clear(self, slot: int) -> None:
        self.oop.write_direct(self.device, slot * STORE_SLOT, b"\0" * 512)
