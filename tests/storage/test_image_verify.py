"""storage/image_verify.py: Image.verify on real domains (file and block), real qemu-img.

A chain RAW base <- COW mid <- COW leaf with data in base and mid is cloned
and synced (INTERNAL) to the other domain: the internal volumes verify equal;
a changed byte in one destination layer, or a layer left ILLEGAL, makes the
answer unequal and names the volume.  (The pools come from tests/virt/lsm_env.py.)
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest

from storage import commands, errors, image_verify, sd
from tests.virt import lsm_env

pytestmark = [pytest.mark.root]

MiB = 1024**2


@pytest.fixture(params=[(sd.FILE, sd.BLOCK), (sd.BLOCK, sd.FILE)], ids=["file-block", "block-file"])
def env(request: pytest.FixtureRequest, tmp_path) -> Iterator[lsm_env.LsmEnv]:
    workdir = str(tmp_path)
    e, cleanup = lsm_env.make_lsm_env(workdir, *request.param)
    try:
        yield e
    finally:
        cleanup()


def write(path: str, offset: int, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, data, offset)
        os.fsync(fd)
    finally:
        os.close(fd)


def qemu_io(path: str, command: str) -> None:
    """One qemu-io command on a qcow2 layer alone (its backing not opened)."""
    spec = image_verify.layer_filename(path, "qcow2", 0)
    commands.run(["qemu-io", "-c", command, spec], timeout=60)


def test_verify_proves_internal_volumes_equal_and_finds_a_difference(env):
    img, base, mid, leaf = (str(uuid.uuid4()) for _ in range(4))
    env.create(img, base, 16 * MiB, "RAW")
    with env.prepared(img, base) as path:
        write(path, MiB, os.urandom(MiB))
    env.create(img, mid, 16 * MiB, "COW", parent=base)
    with env.prepared(img, mid) as path:
        qemu_io(path, "write -P 0x5a 4M 1M")
    env.create(img, leaf, 16 * MiB, "COW", parent=mid)
    env.clone(img)
    verify = image_verify.ImageVerify(env.provider)

    answer = verify.image_verify(img, env.pool_id, env.sd_id, env.dst_sd_id)
    # Cloned, not synced: the layers are empty on the destination and ILLEGAL.
    assert answer["equal"] is False
    assert {v["volumeID"] for v in answer["volumes"]} == {base, mid}

    env.sync(img, "INTERNAL")
    answer = verify.image_verify(img, env.pool_id, env.sd_id, env.dst_sd_id)

    assert answer == {"equal": True, "volumes": [
        {"volumeID": base, "equal": True, "legality": "LEGAL"},
        {"volumeID": mid, "equal": True, "legality": "LEGAL"},
    ]}
    assert env.provider.images.refs(env.dst_sd_id, img, mid) == 0  # released

    # One changed cluster in the destination's mid layer.
    env.provider.prepare(env.pool_id, env.dst_sd_id, img, mid)
    try:
        path = env.provider.images.link_path(env.dst_sd_id, img, mid)
        qemu_io(path, "write -P 0x11 4M 64k")
    finally:
        env.provider.teardown(env.pool_id, env.dst_sd_id, img, mid)
    answer = verify.image_verify(img, env.pool_id, env.sd_id, env.dst_sd_id)
    assert answer["equal"] is False
    assert [v["equal"] for v in answer["volumes"]] == [True, False]


def test_verify_refuses_the_same_domain_and_an_image_not_copied(env):
    img, base = str(uuid.uuid4()), str(uuid.uuid4())
    env.create(img, base, 16 * MiB, "COW")
    verify = image_verify.ImageVerify(env.provider)
    with pytest.raises(errors.SameSourceAndDestination):
        verify.image_verify(img, env.pool_id, env.sd_id, env.sd_id)
    with pytest.raises(errors.ImageDoesNotExistInSD):
        verify.image_verify(img, env.pool_id, env.sd_id, env.dst_sd_id)
    # One volume: nothing internal to compare.
    env.clone(img)
    assert verify.image_verify(img, env.pool_id, env.sd_id, env.dst_sd_id) == {
        "equal": True, "volumes": []}
