"""contrib/guest/build: what it puts in the initramfs, and its cache."""

from __future__ import annotations

import gzip
import os

from contrib import guest
from storage import commands

MODULES = [
    "virtio_ring",
    "virtio",
    "virtio_pci_legacy_dev",
    "virtio_pci_modern_dev",
    "virtio_pci",
    "virtio_blk",
]


def build(out: str) -> str:
    """Run the build script; return its stderr (its progress messages)."""
    proc = commands.run([guest.BUILD_SCRIPT, "--out", out], timeout=guest.BUILD_TIMEOUT)
    assert proc.stdout.decode().split() == [f"{out}/vmlinuz", f"{out}/initrd.img"]
    return proc.stderr.decode()


def initrd_files(path: str) -> dict[str, bytes]:
    """Name -> content of the regular files in a gzipped newc cpio."""
    with gzip.open(path) as f:
        data = f.read()
    files: dict[str, bytes] = {}
    pos = 0
    while True:
        assert data[pos : pos + 6] == b"070701", "not a newc archive"
        mode = int(data[pos + 14 : pos + 22], 16)
        size = int(data[pos + 54 : pos + 62], 16)
        namesize = int(data[pos + 94 : pos + 102], 16)
        name_start = pos + 110
        name = data[name_start : name_start + namesize - 1].decode()
        body = (name_start + namesize + 3) & ~3
        if name == "TRAILER!!!":
            return files
        if mode & 0o170000 == 0o100000:
            files[name.removeprefix("./")] = data[body : body + size]
        pos = (body + size + 3) & ~3


def test_build_produces_kernel_initrd_and_writer(workdir: str) -> None:
    out = os.path.join(workdir, "guest")
    build(out)

    for name in ("vmlinuz", "initrd.img", "writer"):
        assert os.path.getsize(os.path.join(out, name)) > 0
    assert os.access(os.path.join(out, "writer"), os.X_OK)
    files = initrd_files(os.path.join(out, "initrd.img"))
    assert files["init"].startswith(b"#!/bin/busybox sh")
    assert "bin/busybox" in files
    assert files["bin/writer"][:4] == b"\x7fELF"
    assert files["lib/modules/order"].decode().split() == MODULES
    for mod in MODULES:
        # Uncompressed: busybox's insmod loads them as they are.
        assert files[f"lib/modules/{mod}.ko"][:4] == b"\x7fELF"


def test_build_is_cached_until_an_input_changes(workdir: str) -> None:
    out = os.path.join(workdir, "guest")
    build(out)
    initrd = os.path.join(out, "initrd.img")
    built = os.stat(initrd).st_mtime_ns

    assert "up to date" in build(out)
    assert os.stat(initrd).st_mtime_ns == built

    # A different inputs hash (as after an edit of init or writer.c) rebuilds.
    with open(os.path.join(out, ".inputs"), "w") as f:
        f.write("stale\n")
    assert "up to date" not in build(out)
    assert os.stat(initrd).st_mtime_ns != built
