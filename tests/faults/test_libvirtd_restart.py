"""Fault matrix case 3 (issue 13): libvirtd restarted during the mirror.

One daemon with a libvirtd of its own (tests/faults/cluster_site.py: the
machine's libvirtd is never touched), the test guest writing throughout.
``move-disk`` (file -> thin block) runs as an operator runs it and is never
stopped, its mirror slowed down (it copies for seconds): once the mirror
runs, libvirtd is stopped (SIGTERM) and, after the flow has polled the
daemon a few times without it (or asked for the pivot, which waits),
started again in the same namespace.  QEMU and its mirror live on under the
new libvirtd.

The daemon rides it out: while libvirtd is away ``VM.getStats`` answers
what it knows (the VM Up, the mirror as last read) and a verb that needs
libvirt waits for it (virt/connection.py); once reconnected it reads every
VM's status and mirror again (virt/outages.py) before a waiting verb goes
on.  The move then pivots: the VM runs on the destination, every
acknowledged write is on the destination chain, nothing is left behind.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable, Iterator

import libvirt
import pytest

from contrib import guest
from tests.faults import cluster_site
from tests.vdsm_lsm import test_move_disk
from tests.virt import test_vm
from tests.virt.conftest import guest_files  # noqa: F401
from virt import connection, errors
from virt import drive as drive_mod
from virt import vm as vm_mod

pytestmark = [pytest.mark.timeout(900)]

# A chunk above a 64 MiB volume's maximum size: no extension of the thin
# replica is needed while libvirtd (and so the watermark monitor) is away.
CHUNK_MB = 128
# The guest writes 10 blocks of 64 KiB a second, the mirror copies 1 MiB/s:
# it converges, in seconds (libvirtd goes away while it still copies).
GUEST_RATE = 10
BANDWIDTH = 1
# How many VM.getStats the daemon answers while libvirtd is down (the flow
# polls every 0.5 s) before libvirtd is started again.
POLLS_WITHOUT_LIBVIRTD = 6
# A verb (a request's thread) waiting for libvirtd.
WAITING_VERB = r"\(rpc-worker\S*\) \[virt\.connection\] libvirtd does not answer"
TOP = test_move_disk.TOP


@pytest.fixture(scope="module")
def site(guest_files: guest.Artifacts  # noqa: F811
         ) -> Iterator[cluster_site.PrivateLibvirtSite]:
    s = cluster_site.PrivateLibvirtSite.make(guest_files, chunk_mb=CHUNK_MB)
    try:
        yield s
    finally:
        s.close()


def run_move(site: cluster_site.PrivateLibvirtSite, *args: str) -> tuple[
        subprocess.Popen[str], Callable[[], str]]:
    """move-disk in the background; its stderr (a file) read by the function returned."""
    err_path = os.path.join(site.workdir, "move-disk.err")
    with open(err_path, "w") as err:
        proc = subprocess.Popen(site.move_disk_argv(*args), cwd=TOP, stdout=subprocess.PIPE,
                                stderr=err, text=True)

    def stderr() -> str:
        with open(err_path) as f:
            return f.read()

    return proc, stderr


@pytest.mark.root
@pytest.mark.libvirt
@pytest.mark.guest
def test_libvirtd_restarted_during_the_mirror_the_move_finishes(
        site: cluster_site.PrivateLibvirtSite) -> None:
    img, (base, leaf) = site.create_image()
    vm = site.start_guest(img, leaf, rate=GUEST_RATE)
    log = cluster_site.LogWatch(site.daemon.log_path)

    flow, stderr = run_move(site, *site.move_args(vm, site.block_sd, "--bandwidth",
                                                  str(BANDWIDTH)))
    try:
        # The mirror runs: libvirtd goes away under it.
        cluster_site.wait_mirror(site, vm)
        outage = cluster_site.LogWatch(site.daemon.log_path)
        site.stop_libvirtd()
        outage.wait(r"libvirt connection closed")
        # Without libvirtd the daemon still answers: the VM is Up.
        during = site.stats(vm)
        assert during["status"] == "Up", during
        # The flow goes on meanwhile: it polls the mirror (answered from
        # memory), or asks for the pivot, which waits for libvirtd.
        outage.wait_any({r"Request method=VM\.getStats duration": POLLS_WITHOUT_LIBVIRTD + 1,
                         WAITING_VERB: 1})
        assert flow.poll() is None, stderr()

        site.start_libvirtd()

        # Reconnected, the daemon read the VM and its mirror again.
        text = outage.wait(rf"Re-read after reconnect vm={vm.vm_id} status=Up")
        out, _ = flow.communicate(timeout=300)
    finally:
        if flow.poll() is None:
            flow.kill()
            flow.wait(60)
    err = stderr()
    print(f"move-disk rc={flow.returncode}\n{out}\n{err}\ndaemon:\n{outage.summary(60)}")
    assert flow.returncode == 0, err
    assert f"Re-read after reconnect vm={vm.vm_id} drive=vda replica=" in text, text[-3000:]
    assert "Connected to libvirt" in outage.text()
    summary = json.loads(out)
    assert summary["dstDomainID"] == site.block_sd and summary["resumed"] is False
    chain = summary["volumeChain"]
    assert chain[:2] == [base, leaf] and len(chain) == 3
    assert log.count(r"Traceback") == 0, log.text()[-5000:]

    site.assert_clean(vm, img, site.block_sd)
    vm.wait_acks(vm.acks() + 10)
    site.call("VM.destroy", vmID=vm.vm_id)
    result = site.verify(vm, img, site.block_sd, chain[-1])
    assert result.ok and result.lost == 0, str(result)


# The connection's part, without libvirtd: libvirt.open is a stub that fails
# while "libvirtd is down".


class StubConn:
    """What Connection asks of a virConnect."""

    def __init__(self) -> None:
        self.alive = True

    def setKeepAlive(self, interval: int, count: int) -> None:  # noqa: N802
        pass

    def registerCloseCallback(self, cb: object, opaque: object) -> None:  # noqa: N802
        pass

    def unregisterCloseCallback(self) -> None:  # noqa: N802
        pass

    def domainEventRegisterAny(self, *args: object) -> int:  # noqa: N802
        return 1

    def domainEventDeregisterAny(self, cb_id: int) -> None:  # noqa: N802
        pass

    def isAlive(self) -> bool:  # noqa: N802
        return self.alive

    def close(self) -> None:
        self.alive = False


class Libvirtd:
    """libvirt.open of a libvirtd that is down for the next ``down`` attempts."""

    def __init__(self) -> None:
        self.down = 0
        self.attempts = 0
        self.conns: list[StubConn] = []

    def open(self, uri: str) -> StubConn:
        self.attempts += 1
        if self.down > 0:
            self.down -= 1
            raise libvirt.libvirtError("Failed to connect socket: No such file or directory")
        self.conns.append(StubConn())
        return self.conns[-1]


@pytest.fixture
def libvirtd(monkeypatch: pytest.MonkeyPatch) -> Libvirtd:
    fake = Libvirtd()
    monkeypatch.setattr(libvirt, "open", fake.open)
    return fake


def test_a_call_waits_for_libvirtd_and_runs_after_the_re_read(libvirtd: Libvirtd) -> None:
    order: list[str] = []
    conn = connection.Connection("qemu:///fake", on_reconnect=lambda: order.append("re-read"),
                                 reconnect_interval=0.01)
    conn.open()
    libvirtd.conns[-1].alive = False  # libvirtd went away ...
    libvirtd.down = 3  # ... and answers again at the 4th attempt

    def call(c: object) -> int:
        order.append("call")
        return 42

    assert conn.call(call) == 42

    assert order == ["re-read", "call"] and conn.generation == 2
    assert libvirtd.attempts == 1 + 4


def test_a_call_gives_up_after_the_wait_and_an_impatient_one_at_once(
        libvirtd: Libvirtd) -> None:
    conn = connection.Connection("qemu:///fake", reconnect_interval=0.01,
                                 unavailable_wait=0.2)
    conn.open()
    libvirtd.conns[-1].alive = False
    libvirtd.down = 10**6

    with pytest.raises(errors.LibvirtUnavailableError):
        conn.call(lambda c: 1)
    waited = libvirtd.attempts
    with connection.impatient(), pytest.raises(errors.LibvirtUnavailableError):
        conn.call(lambda c: 1)
    assert waited > 2 and libvirtd.attempts == waited + 1
    conn.close()
    with pytest.raises(errors.LibvirtUnavailableError):
        conn.call(lambda c: 1)  # closed: no wait
    assert libvirtd.attempts == waited + 1


def test_stats_answer_from_memory_while_libvirtd_is_away() -> None:
    vm, dom, conn = test_vm.make_vm()
    d = vm.drives[0]
    d.replica = drive_mod.Replica("pool", "dst", d.image_id, d.volume_id,
                                  state=drive_mod.COPYING)
    dom.block_jobs["vda"] = {"type": libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_COPY, "cur": 5, "end": 9}
    dom.block_info["vda"] = [64, 8, 16]
    assert vm.stats()["disks"]["vda"]["replicate"]["cur"] == 5

    def away(vm_id: str) -> None:
        raise errors.LibvirtUnavailableError("no libvirtd", uri="qemu:///fake")

    conn.lookup = away  # type: ignore[method-assign]
    stats = vm.stats()

    assert stats["status"] == vm_mod.UP
    assert (stats["disks"]["vda"]["replicate"]["cur"],
            stats["disks"]["vda"]["replicate"]["end"]) == (5, 9)
    assert stats["disks"]["vda"]["capacity"] == 64
