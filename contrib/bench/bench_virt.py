"""Benchmark: VM.create to first guest write, and the guest's I/O gap at a live snapshot.

Real libvirtd, the test guest under TCG, a real storage domain (file by
default, ``--domain block`` for loop activation).

- **VM.create -> first ACK**: from calling ``vm_create`` to the first write the
  guest acknowledges on its serial console. The baseline, measured in the same
  run, boots the same guest on a plain qcow2 file with a minimal domain XML
  through ``virDomainCreateXML`` directly (no storage prepare, no metadata):
  the ratio is what preparing the chain and our domain XML cost on top of
  booting under TCG.
- **snapshot I/O gap**: the guest writes a block every 10 ms; the largest
  interval between consecutive ACKs (guest clock) from a few writes before
  ``vm_snapshot`` is called to a few after it returns. The baseline is the
  largest gap in a window of as many writes just before, without a
  snapshot: the guest's own jitter under TCG.

    .venv/bin/python -m contrib.bench.bench_virt [--runs N] [--domain file|block]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
import uuid
import xml.etree.ElementTree as ET
from typing import Any

import libvirt

from contrib import guest
from contrib.guest import verifier
from storage import commands
from tests.virt import storage_env
from virt import api as virt_api
from virt import connection

MiB = 1024**2
URI = "qemu:///system"
BOOT_TIMEOUT = 180.0
WRITE_RATE = 100  # writes per second asked of the guest
MARGIN = 3  # ACKs before the call and after it returns counted in the window
# Thin block volumes get room for the guest's 16 MiB span up front: nothing
# extends them here (the watermark monitor's job).
INITIAL_SIZE = 32 * MiB


def wait_first_ack(serial_log: str, start: float) -> float:
    verifier.wait_for_acks(serial_log, 1, timeout=BOOT_TIMEOUT, interval=0.02)
    return time.monotonic() - start


def vm_params(art: guest.Artifacts, work: str, name: str, drives: list[dict[str, Any]]):
    serial_log = os.path.join(work, f"{name}.log")
    params = {
        "vmName": name,
        "memSize": 128,
        "smp": 1,
        "accel": "tcg",
        "kernel": art.kernel,
        "initrd": art.initrd,
        "kernelArgs": guest.kernel_args(span_mb=16, rate=WRITE_RATE),
        "serialLog": serial_log,
        "drives": drives,
    }
    return params, serial_log


def baseline_boot(conn: libvirt.virConnect, art: guest.Artifacts, work: str, run: int) -> float:
    """createXML of a minimal domain on a plain qcow2 file, to first ACK."""
    image = os.path.join(work, f"baseline-{run}.qcow2")
    commands.run(["qemu-img", "create", "-q", "-f", "qcow2", image, str(64 * MiB)])
    serial_log = os.path.join(work, f"baseline-{run}.log")
    dom = ET.Element("domain", type="qemu")
    ET.SubElement(dom, "name").text = f"lsmbench-virt-base-{run}-{uuid.uuid4().hex[:6]}"
    ET.SubElement(dom, "memory", unit="MiB").text = "128"
    os_el = ET.SubElement(dom, "os")
    ET.SubElement(os_el, "type", arch="x86_64").text = "hvm"
    ET.SubElement(os_el, "kernel").text = art.kernel
    ET.SubElement(os_el, "initrd").text = art.initrd
    ET.SubElement(os_el, "cmdline").text = guest.kernel_args(span_mb=16, rate=WRITE_RATE)
    devices = ET.SubElement(dom, "devices")
    disk = ET.SubElement(devices, "disk", type="file", device="disk")
    ET.SubElement(disk, "driver", name="qemu", type="qcow2", cache="none", io="native")
    ET.SubElement(disk, "source", file=image)
    ET.SubElement(disk, "target", dev="vda", bus="virtio")
    serial = ET.SubElement(devices, "serial", type="file")
    ET.SubElement(serial, "source", path=serial_log)
    xml = ET.tostring(dom, encoding="unicode")
    start = time.monotonic()
    d = conn.createXML(xml, 0)
    try:
        return wait_first_ack(serial_log, start)
    finally:
        d.destroy()


def bench_create(
    api: virt_api.API, env: storage_env.StorageEnv, art: guest.Artifacts, work: str, runs: int
) -> tuple[list[float], list[float]]:
    ours, base = [], []
    conn = libvirt.open(URI)
    try:
        for run in range(runs):
            base.append(baseline_boot(conn, art, work, run))
            img, vol = env.new_image(initial_size=INITIAL_SIZE)
            vm_id = str(uuid.uuid4())
            params, serial_log = vm_params(
                art, work, f"lsmbench-virt-{vm_id[:8]}", [env.drive(img, vol)]
            )
            start = time.monotonic()
            api.vm_create(vm_id, params)
            try:
                ours.append(wait_first_ack(serial_log, start))
            finally:
                api.vm_destroy(vm_id)
    finally:
        conn.close()
    return ours, base


def bench_snapshot(
    api: virt_api.API, env: storage_env.StorageEnv, art: guest.Artifacts, work: str, runs: int
) -> tuple[list[int], list[int], list[float]]:
    img, leaf = env.new_image(initial_size=INITIAL_SIZE)
    vm_id = str(uuid.uuid4())
    params, serial_log = vm_params(art, work, f"lsmbench-virt-{vm_id[:8]}", [env.drive(img, leaf)])
    api.vm_create(vm_id, params)
    gaps, base_gaps, calls = [], [], []
    try:
        verifier.wait_for_acks(serial_log, 50, timeout=BOOT_TIMEOUT)
        for _ in range(runs):
            new = str(uuid.uuid4())
            env.create(img, new, 64 * MiB, "COW", parent=leaf, initial_size=INITIAL_SIZE)
            before = len(verifier.parse_log(serial_log).acks)
            start = time.monotonic()
            api.vm_snapshot(
                vm_id,
                [{"domainID": env.sd_id, "imageID": img, "baseVolumeID": leaf, "volumeID": new}],
            )
            calls.append(time.monotonic() - start)
            after = len(verifier.parse_log(serial_log).acks)
            leaf = new
            serial = verifier.wait_for_acks(serial_log, after + MARGIN + 1, timeout=60)
            acks = serial.acks
            lo, hi = max(before - MARGIN, 1), after + MARGIN + 1
            gaps.append(verifier.largest_gap_ms(acks[lo - 1 : hi]))
            width = hi - lo + 1
            base_gaps.append(verifier.largest_gap_ms(acks[max(lo - width, 0) : lo]))
            time.sleep(0.5)
    finally:
        api.vm_destroy(vm_id)
    return gaps, base_gaps, calls


def row(name: str, unit: str, ours: list[float], base: list[float]) -> str:
    med, bmed = statistics.median(ours), statistics.median(base)
    ratio = med / bmed if bmed else float("inf")
    return (
        f"{name:<28} {unit:<4} {len(ours):>4} {med:>8.1f} {min(ours):>8.1f} {max(ours):>8.1f} "
        f"{bmed:>9.1f} {ratio:>6.2f}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--domain", choices=["file", "block"], default="file")
    args = parser.parse_args(argv)
    art = guest.ensure_built()
    connection.start_event_loop()
    work = tempfile.mkdtemp(prefix="bench-virt-", dir="/var/tmp")
    env, cleanup = storage_env.make_env(work, args.domain)
    api = virt_api.API(env, virt_api.Config(libvirt_uri=URI, accel="tcg"))
    try:
        api.start()
        create, create_base = bench_create(api, env, art, work, args.runs)
        gaps, gap_base, calls = bench_snapshot(api, env, art, work, args.runs)
    finally:
        for vm in api.vms():
            try:
                api.vm_destroy(vm.id)
            except Exception as e:
                print(f"cannot destroy {vm.id}: {e}")
        api.stop()
        cleanup()
        shutil.rmtree(work, ignore_errors=True)
    print(f"virt on a {args.domain} domain, TCG guest (baseline measured in the same run)")
    print(
        f"{'metric':<28} {'unit':<4} {'runs':>4} {'median':>8} {'min':>8} {'max':>8} "
        f"{'baseline':>9} {'ratio':>6}"
    )
    print(row("VM.create -> first ACK", "s", create, create_base))
    print(row("snapshot: largest ACK gap", "ms", gaps, gap_base))
    print(
        f"{'VM.snapshot call':<28} {'ms':<4} {len(calls):>4} "
        f"{statistics.median(calls) * 1000:>8.1f} {min(calls) * 1000:>8.1f} "
        f"{max(calls) * 1000:>8.1f}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
