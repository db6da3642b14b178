"""What every SPM job is made of: its persisted params and the services it runs with.

A job is built as ``JobClass(services, params)``, the same way when a verb
submits it and when a new SPM rebuilds it from its task file
(:mod:`storage.jobs` declares every kind once).  ``params`` is the JSON the
task manager persists; :class:`Services` is what the job may use of this
host's storage: a getter of domains by id, the image manager (prepared
volumes), the resource manager whose locks it takes (waiting up to
``lock_timeout``), and the settings of the copies it makes.

Subclasses set ``kind``, read their own fields from params in
:meth:`Job._read_params`, and implement ``locks``, ``run`` and ``rollback``
(see :mod:`storage.task`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from storage import image, resource, sd, task

DomainGetter = Callable[[str], sd.StorageDomain]


@dataclasses.dataclass(frozen=True)
class Services:
    """What a job runs with (one per storage provider)."""

    domains: DomainGetter
    images: image.ImageManager
    resources: resource.Manager
    lock_timeout: float = resource.DEFAULT_TIMEOUT
    # [irs] copy_rate_limit_mb in bytes/s, for Image.syncData (None: unlimited).
    copy_rate_limit_bps: int | None = None


def image_locks(sd_id: str, img_id: str, mode: str) -> list[resource.Request]:
    """The domain shared and the image in mode: what a job on one image holds."""
    return [
        (resource.SD_NAMESPACE, sd_id, resource.SHARED),
        (resource.image_namespace(sd_id), img_id, mode),
    ]


class Job:
    """Base of the storage jobs; ``kind`` names the kind in storage.jobs."""

    kind: str = ""

    def __init__(self, services: Services, params: dict[str, Any]) -> None:
        self.services = services
        self.params = params
        self._read_params(params)

    @property
    def domains(self) -> DomainGetter:
        return self.services.domains

    @property
    def images(self) -> image.ImageManager:
        return self.services.images

    def _read_params(self, params: dict[str, Any]) -> None:
        """Set the subclass's own fields from params (called by __init__)."""

    def locks(self) -> list[resource.Request]:
        """The resources the job holds while it runs."""
        raise NotImplementedError

    def lock(self, requests: list[resource.Request]) -> resource.Lease:
        """Take requests, waiting up to the services' lock timeout."""
        return self.services.resources.acquire(requests, timeout=self.services.lock_timeout)

    def run(self, ctx: task.Context) -> None:
        raise NotImplementedError

    def rollback(self, ctx: task.Context) -> None:
        raise NotImplementedError
