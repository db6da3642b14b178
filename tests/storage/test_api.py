"""The provider object as the verbs use it: task lifecycle, Task.* rules,
SPM-only verbs, and a daemon killed (kill -9) during Volume.create."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from storage import block_sd, errors, mailbox, qemuimg
from tests.storage.conftest import requires_root
from tests.storage.domain_helpers import (
    API_OPTIONS,
    create_volume,
    domain_state,
    make_pool,
    new_id,
    run_task,
)

pytest_plugins = ["tests.storage.domain_fixtures"]

pytestmark = requires_root

MiB = 1024**2
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def spm(api, file_domain_factory):
    sd_id = file_domain_factory(api)
    return make_pool(api, sd_id), sd_id


class Gate:
    """Makes qemu-img create wait, once armed, until released."""

    def __init__(self) -> None:
        self.armed = False
        self.started = threading.Event()
        self.release = threading.Event()


@pytest.fixture
def gate(monkeypatch):
    gate = Gate()
    real = qemuimg.create

    def create(*args, **kwargs):
        if gate.armed:
            gate.started.set()
            assert gate.release.wait(120)
        return real(*args, **kwargs)

    monkeypatch.setattr(qemuimg, "create", create)
    yield gate
    gate.release.set()


def test_task_lifecycle(api, spm):
    pool_id, sd_id = spm
    img, vol = new_id(), new_id()
    task_id = api.volume_create(pool_id, sd_id, img, vol, 16 * MiB, "COW", "SPARSE", "d")
    assert api.task_get_info(task_id) == {"id": task_id, "verb": "Volume.create"}
    status = run_task(api, task_id)
    assert status == {
        "taskID": task_id, "taskState": "finished", "taskResult": "success",
        "code": "", "message": "", "progress": 100,
    }
    assert api.task_get_status(task_id) == status
    assert api.host_get_all_tasks_statuses() == {task_id: status}
    assert api.host_get_all_tasks_info() == {task_id: {"id": task_id, "verb": "Volume.create"}}
    assert api.task_clear(task_id) is True
    for call in (api.task_get_status, api.task_get_info, api.task_clear, api.task_stop):
        with pytest.raises(errors.UnknownTask):
            call(task_id)
    assert api.host_get_all_tasks_statuses() == {}

    delete_id = api.volume_delete(pool_id, sd_id, img, vol)
    assert api.task_get_info(delete_id)["verb"] == "Volume.delete"
    assert run_task(api, delete_id)["taskResult"] == "success"


def test_clear_of_running_task_refused(api, spm, gate):
    pool_id, sd_id = spm
    gate.armed = True
    started, release = gate.started, gate.release
    task_id = api.volume_create(pool_id, sd_id, new_id(), new_id(), MiB, "COW", "SPARSE")
    assert started.wait(60)
    assert api.task_get_status(task_id)["taskState"] == "running"
    with pytest.raises(errors.TaskNotFinished):
        api.task_clear(task_id)
    release.set()
    assert run_task(api, task_id)["taskResult"] == "success"
    assert api.task_clear(task_id) is True


def test_stop_running_create_rolls_back(api, spm, gate):
    pool_id, sd_id = spm
    started, release = gate.started, gate.release
    img, base, vol = new_id(), new_id(), new_id()
    create_volume(api, pool_id, sd_id, img, base, 16 * MiB)
    before = domain_state(api, sd_id)
    gate.armed = True
    task_id = api.volume_create(pool_id, sd_id, img, vol, 16 * MiB, "COW", "SPARSE", "",
                                img, base)
    assert started.wait(60)
    assert api.task_stop(task_id) is True
    assert api.task_get_status(task_id)["taskState"] == "aborting"
    release.set()
    status = run_task(api, task_id)
    assert status["taskResult"] == "cleanFailure"
    assert status["code"] == "TaskAborted"
    assert domain_state(api, sd_id) == before
    assert api.volume_get_info(pool_id, sd_id, img, base)["voltype"] == "LEAF"


def test_spm_only_verbs_refused_when_not_spm(api_factory, file_domain_factory):
    # A pool without SPM: the mailbox waits for one half a second.
    api = api_factory(mailbox=mailbox.Settings(request_timeout=0.5))
    sd_id = file_domain_factory(api)
    pool_id = make_pool(api, sd_id, spm=False)
    img, vol = new_id(), new_id()
    with pytest.raises(errors.SpmStatusError):
        api.volume_create(pool_id, sd_id, img, vol, MiB, "COW", "SPARSE")
    with pytest.raises(errors.SpmStatusError):
        api.volume_delete(pool_id, sd_id, img, vol)
    with pytest.raises(errors.SpmStatusError):
        api.host_get_all_tasks_statuses()
    with pytest.raises(errors.SpmStatusError):
        api.host_get_all_tasks_info()
    # The SPM-request path (virt's): no SPM answers, a code of its own.
    with pytest.raises(errors.SpmRequestUnavailable):
        api.extend(pool_id, sd_id, img, vol, MiB)
    with pytest.raises(errors.UnknownTask):
        api.task_get_status(new_id())
    assert api.storage_domain_get_images(sd_id) == []


def test_no_pool(api):
    with pytest.raises(errors.SpmStatusError):
        api.host_get_all_tasks_statuses()
    with pytest.raises(errors.StoragePoolUnknown):
        api.volume_create(new_id(), new_id(), new_id(), new_id(), MiB, "COW", "SPARSE")
    with pytest.raises(errors.StoragePoolUnknown):
        api.image_teardown(new_id(), new_id(), new_id(), new_id())


def test_verbs_named_for_the_schema(api):
    """Every storage verb of the schema has its handler on the provider."""
    import re

    import yaml

    with open(os.path.join(REPO, "vdsm_lsm", "api.yml")) as f:
        schema = yaml.safe_load(f)
    served = ("StorageDomain.", "StoragePool.", "Volume.", "Task.", "Image.prepare",
              "Image.teardown", "Host.getAllTasks")
    for verb, spec in schema["verbs"].items():
        if not verb.startswith(served):
            continue
        namespace, name = verb.split(".")
        method = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", f"{namespace}_{name}").lower()
        handler = getattr(api, method)
        params = {re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", p).lower() for p in spec["params"]}
        code = handler.__code__
        accepted = set(code.co_varnames[1 : code.co_argcount + code.co_kwonlyargcount])
        assert params <= accepted, (verb, params - accepted)


def test_kill_during_create_then_recovery(api_factory, domain_factory, storage_tmpdir):
    first = api_factory()
    sd_id = domain_factory(first)
    pool_id = make_pool(first, sd_id)
    img, base, vol = new_id(), new_id(), new_id()
    create_volume(first, pool_id, sd_id, img, base, 16 * MiB)
    before = domain_state(first, sd_id)
    entry = first.cache.registry.get(sd_id)
    first.close()

    marker = os.path.join(storage_tmpdir, "creating")
    args = {
        "run_dir": os.path.join(storage_tmpdir, "run-a"),
        "options": API_OPTIONS,
        "pool_id": pool_id,
        "marker": marker,
        "request": {
            "storagepool_id": pool_id, "storagedomain_id": sd_id, "image_id": img,
            "volume_id": vol, "size": 32 * MiB, "vol_format": "COW",
            "preallocate": "SPARSE", "desc": "", "src_img_uuid": img, "src_vol_uuid": base,
        },
    }
    child = subprocess.Popen(
        [sys.executable, "-m", "tests.storage.crash_child", json.dumps(args)],
        cwd=REPO, stdout=subprocess.PIPE, text=True, start_new_session=True,
    )
    try:
        task_id = child.stdout.readline().strip()
        assert task_id, "the child daemon did not submit the task"
        deadline = time.monotonic() + 120
        while not os.path.exists(marker):
            assert child.poll() is None, "the child daemon died early"
            assert time.monotonic() < deadline, "the child never reached qemu-img create"
            time.sleep(0.1)
        # Half-created: its metadata says ILLEGAL.
        observer = api_factory("observer")  # another host looking at the storage
        observer.learn_domain(sd_id, entry["type"], entry)
        md = observer.cache.get(sd_id).manifest.read_volume_metadata(img, vol)
        assert md.legality == "ILLEGAL"
    finally:
        os.killpg(child.pid, signal.SIGKILL)
        child.wait(60)

    restarted = api_factory()  # the same run dir: the daemon restarted
    restarted.recover()
    assert restarted.storage_pool_spm_start(pool_id) is True
    status = restarted.task_get_status(task_id)
    assert status["taskState"] == "finished"
    assert status["taskResult"] == "cleanFailure"
    assert status["code"] == "TaskInterrupted"
    assert domain_state(restarted, sd_id) == before
    with pytest.raises(errors.VolumeDoesNotExist):
        restarted.volume_get_info(pool_id, sd_id, img, vol)
    assert restarted.volume_get_info(pool_id, sd_id, img, base)["voltype"] == "LEAF"
    assert not os.path.lexists(restarted.images.link_path(sd_id, img, vol))
    dom = restarted.cache.get(sd_id)
    if isinstance(dom, block_sd.BlockDomain):
        assert not dom.activation.is_active(sd_id, vol)
        # The volume's metadata slot is free again.
        assert dom.manifest.free_slot(dom.manifest.volume_lvs()) == 1
    # The interrupted creation can be retried.
    create_volume(restarted, pool_id, sd_id, img, vol, 32 * MiB, parent=base)
    assert restarted.task_clear(task_id) is True


@pytest.mark.parametrize("bad", ["../../etc", "not-a-uuid", "", "X" * 36])
def test_ids_that_are_not_uuids_never_become_paths(api, spm, storage_tmpdir, bad):
    """The schema refuses them first; the provider refuses them too, for its
    other callers (virt, image verbs)."""
    pool_id, sd_id = spm
    img, vol = new_id(), new_id()
    create_volume(api, pool_id, sd_id, img, vol, MiB)
    before = domain_state(api, sd_id)
    calls = [
        lambda: api.storage_domain_get_info(bad),
        lambda: api.volume_get_info(pool_id, sd_id, bad, vol),
        lambda: api.volume_get_info(pool_id, sd_id, img, bad),
        lambda: api.image_prepare(pool_id, sd_id, img, bad),
        lambda: api.image_prepare(pool_id, sd_id, bad, vol),
        lambda: api.volume_create(pool_id, sd_id, bad, new_id(), MiB, "COW", "SPARSE"),
        lambda: api.volume_create(pool_id, sd_id, img, bad, MiB, "COW", "SPARSE", "", img, vol),
        lambda: api.storage_domain_get_volumes(sd_id, pool_id, bad),
    ]
    for call in calls:
        with pytest.raises(errors.InvalidUUID):
            call()
    assert domain_state(api, sd_id) == before
    assert not os.path.exists(os.path.join(storage_tmpdir, "etc"))
