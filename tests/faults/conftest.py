"""Fixtures of the fault matrix (issue 13): FaultSites, shared by a module's cases.

``fault_site_factory`` (module scope): ``make(**options)`` starts a
:class:`tests.faults.site.FaultSite` (options: vg_size, chunk_mb,
extent_mb, config, env); every site it made is closed at the end of the
module, also when a test failed.  ``fault_site``: one default site per
module.  A module's tests share the site (one daemon, one guest: the
disk ping-pongs between the domains), so they must leave it clean.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from contrib import guest
from tests.faults import site as site_mod
from tests.virt.conftest import guest_files  # noqa: F401


@pytest.fixture(scope="module")
def fault_site_factory(
    guest_files: guest.Artifacts,  # noqa: F811
) -> Iterator[Callable[..., site_mod.FaultSite]]:
    made: list[site_mod.FaultSite] = []

    def make(**options: Any) -> site_mod.FaultSite:
        s = site_mod.FaultSite.create(guest_files, **options)
        made.append(s)
        return s

    try:
        yield make
    finally:
        for s in made:
            s.close()


@pytest.fixture(scope="module")
def fault_site(fault_site_factory: Callable[..., site_mod.FaultSite]) -> site_mod.FaultSite:
    return fault_site_factory()
