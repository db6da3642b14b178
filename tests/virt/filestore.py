"""A small storage for virt tests: real qcow2/raw volumes, prepare links, no domains.

It implements virt's storage interface (prepare / teardown) over volumes made
with ``qemu-img`` in a directory on the root file system, either as files or
on loop devices (block volumes). Prepare links follow the daemon's layout,
``<root>/run/storage/<sd>/<img>/<vol>``, and qcow2 backing references are the
bare parent UUID, so QEMU resolves a chain through the links as it does with
the real storage. Each volume's parent and format sit in a JSON file beside
it, so another process (a "daemon" killed in a test) can prepare the same
volumes.
"""

from __future__ import annotations

import collections
import json
import os
import shutil
import threading
import uuid
from typing import Any

from storage import commands

QEMU_IMG_TIMEOUT = 60


class FileStore:
    def __init__(self, root: str, pool_id: str | None = None, sd_id: str | None = None) -> None:
        self.root = root
        self.run_dir = os.path.join(root, "run")
        self.pool_id = pool_id or str(uuid.uuid4())
        self.sd_id = sd_id or str(uuid.uuid4())
        self._lock = threading.Lock()
        self._refs: collections.Counter[str] = collections.Counter()
        self._stacks: dict[str, list[list[str]]] = {}
        self.calls: list[tuple[str, str]] = []  # ("prepare" | "teardown", vol_id)
        self.loops: list[str] = []

    def reopen(self) -> FileStore:
        """The same volumes as seen by a restarted daemon: no references held."""
        return FileStore(self.root, self.pool_id, self.sd_id)

    # Making volumes

    def create(
        self,
        img_id: str,
        vol_id: str,
        size: int,
        fmt: str = "COW",
        parent: str | None = None,
        block_size: int | None = None,
    ) -> str:
        """Create a volume; on a loop device of block_size bytes if given."""
        vol_dir = os.path.join(self.root, "volumes", img_id)
        os.makedirs(vol_dir, exist_ok=True)
        path = os.path.join(vol_dir, vol_id)
        if block_size is not None:
            backing_file = path + ".img"
            with open(backing_file, "wb") as f:
                f.truncate(block_size)
            out = commands.run(["losetup", "-f", "--show", backing_file], timeout=30)
            dev = out.stdout.decode().strip()
            self.loops.append(dev)
            os.symlink(dev, path)
        cmd = ["qemu-img", "create", "-q", "-f", "qcow2" if fmt == "COW" else "raw"]
        if parent is not None:
            parent_fmt = self.info(img_id, parent)["format"]
            cmd += ["-u", "-b", parent, "-F", "qcow2" if parent_fmt == "COW" else "raw"]
        cmd += [path, str(size)]
        commands.run(cmd, timeout=QEMU_IMG_TIMEOUT)
        with open(path + ".json", "w") as f:
            json.dump({"parent": parent, "format": fmt}, f)
        return path

    def info(self, img_id: str, vol_id: str) -> dict[str, Any]:
        with open(os.path.join(self.root, "volumes", img_id, vol_id + ".json")) as f:
            return json.load(f)

    def volume_path(self, img_id: str, vol_id: str) -> str:
        return os.path.join(self.root, "volumes", img_id, vol_id)

    def link_path(self, img_id: str, vol_id: str) -> str:
        return os.path.join(self.run_dir, "storage", self.sd_id, img_id, vol_id)

    def drive(self, img_id: str, vol_id: str, fmt: str = "cow") -> dict[str, str]:
        """A VM.create drive spec for the volume."""
        return {
            "poolID": self.pool_id,
            "domainID": self.sd_id,
            "imageID": img_id,
            "volumeID": vol_id,
            "device": "disk",
            "iface": "virtio",
            "format": fmt,
            "propagateErrors": "off",
        }

    # virt's storage interface

    def prepare(self, pool_id: str, sd_id: str, img_id: str, vol_id: str) -> dict[str, Any]:
        if pool_id != self.pool_id or sd_id != self.sd_id:
            raise LookupError(f"unknown pool {pool_id} or domain {sd_id}")
        chain = self._chain(img_id, vol_id)
        with self._lock:
            self.calls.append(("prepare", vol_id))
            for v in chain:
                link = self.link_path(img_id, v)
                if self._refs[v] == 0:
                    os.makedirs(os.path.dirname(link), exist_ok=True)
                    if not os.path.islink(link):
                        os.symlink(self.volume_path(img_id, v), link)
                self._refs[v] += 1
            self._stacks.setdefault(vol_id, []).append(chain)
        return {
            "path": self.link_path(img_id, vol_id),
            "chain": [
                {
                    "volumeID": v,
                    "path": self.link_path(img_id, v),
                    "format": self.info(img_id, v)["format"],
                }
                for v in chain
            ],
        }

    def teardown(self, pool_id: str, sd_id: str, img_id: str, vol_id: str) -> None:
        with self._lock:
            self.calls.append(("teardown", vol_id))
            stack = self._stacks.get(vol_id)
            if not stack:
                return
            for v in reversed(stack.pop()):
                self._refs[v] -= 1
                if self._refs[v] <= 0:
                    del self._refs[v]
                    try:
                        os.unlink(self.link_path(img_id, v))
                    except FileNotFoundError:
                        pass

    def refs(self, vol_id: str) -> int:
        with self._lock:
            return self._refs[vol_id]

    def held(self) -> dict[str, int]:
        with self._lock:
            return {k: n for k, n in self._refs.items() if n > 0}

    def _chain(self, img_id: str, vol_id: str) -> list[str]:
        chain = []
        v: str | None = vol_id
        while v is not None:
            try:
                v_info = self.info(img_id, v)
            except FileNotFoundError:
                raise LookupError(f"volume {v} of image {img_id} does not exist") from None
            chain.append(v)
            v = v_info["parent"]
        return list(reversed(chain))

    def cleanup(self) -> None:
        for dev in self.loops:
            commands.run(["losetup", "-d", dev], timeout=30, check=False)
        self.loops = []
        shutil.rmtree(self.root, ignore_errors=True)

    def grow_loop(self, img_id: str, vol_id: str, size: int) -> None:
        """Grow a block volume's loop device to size bytes (QEMU sees it at once)."""
        path = self.volume_path(img_id, vol_id)
        dev = os.readlink(path)
        with open(path + ".img", "r+b") as f:
            f.truncate(size)
        commands.run(["losetup", "-c", dev], timeout=30)
