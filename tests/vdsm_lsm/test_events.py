"""Pushed events: VM status, mirror ready / failed, SPM task finished.

The daemon's event sink (vdsm_lsm/events.py) is tested alone first: what
virt and storage report becomes the notification the schema's ``events:``
section lists (each checked against it), and the reports come where they
should (a VM's status change, a replica's BLOCK_JOB_2 event, a finished
task).  Then against a real daemon and the real test guest: subscribers of
``jms.queue.events`` (stomp.py over TCP, and frames written by hand over
the unix socket) receive VM_status for a VM started, paused (through
libvirt, as an admin would), resumed (VM.cont) and destroyed, VM_replication
when its mirror becomes ready, and task_finished for every task.  The
move-disk flow waits on such events (a fake daemon here).
"""

from __future__ import annotations

import json
import socket
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import libvirt
import pytest

from storage import errors as storage_errors
from storage import task, task_manager
from tests.rpc.conftest import RawStomp, frame
from tests.vdsm_lsm import stomp_env
from tests.vdsm_lsm.stomp_env import new_id
from tests.virt.conftest import (  # noqa: F401
    domains,
    guest_files,
    libvirt_connection,
    vm_params,
    workdir,
)
from vdsm_lsm import api_schema, events, move_disk
from virt import drive as drive_mod
from virt import events as virt_events
from virt import vm as vm_mod

SCHEMA = api_schema.load()


def check_event(method: str, params: dict[str, Any]) -> None:
    """params are what the schema's events: section says for method."""
    for name, event in SCHEMA.events.items():
        head = name.rpartition("|")[0] + "|"
        if not method.startswith(head):
            continue
        ident = method[len(head):]
        assert uuid.UUID(ident)
        for param in event.params:
            key = ident if param.name.startswith("<") else param.name
            assert key in params, (method, key, params)
            SCHEMA.check_value(param.spec, params[key], key)
        extra = set(params) - {p.name for p in event.params} - {ident, "notify_time"}
        assert not extra, (method, extra)
        return
    raise AssertionError(f"no such event in the schema: {method}")


class Sink:
    def __init__(self) -> None:
        self.published: list[tuple[str, dict[str, Any]]] = []

    def __call__(self, method: str, params: dict[str, Any]) -> None:
        check_event(method, params)
        self.published.append((method, params))


@pytest.fixture
def sink() -> Sink:
    return Sink()


@pytest.fixture
def sent(sink: Sink) -> events.Events:
    return events.Events(SCHEMA, sink)


# The sink


def test_vm_status_is_vdsms_event(sent, sink):
    vm_id = new_id()
    sent.vm_status(vm_id, "Paused", "ENOSPC")
    sent.vm_status(vm_id, "Up", "NOERR")
    (m1, p1), (m2, p2) = sink.published
    assert m1 == m2 == f"|virt|VM_status|{vm_id}"
    assert p1[vm_id]["status"] == "Paused" and p1[vm_id]["pauseCode"] == "ENOSPC"
    assert p2[vm_id]["status"] == "Up" and "pauseCode" not in p2[vm_id]
    assert int(p2[vm_id]["statusTime"]) >= int(p1[vm_id]["statusTime"])


def test_replication_and_task_finished_events(sent, sink):
    vm_id, task_id = new_id(), new_id()
    sent.replication(vm_id, "vda", "ready")
    sent.task_finished({"taskID": task_id, "taskState": "finished", "taskResult": "success",
                        "code": "", "message": "", "progress": 100})
    sent.task_finished({"taskID": task_id, "taskResult": "cleanFailure",
                        "code": "TaskAborted", "message": "stopped"})
    assert sink.published == [
        (f"|virt|VM_replication|{vm_id}", {"drive": "vda", "state": "ready"}),
        (f"|storage|task_finished|{task_id}",
         {"taskID": task_id, "taskResult": "success", "code": 0}),
        (f"|storage|task_finished|{task_id}",
         {"taskID": task_id, "taskResult": "cleanFailure",
          "code": api_schema.code_of("TaskAborted")}),
    ]


def test_no_sink_drops_and_a_failing_sink_is_contained():
    e = events.Events(SCHEMA)
    e.vm_status(new_id(), "Up", "NOERR")  # nowhere to go: dropped

    def broken(method: str, params: Any) -> None:
        raise RuntimeError("down")

    e.publish = broken
    e.replication(new_id(), "vda", "failed")  # logged, not raised


# Where the reports come from


def test_vm_status_change_is_told_once(sent, sink):
    vm = vm_mod.VM(new_id(), "x", [], conn=None)  # type: ignore[arg-type]
    vm.notifier = sent
    vm.set_status(vm_mod.UP)
    vm.set_status(vm_mod.UP)  # no change, no event
    vm.set_status(vm_mod.PAUSED, vm_mod.EOTHER)
    vm.set_status(vm_mod.PAUSED, vm_mod.ENOSPC)  # the pause code changed
    vm.set_status(vm_mod.PAUSED)  # kept
    vm.set_status(vm_mod.DOWN)
    told = [(p[vm.id]["status"], p[vm.id].get("pauseCode")) for _, p in sink.published]
    assert told == [("Up", None), ("Paused", "EOTHER"), ("Paused", "ENOSPC"), ("Down", None)]


def test_block_job_events_tell_ready_and_failed_once(sent, sink):
    d = drive_mod.Drive("vda", new_id(), new_id(), new_id(), new_id(), "cow",
                        [drive_mod.Volume(new_id(), "/x", "COW")])
    d.replica = drive_mod.Replica(d.pool_id, new_id(), d.image_id, d.volume_id)
    vm = vm_mod.VM(new_id(), "x", [d], conn=None)  # type: ignore[arg-type]
    dispatcher = virt_events.Dispatcher(lambda vm_id: vm)
    dispatcher.notifier = sent
    copy = libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_COPY
    dispatcher.block_job(vm, "vda", copy, libvirt.VIR_DOMAIN_BLOCK_JOB_READY)
    dispatcher.block_job(vm, "vda", copy, libvirt.VIR_DOMAIN_BLOCK_JOB_READY)
    dispatcher.block_job(vm, "vda", copy, libvirt.VIR_DOMAIN_BLOCK_JOB_FAILED)
    assert [p for _, p in sink.published] == [
        {"drive": "vda", "state": "ready"}, {"drive": "vda", "state": "failed"}]


class Job:
    kind = None
    params: dict[str, Any] = {}

    def __init__(self, error: Exception | None = None) -> None:
        self.error = error
        self.go = threading.Event()

    def run(self, ctx: task.Context) -> None:
        self.go.wait(30)
        if self.error is not None:
            raise self.error

    def rollback(self, ctx: task.Context) -> None:
        pass


def test_task_manager_tells_every_finished_task(sent, sink):
    manager = task_manager.TaskManager(workers=1, on_finished=sent.task_finished)
    try:
        ok, failing, queued = Job(), Job(storage_errors.VolumeDoesNotExist(
            vol_id=new_id(), sd_id=new_id())), Job()
        ids = [manager.submit("test", job) for job in (ok, failing, queued)]
        manager.stop(ids[2])  # still queued behind the others: ends at once
        ok.go.set()
        failing.go.set()
        for task_id in ids:
            manager.wait(task_id, 30)
    finally:
        manager.shutdown()
    told = {p["taskID"]: (p["taskResult"], p["code"]) for _, p in sink.published}
    assert told == {
        ids[0]: ("success", 0),
        ids[1]: ("cleanFailure", api_schema.code_of("VolumeDoesNotExist")),
        ids[2]: ("cleanFailure", api_schema.code_of("TaskAborted")),
    }
    assert len(sink.published) == 3


# move-disk waits on events when it has them


class Answers:
    """A daemon that is the VM's host and the SPM; every task finishes at once."""

    def __init__(self, vm_id: str, src: str, dst: str, pool: str) -> None:
        self.vm_id, self.src, self.dst, self.pool = vm_id, src, dst, pool
        self.img, self.leaf = new_id(), new_id()
        self.calls: list[str] = []
        self.state = "copying"
        self.on = src

    def call(self, method: str, **params: Any) -> Any:
        self.calls.append(method)
        if method == "VM.getStats":
            disk: dict[str, Any] = {"poolID": self.pool, "domainID": self.on,
                                    "imageID": self.img, "volumeID": self.leaf,
                                    "volumeChain": [{"volumeID": self.leaf}]}
            if self.on == self.src and self.state != "idle":
                disk["replicate"] = {"state": self.state, "cur": 5, "end": 5}
            if "VM.diskReplicateStart" not in self.calls:
                disk.pop("replicate", None)
            return [{"vmId": self.vm_id, "status": "Up", "disks": {"vda": disk}}]
        if method == "VM.snapshot":
            self.leaf = params["snapDrives"][0]["volumeID"]
            return True
        if method == "Image.verify":
            return {"equal": True, "volumes": []}
        if method == "VM.diskReplicateStart":
            self.state = "copying"
            return True
        if method == "VM.diskReplicateFinish":
            self.on = self.dst
            return True
        if method == "Task.getStatus":
            # A task is finished the second time it is asked about.
            done = self.calls.count("Task.getStatus") % 2 == 0
            return {"taskID": params["taskID"], "taskState": "finished" if done else "running",
                    "taskResult": "success" if done else "", "code": 0, "message": "",
                    "progress": 100 if done else 10}
        return {
            "StoragePool.getInfo": {"dominfo": {self.src: {}, self.dst: {}}},
            "StoragePool.getSpmStatus": {"spmStatus": "SPM", "spmId": 1},
            "Volume.getInfo": {"capacity": 1 << 30},
        }.get(method, new_id() if method in (
            "Volume.create", "Image.cloneStructure", "Image.syncData", "Image.delete")
            else True)


class FakeEvents:
    def __init__(self, answers: Answers) -> None:
        self.answers = answers
        self.waited: list[str] = []

    def wait(self, prefix: str, predicate: Any = None, timeout: float = 60.0) -> Any:
        self.waited.append(prefix)
        if prefix.startswith(move_disk.VM_REPLICATION):
            self.answers.state = "ready"
            params = {"drive": "vda", "state": "ready"}
            assert predicate is None or predicate(params)
            return params
        return {"taskResult": "success", "code": 0}


def test_move_disk_waits_on_events_not_on_a_poll_interval(monkeypatch):
    answers = Answers(new_id(), new_id(), new_id(), new_id())
    fake = FakeEvents(answers)
    slept: list[float] = []
    monkeypatch.setattr(move_disk.MoveDisk, "_sleep", lambda self, s: slept.append(s))
    flow = move_disk.MoveDisk(answers, answers.vm_id, answers.dst, events=fake,
                              delete_source=True)
    summary = flow.run()
    assert summary["dstDomainID"] == answers.dst
    assert slept == []  # never a poll interval: each wait was an event's
    tasks = [name for name in fake.waited if name.startswith(move_disk.TASK_FINISHED)]
    assert len(tasks) == 4  # snapshot leaf, clone, sync, delete source
    assert fake.waited.count(move_disk.VM_REPLICATION + answers.vm_id) == 1
    assert answers.calls.count("Task.getStatus") == 8  # running, then finished


# Against the daemon and the test guest


@pytest.fixture
def site(daemon_factory: Any, workdir: str, domains: list[str]) -> Iterator[stomp_env.Site]:  # noqa: F811
    s = stomp_env.Site(daemon_factory({"sanlock": {"cluster_lock": "local"}}), workdir)
    try:
        yield s
    finally:
        s.cleanup(list(domains))


@pytest.fixture
def raw_events(site: stomp_env.Site) -> Iterator[RawStomp]:
    """A second subscriber: frames by hand over the unix socket, events only."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(30)
    sock.connect(site.daemon.socket_path)
    raw = RawStomp(sock)
    raw.connect()
    raw.send(frame("SUBSCRIBE", {"destination": stomp_env.EVENTS, "id": "ev",
                                 "receipt": "sub"}))
    assert raw.next()[0] == "RECEIPT"
    yield raw
    raw.close()


def raw_event(raw: RawStomp, name: str) -> dict[str, Any]:
    while True:
        command, headers, body = raw.next(timeout=60)
        assert command == "MESSAGE" and headers["subscription"] == "ev", (command, headers)
        message = json.loads(body)
        assert "id" not in message  # a notification
        if message["method"] == name:
            return message["params"]


def test_events_reach_subscribers_for_pause_resume_mirror_and_tasks(
    site, raw_events, vm_params  # noqa: F811
):
    rpc = site.rpc
    img, base, leaf = new_id(), new_id(), new_id()
    site.create_volume(img, base, "RAW")  # each waits for its task_finished event
    site.create_volume(img, leaf, "COW", parent=base)
    vm = site.start_guest(vm_params, img, leaf)  # waits for VM_status Up
    name = f"|virt|VM_status|{vm.vm_id}"
    assert raw_event(raw_events, name)[vm.vm_id]["status"] == "Up"

    # Paused from outside the daemon (libvirt's lifecycle event), then VM.cont.
    conn = libvirt_connection()
    try:
        mark = rpc.mark()
        conn.lookupByUUIDString(vm.vm_id).suspend()
        paused = rpc.wait_event(name, after=mark)[vm.vm_id]
        assert (paused["status"], paused["pauseCode"]) == ("Paused", "NOERR")
        assert raw_event(raw_events, name)[vm.vm_id]["status"] == "Paused"
        assert rpc.call("VM.getStats", vmID=vm.vm_id)[0]["status"] == "Paused"
    finally:
        conn.close()
    mark = rpc.mark()
    assert rpc.call("VM.cont", vmID=vm.vm_id) is True
    assert rpc.wait_event(name, after=mark)[vm.vm_id]["status"] == "Up"
    assert raw_event(raw_events, name)[vm.vm_id]["status"] == "Up"
    vm.wait_acks(vm.acks() + 10)

    # A mirror becoming ready, then aborted: no pivot, the VM stays.
    rpc.wait_task(rpc.call("Image.cloneStructure", imageID=img, storagepoolID=site.pool_id,
                           storagedomainID=site.src_sd, dstSdUUID=site.dst_sd))
    src = site.drive(site.src_sd, img, leaf)
    mark = rpc.mark()
    rpc.call("VM.diskReplicateStart", vmID=vm.vm_id, srcDisk=src,
             dstDisk=site.drive(site.dst_sd, img, leaf))
    replication = f"|virt|VM_replication|{vm.vm_id}"
    ready = rpc.wait_event(replication, after=mark)
    assert (ready["drive"], ready["state"]) == ("vda", "ready")
    assert raw_event(raw_events, replication)["state"] == "ready"
    rpc.call("VM.diskReplicateFinish", vmID=vm.vm_id, srcDisk=src, dstDisk=src)
    event = rpc.wait_task(rpc.call("Image.delete", imageID=img, storagepoolID=site.pool_id,
                                   storagedomainID=site.dst_sd))
    assert (event["taskResult"], event["code"]) == ("success", 0)

    mark = rpc.mark()
    rpc.call("VM.destroy", vmID=vm.vm_id)
    assert rpc.wait_event(name, after=mark)[vm.vm_id]["status"] == "Down"
    assert raw_event(raw_events, name)[vm.vm_id]["status"] == "Down"
    for method, params in rpc.events:
        check_event(method, params)
    assert rpc.errors.empty()
