"""Extension of thin block volumes: SPM extend, HSM refresh, seen at once by
a process holding the device open."""

from __future__ import annotations

import subprocess
import sys
import threading

import pytest

from storage import errors
from tests.storage.conftest import requires_root
from tests.storage.domain_helpers import (
    create_volume,
    lvs_of,
    make_pool,
    new_id,
    qemu_io,
)

pytest_plugins = ["tests.storage.domain_fixtures"]

pytestmark = requires_root

MiB = 1024**2

# A process that holds a device open and answers its size (BLKGETSIZE64 on
# the fd it opened first) each time it reads a line.
HOLDER = r"""
import fcntl, os, struct, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
print("open", flush=True)
for _ in sys.stdin:
    buf = fcntl.ioctl(fd, 0x80081272, b"\0" * 8)
    print(struct.unpack("Q", buf)[0], flush=True)
"""


class Holder:
    def __init__(self, path: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", HOLDER, path],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        assert self.proc.stdout.readline().strip() == "open"

    def size(self) -> int:
        self.proc.stdin.write("size\n")
        self.proc.stdin.flush()
        return int(self.proc.stdout.readline())

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


@pytest.fixture
def thin(api, block_domain_factory):
    """A pool on a block domain with a prepared 64 MiB COW volume (8 MiB LV)."""
    sd_id = block_domain_factory(api)
    pool_id = make_pool(api, sd_id)
    img, vol = new_id(), new_id()
    create_volume(api, pool_id, sd_id, img, vol, 64 * MiB)
    prep = api.image_prepare(pool_id, sd_id, img, vol)
    yield pool_id, sd_id, img, vol, prep["path"]
    api.image_teardown(pool_id, sd_id, img, vol)


def test_extend_seen_at_once_by_an_open_device(api, thin):
    pool_id, sd_id, img, vol, path = thin
    holder = Holder(path)
    try:
        assert holder.size() == 8 * MiB
        assert api.extend(pool_id, sd_id, img, vol, 20 * MiB) == 20 * MiB
        assert holder.size() == 20 * MiB
        assert lvs_of(api, sd_id)[vol].size == 20 * MiB
    finally:
        holder.close()
    assert api.volume_get_info(pool_id, sd_id, img, vol)["apparentsize"] == 20 * MiB


def test_guest_data_grows_into_the_extension(api, thin):
    pool_id, sd_id, img, vol, path = thin
    qemu_io(path, "qcow2", "write -P 0x33 0 4M")
    # 12 MiB more data do not fit in an 8 MiB LV...
    out = qemu_io(path, "qcow2", "write -P 0x44 4M 12M", check=False)
    assert "No space left on device" in out, out
    # ... they do once it is extended.
    api.extend(pool_id, sd_id, img, vol, 32 * MiB)
    out = qemu_io(path, "qcow2", "write -P 0x44 4M 12M")
    assert "wrote" in out, out
    assert "Pattern verification failed" not in qemu_io(path, "qcow2", "read -P 0x33 0 4M")
    assert "Pattern verification failed" not in qemu_io(path, "qcow2", "read -P 0x44 4M 12M")


def test_extend_is_capped_at_the_maximum_size(api, thin):
    pool_id, sd_id, img, vol, path = thin
    # 64 MiB * 1.1 rounded up to 4 MiB extents.
    assert api.extend(pool_id, sd_id, img, vol, 1024 * MiB) == 72 * MiB
    # Smaller or equal requests change nothing.
    assert api.extend(pool_id, sd_id, img, vol, 16 * MiB) == 72 * MiB
    with pytest.raises(errors.InvalidVolumeSize):
        api.extend(pool_id, sd_id, img, vol, 0)


def test_concurrent_extends(api, thin):
    pool_id, sd_id, img, vol, path = thin
    sizes = [12, 16, 24, 20, 40, 32]
    results: dict[int, int] = {}
    failures: list[BaseException] = []

    def extend(size_mb: int) -> None:
        try:
            results[size_mb] = api.extend(pool_id, sd_id, img, vol, size_mb * MiB)
        except BaseException as e:  # reported below
            failures.append(e)

    threads = [threading.Thread(target=extend, args=(s,)) for s in sizes]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []
    assert all(results[s] >= s * MiB for s in sizes)
    assert lvs_of(api, sd_id)[vol].size == 40 * MiB
    assert api.refresh(pool_id, sd_id, img, vol) == 40 * MiB


def test_hsm_refresh_after_spm_extend(api_factory, block_domain_factory):
    spm = api_factory("spm")
    hsm = api_factory("hsm")
    sd_id = block_domain_factory(spm)
    hsm.learn_domain(sd_id, "block", spm.cache.registry.get(sd_id))
    pool_id = make_pool(spm, sd_id)
    hsm.storage_pool_connect(pool_id, 2, sd_id)
    img, vol = new_id(), new_id()
    create_volume(spm, pool_id, sd_id, img, vol, 64 * MiB)

    prep = hsm.image_prepare(pool_id, sd_id, img, vol)
    holder = Holder(prep["path"])
    try:
        assert holder.size() == 8 * MiB
        # The SPM extends the LV; this "host" maps it with its own device.
        assert spm.extend(pool_id, sd_id, img, vol, 24 * MiB) == 24 * MiB
        assert holder.size() == 8 * MiB
        assert hsm.refresh(pool_id, sd_id, img, vol) == 24 * MiB
        assert holder.size() == 24 * MiB
    finally:
        holder.close()
        hsm.image_teardown(pool_id, sd_id, img, vol)
    # Not active on the HSM: refresh answers the LV's size.
    assert hsm.refresh(pool_id, sd_id, img, vol) == 24 * MiB


def test_file_volumes_need_no_extension(api, file_domain_factory):
    sd_id = file_domain_factory(api)
    pool_id = make_pool(api, sd_id)
    img, vol = new_id(), new_id()
    create_volume(api, pool_id, sd_id, img, vol, 64 * MiB)
    size = api.volume_get_info(pool_id, sd_id, img, vol)["apparentsize"]
    assert api.extend(pool_id, sd_id, img, vol, 32 * MiB) == size
    assert api.refresh(pool_id, sd_id, img, vol) == size


def test_extend_unknown_volume(api, thin):
    pool_id, sd_id, img, vol, path = thin
    with pytest.raises(errors.VolumeDoesNotExist):
        api.extend(pool_id, sd_id, img, new_id(), 32 * MiB)
    with pytest.raises(errors.VolumeDoesNotExist):
        api.refresh(pool_id, sd_id, new_id(), vol)
