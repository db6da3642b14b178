"""What the image jobs (clone, sync, delete) share: how they are made.

A job is built from its persisted JSON params (``img`` and the domain ids
its kind needs) and the services it runs with: a getter of storage domains
by id, the image manager and the resource manager whose locks it takes
(waiting up to lock_timeout).  Subclasses set ``kind`` and read their own
params; storage/task.py runs them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from storage import image, resource, sd

DomainGetter = Callable[[str], sd.StorageDomain]


class ImageJob:
    """Base of a job on one image; params["img"] is its id."""

    kind: str | None = None

    def __init__(
        self,
        domains: DomainGetter,
        images: image.ImageManager,
        resources: resource.Manager,
        params: dict[str, Any],
        lock_timeout: float = resource.DEFAULT_TIMEOUT,
    ) -> None:
        self.domains = domains
        self.images = images
        self.resources = resources
        self.params = params
        self.lock_timeout = lock_timeout
        self.img_id: str = params["img"]
        self._read_params(params)

    def _read_params(self, params: dict[str, Any]) -> None:
        """Set the subclass's own fields from params (called by __init__)."""
