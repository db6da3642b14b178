"""One outgoing migration: the libvirt call and its monitor (virt/migration.py starts it).

:class:`Migration` runs ``virDomainMigrateToURI3`` (peer to peer, live, the
mapped drives' leaves copied over NBD) in one thread, and a monitor in
another that reads ``virDomainGetJobStats`` into the status (phase,
progress, data remaining, rate), pings the destination daemon, and aborts
the job when it was canceled or the destination daemon stopped answering.
When the call returns, the VM has left (``done``: the source is released,
the destination leaves marked LEGAL if this host is the SPM) or stays
(``failed`` / ``canceled``: the destination is told to let go).

Also here, shared with both sides: the phases, :class:`Config`, and
:class:`Peer` / :data:`Connect`, how virt reaches another host's daemon
without importing the transport.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

import libvirt

from common import errors as common_errors
from virt import drive as drive_mod
from virt import errors, replication, storage_iface
from virt import vm as vm_mod

log = logging.getLogger("virt.migration_job")

COPYING_DISKS = "copying-disks"
MEMORY = "memory"
DONE = "done"
FAILED = "failed"
CANCELED = "canceled"
PHASES = (COPYING_DISKS, MEMORY, DONE, FAILED, CANCELED)
FINAL = (DONE, FAILED, CANCELED)

DESTINATION_STATUS = "Migration Destination"

FLAGS = (
    libvirt.VIR_MIGRATE_LIVE | libvirt.VIR_MIGRATE_PEER2PEER | libvirt.VIR_MIGRATE_ABORT_ON_ERROR
)
DISK_FLAGS = libvirt.VIR_MIGRATE_NON_SHARED_INC


class Peer(Protocol):
    """A connection to another host's daemon (the daemon's wiring makes it).

    ``call`` returns a verb's result; an error answer is raised as a
    ``common.errors.Error`` carrying the peer's error name, an unreachable
    peer as ``OSError``.
    """

    def call(self, method: str, **params: Any) -> Any: ...

    def close(self) -> None: ...


# (address "HOST:PORT" or "unix:PATH", timeout in seconds) -> a Peer;
# ValueError for a bad address.
Connect = Callable[[str, float], Peer]

CALL_TIMEOUT = 120.0
PING_TIMEOUT = 5.0


@dataclasses.dataclass(frozen=True)
class Config:
    """Migration settings ([libvirt] migration_*, [vm] migration_*)."""

    # How other hosts' libvirtd reach this host's ("" : qemu+tls://<address>/system).
    libvirt_uri: str = ""
    # Where incoming streams listen, as unix sockets ("": TCP, libvirt's choice).
    socket_dir: str = ""
    # Destination: how long an expected VM may take to arrive (seconds).
    destination_timeout: float = 300.0
    # Source: abort when the destination daemon does not answer this long.
    peer_timeout: float = 10.0
    poll_interval: float = 0.5


def call_peer(connect: Connect | None, dst: str, method: str, timeout: float = CALL_TIMEOUT,
              **params: Any) -> Any:
    """One verb on the daemon at dst; NoConnectionToPeerError if it cannot be reached."""
    if connect is None:
        raise errors.NoConnectionToPeerError("this daemon has no peer transport", dst=dst)
    try:
        peer = connect(dst, timeout)
    except ValueError as e:
        raise errors.NoConnectionToPeerError(str(e), dst=dst) from e
    try:
        return peer.call(method, **params)
    except OSError as e:
        raise errors.NoConnectionToPeerError(str(e), dst=dst) from e
    finally:
        peer.close()


@dataclasses.dataclass
class Mapping:
    drive: drive_mod.Drive
    dst: dict[str, Any]  # DriveSpecVolume on the destination domain


class Migration:
    """One outgoing migration: the libvirt call in one thread, a monitor in another."""

    def __init__(self, vm: vm_mod.VM, dst: str, mappings: list[Mapping], bandwidth: int,
                 connect: Connect | None, config: Config, spm: storage_iface.SpmRequests,
                 on_done: Callable[[vm_mod.VM], None]) -> None:
        self.vm = vm
        self.dst = dst
        self.mappings = mappings
        self.bandwidth = bandwidth
        self._connect = connect
        self._config = config
        self._spm = spm
        self._on_done = on_done
        self._lock = threading.Lock()
        self._finished = threading.Event()
        self._cancel = False
        self._abort_sent = False
        self._peer_lost = False
        self._peer_since: float | None = None
        self.phase = COPYING_DISKS if mappings else MEMORY
        self.progress = 0
        self.data_remaining = 0
        self.rate = 0
        self.error = ""
        self.message = ""
        self.started = time.monotonic()
        self.ended: float | None = None
        self._last: tuple[float, int] | None = None
        self.answer: dict[str, Any] = {}

    # Status

    @property
    def running(self) -> bool:
        return not self._finished.is_set()

    def status(self) -> dict[str, Any]:
        with self._lock:
            return {
                "phase": self.phase,
                "progress": self.progress,
                "dataRemaining": self.data_remaining,
                "rate": self.rate,
                "error": self.error,
                "message": self.message,
                "elapsed": round((self.ended or time.monotonic()) - self.started, 3),
            }

    def _set(self, **values: Any) -> None:
        with self._lock:
            for key, value in values.items():
                setattr(self, key, value)

    # Running

    def start(self, answer: dict[str, Any]) -> None:
        self.answer = answer
        threading.Thread(target=self._run, name=f"migrate-{self.vm.id[:8]}",
                         daemon=True).start()
        threading.Thread(target=self._monitor, name=f"migmon-{self.vm.id[:8]}",
                         daemon=True).start()

    def cancel(self) -> None:
        """Ask libvirt to abort the job (the monitor retries until it took)."""
        log.info("Canceling migration vm=%s dst=%s", self.vm.id, self.dst)
        self._cancel = True
        self._abort()

    def wait(self, timeout: float | None = None) -> bool:
        return self._finished.wait(timeout)

    def _params(self) -> dict[str, Any]:
        params: dict[str, Any] = {libvirt.VIR_MIGRATE_PARAM_DEST_XML: self.answer["domainXml"]}
        if self.mappings:
            params[libvirt.VIR_MIGRATE_PARAM_MIGRATE_DISKS] = [m.drive.name for m in self.mappings]
        if self.answer.get("migrateUri"):
            params[libvirt.VIR_MIGRATE_PARAM_URI] = self.answer["migrateUri"]
        if self.answer.get("disksUri") and self.mappings:
            params[libvirt.VIR_MIGRATE_PARAM_DISKS_URI] = self.answer["disksUri"]
        if self.bandwidth:
            params[libvirt.VIR_MIGRATE_PARAM_BANDWIDTH] = self.bandwidth
        return params

    def _run(self) -> None:
        uri = self.answer["libvirtUri"]
        flags = FLAGS | (DISK_FLAGS if self.mappings else 0)
        params = self._params()
        log.info("Migrating vm=%s to %s via %s disks=%s bandwidth=%d flags=%#x", self.vm.id,
                 self.dst, uri, [m.drive.name for m in self.mappings], self.bandwidth, flags)
        try:
            if self._cancel:
                raise errors.MigrationError("canceled before it started", vm_id=self.vm.id)
            self.vm.call(lambda dom: dom.migrateToURI3(uri, params, flags), retry=False)
        except (libvirt.libvirtError, common_errors.Error) as e:
            self._failed(e)
        except Exception as e:
            log.exception("Migration crashed vm=%s", self.vm.id)
            self._failed(e)
        else:
            self._succeeded()
        finally:
            with self._lock:
                self.ended = time.monotonic()
            self._finished.set()

    def _succeeded(self) -> None:
        log.info("Migration done vm=%s dst=%s in %.1fs", self.vm.id, self.dst,
                 time.monotonic() - self.started)
        self._set(phase=DONE, progress=100, data_remaining=0)
        try:
            self._on_done(self.vm)
        except Exception:
            log.exception("Cannot release the source of migrated vm=%s", self.vm.id)
        for m in self.mappings:
            d = m.dst
            replication.mark_leaf_legal(self._spm, self.vm.id, m.drive.name, d["poolID"],
                                        d["domainID"], d["imageID"], d["volumeID"])

    def _failed(self, e: BaseException) -> None:
        if not self._domain_exists():
            # Destroyed meanwhile, or gone to the destination despite the
            # error: nothing runs here. The destination decides for itself
            # (it adopts a domain that runs there, releases one that vanished).
            log.error("Migration of vm=%s failed (%s) and the domain left this host",
                      self.vm.id, e)
            self._set(phase=FAILED, error=errors.MigrationError.name,
                      message=f"{e}; the domain left this host: see the destination")
            try:
                self._on_done(self.vm)
            except Exception:
                log.exception("Cannot release the source of vm=%s", self.vm.id)
            return
        if self._peer_lost:
            name = errors.NoConnectionToPeerError.name
            message = f"the destination daemon {self.dst} stopped answering: {e}"
        else:
            name = common_errors.name_of(e)
            if name == common_errors.GENERAL or isinstance(e, libvirt.libvirtError):
                name = errors.MigrationError.name
            message = str(e)
        phase = CANCELED if self._cancel and not self._peer_lost else FAILED
        log.warning("Migration %s vm=%s dst=%s: %s; the VM stays on this host", phase,
                    self.vm.id, self.dst, message)
        self._set(phase=phase, error=name, message=message)
        self.release_destination()
        try:
            self.vm.refresh_state()
        except (libvirt.libvirtError, common_errors.Error) as err:
            log.warning("Cannot read state of vm=%s after migration: %s", self.vm.id, err)

    def release_destination(self) -> None:
        """Tell the destination to let go of the incoming VM (best effort)."""
        try:
            call_peer(self._connect, self.dst, "VM.destroy", vmID=self.vm.id)
        except common_errors.Error as e:
            if e.name != errors.NoVMError.name:
                log.warning("Destination %s did not release vm=%s: %s", self.dst, self.vm.id, e)
            return
        log.info("Destination %s released vm=%s", self.dst, self.vm.id)

    def _domain_exists(self) -> bool:
        try:
            self.vm.call(lambda dom: dom.UUIDString())
        except libvirt.libvirtError as e:
            return e.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN
        except common_errors.Error:
            return True
        return True

    # Monitoring

    def _monitor(self) -> None:
        while not self._finished.wait(self._config.poll_interval):
            try:
                self._poll_job()
                self._check_peer()
                if self._cancel and not self._abort_sent:
                    self._abort()
            except Exception:
                log.exception("Migration monitor failed vm=%s", self.vm.id)

    def _poll_job(self) -> None:
        try:
            stats = self.vm.call(lambda dom: dom.jobStats(0), retry=False)
        except (libvirt.libvirtError, common_errors.Error) as e:
            log.debug("jobStats failed vm=%s: %s", self.vm.id, e)
            return
        if not stats or stats.get("type", 0) == libvirt.VIR_DOMAIN_JOB_NONE:
            return
        now = time.monotonic()
        processed = int(stats.get(libvirt.VIR_DOMAIN_JOB_DATA_PROCESSED, 0))
        rate = int(stats.get(libvirt.VIR_DOMAIN_JOB_MEMORY_BPS, 0)
                   or stats.get(libvirt.VIR_DOMAIN_JOB_DISK_BPS, 0))
        if not rate and self._last is not None and now > self._last[0]:
            rate = max(0, int((processed - self._last[1]) / (now - self._last[0])))
        self._last = (now, processed)
        with self._lock:
            if self.phase in FINAL:
                return
            phase, progress = job_progress(stats, bool(self.mappings))
            self.phase = phase
            self.progress = max(self.progress, progress)
            self.data_remaining = int(stats.get(libvirt.VIR_DOMAIN_JOB_DATA_REMAINING, 0))
            self.rate = rate

    def _check_peer(self) -> None:
        try:
            call_peer(self._connect, self.dst, "Host.ping2", timeout=PING_TIMEOUT)
        except errors.NoConnectionToPeerError as e:
            now = time.monotonic()
            if self._peer_since is None:
                self._peer_since = now
                log.warning("Destination daemon %s does not answer (vm=%s): %s", self.dst,
                            self.vm.id, e)
            if now - self._peer_since >= self._config.peer_timeout and not self._peer_lost:
                log.error("Destination daemon %s unreachable for %.0fs: aborting migration "
                          "of vm=%s", self.dst, now - self._peer_since, self.vm.id)
                self._peer_lost = True
                self._abort()
            return
        except common_errors.Error as e:
            log.debug("Destination %s ping answered %s", self.dst, e)
        self._peer_since = None

    def _abort(self) -> None:
        if self._finished.is_set():
            return
        try:
            self.vm.call(lambda dom: dom.abortJob(), retry=False)
        except (libvirt.libvirtError, common_errors.Error) as e:
            log.info("abortJob not taken yet vm=%s: %s", self.vm.id, e)
            return
        self._abort_sent = True
        log.info("Migration job aborted vm=%s", self.vm.id)


def job_progress(stats: dict[str, Any], disks: bool) -> tuple[str, int]:
    """(phase, percent 0-99) from virDomainGetJobStats of an outgoing migration.

    With disks, the NBD copy is the first half (``copying-disks`` until
    memory transfer starts) and memory the second; without, memory is all.
    """
    mem_total = int(stats.get(libvirt.VIR_DOMAIN_JOB_MEMORY_TOTAL, 0))
    if disks and mem_total == 0:
        total = int(stats.get(libvirt.VIR_DOMAIN_JOB_DISK_TOTAL, 0))
        done = int(stats.get(libvirt.VIR_DOMAIN_JOB_DISK_PROCESSED, 0))
        return COPYING_DISKS, int(49 * done / total) if total else 0
    remaining = int(stats.get(libvirt.VIR_DOMAIN_JOB_MEMORY_REMAINING, 0))
    fraction = 1.0 - remaining / mem_total if mem_total else 0.0
    base, share = (50, 49) if disks else (0, 99)
    return MEMORY, base + int(share * min(max(fraction, 0.0), 1.0))


