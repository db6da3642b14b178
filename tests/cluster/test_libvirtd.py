"""A second libvirtd on this machine, for a simulated host 2 (tests/cluster/libvirtd.py).

It runs in its own mount namespace over private libvirt directories; the
machine's libvirtd (host 1's, which other tests use) must not notice.
"""

from __future__ import annotations

import subprocess

import libvirt
import pytest

from tests.cluster import conftest, hosts, libvirtd, namespaces

pytestmark = [pytest.mark.root, pytest.mark.libvirt, conftest.requires_root,
              pytest.mark.timeout(300)]

MAIN_URI = "qemu:///system"


def pid_of(name: str) -> list[int]:
    res = subprocess.run(["pgrep", "-x", name], capture_output=True, text=True, timeout=30)
    return sorted(int(p) for p in res.stdout.split())


def main_libvirtd() -> tuple[list[int], list[str]]:
    """The machine's libvirtd processes (outside any test namespace) and its domains."""
    own = namespaces.mount_ns("self")
    pids = [p for p in pid_of("libvirtd") if namespaces.mount_ns(p) == own]
    conn = libvirt.open(MAIN_URI)
    try:
        names = sorted(d.name() for d in conn.listAllDomains())
    finally:
        conn.close()
    return pids, names


def test_second_libvirtd_answers_beside_the_machines(
    second_libvirtd: libvirtd.Libvirtd,
) -> None:
    before = main_libvirtd()
    assert before[0], "the machine's libvirtd runs (contrib/host-services)"
    conn = libvirt.open(second_libvirtd.uri)
    try:
        assert conn.listAllDomains() == []
        assert conn.getLibVersion() > 0
        # Its own daemon: not the machine's pid.
        assert second_libvirtd.libvirtd is not None
        assert second_libvirtd.libvirtd.pid not in before[0]
    finally:
        conn.close()
    # Private sockets and pid files, in its own directories only.
    res = second_libvirtd.ns.run(["ls", "/run/libvirt"])
    assert "libvirtd.pid" in res.stdout.split() and "virtlogd-sock" in res.stdout.split()
    assert main_libvirtd() == before


def test_second_libvirtd_stops_and_leaves_the_machines_running(
    second_libvirtd: libvirtd.Libvirtd,
) -> None:
    before = main_libvirtd()
    ours = [second_libvirtd.libvirtd, second_libvirtd.virtlogd]
    second_libvirtd.stop()
    assert all(p is not None and p.poll() is not None for p in ours)
    assert main_libvirtd() == before


@pytest.mark.parametrize("lock", [hosts.LOCAL, hosts.SANLOCK])
def test_a_host_with_its_own_libvirtd(cluster: hosts.Cluster, lock: str) -> None:
    """Lock: as parametrized (host 2's, host 1 local).  Host 2's vdsm-lsm
    daemon runs in host 2's namespace and uses host 2's libvirtd as
    qemu:///system (and, with sanlock, host 2's sanlock daemon)."""
    before = main_libvirtd()
    h1 = cluster.add_host(hosts.LOCAL)
    h2 = cluster.add_host(lock, own_libvirtd=True)
    assert h1.libvirt is None and h2.libvirt is not None and h2.ns is not None
    assert (h2.sanlock is not None) == (lock == hosts.SANLOCK)
    assert h2.capabilities()["clusterLock"] == lock
    for h in (h1, h2):
        assert h.capabilities()["libvirtVersion"]
    assert h2.daemon.proc is not None
    assert namespaces.mount_ns(h2.daemon.proc.pid) == h2.ns.ns
    assert h2.libvirt.libvirtd is not None
    assert namespaces.mount_ns(h2.libvirt.libvirtd.pid) == h2.ns.ns
    assert h2.daemon.proc.pid in client_pids(h2.libvirt), "host 2 uses its own libvirtd"
    assert main_libvirtd()[0] == before[0]


def client_pids(daemons: libvirtd.Libvirtd) -> list[int]:
    """Pids of the processes connected to that libvirtd (virt-admin)."""
    admin = f"libvirtd:///system?socket={daemons.dirs.run}/libvirt-admin-sock"

    def virt_admin(*args: str) -> str:
        return subprocess.run(["virt-admin", "-c", admin, *args], capture_output=True,
                              text=True, timeout=30, check=True).stdout

    pids = []
    for line in virt_admin("srv-clients-list", "libvirtd").splitlines()[2:]:
        if not line.split():
            continue
        info = virt_admin("client-info", "libvirtd", line.split()[0])
        for row in info.splitlines():
            key, _, value = row.partition(":")
            if key.strip() == "unix_process_id":
                pids.append(int(value))
    return pids
