"""Helpers of the fault matrix's cases 4 and 6 (tests/faults/test_enospc.py,
test_pivot_refused.py), on top of tests/faults/site.py.

- :class:`Hooked`: a daemon transport whose calls run test hooks just
  before or after a named verb, so that a fault is injected at a known step
  of the real ``move-disk`` flow (run in-process on :class:`FlowRun`),
  never by racing it;
- :func:`fill_vg` / :func:`remove_filler`: a plain ``lvcreate`` of every
  free extent of the block domain's VG (metadata only, as the daemon's LVs
  in loop mode), so that no LV of the domain can grow any more;
- :func:`qmp`: a QMP command behind the daemon's back (libvirt-qemu), e.g.
  ``block-job-pause`` of the mirror.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import Any

import libvirt_qemu

from storage import lvm
from tests.faults import site as site_mod
from tests.virt import conftest as virt_conftest
from vdsm_lsm import client, client_errors, journal, move_disk

log = logging.getLogger("tests.faults")

FILLER = "lsmtest-filler"
WAIT = site_mod.WAIT

Hook = Callable[[dict[str, Any]], None]


class Hooked:
    """A transport running before[verb](params) / after[verb](params) around calls."""

    def __init__(self, rpc: move_disk.Transport) -> None:
        self.rpc = rpc
        self.before: dict[str, Hook] = {}
        self.after: dict[str, Hook] = {}
        self.calls: list[str] = []

    def call(self, method: str, **params: Any) -> Any:
        self.calls.append(method)
        hook = self.before.get(method)
        if hook is not None:
            hook(params)
        result = self.rpc.call(method, **params)
        hook = self.after.get(method)
        if hook is not None:
            hook(params)
        return result


class FlowRun:
    """The move-disk flow in-process, on the site's daemon through Hooked,
    with the CLI's journal (--state-dir), polling (no events)."""

    def __init__(self, site: site_mod.FaultSite, vm: virt_conftest.GuestVM, to: str,
                 **options: Any) -> None:
        self.rpc = Hooked(client.Client(socket_path=site.daemon.socket_path, timeout=300))
        self.flow = move_disk.MoveDisk(
            self.rpc, vm.vm_id, to, timeout=300, poll_interval=0.2,
            journal=journal.Journal(site.state_dir, vm.vm_id, "vda"), **options)

    def run(self) -> dict[str, Any]:
        return self.flow.run()

    def fails(self) -> client_errors.ClientError:
        """Run the flow; the error it ended with (it must fail)."""
        try:
            summary = self.flow.run()
        except client_errors.ClientError as e:
            log.info("move-disk failed as expected: %s %s", e.code, e.message)
            return e
        raise AssertionError(f"move-disk succeeded: {summary}")


# The block domain's VG, filled behind the daemon's back


def _lvm(site: site_mod.FaultSite) -> lvm.LVM:
    return lvm.LVM([site.pv], activation=False)


def fill_vg(site: site_mod.FaultSite) -> int:
    """An LV of every free extent of the block domain's VG; its extents."""
    free = _lvm(site).vg_info(site.block_sd).free_count
    assert free > 0, "the VG is full already"
    _lvm(site).lvcreate(site.block_sd, FILLER, free)
    log.info("Filled vg=%s with lv=%s extents=%d", site.block_sd, FILLER, free)
    return free


def remove_filler(site: site_mod.FaultSite) -> None:
    if FILLER in site.lvs():
        _lvm(site).lvremove(site.block_sd, FILLER)


# Waiting on the VM


def wait_status(site: site_mod.FaultSite, vm: virt_conftest.GuestVM, status: str,
                pause_code: str | None = None, timeout: float = WAIT) -> dict[str, Any]:
    """Until VM.getStats says status (and pause_code); the stats."""
    deadline = time.monotonic() + timeout
    while True:
        stats = site.stats(vm)
        if stats["status"] == status and pause_code in (None, stats.get("pauseCode")):
            return stats
        assert time.monotonic() < deadline, (
            f"VM never {status} {pause_code or ''}: {stats['status']} {stats.get('pauseCode')}")
        time.sleep(0.1)


# QEMU behind libvirt's and the daemon's back


def qmp(site: site_mod.FaultSite, vm: virt_conftest.GuestVM, command: str,
        **arguments: Any) -> Any:
    """A QMP command to the VM's QEMU (libvirt-qemu pass-through); its return."""
    body: dict[str, Any] = {"execute": command}
    if arguments:
        body["arguments"] = arguments
    conn, dom = site.domain(vm)
    try:
        answer = json.loads(libvirt_qemu.qemuMonitorCommand(dom, json.dumps(body), 0))
    finally:
        conn.close()
    assert "error" not in answer, answer
    return answer.get("return")


def mirror_job(site: site_mod.FaultSite, vm: virt_conftest.GuestVM) -> dict[str, Any]:
    """QEMU's mirror job of vda (query-block-jobs)."""
    jobs = [j for j in qmp(site, vm, "query-block-jobs") if j["type"] == "mirror"]
    assert len(jobs) == 1, jobs
    return dict(jobs[0])
