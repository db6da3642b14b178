"""The daemon's wiring serves the schema's verbs, with handlers that match it."""

from __future__ import annotations

import inspect
import os
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from rpc import schema
from storage import jobs, task
from vdsm_lsm import app, config
from virt import thinp

# Verbs of the schema that no provider serves (they answer noimpl, 44): none
# today. A verb added to the schema before its handler is listed here.
NOT_YET: set[str] = set()


@pytest.fixture
def cfg(tmp_path) -> config.Config:
    conf = tmp_path / "vdsm-lsm.conf"
    conf.write_text(
        f"[irs]\nrun_dir = {tmp_path}/run\nstate_dir = {tmp_path}/state\n"
        "volume_utilization_percent = 30\nvolume_utilization_chunk_mb = 64\n"
        "task_workers = 3\n"
        "[sanlock]\ncluster_lock = local\n"
        "[thinp]\nmonitor_interval = 0.5\n"
        "[vm]\naccel = tcg\n"
    )
    return config.load(str(conf))


@pytest.fixture
def daemon_app(cfg: config.Config) -> Iterator[app.App]:
    # The real wiring; libvirt is only connected at start(), which this does not call.
    a = app.App(cfg)
    try:
        yield a
    finally:
        a.storage.close()


def test_every_verb_has_a_provider(daemon_app):
    verbs = {name for name, verb in daemon_app.schema.verbs.items() if verb.target is None}
    assert daemon_app.dispatcher.implemented() == verbs - NOT_YET


def _signature_drift(verb: schema.Verb, handler: object) -> list[str]:
    """How the handler's parameters differ from the verb's params."""
    params = inspect.signature(handler).parameters  # type: ignore[arg-type]
    drift = [
        f"*{name}" for name, p in params.items()
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    ]
    has = {
        name: p.default is inspect.Parameter.empty
        for name, p in params.items()
        if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    }
    wants = {schema.snake_case(p.name): p.required for p in verb.params}
    for name in sorted(set(has) | set(wants)):
        if name not in wants:
            drift.append(f"{name}: not a param")
        elif name not in has:
            drift.append(f"{name}: not taken")
        elif wants[name] and not has[name]:
            drift.append(f"{name}: required, but has a default")
        elif not wants[name] and has[name]:
            drift.append(f"{name}: optional, but has no default")
    return drift


def test_every_handler_signature_matches_its_params(daemon_app):
    # Required params are parameters without a default, optional ones (a
    # schema default or required: false) parameters with one; nothing else.
    handlers = daemon_app.dispatcher.handlers()
    drift = {
        name: problems
        for name, verb in daemon_app.schema.verbs.items()
        if verb.target is None and name in handlers
        for problems in [_signature_drift(verb, handlers[name])]
        if problems
    }
    assert drift == {}


def test_signature_check_finds_drift():
    verb = schema.Verb(
        "A.b", "", (schema.Param("volumeID", {"type": "uuid"}),
                    schema.Param("force", {"type": "bool", "default": False})), ""
    )

    def good(volume_id, force=False): ...
    def renamed(vol_id, force=False): ...
    def no_default(volume_id, force): ...
    def loose(volume_id, force=False, **kw): ...

    assert _signature_drift(verb, good) == []
    assert _signature_drift(verb, renamed) == ["vol_id: not a param", "volume_id: not taken"]
    assert _signature_drift(verb, no_default) == ["force: optional, but has no default"]
    assert _signature_drift(verb, loose) == ["*kw"]


def test_task_status_type_names_what_storage_reports(daemon_app):
    # The schema's TaskStatus is storage's status plus the name rpc adds.
    reported = task.Task("t", "Volume.create", None).status()
    declared = daemon_app.schema.types["TaskStatus"]["properties"]
    assert set(declared) == set(reported) | {schema.ERROR_NAME_KEY}
    assert declared["code"]["type"] == schema.ERROR_CODE


def test_config_becomes_each_package_settings(cfg, daemon_app):
    virt_config = app.virt_config(cfg)
    assert (virt_config.libvirt_uri, virt_config.accel) == ("qemu:///system", "tcg")
    assert virt_config.thinp == thinp.Config(interval=0.5, utilization_percent=30, chunk_mb=64)
    # The monitor gets those settings as they are.
    assert daemon_app.virt.thinp is not None
    assert daemon_app.virt.thinp.config is daemon_app.virt._config.thinp
    # Recovery adopts only VMs on this host's prepare links.
    assert daemon_app.virt._config.drive_root == os.path.join(cfg.irs.run_dir, "storage")
    storage = daemon_app.storage
    assert storage.run_dir == cfg.irs.run_dir and storage.state_dir == cfg.irs.state_dir
    assert (storage.chunk_size, storage.task_workers) == (64 * 1024**2, 3)
    assert storage.cluster_lock_mode == "local"
    # [sanlock] io_timeout reaches new lockspaces and add_lockspace.
    assert storage.env.io_timeout == cfg.sanlock.io_timeout
    # The one job table, bound to this provider's services: syncs copy at
    # [irs] copy_rate_limit_mb.
    limit = cfg.irs.copy_rate_limit_mb * 1024**2 or None  # 0: no limit
    assert storage.job_services.copy_rate_limit_bps == limit
    assert set(storage.job_kinds) == {kind.name for kind in jobs.KINDS}


def _wait_finished(a: app.App, task_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 60
    while True:
        ok, status = a.dispatcher.handle("Task.getStatus", {"taskID": task_id})
        assert ok, status
        if status["taskState"] == "finished":
            return status
        assert time.monotonic() < deadline, f"task {task_id} not finished: {status}"
        time.sleep(0.05)


def test_task_statuses_answered_with_codes_through_the_wiring(daemon_app, tmp_path):
    # Storage reports error names; the caller gets numbers and the name beside.
    handle = daemon_app.dispatcher.handle
    sd_id, pool_id = str(uuid.uuid4()), str(uuid.uuid4())
    (tmp_path / "domain").mkdir()
    for method, params in [
        ("StorageDomain.create", {"storagedomainID": sd_id, "domainType": "file",
                                  "typeArgs": {"path": str(tmp_path / "domain")}, "name": "d"}),
        ("StoragePool.create", {"storagepoolID": pool_id, "name": "p", "masterSdUUID": sd_id,
                                "domainList": [sd_id]}),
        ("StoragePool.connect", {"storagepoolID": pool_id, "hostID": 1, "masterSdUUID": sd_id}),
        ("StoragePool.spmStart", {"storagepoolID": pool_id}),
    ]:
        assert handle(method, params) == (True, True), method

    def create(**over: object) -> str:
        params = {"storagepoolID": pool_id, "storagedomainID": sd_id,
                  "imageID": str(uuid.uuid4()), "volumeID": str(uuid.uuid4()),
                  "size": 1 << 20, "volFormat": "COW", "preallocate": "SPARSE", **over}
        ok, task_id = handle("Volume.create", params)
        assert ok, task_id
        return task_id

    good = _wait_finished(daemon_app, create())
    # Allocating a petabyte fails in the task (qemu-img or the file system refuses).
    bad = _wait_finished(daemon_app, create(size=1 << 50, volFormat="RAW",
                                            preallocate="PREALLOCATED"))
    try:
        assert (good["taskResult"], good["code"], good["error"]) == ("success", 0, "")
        assert bad["taskResult"] == "cleanFailure" and bad["error"]
        assert bad["code"] == daemon_app.schema.code_of(bad["error"]) != 0
        ok, statuses = handle("Host.getAllTasksStatuses", {})
        assert ok and statuses[good["taskID"]] == good and statuses[bad["taskID"]] == bad
    finally:
        handle("StoragePool.destroy", {"storagepoolID": pool_id})
