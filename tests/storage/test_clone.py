"""storage.clone (Image.cloneStructure) on real file and block domains."""

from __future__ import annotations

import collections.abc
import threading

import pytest

from storage import clone, errors, qemuimg, sd, task, volume
from tests.storage import conftest
from tests.storage import image_env as ie

pytestmark = [conftest.requires_root, pytest.mark.timeout(300)]

DIRECTIONS = [("f1", "f2"), ("f1", "b1"), ("b1", "f1"), ("b1", "b2")]


@pytest.fixture(scope="module")
def env() -> collections.abc.Iterator[ie.Env]:
    """One pool for the module; each test makes its own images."""
    with ie.real_storage() as (workdir, make_loop_device), \
            ie.make_env(workdir, make_loop_device) as e:
        yield e


@pytest.fixture(scope="module")
def sources(env: ie.Env) -> dict[str, ie.Chain]:
    """A standard chain on f1 and one on b1, cloned (never changed) by tests."""
    return {role: env.make_chain(env.domains[role]) for role in ("f1", "b1")}


@pytest.mark.parametrize("src_role,dst_role", DIRECTIONS, ids=lambda r: r)
def test_clone_makes_the_same_empty_chain_illegal(env: ie.Env, sources: dict[str, ie.Chain],
                                                  src_role: str, dst_role: str) -> None:
    src, dst = env.domains[src_role], env.domains[dst_role]
    chain = sources[src_role]
    ops = env.ops()

    status = env.clone(ops, chain, dst)

    assert status["progress"] == 100
    src_md = env.metadata(src, chain.img_id)
    dst_md = env.metadata(dst, chain.img_id)
    assert sorted(dst_md) == sorted(chain.vol_ids)
    for vol_id in chain.vol_ids:
        s, d = src_md[vol_id], dst_md[vol_id]
        assert (d.parent, d.format, d.capacity, d.voltype, d.description) == (
            s.parent, s.format, s.capacity, s.voltype, s.description)
        assert d.legality == volume.ILLEGAL
        assert d.image == chain.img_id and d.domain == dst
    # The source is untouched.
    assert set(env.legality(src, chain.img_id).values()) == {volume.LEGAL}

    with env.prepared_chain(src, chain.img_id, chain.leaf) as src_paths, \
            env.prepared_chain(dst, chain.img_id, chain.leaf) as dst_paths:
        for layer, s_path, d_path in zip(chain.layers, src_paths, dst_paths, strict=True):
            fmt = ie.qemuimg_format(layer.format)
            d_info = qemuimg.info(d_path, fmt=fmt)
            s_info = qemuimg.info(s_path, fmt=fmt)
            assert d_info["virtual-size"] == s_info["virtual-size"]
            if layer.format == volume.COW:
                # Same cluster size, bare-UUID backing that resolves, no data.
                assert d_info["cluster-size"] == s_info["cluster-size"]
                assert d_info["backing-filename"] == s_info["backing-filename"]
                assert ie.own_extents(d_path) == []
            elif env.dom(dst).domain_type == sd.FILE:
                # Sparse (qemu-img create allocates the first block only).
                assert ie.data_extents(d_path, fmt) in ([], [(0, 4096)])
        # The whole destination chain opens (every backing link is valid).
        infos = qemuimg.info(dst_paths[-1], fmt="qcow2", backing_chain=True)
        assert len(infos) == len(chain.layers)
        assert chain.layers[1].cluster_size == 128 * ie.KiB
        assert infos[-2]["cluster-size"] == 128 * ie.KiB

    # RAW on block is PREALLOCATED; a RAW volume from block is SPARSE on file.
    base = chain.vol_ids[0]
    expected = {sd.BLOCK: volume.PREALLOCATED, sd.FILE: volume.SPARSE}
    assert dst_md[base].type == expected[env.dom(dst).domain_type]
    if env.dom(dst).domain_type == sd.BLOCK:
        _check_block_sizes(env, chain, dst)

    env.run(ops.image_delete(chain.img_id, env.pool_id, dst))
    assert env.metadata(dst, chain.img_id) == {}


def _check_block_sizes(env: ie.Env, chain: ie.Chain, dst: str) -> None:
    """Internal COW volumes can hold their layer; the leaf has a chunk."""
    dom = env.dom(dst)
    with env.prepared_chain(chain.sd_id, chain.img_id, chain.leaf) as src_paths:
        for layer, s_path in zip(chain.layers, src_paths, strict=True):
            size = dom.manifest.volume_size(chain.img_id, layer.vol_id)[0]
            if layer.format == volume.RAW:
                assert size >= ie.CAPACITY
                continue
            need = qemuimg.measure(s_path, fmt="qcow2", backing=False)["required"]
            assert size >= need
            if layer.vol_id == chain.leaf:
                assert size >= env.storage.chunk_size


def test_clone_of_a_qcow2_base_chain(env: ie.Env) -> None:
    layers = [
        ie.Layer(ie.new_id(), volume.COW, ["write -P 0x51 0 2M"], cluster_size=256 * ie.KiB),
        ie.Layer(ie.new_id(), volume.COW, ["write -P 0x52 1M 1M"]),
    ]
    chain = env.make_chain(env.domains["f1"], layers)

    env.clone(env.ops(), chain, env.domains["f2"])

    md = env.metadata(env.domains["f2"], chain.img_id)
    assert [md[v].format for v in chain.vol_ids] == [volume.COW, volume.COW]
    with env.prepared(env.domains["f2"], chain.img_id, chain.vol_ids[0]) as path:
        assert qemuimg.info(path, fmt="qcow2")["cluster-size"] == 256 * ie.KiB


def test_clone_onto_an_existing_image_is_refused_before_any_task(env: ie.Env) -> None:
    chain = env.make_chain(env.domains["f1"], ie.standard_layers()[:2])
    dst = env.domains["b1"]
    ops = env.ops()
    env.clone(ops, chain, dst)
    before = env.metadata(dst, chain.img_id)
    tasks = env.storage.pool(env.pool_id).tasks
    assert tasks is not None
    known = set(tasks.all_info())

    with pytest.raises(errors.VolumeAlreadyExists):
        ops.image_clone_structure(chain.img_id, env.pool_id, chain.sd_id, dst)

    assert set(tasks.all_info()) == known
    assert env.metadata(dst, chain.img_id) == before


def test_clone_refuses_a_volume_that_exists_elsewhere_on_the_destination(env: ie.Env) -> None:
    chain = env.make_chain(env.domains["f1"], ie.standard_layers()[:1])
    dst = env.domains["f2"]
    # The same volume UUID in another image of the destination.
    env.make_chain(dst, [ie.Layer(chain.vol_ids[0], volume.RAW, [])])

    with pytest.raises(errors.VolumeAlreadyExists):
        env.ops().image_clone_structure(chain.img_id, env.pool_id, chain.sd_id, dst)
    assert env.metadata(dst, chain.img_id) == {}


def test_bad_input_is_refused_with_codes(env: ie.Env) -> None:
    ops = env.ops()
    chain = env.make_chain(env.domains["f1"], ie.standard_layers()[:2])
    tasks = env.storage.pool(env.pool_id).tasks
    assert tasks is not None

    known = set(tasks.all_info())
    images = {role: env.dom(sd_id).manifest.list_images() for role, sd_id in env.domains.items()}

    with pytest.raises(errors.SameSourceAndDestination):
        ops.image_clone_structure(chain.img_id, env.pool_id, chain.sd_id, chain.sd_id)
    with pytest.raises(errors.ImageDoesNotExistInSD):
        ops.image_clone_structure(ie.new_id(), env.pool_id, chain.sd_id, env.domains["b1"])
    with pytest.raises(errors.StorageDomainDoesNotExist):
        ops.image_clone_structure(chain.img_id, env.pool_id, chain.sd_id, ie.new_id())
    with pytest.raises(errors.StoragePoolUnknown):
        ops.image_clone_structure(chain.img_id, ie.new_id(), chain.sd_id, env.domains["b1"])

    assert set(tasks.all_info()) == known
    assert images == {
        role: env.dom(sd_id).manifest.list_images() for role, sd_id in env.domains.items()
    }


def test_clone_needs_spm(env: ie.Env) -> None:
    chain = env.make_chain(env.domains["f1"], ie.standard_layers()[:1])
    ops = env.ops()
    env.storage.storage_pool_spm_stop(env.pool_id)
    try:
        with pytest.raises(errors.SpmStatusError):
            ops.image_clone_structure(chain.img_id, env.pool_id, chain.sd_id, env.domains["f2"])
    finally:
        env.storage.storage_pool_spm_start(env.pool_id)


def test_failed_clone_removes_what_it_created(env: ie.Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """Fault injection: the third volume can't be created."""
    chain = env.make_chain(env.domains["f1"], [
        ie.Layer(ie.new_id(), volume.RAW, []),
        ie.Layer(ie.new_id(), volume.COW, []),
        ie.Layer(ie.new_id(), volume.COW, []),
    ])
    dst = env.domains["b1"]
    dom = env.dom(dst)
    real = type(dom).create_volume
    calls = []

    def failing(self: sd.StorageDomain, images: object, img_id: str, vol_id: str,
                *args: object, **kwargs: object) -> None:
        calls.append(vol_id)
        if len(calls) == 3:
            kwargs["on_allocated"]()  # type: ignore[operator]
            raise errors.NoSpaceLeftOnDomain(sd_id=self.sd_id, reason="injected")
        real(self, images, img_id, vol_id, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(type(dom), "create_volume", failing)
    status = env.wait(env.ops().image_clone_structure(chain.img_id, env.pool_id,
                                                      chain.sd_id, dst))

    assert status["taskResult"] == task.CLEAN_FAILURE
    assert status["code"] == "NoSpaceLeftOnDomain"
    assert len(calls) == 3
    assert dom.manifest.list_volumes(chain.img_id) == []
    assert all(lv not in dom.manifest.volume_lvs() for lv in chain.vol_ids)


def test_stopped_clone_removes_what_it_created(env: ie.Env,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Task.stop while the second volume is being created."""
    chain = env.make_chain(env.domains["f1"], ie.standard_layers()[:3])
    dst = env.domains["f2"]
    dom = env.dom(dst)
    real = type(dom).create_volume
    tasks = env.storage.pool(env.pool_id).tasks
    assert tasks is not None
    task_ids: list[str] = []
    calls = []

    def stopping(self: sd.StorageDomain, *args: object, **kwargs: object) -> None:
        calls.append(args)
        real(self, *args, **kwargs)  # type: ignore[arg-type]
        if len(calls) == 2:
            tasks.stop(task_ids[0])

    monkeypatch.setattr(type(dom), "create_volume", stopping)
    ops = env.ops()
    task_ids.append(ops.image_clone_structure(chain.img_id, env.pool_id, chain.sd_id, dst))
    status = env.wait(task_ids[0])

    assert status["taskResult"] == task.CLEAN_FAILURE
    assert status["code"] == "TaskAborted"
    assert len(calls) == 2
    assert dom.manifest.list_volumes(chain.img_id) == []
    # The image can be cloned again afterwards.
    monkeypatch.undo()
    env.storage.task_clear(task_ids[0])
    env.clone(ops, chain, dst)
    assert sorted(dom.manifest.list_volumes(chain.img_id)) == sorted(chain.vol_ids)


def test_recovery_rollback_removes_only_this_tasks_volumes(env: ie.Env) -> None:
    """What a restart's rollback removes: the chain's volumes made by this
    task (ILLEGAL, not older than it, or without metadata), nothing else."""
    chain = env.make_chain(env.domains["f1"], ie.standard_layers()[:2])
    dst = env.domains["b1"]
    ops = env.ops()
    env.clone(ops, chain, dst)
    dom = env.dom(dst)
    params = clone.make_params(chain.sd_id, dst, chain.img_id,
                               [(v, None) for v in chain.vol_ids])  # type: ignore[misc]

    class Ctx:
        recovering = True

    # Volumes older than the task (made by someone else) stay.
    old = dict(params, submitted=params["submitted"] + 3600)
    env.job(clone.KIND, old).rollback(Ctx())  # type: ignore[arg-type]
    assert sorted(dom.manifest.list_volumes(chain.img_id)) == sorted(chain.vol_ids)

    # The leaf's metadata was never written: removed; all ILLEGAL ones too.
    dom.manifest.write_slot(dom.manifest.slot_of(dom.manifest.volume_lvs()[chain.leaf]), b"")
    ours = dict(params, submitted=params["submitted"] - 3600)
    env.job(clone.KIND, ours).rollback(Ctx())  # type: ignore[arg-type]
    assert dom.manifest.list_volumes(chain.img_id) == []


def test_a_second_clone_while_the_first_runs_is_refused(env: ie.Env,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    chain = env.make_chain(env.domains["f1"], ie.standard_layers()[:2])
    dst = env.domains["f2"]
    dom = env.dom(dst)
    real = type(dom).create_volume
    started, proceed = threading.Event(), threading.Event()

    def gated(self: sd.StorageDomain, *args: object, **kwargs: object) -> None:
        started.set()
        assert proceed.wait(ie.WAIT)
        real(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(type(dom), "create_volume", gated)
    ops = env.ops()
    task_id = ops.image_clone_structure(chain.img_id, env.pool_id, chain.sd_id, dst)
    try:
        assert started.wait(ie.WAIT)
        with pytest.raises(errors.VolumeAlreadyExists) as e:
            ops.image_clone_structure(chain.img_id, env.pool_id, chain.sd_id, dst)
        assert task_id in str(e.value)
    finally:
        proceed.set()
    env.run(task_id)
    assert sorted(dom.manifest.list_volumes(chain.img_id)) == sorted(chain.vol_ids)
