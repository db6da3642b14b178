"""Fixtures for several simulated hosts on one machine (needs root).

- ``sanlock_shim``: a function returning the path of the setrlimit
  LD_PRELOAD shim (contrib/sanlock), compiled with gcc once per session on
  first use.
- ``sanlock_host_factory(name=None)``: a started
  :class:`tests.cluster.sanlockd.SanlockHost` (its own mount namespace,
  private /run/sanlock, real sanlock daemon); ``.lease_client()`` runs
  python3-sanlock calls in it.  All stopped at teardown.
- ``host_namespace_factory(name, tmpfs=(), binds=())``: a started
  :class:`tests.cluster.namespaces.HostNamespace`, stopped at teardown.
- ``cluster``: a :class:`tests.cluster.hosts.Cluster`; ``add_host(...)``
  starts vdsm-lsm daemons as hosts 1, 2, 3 sharing one file-domain
  directory and the block domain's loop devices; ``create_pool()``.
  Closed at teardown (pools, daemons, sanlock daemons, libvirtds,
  namespaces), before the loop devices are checked and removed.
- ``second_libvirtd``: a :class:`tests.cluster.libvirtd.Libvirtd` of a
  simulated host 2 in its own namespace (the machine's libvirtd untouched).

Every test here checks that it leaves no sanlock process behind (zombies
aside), and at the end of the session ``pgrep -a sanlock`` must say what it
said at the start.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence

import pytest

from tests.cluster import hosts, libvirtd, namespaces, sanlockd
from tests.storage import conftest as storage_conftest

# The real-storage fixtures (under /var/tmp, loop devices; always cleaned up).
storage_tmpdir = storage_conftest.storage_tmpdir
sparse_file_factory = storage_conftest.sparse_file_factory
loop_device_factory = storage_conftest.loop_device_factory

requires_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (namespaces, sanlock)")
STRAY_WAIT = 10.0


def pgrep_sanlock() -> list[str]:
    res = subprocess.run(["pgrep", "-a", "sanlock"], capture_output=True, text=True, timeout=30)
    return sorted(res.stdout.splitlines())


@pytest.fixture(scope="session", autouse=True)
def machine_sanlock_unchanged() -> Iterator[None]:
    """``pgrep -a sanlock`` is the same after these tests as before them
    (zombie helpers of stopped daemons included: PID 1 reaps them late)."""
    before = pgrep_sanlock()
    yield
    deadline = time.monotonic() + STRAY_WAIT
    while pgrep_sanlock() != before and time.monotonic() < deadline:
        time.sleep(0.2)
    after = pgrep_sanlock()
    if after != before:
        pytest.fail(f"sanlock processes before the tests: {before}, after: {after}",
                    pytrace=False)


@pytest.fixture(autouse=True)
def no_stray_sanlock() -> Iterator[None]:
    """Fail the test if a sanlock process that was not there before it
    outlives it (torn down last: after every other fixture of the test)."""
    before = {line.split()[0] for line in sanlockd.running_daemons()}
    yield
    deadline = time.monotonic() + STRAY_WAIT
    while True:
        stray = [p for p in sanlockd.running_daemons() if p.split()[0] not in before]
        if not stray or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    if stray:
        pytest.fail(f"sanlock processes left behind: {stray}", pytrace=False)


@pytest.fixture(scope="session")
def sanlock_shim(tmp_path_factory: pytest.TempPathFactory) -> Callable[[], str]:
    built: list[str] = []

    def get() -> str:
        if not built:
            built.append(sanlockd.build_shim(str(tmp_path_factory.mktemp("sanlock-shim"))))
        return built[0]

    return get


@pytest.fixture
def host_namespace_factory(
    storage_tmpdir: str,
) -> Iterator[Callable[..., namespaces.HostNamespace]]:
    made: list[namespaces.HostNamespace] = []

    def make(name: str, tmpfs: Sequence[str] = (),
             binds: Sequence[tuple[str, str]] = ()) -> namespaces.HostNamespace:
        ns = namespaces.HostNamespace(
            name, os.path.join(storage_tmpdir, f"{name}-namespace.log"), tmpfs, binds
        )
        made.append(ns)
        return ns.start()

    yield make
    for ns in reversed(made):
        ns.stop()


@pytest.fixture
def sanlock_host_factory(
    storage_tmpdir: str, sanlock_shim: Callable[[], str]
) -> Iterator[Callable[..., sanlockd.SanlockHost]]:
    made: list[sanlockd.SanlockHost] = []

    def make(name: str | None = None) -> sanlockd.SanlockHost:
        name = name or f"host{len(made) + 1}"
        host = sanlockd.SanlockHost(name, os.path.join(storage_tmpdir, name), sanlock_shim())
        made.append(host)
        return host.start()

    yield make
    for host in reversed(made):
        host.stop()


@pytest.fixture
def cluster(
    storage_tmpdir: str,
    loop_device_factory: Callable[..., str],
    sanlock_shim: Callable[[], str],
) -> Iterator[hosts.Cluster]:
    # Depends on loop_device_factory so that it is torn down first: daemons
    # stop (and let go of the devices) before the loop devices are checked.
    c = hosts.Cluster(storage_tmpdir, lambda: loop_device_factory(2 * 1024**3), sanlock_shim)
    try:
        yield c
    finally:
        c.close()


@pytest.fixture
def second_libvirtd(storage_tmpdir: str) -> Iterator[libvirtd.Libvirtd]:
    dirs = libvirtd.private_dirs(os.path.join(storage_tmpdir, "host2-libvirt"))
    ns = namespaces.HostNamespace(
        "host2", os.path.join(storage_tmpdir, "host2-namespace.log"), binds=dirs.binds()
    ).start()
    daemons = libvirtd.Libvirtd(ns, dirs)
    try:
        yield daemons.start()
    finally:
        daemons.stop()
        ns.stop()
