"""What the STOMP tests share: a VDSM-style client that is not ours, and a pool to run on.

:class:`VdsmStomp` speaks to the daemon as the engine and ``vdsm-client``
do, with ``stomp.py`` (PyPI) frames over TCP: requests ``SEND`` to
``jms.topic.vdsm_requests`` (storage verbs to ``jms.topic.vdsm_irs_requests``,
as the engine's IRS broker does) with a ``reply-to`` of its own, and a
subscription to ``jms.queue.events`` whose notifications it keeps.

:class:`Site` is a daemon with a pool of two file domains (source,
destination), made over that client with VDSM-shaped params; the daemon
is the SPM (one daemon, ``cluster_lock = local``).
"""

from __future__ import annotations

import itertools
import json
import os
import queue
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import stomp as stomp_py

from vdsm_lsm import client_errors

REQUESTS = "jms.topic.vdsm_requests"
IRS_REQUESTS = "jms.topic.vdsm_irs_requests"
EVENTS = "jms.queue.events"
BLANK = "00000000-0000-0000-0000-000000000000"
MiB = 1024**2
STORAGE_NAMESPACES = ("StorageDomain.", "StoragePool.", "Volume.", "Image.", "Task.")


def new_id() -> str:
    return str(uuid.uuid4())


class VdsmStomp(stomp_py.ConnectionListener):
    """JSON-RPC over stomp.py: calls answered by id, events kept in order."""

    def __init__(self, port: int, timeout: float = 120.0) -> None:
        self.timeout = timeout
        self.reply_to = f"jms.queue.reqs.{new_id()}"
        self._ids = itertools.count(1)
        self._cond = threading.Condition()
        self._replies: dict[Any, dict[str, Any]] = {}
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.errors: queue.Queue[Any] = queue.Queue()
        self.conn = stomp_py.Connection12([("127.0.0.1", port)], heartbeats=(0, 0))
        self.conn.set_listener("vdsm", self)
        self.conn.connect(wait=True)
        self.conn.subscribe(self.reply_to, id="replies")
        self.conn.subscribe(EVENTS, id="events")

    # stomp.py's listener

    def on_message(self, frame: Any) -> None:
        message = json.loads(frame.body)
        with self._cond:
            if frame.headers.get("subscription") == "events":
                self.events.append((message["method"], message["params"]))
            else:
                self._replies[message["id"]] = message
            self._cond.notify_all()

    def on_error(self, frame: Any) -> None:
        self.errors.put(frame)

    # Calls

    def call(self, method: str, **params: Any) -> Any:
        req_id = next(self._ids)
        body = json.dumps({"jsonrpc": "2.0", "id": req_id, "method": method, "params": params})
        destination = IRS_REQUESTS if method.startswith(STORAGE_NAMESPACES) else REQUESTS
        self.conn.send(destination, body, content_type="application/json",
                       headers={"reply-to": self.reply_to})
        with self._cond:
            if not self._cond.wait_for(lambda: req_id in self._replies, self.timeout):
                raise TimeoutError(f"no answer to {method} in {self.timeout}s")
            response = self._replies.pop(req_id)
        if "error" in response:
            raise client_errors.ClientError(response["error"]["code"],
                                            response["error"]["message"])
        return response["result"]

    def error_code(self, method: str, **params: Any) -> int:
        try:
            self.call(method, **params)
        except client_errors.ClientError as e:
            return e.code
        raise AssertionError(f"{method} succeeded")

    # Events

    def wait_event(self, name: str, predicate: Callable[[dict[str, Any]], bool] | None = None,
                   timeout: float = 120.0, after: int = 0) -> dict[str, Any]:
        """The params of the first event named name (from the after-th on)."""
        def found() -> dict[str, Any] | None:
            for method, params in self.events[after:]:
                if method == name and (predicate is None or predicate(params)):
                    return params
            return None

        with self._cond:
            if not self._cond.wait_for(lambda: found() is not None, timeout):
                raise TimeoutError(f"no event {name} in {timeout}s: got {self.events}")
            result = found()
        assert result is not None
        return result

    def mark(self) -> int:
        """How many events came so far (wait_event's after)."""
        with self._cond:
            return len(self.events)

    def wait_task(self, task_id: str, timeout: float = 120.0) -> dict[str, Any]:
        """Wait for the task's task_finished event (no polling), check it, clear the task."""
        event = self.wait_event(f"|storage|task_finished|{task_id}", timeout=timeout)
        status = self.call("Task.getStatus", taskID=task_id)
        assert status["taskState"] == "finished", status
        assert (event["taskResult"], event["code"]) == (status["taskResult"], status["code"])
        self.call("Task.clear", taskID=task_id)
        return event

    def close(self) -> None:
        if self.conn.is_connected():
            self.conn.disconnect()


class Site:
    """A daemon (SPM, local lock) with a pool of a source and a destination file domain."""

    def __init__(self, daemon: Any, workdir: str) -> None:
        self.daemon = daemon
        self.rpc = VdsmStomp(daemon.port)
        self.pool_id, self.src_sd, self.dst_sd = new_id(), new_id(), new_id()
        self.paths = {self.src_sd: os.path.join(workdir, "src"),
                      self.dst_sd: os.path.join(workdir, "dst")}
        self.made: list[str] = []
        for sd_id, path in self.paths.items():
            os.makedirs(path, exist_ok=True)
            self.rpc.call("StorageDomain.create", storagedomainID=sd_id, domainType="file",
                          typeArgs={"path": path}, name=f"stomp-{sd_id[:8]}", domainClass=1,
                          version=5, blockSize=512, maxHosts=250)
            self.made.append(sd_id)
        self.rpc.call("StoragePool.create", storagepoolID=self.pool_id, name="stomp",
                      masterSdUUID=self.src_sd, masterVersion=1,
                      domainList=[self.src_sd, self.dst_sd], lockRenewalIntervalSec=5,
                      leaseTimeSec=60, ioOpTimeoutSec=10, leaseRetries=3)
        self.rpc.call("StoragePool.connect", storagepoolID=self.pool_id, hostID=1,
                      scsiKey=self.pool_id, masterSdUUID=self.src_sd, masterVersion=1,
                      domainDict={self.src_sd: "active", self.dst_sd: "active"})
        self.rpc.call("StoragePool.spmStart", storagepoolID=self.pool_id, prevID=-1,
                      prevLver="-1", enableScsiFencing="false", maxHostID=250, domVersion="5")

    def create_volume(self, img_id: str, vol_id: str, fmt: str, parent: str = BLANK,
                      size: int = 64 * MiB) -> None:
        """Volume.create as the engine sends it (the size a string, a diskType)."""
        self.rpc.wait_task(self.rpc.call(
            "Volume.create", storagepoolID=self.pool_id, storagedomainID=self.src_sd,
            imageID=img_id, volumeID=vol_id, size=str(size), volFormat=fmt,
            preallocate="SPARSE", diskType="DATA", desc="",
            srcImgUUID=img_id if parent != BLANK else BLANK, srcVolUUID=parent,
        ))

    def volume_path(self, sd_id: str, img_id: str, vol_id: str) -> str:
        return os.path.join(self.paths[sd_id], sd_id, "images", img_id, vol_id)

    def drive(self, sd_id: str, img_id: str, vol_id: str) -> dict[str, str]:
        """A DriveSpecVolume as the engine sends it (with device and diskType)."""
        return {"poolID": self.pool_id, "domainID": sd_id, "imageID": img_id,
                "volumeID": vol_id, "device": "disk", "diskType": "file"}

    def start_guest(self, vm_params: Any, img: str, leaf: str) -> Any:
        drive = {"poolID": self.pool_id, "domainID": self.src_sd, "imageID": img,
                 "volumeID": leaf, "format": "cow"}
        vm = vm_params([drive], rate=50)
        mark = self.rpc.mark()
        self.rpc.call("VM.create", vmID=vm.vm_id, vmParams=vm.params)
        self.rpc.wait_event(f"|virt|VM_status|{vm.vm_id}",
                            lambda p: p[vm.vm_id]["status"] == "Up", after=mark)
        vm.wait_acks(30)
        return vm

    def cleanup(self, vm_ids: list[str]) -> None:
        for vm_id in vm_ids:
            try:
                self.rpc.call("VM.destroy", vmID=vm_id)
            except (client_errors.ClientError, OSError, TimeoutError):
                pass
        for method, params in [("StoragePool.destroy", {"storagepoolID": self.pool_id})] + [
            ("StorageDomain.format", {"storagedomainID": sd_id}) for sd_id in self.made
        ]:
            try:
                self.rpc.call(method, **params)
            except (client_errors.ClientError, OSError, TimeoutError) as e:
                print(f"clean-up {method}: {e}")
        self.rpc.close()


def wait_for(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.2)
