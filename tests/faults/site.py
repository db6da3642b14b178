"""The fault matrix's site (issue 13): one real daemon, a file and a thin block domain.

:class:`FaultSite` is :class:`tests.vdsm_lsm.test_move_disk.Site` (its
calls, tasks and ``move-disk`` subprocess helpers are used as they are)
over a pool of two domains of different kinds, so every move crosses them:

- a FILE domain in a directory under /var/tmp (``file_sd``, the master;
  ``src_sd`` for the inherited helpers), and
- a thin BLOCK domain (``block_sd``; ``dst_sd``): a VG on a loop device over
  a sparse file of ``vg_size`` bytes (small for an ENOSPC test), LVs
  activated in loop mode (no device-mapper here), COW volumes starting at
  ``chunk_mb`` and extended by the watermark monitor.

One daemon, the ``local`` cluster lock, SPM on the pool.  Its ``qemu-img``
is a shim first on the daemon's PATH (:class:`tests.faults.processes.QemuImgHold`): it runs the
real qemu-img unless a test asked it to hold one call
(``site.qemu_img.hold("convert", vol_id)``), which then waits, looking like
a qemu-img orphan, until killed: "during the clone" and "during syncData"
are then known points, never a race.

Teardown (:meth:`FaultSite.close`, also after a failure): the site's VMs
destroyed, held calls ended, the pool destroyed and both domains formatted
through the daemon, then what the daemon left is measured
(:attr:`FaultSite.leaked_loops`: loop devices still stacked on the block
domain's PV) and removed with plain ``losetup``/``lvm``, the PV detached
and the daemon stopped.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import tempfile
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from typing import Any

import libvirt

from contrib import guest
from contrib.guest import verifier
from storage import block_manifest, commands, lvm
from tests import daemon as daemon_mod
from tests.faults import processes
from tests.storage import conftest as storage_conftest
from tests.vdsm_lsm import test_move_disk
from tests.virt import conftest as virt_conftest
from vdsm_lsm import client_errors, journal, move_disk

log = logging.getLogger("tests.faults")

MiB = 1024**2
GiB = 1024**3
BLANK = test_move_disk.BLANK
VM_PREFIX = "lsmtest-faults-"
WAIT = processes.WAIT
POLL = processes.POLL
# Set to keep a site's directory (daemon log, serial log) after the tests.
KEEP_ENV = "VDSM_LSM_KEEP_FAULT_SITE"
LOSETUP_COLUMNS = "NAME,BACK-FILE,BACK-INO,BACK-MAJ:MIN,OFFSET,SIZELIMIT"
# Kept here for the tests that use them (they are processes').
QemuImgHold = processes.QemuImgHold
process_alive = processes.process_alive


def new_id() -> str:
    return str(uuid.uuid4())


class FaultSite(test_move_disk.Site):
    """A daemon with a pool of a file domain and a thin block domain; SPM here.

    Make it with :meth:`create` (or the ``fault_site_factory`` fixture of
    tests/faults/conftest.py), end it with :meth:`close`.
    """

    def __init__(
        self,
        workdir: str,
        guest_files: guest.Artifacts,
        vg_size: int = GiB,
        chunk_mb: int = 16,
        extent_mb: int = 4,
        config: dict[str, dict[str, Any]] | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        # Not Site.__init__ (it makes two file domains): the same fields, here.
        self.workdir = workdir
        self.guest_files = guest_files
        self.vg_size = vg_size
        self.qemu_img = processes.QemuImgHold(workdir)
        sections: dict[str, dict[str, Any]] = {
            "irs": {"volume_utilization_chunk_mb": chunk_mb, "block_extent_size_mb": extent_mb},
            "lvm": {"activation": "loop"},
            "sanlock": {"cluster_lock": "local"},
            "thinp": {"monitor_interval": 1},
        }
        for section, values in (config or {}).items():
            sections.setdefault(section, {}).update(values)
        self.daemon = daemon_mod.Daemon(os.path.join(workdir, "daemon"), sections)
        self.daemon.extra_env.update(self.qemu_img.path_env)
        self.daemon.extra_env.update(env or {})
        self.pool_id, self.file_sd, self.block_sd = new_id(), new_id(), new_id()
        self.src_sd, self.dst_sd = self.file_sd, self.block_sd
        self.src_path = os.path.join(workdir, "file-sd")
        self.dst_path = ""
        self.formatted: list[str] = []
        self.vms: list[str] = []
        self.pv = ""
        self.leaked_loops: list[str] | None = None  # measured by close()
        self._pv_file = os.path.join(workdir, "pv.img")
        self._closed = False

    @classmethod
    def create(cls, guest_files: guest.Artifacts, **options: Any) -> FaultSite:
        """A started site in a new directory under /var/tmp (close() removes it)."""
        workdir = tempfile.mkdtemp(prefix="lsmtest-faults-", dir="/var/tmp")
        os.makedirs(os.path.join(workdir, "daemon"))
        site = cls(workdir, guest_files, **options)
        try:
            site.start()
        except BaseException:
            site.close()
            raise
        return site

    def start(self) -> None:
        with open(self._pv_file, "wb") as f:
            f.truncate(self.vg_size)
        self.pv = commands.run(["losetup", "--find", "--show", self._pv_file],
                               timeout=60).stdout.decode().strip()
        self.daemon.start()
        os.makedirs(self.src_path)
        self.call("StorageDomain.create", storagedomainID=self.file_sd, domainType="file",
                  typeArgs={"path": self.src_path}, name="faults-file")
        self.formatted.append(self.file_sd)
        self.call("StorageDomain.create", storagedomainID=self.block_sd, domainType="block",
                  typeArgs={"devices": [self.pv]}, name="faults-block")
        self.formatted.append(self.block_sd)
        self.call("StoragePool.create", storagepoolID=self.pool_id, name="faults",
                  masterSdUUID=self.file_sd, domainList=[self.file_sd, self.block_sd])
        self.connect()
        os.makedirs(self.state_dir, exist_ok=True)

    # The pool, as an engine keeps it

    def connect(self) -> None:
        """StoragePool.connect unless connected, then spmStart unless SPM."""
        try:
            status = self.call("StoragePool.getSpmStatus", storagepoolID=self.pool_id)
        except client_errors.ClientError as e:
            log.info("Pool not connected (%s): connecting", e)
            self.call("StoragePool.connect", storagepoolID=self.pool_id, hostID=1,
                      masterSdUUID=self.file_sd)
            status = self.call("StoragePool.getSpmStatus", storagepoolID=self.pool_id)
        if status["spmStatus"] != "SPM":
            assert self.call("StoragePool.spmStart", storagepoolID=self.pool_id) is True

    def other(self, sd_id: str) -> str:
        return self.block_sd if sd_id == self.file_sd else self.file_sd

    def is_block(self, sd_id: str) -> bool:
        return sd_id == self.block_sd

    # The daemon's life

    def kill9_daemon(self) -> None:
        """kill -9 the daemon (its children, QEMU and libvirtd live on)."""
        assert self.daemon.proc is not None and self.daemon.proc.poll() is None
        self.daemon.kill9()

    def restart_daemon(self, **irs: Any) -> None:
        """Start the (killed or stopped) daemon again, with changed [irs]
        options if given, and make it SPM again as an engine would."""
        if self.daemon.proc is not None:
            self.daemon.stop()
        if irs:
            self.daemon.config["irs"].update(irs)
            daemon_mod.write_config(self.daemon.conf_path, self.daemon.config)
        self.daemon.start()
        self.connect()

    def freeze_daemon(self) -> None:
        """SIGSTOP: the daemon does nothing until killed (or thawed)."""
        assert self.daemon.proc is not None
        os.kill(self.daemon.proc.pid, signal.SIGSTOP)

    # Images and the guest

    def create_image(self, sd_id: str | None = None, size: int = 64 * MiB,
                     base_data_mb: int = 0) -> tuple[str, list[str]]:
        """An image of a RAW base and a COW leaf on sd_id (the file domain);
        base_data_mb MiB of random data written into the base (file domain
        only); (imgID, [base, leaf])."""
        sd_id = sd_id or self.file_sd
        img, base, leaf = new_id(), new_id(), new_id()
        for vol, fmt, parent in ((base, "RAW", BLANK), (leaf, "COW", base)):
            self.wait_task(self.call(
                "Volume.create", storagepoolID=self.pool_id, storagedomainID=sd_id,
                imageID=img, volumeID=vol, size=size, volFormat=fmt,
                preallocate="PREALLOCATED" if fmt == "RAW" and self.is_block(sd_id)
                else "SPARSE", desc="", srcImgUUID=img if parent != BLANK else BLANK,
                srcVolUUID=parent))
            if vol == base and base_data_mb:
                assert not self.is_block(sd_id), "base data on the file domain only"
                with open(os.path.join(self.src_path, sd_id, "images", img, base), "r+b") as f:
                    for _ in range(base_data_mb):
                        f.write(os.urandom(MiB))
        return img, [base, leaf]

    def start_guest(self, img: str, leaf: str, sd_id: str | None = None,
                    **writer: Any) -> virt_conftest.GuestVM:
        """The test guest on the image's leaf, writing (rate=50 blocks/s over
        a 16 MiB span unless told), once it acknowledged some writes."""
        vm_id = new_id()
        self.vms.append(vm_id)
        serial_log = os.path.join(self.workdir, f"serial-{vm_id[:8]}.log")
        writer.setdefault("span_mb", 16)
        writer.setdefault("rate", 50)
        params = {
            "vmName": f"{VM_PREFIX}{vm_id[:8]}", "memSize": 128, "smp": 1, "accel": "tcg",
            "kernel": self.guest_files.kernel, "initrd": self.guest_files.initrd,
            "kernelArgs": guest.kernel_args(**writer), "serialLog": serial_log,
            "drives": [{"poolID": self.pool_id, "domainID": sd_id or self.file_sd,
                        "imageID": img, "volumeID": leaf, "format": "cow"}],
        }
        vm = virt_conftest.GuestVM(vm_id, serial_log, params)
        self.call("VM.create", vmID=vm_id, vmParams=params)
        vm.wait_acks(30)
        return vm

    def stats(self, vm: virt_conftest.GuestVM) -> dict[str, Any]:
        return dict(move_disk.vm_stats(self.call("VM.getStats", vmID=vm.vm_id)))

    def disk(self, vm: virt_conftest.GuestVM, drive: str = "vda") -> dict[str, Any]:
        return dict(self.stats(vm)["disks"][drive])

    def chain(self, vm: virt_conftest.GuestVM) -> list[str]:
        return [v["volumeID"] for v in self.disk(vm)["volumeChain"]]

    def wait_up(self, vm: virt_conftest.GuestVM, timeout: float = WAIT) -> None:
        """Until the (recovered) VM is Up in VM.getStats."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                if self.stats(vm).get("status") == "Up":
                    return
            except client_errors.ClientError as e:
                log.info("VM %s not there yet: %s", vm.vm_id, e)
            assert time.monotonic() < deadline, f"VM {vm.vm_id} never Up"
            time.sleep(0.1)

    def wait_replica(self, vm: virt_conftest.GuestVM, state: str = "ready",
                     timeout: float = WAIT) -> dict[str, Any]:
        """Until VM.getStats shows the drive's replication in state."""
        deadline = time.monotonic() + timeout
        while True:
            replicate = self.disk(vm).get("replicate")
            if replicate and replicate.get("state") == state:
                return dict(replicate)
            assert time.monotonic() < deadline, f"replication never {state}: {replicate}"
            time.sleep(0.1)

    # libvirt, behind the daemon's back

    def libvirt_connection(self) -> libvirt.virConnect:
        """A connection of the test's own to the daemon's libvirtd (close it)."""
        return virt_conftest.libvirt_connection()

    def domain(self, vm: virt_conftest.GuestVM) -> tuple[libvirt.virConnect, libvirt.virDomain]:
        """A connection of the test's own and the VM's libvirt domain (close the connection)."""
        conn = self.libvirt_connection()
        return conn, conn.lookupByUUIDString(vm.vm_id)

    def live_source(self, vm: virt_conftest.GuestVM, drive: str = "vda") -> str:
        """The drive's source path in the live domain XML."""
        conn, dom = self.domain(vm)
        try:
            return live_source(dom.XMLDesc(0), drive)
        finally:
            conn.close()

    def block_job(self, vm: virt_conftest.GuestVM, drive: str = "vda") -> dict[str, Any]:
        conn, dom = self.domain(vm)
        try:
            return dict(dom.blockJobInfo(drive, 0) or {})
        finally:
            conn.close()

    # move-disk

    def journal_record(self, vm: virt_conftest.GuestVM, drive: str = "vda") -> dict[str, Any]:
        return journal.read(os.path.join(self.state_dir, journal.name_of(vm.vm_id, drive)
                                         + journal.SUFFIX))

    def move_args(self, vm: virt_conftest.GuestVM, to: str, *more: str) -> tuple[str, ...]:
        return (vm.vm_id, to, "--delete-source", "--timeout", "300", *more)

    # Checks

    def lvs(self) -> list[str]:
        """Names of the block domain's LVs (plain lvm2, metadata only)."""
        return sorted(lv.name for lv in lvm.LVM([self.pv], activation=False).lvs(self.block_sd))

    def stacked_loops(self) -> list[dict[str, Any]]:
        """Loop devices bound over the block domain's PV (losetup), found by
        the backing's device and inode: a device bound by a daemon in
        another mount namespace shows its backing as "/loopN"."""
        st = os.stat(self.pv)
        pv = (os.major(st.st_dev), os.minor(st.st_dev), st.st_ino)
        out = commands.run(["losetup", "--list", "--json", "-O", LOSETUP_COLUMNS],
                           timeout=60).stdout
        rows = json.loads(out).get("loopdevices", []) if out.strip() else []
        return [d for d in rows if d.get("back-file") == self.pv or _backing(d) == pv]

    def qemu_img_orphans(self) -> list[int]:
        """qemu-img processes (real or held) naming this daemon's run dir."""
        return [pid for pid, argv in processes.processes()
                if os.path.basename(argv[0]) == "qemu-img"
                and any(self.daemon.run_dir in a for a in argv[1:])]

    def assert_clean(self, vm: virt_conftest.GuestVM, img: str, on_sd: str) -> None:
        """The VM runs on on_sd only and nothing of a move is left anywhere:
        the image and its LEGAL volumes on on_sd only (test_move_disk's
        assert_only_on: no task, no journal, no prepare link of the other
        domain), prepare links exactly the chain's, LVs and loop devices
        only the chain's (on the block domain) and the special LVs', no
        block job, no other domain of the site's in libvirt, no qemu-img."""
        test_move_disk.assert_only_on(self, vm, img, on_sd)
        chain = self.chain(vm)
        links = os.path.join(self.daemon.run_dir, "storage")
        for sd_id in (self.file_sd, self.block_sd):
            sd_links = os.path.join(links, sd_id)
            imgs = sorted(os.listdir(sd_links)) if os.path.isdir(sd_links) else []
            imgs = [i for i in imgs if os.listdir(os.path.join(sd_links, i))]
            if sd_id == on_sd:
                assert imgs == [img], (sd_id, imgs)
                found = sorted(os.listdir(os.path.join(sd_links, img)))
                assert found == sorted(chain), f"prepare links {found} for the chain {chain}"
            else:
                assert imgs == [], (sd_id, imgs)
        volumes = chain if self.is_block(on_sd) else []
        assert self.lvs() == sorted([*block_manifest.SPECIAL_LVS, *volumes])
        loops = self.stacked_loops()
        offsets = [d["offset"] for d in loops]
        assert len(set(offsets)) == len(offsets), f"an LV mapped twice: {loops}"
        assert len(loops) == len(block_manifest.SPECIAL_LVS) + len(volumes), (
            f"loop devices over {self.pv}: {json.dumps(loops)} for LVs "
            f"{sorted([*block_manifest.SPECIAL_LVS, *volumes])}")
        assert self.block_job(vm) == {}
        assert on_sd in self.live_source(vm) and "replicate" not in self.disk(vm)
        conn = self.libvirt_connection()
        try:
            defined = {d.UUIDString() for d in conn.listAllDomains()}
        finally:
            conn.close()
        assert defined & set(self.vms) == {vm.vm_id}
        assert self.qemu_img_orphans() == []

    def verify(self, vm: virt_conftest.GuestVM, img: str, on_sd: str,
               leaf: str) -> verifier.Result:
        """After the VM is destroyed: every acknowledged write on the chain of
        leaf on on_sd (prepared through the daemon for the check)."""
        prepared = self.call("Image.prepare", storagepoolID=self.pool_id,
                             storagedomainID=on_sd, imageID=img, volumeID=leaf)
        try:
            return verifier.verify(vm.serial_log, prepared["path"], image_format="qcow2")
        finally:
            self.call("Image.teardown", storagepoolID=self.pool_id, storagedomainID=on_sd,
                      imageID=img, volumeID=leaf)

    # The end

    def destroy_vms(self) -> None:
        """The site's VMs: VM.destroy, then libvirt's destroy of what is left."""
        for vm_id in self.vms:
            try:
                self.call("VM.destroy", vmID=vm_id)
            except (client_errors.ClientError, OSError) as e:
                log.info("VM.destroy %s: %s", vm_id, e)
        conn = self.libvirt_connection()
        try:
            for vm_id in self.vms:
                try:
                    conn.lookupByUUIDString(vm_id).destroy()
                except libvirt.libvirtError:
                    continue
                log.warning("Destroyed the site's domain %s behind the daemon's back", vm_id)
        finally:
            conn.close()

    def teardown_storage(self) -> list[str]:
        """Destroy the pool and format both domains through the daemon; the
        loop devices then still stacked on the PV (the measure of a leak)."""
        if self.formatted and self.daemon.proc is not None and self.daemon.proc.poll() is None:
            self.cleanup()  # Site's: StoragePool.destroy, StorageDomain.format
            self.formatted = []
        if self.leaked_loops is None and self.pv:
            self.leaked_loops = [d["name"] for d in self.stacked_loops()]
            if self.leaked_loops:
                log.error("Loop devices left over the PV %s: %s", self.pv, self.leaked_loops)
        return list(self.leaked_loops or [])

    def close(self) -> None:
        """Everything undone, also after a failure (idempotent)."""
        if self._closed:
            return
        self._closed = True
        try:
            self.qemu_img.end()
            if self.daemon.proc is not None and self.daemon.proc.poll() is None:
                with _suppress():
                    os.kill(self.daemon.proc.pid, signal.SIGCONT)
            self.destroy_vms()
            for pid in self.qemu_img_orphans():
                with _suppress():
                    os.kill(pid, signal.SIGKILL)
            with _suppress():
                self.teardown_storage()
        finally:
            self.daemon.stop()
            if self.pv:
                for d in self.stacked_loops():
                    commands.run(["losetup", "--detach", d["name"]], timeout=60, check=False)
                storage_conftest.wipe_lvm([self.pv])
                commands.run(["losetup", "--detach", self.pv], timeout=60, check=False)
                if any(d["name"] == self.pv for d in storage_conftest.loop_devices()):
                    log.error("The PV %s is still bound (a device over it is busy)", self.pv)
            if os.environ.get(KEEP_ENV):
                log.warning("Kept the site's files in %s (%s)", self.workdir, KEEP_ENV)
            else:
                shutil.rmtree(self.workdir, ignore_errors=True)


def live_source(xml: str, drive: str = "vda") -> str:
    """The source file or device of drive in a domain XML ("" if none)."""
    root = ET.fromstring(xml)
    for disk in root.findall("./devices/disk"):
        target = disk.find("target")
        if target is None or target.get("dev") != drive:
            continue
        source = disk.find("source")
        if source is None:
            return ""
        return source.get("file") or source.get("dev") or ""
    return ""


@contextlib.contextmanager
def _suppress() -> Iterator[None]:
    """Log and swallow any error of a clean-up step."""
    try:
        yield
    except Exception as e:
        log.warning("Clean-up step failed: %r", e)


def _backing(row: dict[str, Any]) -> tuple[int, int, int] | None:
    """(major, minor, inode) of a losetup row's backing file."""
    try:
        major, minor = str(row["back-maj:min"]).strip().split(":")
        return int(major), int(minor), int(row["back-ino"])
    except (KeyError, ValueError):
        return None
