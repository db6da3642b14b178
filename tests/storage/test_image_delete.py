"""storage.image_delete (Image.delete) on real file and block domains."""

from __future__ import annotations

import collections.abc
import os

import pytest

from storage import errors, image_delete, sd, task, volume
from tests.storage import conftest
from tests.storage import image_env as ie

pytestmark = [conftest.requires_root, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def env() -> collections.abc.Iterator[ie.Env]:
    with ie.real_storage() as (workdir, make_loop_device), \
            ie.make_env(workdir, make_loop_device) as e:
        yield e


def small_layers() -> list[ie.Layer]:
    return [
        ie.Layer(ie.new_id(), volume.RAW, ["write -P 0x11 0 1M"]),
        ie.Layer(ie.new_id(), volume.COW, ["write -P 0x21 1M 1M"]),
        ie.Layer(ie.new_id(), volume.COW, []),
    ]


@pytest.mark.parametrize("role", ["f1", "b1"])
def test_delete_removes_every_volume(env: ie.Env, role: str) -> None:
    sd_id = env.domains[role]
    chain = env.make_chain(sd_id, small_layers())
    other = env.make_chain(sd_id, small_layers()[:1])
    dom = env.dom(sd_id)

    status = env.run(env.ops().image_delete(chain.img_id, env.pool_id, sd_id))

    assert status["progress"] == 100
    assert dom.manifest.list_volumes(chain.img_id) == []
    assert chain.img_id not in dom.manifest.list_images()
    for vol_id in chain.vol_ids:
        assert dom.manifest.find_volume(vol_id) is None
    if dom.domain_type == sd.FILE:
        assert not os.path.exists(dom.manifest.image_dir(chain.img_id))  # type: ignore[attr-defined]
    # Another image is left alone.
    assert dom.manifest.list_volumes(other.img_id) == other.vol_ids


def test_delete_refuses_a_prepared_image(env: ie.Env) -> None:
    sd_id = env.domains["b2"]
    chain = env.make_chain(sd_id, small_layers())
    ops = env.ops()
    tasks = env.storage.pool(env.pool_id).tasks
    assert tasks is not None
    known = set(tasks.all_info())

    # A VM using the image prepares its leaf; a copy may prepare the base only.
    for vol_id in (chain.leaf, chain.vol_ids[0]):
        with env.prepared(sd_id, chain.img_id, vol_id, allow_illegal=False):
            with pytest.raises(errors.VolumeIsBusy):
                ops.image_delete(chain.img_id, env.pool_id, sd_id)

    assert set(tasks.all_info()) == known
    assert env.legality(sd_id, chain.img_id) == {v: volume.LEGAL for v in chain.vol_ids}
    env.run(ops.image_delete(chain.img_id, env.pool_id, sd_id))


def test_delete_refuses_bad_input(env: ie.Env) -> None:
    ops = env.ops()
    sd_id = env.domains["f1"]
    with pytest.raises(errors.ImageDoesNotExistInSD):
        ops.image_delete(ie.new_id(), env.pool_id, sd_id)
    with pytest.raises(errors.StorageDomainDoesNotExist):
        ops.image_delete(ie.new_id(), env.pool_id, ie.new_id())
    with pytest.raises(errors.StoragePoolUnknown):
        ops.image_delete(ie.new_id(), ie.new_id(), sd_id)


def test_an_interrupted_delete_leaves_illegal_volumes_and_finishes_when_run_again(
    env: ie.Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fault injection: removing the second volume fails."""
    sd_id = env.domains["b1"]
    chain = env.make_chain(sd_id, small_layers())
    dom = env.dom(sd_id)
    real = type(dom).remove_volume
    removed: list[str] = []

    def failing(self: sd.StorageDomain, img_id: str, vol_id: str, *args: object) -> None:
        if len(removed) == 1:
            raise errors.CannotRemoveLogicalVolume(vg=self.sd_id, lv=vol_id, reason="injected")
        removed.append(vol_id)
        real(self, img_id, vol_id, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(type(dom), "remove_volume", failing)
    ops = env.ops()
    status = env.wait(ops.image_delete(chain.img_id, env.pool_id, sd_id))

    assert status["taskResult"] == task.CLEAN_FAILURE
    assert status["code"] == "CannotRemoveLogicalVolume"
    assert removed == [chain.leaf]  # children first
    assert env.legality(sd_id, chain.img_id) == {v: volume.ILLEGAL for v in chain.vol_ids[:-1]}

    monkeypatch.undo()
    env.run(ops.image_delete(chain.img_id, env.pool_id, sd_id))
    assert dom.manifest.list_volumes(chain.img_id) == []


def test_delete_removes_what_a_crashed_creation_left(env: ie.Env) -> None:
    """A block volume whose metadata was never written, on top of a chain."""
    sd_id = env.domains["b2"]
    chain = env.make_chain(sd_id, small_layers())
    dom = env.dom(sd_id)
    manifest = dom.manifest
    manifest.write_slot(manifest.slot_of(manifest.volume_lvs()[chain.leaf]), b"")  # type: ignore[attr-defined]

    env.run(env.ops().image_delete(chain.img_id, env.pool_id, sd_id))

    assert manifest.list_volumes(chain.img_id) == []
    assert all(v not in manifest.volume_lvs() for v in chain.vol_ids)  # type: ignore[attr-defined]


def test_delete_is_recovered_by_running_it_again(env: ie.Env) -> None:
    assert env.storage.job_kinds[image_delete.KIND].recovery == task.RERUN


def _md(parent: str) -> volume.Metadata:
    return volume.Metadata(domain="d", image="i", parent=parent, capacity=1, format=volume.COW,
                           type=volume.SPARSE, voltype=volume.LEAF, legality=volume.LEGAL,
                           ctime=0)


def test_removal_order_puts_children_first() -> None:
    blank = volume.BLANK_UUID
    mds: dict[str, volume.Metadata | None] = {
        "base": _md(blank), "mid": _md("base"), "top": _md("mid"), "half": None,
        "stray": _md("missing"),
    }
    order = image_delete.removal_order(mds)
    assert order[0] == "half"
    assert order.index("top") < order.index("mid") < order.index("base")
    assert sorted(order) == sorted(mds)
    # A loop in broken metadata does not hang.
    assert sorted(image_delete.removal_order({"a": _md("b"), "b": _md("a")})) == ["a", "b"]
