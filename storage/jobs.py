"""The storage job kinds, declared once: what each verb's task runs.

Every SPM verb that changes storage submits one persisted job, by kind, and
a new SPM rebuilds the jobs of unfinished tasks from the same table, so a
kind is declared in exactly one place:

=========================  ========================  ================  ==========
kind                       verb                      job               recovery
=========================  ========================  ================  ==========
``volume.create``          ``Volume.create``         CreateVolume      rollback
``volume.delete``          ``Volume.delete``         DeleteVolume      rerun
``image.cloneStructure``   ``Image.cloneStructure``  clone.CloneJob    rollback
``image.syncData``         ``Image.syncData``        sync.SyncJob      rerun
``image.delete``           ``Image.delete``          DeleteJob         rerun
=========================  ========================  ================  ==========

(``rollback``: after a restart the task's rollback undoes what it made and
it ends ``cleanFailure``/``TaskInterrupted``; ``rerun``: it is run again.)

A job is built as ``kind.job(services, params)`` (:mod:`storage.job`);
:func:`task_kinds` binds the table to one provider's services, and is what
the pool's task manager is built with (:class:`storage.pool.Pool`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from storage import clone, image_delete, job, sync, task, volume_jobs

JobClass = Callable[[job.Services, dict[str, Any]], job.Job]


@dataclasses.dataclass(frozen=True)
class Kind:
    """One job kind: its persisted name, the verb it serves, how it is made
    and how its task is recovered after a restart."""

    name: str
    verb: str
    job: JobClass
    recovery: str

    def __post_init__(self) -> None:
        if self.recovery not in task.RECOVERIES:
            raise ValueError(f"invalid recovery {self.recovery!r} of job kind {self.name}")


KINDS: tuple[Kind, ...] = (
    Kind(volume_jobs.CREATE, "Volume.create", volume_jobs.CreateVolume, task.ROLLBACK),
    Kind(volume_jobs.DELETE, "Volume.delete", volume_jobs.DeleteVolume, task.RERUN),
    Kind(clone.KIND, "Image.cloneStructure", clone.CloneJob, task.ROLLBACK),
    Kind(sync.KIND, "Image.syncData", sync.SyncJob, task.RERUN),
    Kind(image_delete.KIND, "Image.delete", image_delete.DeleteJob, task.RERUN),
)

_BY_NAME: dict[str, Kind] = {kind.name: kind for kind in KINDS}


def get(name: str) -> Kind:
    """The kind named name (KeyError: not a storage job kind)."""
    return _BY_NAME[name]


def build(name: str, services: job.Services, params: dict[str, Any]) -> job.Job:
    """A new job of kind name, as a verb submits it and recovery rebuilds it."""
    return get(name).job(services, params)


def task_kinds(services: job.Services) -> dict[str, task.JobKind]:
    """The table bound to services, for the task manager: kind -> JobKind."""
    return {kind.name: _bind(kind, services) for kind in KINDS}


def _bind(kind: Kind, services: job.Services) -> task.JobKind:
    def factory(params: dict[str, Any]) -> task.Job:
        return kind.job(services, params)

    return task.JobKind(factory, kind.recovery)
