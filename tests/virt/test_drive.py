"""virt/drive.py: a VM's disk, its chain, sizes and replica state."""

from __future__ import annotations

import os
import stat
import threading

import libvirt
import pytest

from virt import drive as drive_mod

COPY = libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_COPY
READY = libvirt.VIR_DOMAIN_BLOCK_JOB_READY
FAILED = libvirt.VIR_DOMAIN_BLOCK_JOB_FAILED


def make_drive(**over: object) -> drive_mod.Drive:
    fields: dict[str, object] = dict(
        name="vdb",
        pool_id="pool",
        domain_id="sd",
        image_id="img",
        volume_id="top",
        format="cow",
        chain=[
            drive_mod.Volume("base", "/l/base", "RAW"),
            drive_mod.Volume("top", "/l/top", "COW"),
        ],
    )
    fields.update(over)
    return drive_mod.Drive(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "index, name",
    [(0, "vda"), (1, "vdb"), (25, "vdz"), (26, "vdaa"), (27, "vdab"), (701, "vdzz"),
     (702, "vdaaa")],
)
def test_target_names_follow_the_kernel_order(index, name):
    assert drive_mod.target_name(index) == name


@pytest.mark.parametrize("fmt, qemu", [("cow", "qcow2"), ("COW", "qcow2"), ("raw", "raw"),
                                       ("RAW", "raw")])
def test_qemu_format_of_either_convention(fmt, qemu):
    assert drive_mod.qemu_format(fmt) == qemu
    assert drive_mod.Volume("v", "/p", fmt).qemu_format == qemu


def test_the_leaf_is_the_last_link():
    d = make_drive()
    assert d.path == "/l/top" and d.alias == "ua-vdb"
    assert d.volume_chain() == [
        {"volumeID": "base", "path": "/l/base"},
        {"volumeID": "top", "path": "/l/top"},
    ]


def test_block_info_sizes_become_stats():
    d = make_drive()
    d.update_sizes(capacity=1 << 30, allocation=5 << 20, physical=8 << 20)
    stats = d.stats()
    assert (stats["capacity"], stats["truesize"], stats["apparentsize"]) == (1 << 30, 5 << 20,
                                                                             8 << 20)
    assert (stats["imageID"], stats["domainID"], stats["poolID"], stats["volumeID"]) == (
        "img", "sd", "pool", "top")
    assert stats["format"] == "cow" and stats["threshold"] == 0


def test_chain_from_prepare_result():
    chain = drive_mod.chain_from_prepare({
        "path": "/l/top",
        "chain": [{"volumeID": "base", "path": "/l/base", "format": "RAW"},
                  {"volumeID": "top", "path": "/l/top", "format": "COW"}],
    })
    assert chain == [drive_mod.Volume("base", "/l/base", "RAW"),
                     drive_mod.Volume("top", "/l/top", "COW")]
    with pytest.raises(ValueError, match="empty chain"):
        drive_mod.chain_from_prepare({"path": "/l/top", "chain": []})


def test_replica_spec_and_path():
    r = drive_mod.Replica("pool", "dst", "img", "top")
    assert r.path == "" and r.state == drive_mod.COPYING and r.need_extend
    r.chain = [drive_mod.Volume("top", "/d/top", "COW")]
    assert r.path == "/d/top"
    assert r.spec() == {"poolID": "pool", "domainID": "dst", "imageID": "img", "volumeID": "top"}


# Disk type: how the leaf is reached


def test_disk_type_of_files_and_missing_paths(tmp_path):
    f = tmp_path / "volume"
    f.write_bytes(b"")
    assert drive_mod.disk_type(str(f)) == drive_mod.FILE
    assert drive_mod.disk_type(str(tmp_path / "missing")) == drive_mod.FILE
    assert drive_mod.disk_type("/dev/null") == drive_mod.FILE  # a character device


def _a_block_device() -> str | None:
    for entry in sorted(os.listdir("/dev")):
        path = os.path.join("/dev", entry)
        try:
            if stat.S_ISBLK(os.stat(path).st_mode):
                return path
        except OSError:
            continue
    return None


def test_disk_type_follows_links_to_block_devices(tmp_path):
    dev = _a_block_device()
    if dev is None:
        pytest.skip("no block device on this machine")
    link = tmp_path / "leaf"
    link.symlink_to(dev)
    assert drive_mod.disk_type(str(link)) == drive_mod.BLOCK


# Block job events


def test_block_job_events_move_the_replica_state():
    d = make_drive(replica=drive_mod.Replica("pool", "dst", "img", "top"))
    d.on_block_job(COPY, READY)
    assert d.replica is not None and d.replica.state == drive_mod.READY
    assert d.last_job_event == (COPY, READY)
    d.on_block_job(COPY, FAILED)
    assert d.replica.state == drive_mod.FAILED


def test_block_job_event_without_replica_is_remembered():
    d = make_drive()
    d.on_block_job(COPY, libvirt.VIR_DOMAIN_BLOCK_JOB_COMPLETED)
    assert d.replica is None
    assert d.last_job_event == (COPY, libvirt.VIR_DOMAIN_BLOCK_JOB_COMPLETED)
    d.reset_job_event()
    assert d.last_job_event is None


def test_wait_job_wakes_on_the_event_from_another_thread():
    d = make_drive()
    timer = threading.Timer(0.05, d.on_block_job, (COPY, READY))
    timer.start()
    try:
        assert d.wait_job(lambda ev: ev == (COPY, READY), 10)
    finally:
        timer.join()


def test_wait_job_times_out_on_another_event():
    d = make_drive()
    d.on_block_job(COPY, FAILED)
    assert not d.wait_job(lambda ev: ev == (COPY, READY), 0.05)
