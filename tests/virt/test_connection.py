"""virt/connection.py: one connection, events, surviving a libvirtd restart."""

from __future__ import annotations

import os
import re
import signal
import time

import libvirt
import pytest

from storage import commands
from tests.virt import conftest
from virt import connection, errors
from virt import vm as vm_mod

pytestmark = [pytest.mark.root, pytest.mark.libvirt]

MiB = conftest.MiB


def test_version_string():
    assert connection.version_string(9000000) == "9.0.0"
    assert connection.version_string(7002022) == "7.2.22"


def test_versions():
    conn = connection.Connection(conftest.URI)
    conn.open()
    try:
        assert re.fullmatch(r"\d+\.\d+\.\d+", conn.libvirt_version())
        assert re.fullmatch(r"\d+\.\d+\.\d+", conn.qemu_version())
    finally:
        conn.close()


def test_unreachable_libvirt_is_coded_error():
    conn = connection.Connection("qemu+unix:///system?socket=/nonexistent/libvirt-sock")
    with pytest.raises(errors.LibvirtUnavailableError) as e:
        conn.open()
    assert e.value.name == "LibvirtConnectionError"


def test_broken_connection_is_reopened():
    conn = connection.Connection(conftest.URI)
    conn.open()
    try:
        generation = conn.generation
        conn.get().close()  # the connection dies under its owner

        assert conn.call(lambda c: c.getLibVersion()) > 0
        assert conn.generation == generation + 1
    finally:
        conn.close()


def test_closed_connection_refuses():
    conn = connection.Connection(conftest.URI)
    conn.open()
    conn.close()
    with pytest.raises(errors.LibvirtUnavailableError):
        conn.get()


def libvirtd_pid() -> int | None:
    out = commands.run(["pgrep", "-x", "libvirtd"], check=False).stdout.split()
    return int(out[0]) if out else None


def libvirtd_answers() -> bool:
    proc = commands.run(["virsh", "-c", conftest.URI, "version"], timeout=10, check=False)
    return proc.returncode == 0


def restart_libvirtd() -> None:
    """Stop libvirtd by its pid and start it again as contrib/host-services does."""
    pid = libvirtd_pid()
    try:
        if pid is not None:
            os.kill(pid, signal.SIGTERM)
            conftest.wait_for(lambda: not os.path.exists(f"/proc/{pid}"), 60, "libvirtd exit")
    finally:
        if libvirtd_pid() is None:
            commands.run(["libvirtd", "-d"], timeout=60)
        conftest.wait_for(libvirtd_answers, 60, "libvirtd to answer")


def foreign_domains(ours: list[str]) -> list[str]:
    conn = conftest.libvirt_connection()
    try:
        return [d.name() for d in conn.listAllDomains() if d.UUIDString() not in ours]
    finally:
        conn.close()


@pytest.mark.guest
def test_events_arrive_after_libvirtd_restart(api, file_env, vm_params, domains):
    if os.path.exists("/run/systemd/system"):
        pytest.skip("libvirtd is a systemd unit here; not restarting it under systemd")
    img, vol = file_env.new_image()
    g = vm_params([file_env.drive(img, vol)], rate=20)
    others = foreign_domains(domains)
    if others:
        pytest.skip(f"other domains are running, not restarting libvirtd under them: {others}")
    api.vm_create(g.vm_id, g.params)
    g.wait_acks(5)
    generation = api.connection.generation

    restart_libvirtd()

    assert api.connection.wait_connected(generation, timeout=60)
    assert api.vm_get_stats(g.vm_id)[0]["status"] == vm_mod.UP
    conn = conftest.libvirt_connection()
    try:
        dom = conn.lookupByUUIDString(g.vm_id)
        dom.suspend()
        conftest.wait_for(lambda: api.get_vm(g.vm_id).status == vm_mod.PAUSED, 30, "Paused")
        dom.resume()
        conftest.wait_for(lambda: api.get_vm(g.vm_id).status == vm_mod.UP, 30, "Up")
    finally:
        conn.close()
    api.vm_destroy(g.vm_id)


@pytest.mark.guest
def test_calls_survive_libvirtd_restart_without_events(api, file_env, vm_params, domains):
    # Even before the reconnect thread runs, a verb reopens the connection.
    if os.path.exists("/run/systemd/system"):
        pytest.skip("libvirtd is a systemd unit here; not restarting it under systemd")
    img, vol = file_env.new_image()
    g = vm_params([file_env.drive(img, vol)], rate=20)
    others = foreign_domains(domains)
    if others:
        pytest.skip(f"other domains are running, not restarting libvirtd under them: {others}")
    api.vm_create(g.vm_id, g.params)

    restart_libvirtd()

    deadline = time.monotonic() + 60
    while True:
        try:
            stats = api.vm_get_stats(g.vm_id)[0]
            break
        except (errors.LibvirtUnavailableError, libvirt.libvirtError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    assert stats["disks"]["vda"]["volumeID"] == vol
    api.vm_destroy(g.vm_id)
    assert file_env.held() == {}
