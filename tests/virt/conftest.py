"""Fixtures for virt tests: real libvirtd, the real test guest under TCG, real storage.

Every domain a test creates is named ``lsmtest-virt-*`` and its UUID is
recorded; teardown destroys those domains through a connection of its own,
whatever state the test left the API object in.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import libvirt
import pytest

from contrib import guest
from contrib.guest import verifier
from storage import sd
from tests.virt import storage_env
from virt import api as virt_api
from virt import connection

log = logging.getLogger("tests.virt")

URI = "qemu:///system"
MiB = 1024 * 1024
BOOT_TIMEOUT = 120


def libvirt_connection() -> libvirt.virConnect:
    connection.start_event_loop()
    return libvirt.open(URI)


@pytest.fixture(scope="session")
def guest_files() -> guest.Artifacts:
    return guest.ensure_built(os.environ.get("VDSM_LSM_GUEST_DIR", guest.DEFAULT_DIR))


@pytest.fixture
def workdir() -> Iterator[str]:
    path = tempfile.mkdtemp(prefix="lsmtest-virt-", dir="/var/tmp")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def file_env(workdir: str, domains: list[str]) -> Iterator[storage_env.StorageEnv]:
    """A pool with one file domain; this host is SPM."""
    yield from _env(workdir, domains, sd.FILE)


@pytest.fixture
def block_env(workdir: str, domains: list[str]) -> Iterator[storage_env.StorageEnv]:
    """A pool with one block domain on a loop device (loop activation here)."""
    yield from _env(workdir, domains, sd.BLOCK)


@pytest.fixture(params=[sd.FILE, sd.BLOCK])
def any_env(
    request: pytest.FixtureRequest, workdir: str, domains: list[str]
) -> Iterator[storage_env.StorageEnv]:
    """Each test runs once on a file domain and once on a block domain."""
    yield from _env(workdir, domains, request.param)


def _env(workdir: str, domains: list[str], domain_type: str) -> Iterator[storage_env.StorageEnv]:
    env, cleanup = storage_env.make_env(workdir, domain_type)
    try:
        yield env
    finally:
        # QEMU must let go of the volumes before they are deactivated.
        destroy_domains(domains)
        cleanup()


@pytest.fixture
def domains() -> Iterator[list[str]]:
    """UUIDs of domains the test creates; destroyed at teardown."""
    ids: list[str] = []
    try:
        yield ids
    finally:
        destroy_domains(ids)


def destroy_domains(ids: list[str]) -> None:
    if not ids:
        return
    conn = libvirt_connection()
    try:
        for vm_id in ids:
            try:
                dom = conn.lookupByUUIDString(vm_id)
            except libvirt.libvirtError:
                continue
            log.info("Destroying test domain %s", vm_id)
            try:
                dom.destroy()
            except libvirt.libvirtError as e:
                log.error("Cannot destroy test domain %s: %s", vm_id, e)
    finally:
        conn.close()


def config_for(storage: Any, **options: Any) -> virt_api.Config:
    """Virt's config for a "daemon" over this storage: it adopts only VMs on
    its own prepare links, as the daemon does, so VMs of other tests (or other
    sessions) on the shared libvirtd are never recovered into it."""
    run_dir = getattr(storage, "run_dir", "")
    root = os.path.join(run_dir, "storage") if run_dir else ""
    return virt_api.Config(libvirt_uri=URI, accel="tcg", drive_root=root, **options)


@pytest.fixture
def make_api(domains: list[str]) -> Iterator[Callable[[Any], virt_api.API]]:
    """Factory of started virt APIs (a "daemon" each), stopped at teardown."""
    apis: list[virt_api.API] = []

    def make(storage: Any) -> virt_api.API:
        a = virt_api.API(storage, config_for(storage))
        a.start()
        apis.append(a)
        return a

    try:
        yield make
    finally:
        destroy_domains(domains)
        for a in apis:
            a.stop()


@pytest.fixture
def api(make_api: Callable[[Any], virt_api.API], file_env: storage_env.StorageEnv) -> virt_api.API:
    return make_api(file_env)


@dataclasses.dataclass
class GuestVM:
    vm_id: str
    serial_log: str
    params: dict[str, Any]

    def wait_acks(self, count: int, timeout: float = BOOT_TIMEOUT) -> verifier.SerialLog:
        return verifier.wait_for_acks(self.serial_log, count, timeout=timeout)

    def acks(self) -> int:
        if not os.path.exists(self.serial_log):
            return 0
        return len(verifier.parse_log(self.serial_log).acks)


@pytest.fixture
def vm_params(
    guest_files: guest.Artifacts, workdir: str, domains: list[str]
) -> Callable[..., GuestVM]:
    """Build vmParams for the test guest; the VM's UUID is recorded for clean-up."""

    def make(drives: list[dict[str, Any]], **writer: Any) -> GuestVM:
        vm_id = str(uuid.uuid4())
        domains.append(vm_id)
        serial_log = os.path.join(workdir, f"serial-{vm_id[:8]}.log")
        writer.setdefault("span_mb", 16)
        params = {
            "vmName": f"lsmtest-virt-{vm_id[:8]}",
            "memSize": 128,
            "smp": 1,
            "accel": "tcg",
            "kernel": guest_files.kernel,
            "initrd": guest_files.initrd,
            "kernelArgs": guest.kernel_args(**writer),
            "serialLog": serial_log,
            "drives": drives,
        }
        return GuestVM(vm_id, serial_log, params)

    return make


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.1)
