"""The real sanlock daemon, one per simulated host, on this machine.

Two hosts, each a mount namespace with a private /run/sanlock and its own
sanlock daemon (the setrlimit shim, ``-w 0 -l 0``); a lockspace and a paxos
resource on files under /var/tmp written with ``sanlock direct init``;
add_lockspace with the short io_timeout of the tests; contention ("held by
another host", -243); hand-over on release, when the holding process dies,
and when the holder's sanlock daemon is killed (the lease then expires by
sanlock's rule: 8 * io_timeout + 60 s).  Times are printed (``-s``).
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable

import pytest

from tests.cluster import conftest, namespaces, sanlockd

pytestmark = [pytest.mark.root, conftest.requires_root, pytest.mark.timeout(300)]

IO_TIMEOUT = sanlockd.IO_TIMEOUT
HELD_BY_ANOTHER_HOST = -243  # SANLK_ACQUIRE_IDLIVE
LOCKSPACE = "test-ls"
RESOURCE = "SDM"
RESOURCE_OFFSET = 1024 * 1024
MiB = 1024 * 1024


class Leases:
    """ids and leases files under /var/tmp, initialized with sanlock direct."""

    def __init__(self, directory: str) -> None:
        self.ids = os.path.join(directory, "ids")
        self.leases = os.path.join(directory, "leases")
        for path, size in ((self.ids, MiB), (self.leases, 2 * MiB)):
            with open(path, "wb") as f:
                f.truncate(size)
        # The io_timeout written in the delta leases must be the one the
        # hosts use: add_lockspace waits 2 * the on-disk io_timeout.
        subprocess.run(["sanlock", "direct", "init", "-o", str(IO_TIMEOUT),
                        "-s", f"{LOCKSPACE}:0:{self.ids}:0"], check=True, timeout=60,
                       capture_output=True)
        subprocess.run(["sanlock", "direct", "init",
                        "-r", f"{LOCKSPACE}:{RESOURCE}:{self.leases}:{RESOURCE_OFFSET}"],
                       check=True, timeout=60, capture_output=True)

    @property
    def resource(self) -> dict[str, object]:
        return {"lockspace": LOCKSPACE, "resource": RESOURCE, "path": self.leases,
                "offset": RESOURCE_OFFSET}

    def join(self, client: sanlockd.LeaseClient, host_id: int) -> float:
        """add_lockspace with the tests' io_timeout; the seconds it took."""
        client.call("add_lockspace", lockspace=LOCKSPACE, host_id=host_id, path=self.ids,
                    iotimeout=IO_TIMEOUT)
        return client.last_seconds

    def leader_io_timeout(self) -> int:
        out = subprocess.run(["sanlock", "direct", "read_leader",
                              "-s", f"{LOCKSPACE}:1:{self.ids}:0"],
                             check=True, timeout=60, capture_output=True, text=True).stdout
        for line in out.splitlines():
            key, _, value = line.partition(" ")
            if key == "io_timeout":
                return int(value)
        raise AssertionError(f"no io_timeout in the leader record:\n{out}")


def acquire_when_free(client: sanlockd.LeaseClient, resource: dict[str, object],
                      timeout: float) -> float:
    """Retry acquire while it answers "held by another host"; seconds waited."""
    start = time.monotonic()
    while True:
        try:
            client.call("acquire", **resource)
            return time.monotonic() - start
        except sanlockd.SanlockError as e:
            if e.errno != HELD_BY_ANOTHER_HOST or time.monotonic() - start > timeout:
                raise
        time.sleep(0.5)


@pytest.fixture
def two_hosts(
    sanlock_host_factory: Callable[..., sanlockd.SanlockHost], storage_tmpdir: str
) -> tuple[sanlockd.SanlockHost, sanlockd.SanlockHost, Leases]:
    return sanlock_host_factory("host1"), sanlock_host_factory("host2"), Leases(storage_tmpdir)


def test_each_host_has_its_own_daemon_in_its_own_namespace(
    two_hosts: tuple[sanlockd.SanlockHost, sanlockd.SanlockHost, Leases],
) -> None:
    h1, h2, _ = two_hosts
    assert h1.daemon.pid != h2.daemon.pid
    spaces = {h1.ns.ns, h2.ns.ns, namespaces.mount_ns("self")}
    assert len(spaces) == 3, spaces
    sock = os.path.join(sanlockd.SANLOCK_DIR, "sanlock.sock")
    assert not os.path.exists(sock), "the hosts' sanlock sockets are private"
    for h in (h1, h2):
        assert h.ns.run(["test", "-S", sock], check=False).returncode == 0
        assert f"daemon {h.name}" in h.daemon.status()
    running = {int(line.split()[0]) for line in sanlockd.running_daemons()}
    assert {h1.daemon.pid, h2.daemon.pid} <= running


def test_two_hosts_contend_for_a_paxos_lease(
    two_hosts: tuple[sanlockd.SanlockHost, sanlockd.SanlockHost, Leases],
) -> None:
    h1, h2, leases = two_hosts
    assert leases.leader_io_timeout() == IO_TIMEOUT
    c1, c2 = h1.lease_client(), h2.lease_client()

    join1 = leases.join(c1, 1)
    join2 = leases.join(c2, 2)
    print(f"\nadd_lockspace io_timeout={IO_TIMEOUT}: host1 {join1:.2f}s host2 {join2:.2f}s")
    assert join1 < 4 * IO_TIMEOUT + 5, "a short io_timeout makes add_lockspace short"
    # Each daemon holds its own host id only.
    assert [ls["host_id"] for ls in c1.call("get_lockspaces")] == [1]
    assert [ls["host_id"] for ls in c2.call("get_lockspaces")] == [2]

    held = c1.call("acquire", **leases.resource)
    acquire1 = c1.last_seconds
    assert [r["resource"] for r in held] == [RESOURCE]

    with pytest.raises(sanlockd.SanlockError) as e:
        c2.call("acquire", **leases.resource)
    assert e.value.errno == HELD_BY_ANOTHER_HOST, e.value
    refused = c2.last_seconds
    owners = c2.call("read_resource_owners", **leases.resource)
    assert [o["host_id"] for o in owners] == [1]

    c1.call("release", **leases.resource)
    c2.call("acquire", **leases.resource)
    acquire2 = c2.last_seconds
    owners = c1.call("read_resource_owners", **leases.resource)
    assert [o["host_id"] for o in owners] == [2]
    print(f"acquire: {acquire1:.3f}s; refused (held by host 1) after {refused:.2f}s; "
          f"acquire after release {acquire2:.3f}s")

    # Both daemons see both host ids alive in the lockspace.
    for h in (h1, h2):
        status = h.daemon.host_status(LOCKSPACE)
        assert "owner_id=1" in status and "owner_id=2" in status, status


def test_the_lease_is_free_at_once_when_its_holder_process_dies(
    two_hosts: tuple[sanlockd.SanlockHost, sanlockd.SanlockHost, Leases],
) -> None:
    """kill -9 of the holding process (an SPM daemon): sanlock releases."""
    h1, h2, leases = two_hosts
    c1, c2 = h1.lease_client(), h2.lease_client()
    leases.join(c1, 1)
    leases.join(c2, 2)
    c1.call("acquire", **leases.resource)
    c1.proc.kill()
    c1.proc.wait()
    waited = acquire_when_free(c2, leases.resource, timeout=30)
    print(f"\nholder killed: host 2 acquired after {waited:.2f}s")
    assert waited < 10


@pytest.mark.slow  # 75 s; tests/cluster/test_spm.py waits the same rule out in make check
def test_failover_when_the_holders_sanlock_daemon_is_killed(
    two_hosts: tuple[sanlockd.SanlockHost, sanlockd.SanlockHost, Leases],
) -> None:
    """host 1's sanlock is killed while it holds the lease: host 2 gets it
    once host 1's delta lease is dead, 8 * io_timeout + 60 s after its last
    renewal (the 60 s is sanlock's watchdog fire timeout: fixed in 3.8.5)."""
    h1, h2, leases = two_hosts
    c1, c2 = h1.lease_client(), h2.lease_client()
    leases.join(c1, 1)
    leases.join(c2, 2)
    c1.call("acquire", **leases.resource)
    h1.daemon.kill()
    dead_after = 8 * IO_TIMEOUT + 60
    waited = acquire_when_free(c2, leases.resource, timeout=dead_after + 60)
    print(f"\nsanlock of host 1 killed: host 2 acquired after {waited:.1f}s "
          f"(io_timeout={IO_TIMEOUT}, rule {dead_after}s after the last renewal)")
    assert dead_after - 2 * IO_TIMEOUT - 1 <= waited <= dead_after + 30
    owners = c2.call("read_resource_owners", **leases.resource)
    assert [o["host_id"] for o in owners] == [2]


def test_a_restarted_daemon_takes_its_host_id_back_and_frees_its_old_leases(
    two_hosts: tuple[sanlockd.SanlockHost, sanlockd.SanlockHost, Leases],
) -> None:
    """Same owner name (-e): the host id is re-acquired at once, with a new
    generation, and the paxos lease of the old generation is free for host 2
    without waiting for it to expire."""
    h1, h2, leases = two_hosts
    c1, c2 = h1.lease_client(), h2.lease_client()
    leases.join(c1, 1)
    leases.join(c2, 2)
    c1.call("acquire", **leases.resource)
    h1.daemon.kill()
    killed = time.monotonic()
    c1.close()
    h1.daemon.start()
    rejoin = leases.join(h1.lease_client(), 1)
    waited = acquire_when_free(c2, leases.resource, timeout=60)
    total = time.monotonic() - killed
    print(f"\nsanlock of host 1 restarted: add_lockspace {rejoin:.2f}s, "
          f"host 2 acquired {total:.1f}s after the kill")
    assert rejoin < 4 * IO_TIMEOUT + 5
    assert waited < 10
