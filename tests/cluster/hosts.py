"""Several simulated hosts on one machine: vdsm-lsm daemons sharing storage.

A :class:`Cluster` (fixture ``cluster``, see ``tests/cluster/conftest.py``)
makes :class:`ClusterHost` s that share one file-domain directory and the
block devices of one block domain (a loop device), each with its own host
id, run dir, state dir, unix socket, TCP port and config.  Each host says
which cluster lock it uses:

- ``cluster_lock="local"``: the daemon runs on the machine as any test
  daemon does (no namespace unless asked for);
- ``cluster_lock="sanlock"``: the host gets a mount namespace with a private
  ``/run/sanlock`` and its own real sanlock daemon
  (:mod:`tests.cluster.sanlockd`); its vdsm-lsm daemon runs in that
  namespace, so its python3-sanlock talks to that host's sanlock;
- ``own_libvirtd=True``: the host's namespace also gets private libvirt
  directories and its own virtlogd + libvirtd (:mod:`tests.cluster.libvirtd`);
  its vdsm-lsm daemon uses it as ``qemu:///system`` from inside.

:meth:`Cluster.create_pool` makes a pool on one host (file master domain
plus a block domain, that host connected and SPM) and returns the ids.
Everything is stopped by :meth:`Cluster.close` (the fixture calls it, also
when the test fails): pools destroyed and domains formatted through their
host (best effort), then daemons, sanlock, libvirtd, namespaces.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import threading
import uuid
from collections.abc import Callable
from typing import Any

from tests import daemon as daemon_mod
from tests.cluster import libvirtd as libvirtd_mod
from tests.cluster import namespaces, sanlockd
from vdsm_lsm import client
from vdsm_lsm import config as config_mod

log = logging.getLogger("tests.cluster")

LOCAL = "local"
SANLOCK = "sanlock"
RPC_TIMEOUT = 120.0
TASK_TIMEOUT = 120.0
POLL = 0.05


def new_id() -> str:
    return str(uuid.uuid4())


class HostDaemon(daemon_mod.Daemon):
    """tests.daemon.Daemon, run inside a host's namespace when it has one."""

    def __init__(self, workdir: str, config: dict[str, dict[str, Any]],
                 ns: namespaces.HostNamespace | None) -> None:
        super().__init__(workdir, config)
        self.ns = ns

    def command(self) -> list[str]:
        argv = super().command()
        return self.ns.command(argv) if self.ns is not None else argv


@dataclasses.dataclass
class PoolIds:
    """What :meth:`Cluster.create_pool` made."""

    pool_id: str
    master: str  # the file domain, master of the pool
    file_sd: str
    block_sd: str
    host: ClusterHost  # the host that created it: connected, SPM if create_pool(spm=True)

    @property
    def domains(self) -> list[str]:
        return [self.file_sd, self.block_sd]


class ClusterHost:
    """One simulated host: its vdsm-lsm daemon and, if any, its namespace,
    sanlock daemon and libvirtd."""

    def __init__(self, name: str, host_id: int, workdir: str, daemon: HostDaemon,
                 cluster_lock: str, ns: namespaces.HostNamespace | None = None,
                 sanlock: sanlockd.SanlockDaemon | None = None,
                 libvirt: libvirtd_mod.Libvirtd | None = None) -> None:
        self.name = name
        self.host_id = host_id
        self.workdir = workdir
        self.daemon = daemon
        self.cluster_lock = cluster_lock
        self.ns = ns
        self.sanlock = sanlock
        self.libvirt = libvirt

    def __repr__(self) -> str:
        return f"<ClusterHost {self.name} id={self.host_id} lock={self.cluster_lock}>"

    @property
    def config(self) -> dict[str, dict[str, Any]]:
        return self.daemon.config

    @property
    def run_dir(self) -> str:
        return str(self.daemon.config["irs"]["run_dir"])

    @property
    def socket_path(self) -> str:
        return self.daemon.socket_path

    def rpc(self, timeout: float = RPC_TIMEOUT) -> client.Client:
        """A JSON-RPC client over this host's unix socket (close it)."""
        return self.daemon.unix(timeout=timeout)

    def call(self, method: str, **params: Any) -> Any:
        """One verb on this host; raises client.ClientError (code, message)."""
        c = self.rpc()
        try:
            return c.call(method, **params)
        finally:
            c.close()

    def error_code(self, method: str, **params: Any) -> int:
        """The error code a verb answers (AssertionError if it succeeds)."""
        try:
            result = self.call(method, **params)
        except client.ClientError as e:
            return e.code
        raise AssertionError(f"{self.name}: {method} succeeded: {result!r}")

    def capabilities(self) -> dict[str, Any]:
        caps: dict[str, Any] = self.call("Host.getCapabilities")
        return caps

    def wait_task(self, task_id: str, timeout: float = TASK_TIMEOUT) -> dict[str, Any]:
        """Task.getStatus once the task is finished."""
        status: dict[str, Any] = {}
        for _ in range(int(timeout / POLL)):
            status = self.call("Task.getStatus", taskID=task_id)
            if status["taskState"] == "finished":
                return status
            threading.Event().wait(POLL)
        raise AssertionError(f"{self.name}: task {task_id} not finished: {status}")

    def lease_client(self) -> sanlockd.LeaseClient:
        """python3-sanlock calls through this host's sanlock (needs one)."""
        if self.ns is None or self.sanlock is None:
            raise RuntimeError(f"{self.name} has no sanlock daemon")
        return sanlockd.LeaseClient(self.ns, os.path.join(self.workdir, "lease-client.log"))

    # Life cycle.

    def start(self) -> ClusterHost:
        self.daemon.start()
        return self

    def stop(self) -> int:
        """SIGTERM the vdsm-lsm daemon and wait; its exit code."""
        return self.daemon.stop()

    def kill9(self) -> None:
        self.daemon.kill9()

    def restart(self) -> ClusterHost:
        self.daemon.restart()
        return self

    def kill_sanlock(self) -> None:
        """kill -9 this host's sanlock daemon (the namespace stays)."""
        assert self.sanlock is not None
        self.sanlock.kill(signal.SIGKILL)

    def start_sanlock(self) -> None:
        """Start this host's sanlock daemon again (same namespace, same owner
        name: it takes its host ids back at once, see tests/cluster/sanlockd.py)."""
        assert self.sanlock is not None
        self.sanlock.start()

    def shutdown(self) -> None:
        """Everything of this host, in order; safe to call twice."""
        for step in (self.daemon.stop,
                     self.sanlock.stop if self.sanlock else None,
                     self.libvirt.stop if self.libvirt else None,
                     self.ns.stop if self.ns else None):
            if step is None:
                continue
            try:
                step()
            except Exception:
                log.exception("%s: cannot stop %s", self.name, step)


class Cluster:
    """Hosts sharing one file-domain directory and one block domain's devices.

    storage_dir: a directory under /var/tmp (direct I/O) for the shared
    file domain and each host's private directories; block_device: makes a
    loop device (the tests' loop_device_factory) when a pool needs one;
    shim: the path of the built setrlimit shim (built once per session, on
    the first sanlock host).
    """

    def __init__(self, storage_dir: str, block_device: Callable[[], str],
                 shim: Callable[[], str]) -> None:
        self.storage_dir = storage_dir
        self.file_dir = os.path.join(storage_dir, "file-domains")
        os.makedirs(self.file_dir, exist_ok=True)
        self._block_device = block_device
        self.shim = shim
        self.block_devices: list[str] = []
        self.hosts: list[ClusterHost] = []
        self.pools: list[PoolIds] = []

    def add_host(
        self,
        cluster_lock: str = LOCAL,
        own_libvirtd: bool = False,
        namespace: bool | None = None,
        config: dict[str, dict[str, Any]] | None = None,
        start: bool = True,
    ) -> ClusterHost:
        """A new host with the next host id (1, 2, 3 ...).

        cluster_lock: "local" or "sanlock" (a sanlock daemon of its own in
        its namespace); own_libvirtd: its own libvirtd in its namespace;
        namespace: a namespace even without either (default: only when
        needed); config: more daemon config, merged over the defaults.
        """
        if cluster_lock not in (LOCAL, SANLOCK):
            raise ValueError(f"say which lock the host uses, not {cluster_lock!r}")
        host_id = len(self.hosts) + 1
        name = f"host{host_id}"
        workdir = os.path.join(self.storage_dir, name)
        os.makedirs(workdir)
        if namespace is None:
            namespace = cluster_lock == SANLOCK or own_libvirtd
        ns = sanlock = libvirt = None
        host: ClusterHost | None = None
        try:
            if namespace:
                ns, libvirt = self._namespace(name, workdir, own_libvirtd)
                if cluster_lock == SANLOCK:
                    sanlock = sanlockd.SanlockDaemon(
                        ns, self.shim(), os.path.join(workdir, "sanlock.log"), name
                    ).start()
            elif cluster_lock == SANLOCK:
                raise ValueError("a sanlock host needs its namespace")
            daemon = HostDaemon(workdir, self._config(cluster_lock, config), ns)
            host = ClusterHost(name, host_id, workdir, daemon, cluster_lock, ns, sanlock, libvirt)
            self.hosts.append(host)
            if start:
                host.start()
            return host
        except BaseException:
            if host is None:  # not yet in self.hosts: close() would miss it
                for part in (sanlock, libvirt, ns):
                    if part is not None:
                        part.stop()
            raise

    def _namespace(self, name: str, workdir: str, own_libvirtd: bool
                   ) -> tuple[namespaces.HostNamespace, libvirtd_mod.Libvirtd | None]:
        tmpfs = [sanlockd.SANLOCK_DIR]
        binds: list[tuple[str, str]] = []
        dirs = None
        if own_libvirtd:
            dirs = libvirtd_mod.private_dirs(os.path.join(workdir, "libvirt"))
            binds = dirs.binds()
        ns = namespaces.HostNamespace(name, os.path.join(workdir, "namespace.log"),
                                      tmpfs=tmpfs, binds=binds).start()
        if dirs is None:
            return ns, None
        try:
            return ns, libvirtd_mod.Libvirtd(ns, dirs).start()
        except BaseException:
            ns.stop()
            raise

    def _config(self, cluster_lock: str,
                extra: dict[str, dict[str, Any]] | None) -> dict[str, dict[str, Any]]:
        sanlock_section: dict[str, Any] = {"cluster_lock": cluster_lock}
        if "io_timeout" in config_mod.SCHEMA["sanlock"]:  # once the product has it
            sanlock_section["io_timeout"] = sanlockd.IO_TIMEOUT
        config: dict[str, dict[str, Any]] = {
            "irs": {
                "volume_utilization_chunk_mb": 16,
                "block_extent_size_mb": 4,
            },
            "lvm": {"activation": "loop"},
            "sanlock": sanlock_section,
        }
        for section, values in (extra or {}).items():
            config.setdefault(section, {}).update(values)
        return config

    # The pool.

    def block_device(self) -> str:
        """A new shared loop device (removed with the test's loop devices)."""
        dev = self._block_device()
        self.block_devices.append(dev)
        return dev

    def create_pool(self, host: ClusterHost | None = None, spm: bool = True) -> PoolIds:
        """On host (default: the first): a file domain (master) in the shared
        directory and a block domain on a new loop device, a pool of both,
        host connected with its host id and (if spm) SPM."""
        host = host or self.hosts[0]
        file_sd, block_sd, pool_id = new_id(), new_id(), new_id()
        path = os.path.join(self.file_dir, file_sd[:8])
        os.makedirs(path)
        ids = PoolIds(pool_id, file_sd, file_sd, block_sd, host)
        self.pools.append(ids)  # cleaned up even if the rest fails
        host.call("StorageDomain.create", storagedomainID=file_sd, domainType="file",
                  typeArgs={"path": path}, name="cluster-file")
        host.call("StorageDomain.create", storagedomainID=block_sd, domainType="block",
                  typeArgs={"devices": [self.block_device()]}, name="cluster-block")
        host.call("StoragePool.create", storagepoolID=pool_id, name="cluster-pool",
                  masterSdUUID=file_sd, domainList=ids.domains)
        host.call("StoragePool.connect", storagepoolID=pool_id, hostID=host.host_id,
                  masterSdUUID=file_sd)
        if spm:
            assert host.call("StoragePool.spmStart", storagepoolID=pool_id) is True
        return ids

    def destroy_pool(self, ids: PoolIds) -> None:
        """Best effort, through the host that made it: tasks stopped and
        cleared, the pool destroyed, its domains formatted."""
        host = ids.host
        if host.daemon.proc is None or host.daemon.proc.poll() is not None:
            log.warning("%s is not running: pool %s left to the storage clean-up",
                        host.name, ids.pool_id)
            return
        try:
            for task_id, status in host.call("Host.getAllTasksStatuses").items():
                if status["taskState"] != "finished":
                    host.call("Task.stop", taskID=task_id)
                host.wait_task(task_id)
                host.call("Task.clear", taskID=task_id)
            host.call("StoragePool.destroy", storagepoolID=ids.pool_id)
        except (client.ClientError, OSError, AssertionError) as e:
            log.warning("cannot destroy pool %s: %s", ids.pool_id, e)
        for sd_id in ids.domains:
            try:
                host.call("StorageDomain.format", storagedomainID=sd_id)
            except (client.ClientError, OSError) as e:
                log.warning("cannot format %s: %s", sd_id, e)

    def close(self) -> None:
        """Pools, then every host (daemons, sanlock, libvirtd, namespaces)."""
        for ids in reversed(self.pools):
            self.destroy_pool(ids)
        self.pools.clear()
        for host in reversed(self.hosts):
            host.shutdown()
