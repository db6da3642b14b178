"""Fixtures for tests of domains, volumes, images and pools.

Used by a test module with ``pytest_plugins = ["tests.storage.domain_fixtures"]``.
Built on the real-storage fixtures of ``tests/storage/conftest.py``:

- ``api_factory(**kw)``: a ``storage.api.StorageAPI`` with small sizes
  (4 MiB extents, 8 MiB chunks), the local cluster lock and the activation
  mode of this host (loop without device-mapper).  Each call with the same
  ``name`` shares a run dir (a restarted daemon); another name is another
  "host".  At the end every LV activated by any of them is deactivated
  (loop devices released) and the APIs are closed.
- ``api``: one such API (host "a").
- ``file_domain_factory(api, name)`` / ``block_domain_factory(api, ...)``:
  new domains, returning their UUIDs.

Plain helpers (make_pool, run_task, create_volume ...) are in
``tests/storage/domain_helpers.py``.
"""

from __future__ import annotations

import collections.abc
import logging
import os
from typing import Any

import pytest

from storage import api as api_mod
from storage import block_sd, sd
from tests.storage.domain_helpers import API_OPTIONS, new_id

log = logging.getLogger("tests.storage.domains")

GiB = 1024**3


@pytest.fixture
def api_factory(
    storage_tmpdir: str,
    loop_device_factory: collections.abc.Callable[..., str],
) -> collections.abc.Iterator[collections.abc.Callable[..., Any]]:
    # Depends on loop_device_factory so that it is torn down first: LVs are
    # deactivated before the loop devices under them are checked and removed.
    made: list[api_mod.StorageAPI] = []

    def make(name: str = "a", **kw: Any) -> api_mod.StorageAPI:
        run_dir = os.path.join(storage_tmpdir, f"run-{name}")
        options = dict(API_OPTIONS, **kw)
        provider = api_mod.StorageAPI(run_dir, **options)
        made.append(provider)
        return provider

    yield make

    for provider in reversed(made):
        cleanup(provider)


def cleanup(provider: api_mod.StorageAPI) -> None:
    """Stop tasks, deactivate every LV this API's host activated, close."""
    p = provider._pool
    if p is not None:
        if p.tasks is not None:
            p.tasks.shutdown(wait=True, abort=True)
        p.shutdown()  # releases the SPM lease, which holds the leases LV open
    for sd_id in provider.cache.known():
        try:
            dom = provider.cache.get(sd_id)
        except Exception:
            log.exception("Cannot open domain %s for clean-up", sd_id)
            continue
        if isinstance(dom, block_sd.BlockDomain):
            for lv in dom.activation.active_lvs(dom.vg):
                try:
                    dom.activation.deactivate(dom.vg, lv)
                except Exception:
                    log.exception("Cannot deactivate %s/%s", dom.vg, lv)
    provider.close()


@pytest.fixture
def api(api_factory: collections.abc.Callable[..., api_mod.StorageAPI]) -> api_mod.StorageAPI:
    return api_factory()


@pytest.fixture
def file_domain_factory(
    storage_tmpdir: str,
) -> collections.abc.Callable[..., str]:
    def make(provider: api_mod.StorageAPI, name: str = "file-domain",
             sd_id: str | None = None) -> str:
        path = os.path.join(storage_tmpdir, "mnt")
        os.makedirs(path, exist_ok=True)
        sd_id = sd_id or new_id()
        assert provider.storage_domain_create(sd_id, sd.FILE, {"path": path}, name) is True
        return sd_id

    return make


@pytest.fixture
def block_domain_factory(
    loop_device_factory: collections.abc.Callable[..., str],
) -> collections.abc.Callable[..., str]:
    def make(provider: api_mod.StorageAPI, name: str = "block-domain", pv_count: int = 1,
             pv_size: int = 2 * GiB, sd_id: str | None = None) -> str:
        devices = [loop_device_factory(pv_size) for _ in range(pv_count)]
        sd_id = sd_id or new_id()
        assert provider.storage_domain_create(sd_id, sd.BLOCK, {"devices": devices}, name)
        return sd_id

    return make


@pytest.fixture(params=[sd.FILE, sd.BLOCK])
def domain_type(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def domain_factory(
    domain_type: str,
    file_domain_factory: collections.abc.Callable[..., str],
    block_domain_factory: collections.abc.Callable[..., str],
) -> collections.abc.Callable[..., str]:
    """Domains of the type of the parametrized domain_type fixture."""
    if domain_type == sd.FILE:
        return file_domain_factory
    return block_domain_factory
