"""Dispatch: handlers found by name, errors mapped to codes in one place."""

from __future__ import annotations

import logging

import pytest

from rpc import dispatch, errors
from vdsm_lsm import app

UUID = "4c3a1f0e-3b9a-4d0f-9e59-5c4b7a6e8d21"


class VolumeMissing(errors.Error):
    name = "VolumeDoesNotExist"
    msg = "Volume {vol} does not exist"


class Provider:
    """A tiny provider; its handlers fail the ways real ones can."""

    def __init__(self):
        self.calls = []

    def host_ping2(self):
        return True

    def storage_domain_get_info(self, storagedomain_id):
        self.calls.append(storagedomain_id)
        raise VolumeMissing(vol=storagedomain_id)

    def storage_domain_get_stats(self, storagedomain_id):
        raise RuntimeError("boom")

    def image_clone_structure(self, image_id, storagepool_id, storagedomain_id, dst_sd_uuid):
        return {"image": image_id, "dst": dst_sd_uuid}


@pytest.fixture
def dispatcher():
    provider = Provider()
    d = dispatch.Dispatcher(app.load_schema(), [provider])
    d.provider = provider
    return d


def test_ok(dispatcher):
    assert dispatcher.handle("Host.ping2", {}) == (True, True)


def test_expected_error_code(dispatcher):
    ok, (code, message) = dispatcher.handle("StorageDomain.getInfo", {"storagedomainID": UUID})
    assert not ok and code == 201 and UUID in message


def test_unexpected_error_is_general_exception_with_traceback(dispatcher, caplog):
    caplog.set_level(logging.ERROR)
    ok, (code, message) = dispatcher.handle("StorageDomain.getStats", {"storagedomainID": UUID})
    assert not ok and code == 100 and "boom" in message
    assert any(r.exc_info for r in caplog.records)


def test_unimplemented_verb_is_noimpl(dispatcher):
    ok, (code, _) = dispatcher.handle("Host.getCapabilities", {})
    assert (ok, code) == (False, 44)


def test_alias_reaches_handler(dispatcher):
    ok, result = dispatcher.handle(
        "cloneImageStructure", {"spUUID": UUID, "sdUUID": UUID, "imgUUID": UUID, "dstSdUUID": UUID}
    )
    assert ok and result == {"image": UUID, "dst": UUID}


def test_invalid_params_never_reach_handler(dispatcher):
    ok, (code, _) = dispatcher.handle("StorageDomain.getInfo", {"storagedomainID": "../x"})
    assert (ok, code) == (False, -32602)
    assert dispatcher.provider.calls == []


def test_verb_served_twice_refused():
    with pytest.raises(ValueError, match="served twice"):
        dispatch.Dispatcher(app.load_schema(), [Provider(), Provider()])


def test_requests_are_logged(dispatcher, caplog):
    caplog.set_level(logging.INFO, logger="rpc.dispatch")
    dispatcher.handle("Host.ping2", {})
    assert any("method=Host.ping2" in r.getMessage() and "code=0" in r.getMessage()
               for r in caplog.records)


class TaskProvider:
    """Answers task statuses the way storage reports them: an error name."""

    def __init__(self, code):
        self.code = code

    def task_get_status(self, task_id):
        return {"taskID": task_id, "taskState": "finished", "taskResult": "cleanFailure",
                "code": self.code, "message": "gone", "progress": 100}


@pytest.mark.parametrize(
    "given, code, error",
    [
        ("VolumeDoesNotExist", 201, "VolumeDoesNotExist"),
        ("", 0, ""),
        # A handler that gives the code itself: kept, its name looked up.
        (201, 201, "VolumeDoesNotExist"),
    ],
)
def test_task_status_codes_mapped_by_dispatch(given, code, error):
    d = dispatch.Dispatcher(app.load_schema(), [TaskProvider(given)])
    ok, status = d.handle("Task.getStatus", {"taskID": UUID})
    assert ok and (status["code"], status["error"]) == (code, error)
    assert status["taskID"] == UUID and status["message"] == "gone"


def test_handlers_are_listed_by_verb(dispatcher):
    handlers = dispatcher.handlers()
    assert set(handlers) == dispatcher.implemented()
    assert handlers["Host.ping2"]() is True
