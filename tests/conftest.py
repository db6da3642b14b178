"""Fixtures shared by every test package: a real daemon process."""

from __future__ import annotations

import collections.abc
import os

import pytest

from tests import daemon as daemon_mod


@pytest.fixture
def daemon_factory(
    tmp_path_factory: pytest.TempPathFactory,
) -> collections.abc.Iterator[collections.abc.Callable[..., daemon_mod.Daemon]]:
    """Make daemons with extra config; every one is stopped at the end."""
    made: list[daemon_mod.Daemon] = []

    def make(config: dict | None = None, start: bool = True) -> daemon_mod.Daemon:
        workdir = str(tmp_path_factory.mktemp("daemon"))
        d = daemon_mod.Daemon(workdir, config)
        made.append(d)
        if start:
            d.start()
        return d

    yield make
    for d in made:
        d.stop()


@pytest.fixture
def daemon(daemon_factory: collections.abc.Callable[..., daemon_mod.Daemon]) -> daemon_mod.Daemon:
    return daemon_factory()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked slow run only with VDSM_LSM_SLOW=1 (make slow)."""
    if os.environ.get("VDSM_LSM_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow: make slow (VDSM_LSM_SLOW=1) runs it")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


def pytest_report_header(config: pytest.Config) -> str:
    return f"vdsm-lsm tests: uid={os.getuid()}"
