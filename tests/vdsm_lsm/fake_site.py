"""A fake daemon for the move-disk flow: the VM's host and the SPM in one object.

It keeps the state the flow changes (which domain and leaf the drive runs,
its mirror, the images and volumes of each domain, SPM tasks) and answers the
verbs the flow calls from it, as the real daemon would.  A task is running
the first time ``Task.getStatus`` asks and finished the next.  The mirror
is ready after ``ready_after`` readings of ``VM.getStats`` (``None`` when
background: never; write-blocking mirrors are ready at the next reading).

``kill_after(step)`` simulates ``kill -9`` of move-disk right after the
journal records that step: from then on every call raises :class:`Killed`
(a BaseException, so the flow cannot roll back: it is dead), until
``revive()``.
"""

from __future__ import annotations

import uuid
from typing import Any

from rpc import schema
from vdsm_lsm import api_schema, client_errors, journal

MiB = 1024**2
BLANK = "00000000-0000-0000-0000-000000000000"


class Killed(BaseException):
    """move-disk was killed (the test's kill -9)."""


def refusal(name: str, message: str = "refused") -> client_errors.ClientError:
    return client_errors.ClientError(api_schema.code_of(name), message)


class FakeSite:
    def __init__(self) -> None:
        self.vm_id, self.pool = str(uuid.uuid4()), str(uuid.uuid4())
        self.src, self.dst = str(uuid.uuid4()), str(uuid.uuid4())
        self.img, self.base = str(uuid.uuid4()), str(uuid.uuid4())
        self.on, self.leaf = self.src, self.base
        self.replicate: dict[str, Any] | None = None
        self.volumes: dict[str, dict[str, dict[str, Any]]] = {
            self.src: {self.base: {"parent": BLANK, "legality": "LEGAL"}}}
        self.tasks: dict[str, dict[str, Any]] = {}
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.ready_after: int | None = 2
        self.sync_writes_supported = True
        self.verify_equal = True
        self._killed = False
        self._stop_at: str | None = None

    # Kills

    def kill_after(self, step: str, monkeypatch: Any) -> None:
        self._stop_at = step

        def stop(name: str) -> None:
            if name == self._stop_at:
                self._killed = True
                raise Killed(name)

        real_write = journal.Journal._write

        def write(j: journal.Journal) -> None:
            if self._killed:
                raise Killed("journal write")  # a killed process writes nothing more
            real_write(j)

        monkeypatch.setattr(journal, "_stop_after", stop)
        monkeypatch.setattr(journal.Journal, "_write", write)

    def revive(self) -> None:
        self._killed = False
        self._stop_at = None

    # The transport

    def methods(self) -> list[str]:
        return [m for m, _ in self.calls]

    def call(self, method: str, **params: Any) -> Any:
        if self._killed:
            raise Killed(method)
        self.calls.append((method, params))
        handler = getattr(self, schema.handler_name(method))
        return handler(**{schema.snake_case(k): v for k, v in params.items()})

    # VM verbs

    def vm_get_stats(self, vm_id: str) -> Any:
        chain = self._chain(self.on)
        disk: dict[str, Any] = {"poolID": self.pool, "domainID": self.on, "imageID": self.img,
                                "volumeID": self.leaf,
                                "volumeChain": [{"volumeID": v} for v in chain]}
        r = self.replicate
        if r is not None:
            r["reads"] += 1
            wait = 1 if r["syncWrites"] else self.ready_after
            if wait is not None and r["reads"] > wait:
                r["state"] = "ready"
            disk["replicate"] = {k: r[k] for k in ("dstDisk", "state", "syncWrites")}
            disk["replicate"].update(cur=r["reads"] * MiB, end=(r["reads"] + 64) * MiB,
                                     rate=MiB, eta=-1)
            if r["state"] == "ready":
                disk["replicate"].update(cur=r["reads"] * MiB, end=r["reads"] * MiB, eta=0)
        return [{"vmId": self.vm_id, "status": "Up", "disks": {"vda": disk}}]

    def vm_snapshot(self, vm_id: str, snap_drives: list[dict[str, Any]]) -> bool:
        new = snap_drives[0]["volumeID"]
        assert new in self.volumes[self.on], "snapshot onto a volume that does not exist"
        self.leaf = new
        return True

    def vm_disk_replicate_start(self, vm_id: str, src_disk: dict[str, Any],
                               dst_disk: dict[str, Any], bandwidth: int = 0,
                               sync_writes: bool = False) -> bool:
        if self.replicate is not None:
            raise refusal("replicaErr", "already replicating")
        if sync_writes and not self.sync_writes_supported:
            raise refusal("SyncWritesUnsupported")
        assert self.img in self.images(dst_disk["domainID"])
        self.replicate = {"dstDisk": dst_disk, "state": "copying", "syncWrites": sync_writes,
                          "reads": 0}
        return True

    def vm_disk_replicate_finish(self, vm_id: str, src_disk: dict[str, Any],
                                dst_disk: dict[str, Any]) -> bool:
        if self.replicate is None:
            raise refusal("ReplicationNotInProgress")
        if dst_disk["domainID"] == src_disk["domainID"]:
            self.replicate = None
            return True
        if self.replicate["state"] != "ready":
            raise refusal("unavail", "not ready")
        assert all(v["legality"] == "LEGAL" for k, v in self.volumes[self.dst].items()
                   if k != self.leaf), "pivot onto an unsynced chain"
        self.on = self.dst
        self.replicate = None
        return True

    # Pool and domains

    def storage_pool_get_info(self, storagepool_id: str) -> Any:
        return {"info": {}, "dominfo": {self.src: {}, self.dst: {}}}

    def storage_pool_get_spm_status(self, storagepool_id: str) -> Any:
        return {"spmStatus": "SPM", "spmId": 1, "spmLver": 1}

    def images(self, sd_id: str) -> list[str]:
        return [self.img] if self.volumes.get(sd_id) else []

    def storage_domain_get_images(self, storagedomain_id: str) -> Any:
        return self.images(storagedomain_id)

    # Volumes and images (SPM tasks)

    def volume_get_info(self, storagepool_id: str, storagedomain_id: str, image_id: str,
                        volume_id: str) -> Any:
        vol = self.volumes.get(storagedomain_id, {}).get(volume_id)
        if vol is None:
            raise refusal("VolumeDoesNotExist")
        return dict(vol, capacity=64 * MiB)

    def volume_create(self, volume_id: str, storagedomain_id: str, src_vol_uuid: str,
                       **_: Any) -> str:
        self.volumes[storagedomain_id][volume_id] = {"parent": src_vol_uuid, "legality": "LEGAL"}
        return self._task("Volume.create")

    def volume_delete(self, storagedomain_id: str, volume_id: str, **_: Any) -> str:
        self.volumes[storagedomain_id].pop(volume_id)
        return self._task("Volume.delete")

    def image_clone_structure(self, storagedomain_id: str, dst_sd_uuid: str, **_: Any) -> str:
        if self.images(dst_sd_uuid):
            raise refusal("VolumeAlreadyExists", "the image exists there")
        self.volumes[dst_sd_uuid] = {v: dict(md, legality="ILLEGAL")
                                   for v, md in self.volumes[storagedomain_id].items()}
        return self._task("Image.cloneStructure")

    def image_sync_data(self, dst_sd_uuid: str, **_: Any) -> str:
        for v, md in self.volumes[dst_sd_uuid].items():
            if v != self.leaf:
                md["legality"] = "LEGAL"
        return self._task("Image.syncData")

    def image_delete(self, storagedomain_id: str, **_: Any) -> str:
        assert not (self.on == storagedomain_id), "deleting the image the VM runs"
        assert not (self.replicate and self.replicate["dstDisk"]["domainID"] == storagedomain_id)
        self.volumes[storagedomain_id] = {}
        return self._task("Image.delete")

    def image_verify(self, **_: Any) -> Any:
        return {"equal": self.verify_equal, "volumes": [
            {"volumeID": self.base, "equal": self.verify_equal, "legality": "LEGAL"}]}

    def volume_set_legality(self, storagedomain_id: str, volume_id: str, legality: str,
                            **_: Any) -> bool:
        self.volumes[storagedomain_id][volume_id]["legality"] = legality
        return True

    # Tasks

    def _task(self, verb: str) -> str:
        task_id = str(uuid.uuid4())
        self.tasks[task_id] = {"verb": verb, "polls": 0}
        return task_id

    def _status(self, task_id: str) -> dict[str, Any]:
        t = self.tasks[task_id]
        done = t["polls"] >= 1
        return {"taskID": task_id, "taskState": "finished" if done else "running",
                "taskResult": "success" if done else "", "code": 0, "message": "",
                "progress": 100 if done else 50}

    def task_get_status(self, task_id: str) -> Any:
        if task_id not in self.tasks:
            raise refusal("UnknownTask")
        status = self._status(task_id)
        self.tasks[task_id]["polls"] += 1
        return status

    def task_clear(self, task_id: str) -> bool:
        self.tasks.pop(task_id, None)
        return True

    def task_stop(self, task_id: str) -> bool:
        return True

    def host_get_all_tasks_info(self) -> Any:
        return {t: {"id": t, "verb": v["verb"]} for t, v in self.tasks.items()}

    def host_get_all_tasks_statuses(self) -> Any:
        return {t: self._status(t) for t in self.tasks}

    # Helpers

    def _chain(self, sd_id: str) -> list[str]:
        vols = self.volumes.get(sd_id, {})
        chain, vol = [], self.leaf
        while vol in vols:
            chain.append(vol)
            vol = vols[vol]["parent"]
        return list(reversed(chain)) or [self.base]
