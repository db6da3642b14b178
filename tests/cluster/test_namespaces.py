"""The simulated hosts' mount namespaces (tests/cluster/namespaces.py):
private mounts, and nothing left behind, even when the test process dies."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable

import pytest

from tests.cluster import conftest, namespaces

pytestmark = [pytest.mark.root, conftest.requires_root, pytest.mark.timeout(120)]

TOP = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def gone(pid: int, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if namespaces.mount_ns(pid) is None:  # gone, or a zombie
            return True
        time.sleep(0.05)
    return False


def test_private_tmpfs_and_binds(
    host_namespace_factory: Callable[..., namespaces.HostNamespace], storage_tmpdir: str
) -> None:
    private = os.path.join(storage_tmpdir, "private")
    target = os.path.join(storage_tmpdir, "target")
    tmpfs = os.path.join(storage_tmpdir, "tmpfs")
    os.makedirs(private)
    os.makedirs(target)
    with open(os.path.join(private, "mark"), "w") as f:
        f.write("host-a")
    a = host_namespace_factory("a", tmpfs=[tmpfs], binds=[(private, target)])
    b = host_namespace_factory("b", tmpfs=[tmpfs])
    assert a.run(["cat", os.path.join(target, "mark")]).stdout == "host-a"
    assert not os.path.exists(os.path.join(target, "mark")), "bind is private to a"
    a.run(["touch", os.path.join(tmpfs, "only-a")])
    assert not os.path.exists(os.path.join(tmpfs, "only-a"))
    assert b.run(["ls", tmpfs]).stdout == ""
    assert "tmpfs" in a.run(["findmnt", "-n", "-o", "FSTYPE", tmpfs]).stdout
    # The working directory is the caller's, the rest of the machine shared.
    assert a.run(["pwd"]).stdout.strip() == os.getcwd()
    assert a.run(["cat", os.path.join(TOP, "pyproject.toml")]).returncode == 0


def test_stop_ends_every_process_inside(
    host_namespace_factory: Callable[..., namespaces.HostNamespace],
) -> None:
    ns = host_namespace_factory("a")
    sleeper = ns.popen(["sleep", "1000"])
    # One that ignores SIGTERM: SIGKILL after the grace period.
    stubborn = ns.popen(["sh", "-c", "trap '' TERM; sleep 1000 & wait"])
    time.sleep(0.3)
    inside = ns.pids()
    assert sleeper.pid in inside and stubborn.pid in inside
    holder = ns.pid
    ns.stop()
    assert sleeper.returncode is not None and stubborn.returncode is not None
    assert all(gone(p) for p in inside + [holder])
    ns.stop()  # twice is fine


def test_nothing_outlives_a_killed_test_process(storage_tmpdir: str) -> None:
    """The process that made the namespace dies by SIGKILL: the holder sees
    EOF on its stdin and ends everything inside, then itself."""
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {TOP!r})
        from tests.cluster import namespaces
        ns = namespaces.HostNamespace("orphan", {storage_tmpdir!r} + "/ns.log",
                                      tmpfs=[{storage_tmpdir!r} + "/t"]).start()
        p = ns.popen(["sleep", "1000"])
        print(ns.pid, p.pid, flush=True)
        time.sleep(1000)
    """)
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None
        holder, sleeper = (int(x) for x in parent.stdout.readline().split())
        assert namespaces.mount_ns(sleeper) == namespaces.mount_ns(holder)
    finally:
        parent.send_signal(signal.SIGKILL)
        parent.wait()
    assert gone(sleeper) and gone(holder)
