"""Helpers of the tests where a second host joins a pool (test_join.py,
test_roles.py): joining and leaving through the API, and reading what is
on the shared storage without any host's help, to prove nothing changed."""

from __future__ import annotations

import dataclasses
import hashlib
import mmap
import os
from typing import Any

from storage import lvm, lvm_cmd
from tests.cluster import hosts
from tests.storage import conftest as storage_conftest

BLANK = "00000000-0000-0000-0000-000000000000"


@dataclasses.dataclass
class Joined:
    """host's connections to a pool's storage (ids as it was given them)."""

    host: hosts.ClusterHost
    ids: hosts.PoolIds
    file_con: dict[str, str]
    block_con: dict[str, str]


def file_dir(cluster: hosts.Cluster, ids: hosts.PoolIds) -> str:
    """The directory create_pool made the file domain in (its typeArgs.path)."""
    return os.path.join(cluster.file_dir, ids.file_sd[:8])


def connect_storage(host: hosts.ClusterHost, domain_type: str,
                    connections: list[dict[str, str]]) -> list[dict[str, Any]]:
    result: list[dict[str, Any]] = host.call(
        "StoragePool.connectStorageServer", storagepoolID=BLANK, domainType=domain_type,
        connectionParams=connections)
    return result


def join(cluster: hosts.Cluster, host: hosts.ClusterHost, ids: hosts.PoolIds) -> Joined:
    """host connects to the pool's storage (the file domain's directory, the
    block domain's device) and then to the pool, with its own host id."""
    joined = Joined(host, ids, {"id": hosts.new_id(), "connection": file_dir(cluster, ids)},
                    {"id": hosts.new_id(), "connection": cluster.block_devices[0]})
    for domain_type, con in (("file", joined.file_con), ("block", joined.block_con)):
        assert connect_storage(host, domain_type, [con]) == [
            {"id": con["id"], "status": 0, "error": ""}
        ]
    assert host.call("StoragePool.connect", storagepoolID=ids.pool_id, hostID=host.host_id,
                     masterSdUUID=ids.master) is True
    return joined


def leave(joined: Joined) -> None:
    """Disconnect from the pool, then from the storage."""
    host, ids = joined.host, joined.ids
    assert host.call("StoragePool.disconnect", storagepoolID=ids.pool_id, hostID=host.host_id,
                     masterSdUUID=ids.master) is True
    for domain_type, con in (("file", joined.file_con), ("block", joined.block_con)):
        result = host.call("StoragePool.disconnectStorageServer", storagepoolID=BLANK,
                           domainType=domain_type, connectionParams=[con])
        assert result == [{"id": con["id"], "status": 0, "error": ""}]


def leave_quietly(joined: Joined) -> None:
    """leave(), best effort (test clean-up: the host's devices must go before
    the loop devices are checked)."""
    try:
        leave(joined)
    except Exception as e:  # reported by the test's own assertions
        print(f"cannot leave the pool on {joined.host.name}: {e}")


def host_devices(cluster: hosts.Cluster) -> set[str]:
    """Loop devices mapped over the block domain's device (by any host)."""
    return set(storage_conftest.stacked_loop_devices(cluster.block_devices[0]))


def host_storage_files(host: hosts.ClusterHost) -> list[str]:
    """The host's prepare links and loop state files (run dir)."""
    found = []
    for sub in ("storage", "loop"):
        for dirpath, _, names in os.walk(os.path.join(host.run_dir, sub)):
            found.extend(os.path.join(dirpath, n) for n in names)
    return sorted(found)


def read_direct(path: str, offset: int, size: int) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        buf = mmap.mmap(-1, size)
        assert os.preadv(fd, [buf], offset) == size
        return bytes(buf)
    finally:
        os.close(fd)


def on_storage(cluster: hosts.Cluster, ids: hosts.PoolIds) -> dict[str, Any]:
    """What is on the shared storage, read by the test itself: the file
    domain's files (size, mtime, bytes of metadata files) and the block
    domain's VG (seqno, LVs with sizes and tags, the metadata LV's bytes,
    read through the PV)."""
    files = []
    root = os.path.join(file_dir(cluster, ids), ids.file_sd)
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = os.path.join(dirpath, name)
            st = os.stat(path)
            digest = ""
            if name.endswith(".meta") or name == "metadata":
                with open(path, "rb") as f:
                    digest = hashlib.sha256(f.read()).hexdigest()
            files.append((os.path.relpath(path, root), st.st_size, st.st_mtime_ns, digest))
    dev = cluster.block_devices[0]
    vg = ids.block_sd
    lvm_ = lvm.LVM([dev], activation=False)
    out = lvm_cmd.run(lvm_cmd.report_args("vgs", "vg_seqno", [vg]), lvm_.config(), 60)
    seqno = lvm_cmd.parse_report("vgs", "vg", out)[0]["vg_seqno"]
    lvs = {lv.name: (lv.size, lv.tags) for lv in lvm_.lvs(vg)}
    layout = lvm_.lv_layout(vg, "metadata")
    (segment,) = layout.segments
    metadata = read_direct(dev, layout.offset(segment), segment.count * layout.extent_size)
    return {
        "files": sorted(files),
        "seqno": seqno,
        "lvs": lvs,
        "metadata": hashlib.sha256(metadata).hexdigest(),
    }
