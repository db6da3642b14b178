"""Fixtures for the test guest's tests: the built guest and scratch dirs."""

from __future__ import annotations

import collections.abc
import shutil
import tempfile

import pytest

from contrib import guest


@pytest.fixture(scope="session")
def artifacts() -> guest.Artifacts:
    """The guest, built (or found up to date) in the shared cache."""
    return guest.ensure_built()


def _scratch_dir() -> collections.abc.Iterator[str]:
    # On the root file system: direct I/O does not work on tmpfs.
    path = tempfile.mkdtemp(prefix="vdsm-lsm-guest-test-", dir="/var/tmp")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def workdir() -> collections.abc.Iterator[str]:
    """A scratch dir for one test, removed afterwards."""
    yield from _scratch_dir()


@pytest.fixture(scope="module")
def module_workdir() -> collections.abc.Iterator[str]:
    """A scratch dir shared by a module's tests, removed afterwards."""
    yield from _scratch_dir()
