"""The demo's story: two hosts, one pool, a disk moved while its VM writes.

contrib/demo starts two vdsm-lsm daemons on this machine (host 1 and host
2: each its own config, run dir, state dir, unix socket and log) and a loop
device; this module tells the rest, as a management engine would:

1. host 1 creates a file domain (the master) and a thin block domain (a VG
   on the loop device), the pool, connects with host id 1 and becomes SPM;
2. host 2 joins: StoragePool.connectStorageServer for the file domain's
   directory and the loop device, StoragePool.connect with host id 2;
3. host 1 (SPM) creates an image on the file domain (RAW base + COW leaf)
   and host 2 runs the test VM (TCG), whose guest writes checksummed blocks;
4. ``vdsm-lsm-client --socket HOST2 move-disk VM BLOCK_SD --spm HOST1``
   moves the disk onto the block domain while the guest writes: each
   extension (the replica while mirroring, the source after the pivot) goes
   through host 1's storage mailbox and is printed as it happens;
5. the verifier proves every write the guest acknowledged is on the
   destination chain; a summary follows, then everything is removed.

    python -m contrib.demo_flow --host1 SOCK --host2 SOCK --log1 PATH --log2 PATH
        --workdir DIR --loop DEV --logdir DIR
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
import uuid
from typing import Any

from contrib import demo_hosts, guest
from contrib.demo_hosts import MiB, short
from contrib.guest import verifier
from vdsm_lsm import client

BLANK = demo_hosts.BLANK
SIZE = 512 * MiB
SPAN_MB = 384
PHASE = re.compile(r"\]\s+[\d.]+% ([a-z-]+)")
TOP = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def new_id() -> str:
    return str(uuid.uuid4())


def run_move(argv: list[str], log_path: str) -> int:
    """Run move-disk, its progress bar into log_path; print each phase as it starts."""
    phase, seen = "", 0
    with open(log_path, "w") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=out, cwd=TOP)
        deadline = time.monotonic() + 600
        while True:
            done = proc.poll() is not None
            with open(log_path, errors="replace") as f:
                phases = PHASE.findall(f.read())
            for name in phases[seen:]:
                if name != phase:
                    print(f"   -- {name}", flush=True)
                    phase = name
            seen = len(phases)
            if done:
                return proc.returncode
            if time.monotonic() > deadline:
                proc.kill()
                proc.wait()
                return -9
            time.sleep(0.1)


UUID = re.compile(r"([0-9a-f]{8})-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def shorten(text: str) -> str:
    """UUIDs cut to their first 8 digits, for reading."""
    return UUID.sub(r"\1", text)


class Story:
    def __init__(self, args: argparse.Namespace) -> None:
        self.h1 = demo_hosts.Host("host 1", 1, args.host1, args.log1)
        self.h2 = demo_hosts.Host("host 2", 2, args.host2, args.log2)
        self.workdir = args.workdir
        self.logdir = args.logdir
        self.loop = args.loop
        self.file_dir = os.path.join(args.workdir, "shared", "file-domain")
        self.pool_id, self.file_sd, self.block_sd = new_id(), new_id(), new_id()
        self.img, self.base, self.leaf = new_id(), new_id(), new_id()
        self.vm_id = new_id()
        self.serial_log = os.path.join(args.workdir, "guest-serial.log")
        self.connections = {"file": {"id": new_id(), "connection": self.file_dir},
                            "block": {"id": new_id(), "connection": self.loop}}
        self.step = 0
        self.made: list[str] = []  # what to undo: "domains", "pool", "joined", "vm"
        self.facts: dict[str, Any] = {}

    def say(self, text: str) -> None:
        self.step += 1
        print(f"\n== {self.step}. {text}", flush=True)

    def show(self, host: demo_hosts.Host, method: str, **params: Any) -> Any:
        shown = " ".join(f"{k}={shorten(v if isinstance(v, str) else json.dumps(v))}"
                         for k, v in params.items() if k != "vmParams")
        print(f"   [{host.name}] {method} {shown}", flush=True)
        return host.call(method, **params)

    # The story.

    def run(self) -> int:
        artifacts = guest.ensure_built()
        caps = self.h1.call("Host.getCapabilities")
        print(f"   two hosts on this machine: {self.h1.socket_path} (id 1), "
              f"{self.h2.socket_path} (id 2); vdsm-lsm {caps.get('version', '?')}")

        self.say("Host 1: a file domain (master), a thin block domain on "
                 f"{self.loop}, the pool; host 1 connects (id 1) and becomes SPM")
        os.makedirs(self.file_dir, exist_ok=True)
        self.made.append("domains")
        self.show(self.h1, "StorageDomain.create", storagedomainID=self.file_sd,
                  domainType="file", typeArgs={"path": self.file_dir}, name="demo-file")
        self.show(self.h1, "StorageDomain.create", storagedomainID=self.block_sd,
                  domainType="block", typeArgs={"devices": [self.loop]}, name="demo-block")
        self.show(self.h1, "StoragePool.create", storagepoolID=self.pool_id, name="demo",
                  masterSdUUID=self.file_sd, domainList=[self.file_sd, self.block_sd])
        self.made.append("pool")
        self.show(self.h1, "StoragePool.connect", storagepoolID=self.pool_id, hostID=1,
                  masterSdUUID=self.file_sd)
        self.show(self.h1, "StoragePool.spmStart", storagepoolID=self.pool_id)

        self.say("Host 2 joins: connectStorageServer (the file directory, the loop "
                 "device), then StoragePool.connect with host id 2")
        self.made.append("joined")
        for domain_type, con in self.connections.items():
            result = self.show(self.h2, "StoragePool.connectStorageServer",
                               storagepoolID=BLANK, domainType=domain_type,
                               connectionParams=[con])
            if [r["status"] for r in result] != [0]:
                raise RuntimeError(f"host 2 cannot connect {con}: {result}")
        self.show(self.h2, "StoragePool.connect", storagepoolID=self.pool_id, hostID=2,
                  masterSdUUID=self.file_sd)
        status = self.h2.call("StoragePool.getSpmStatus", storagepoolID=self.pool_id)
        print(f"   host 2 is {status['spmStatus']}; the SPM is host {status['spmId']}")

        self.say("Host 1 (SPM) creates the image on the file domain: RAW base + COW leaf, "
                 f"{SIZE // MiB} MiB")
        for vol, fmt, parent in ((self.base, "RAW", BLANK), (self.leaf, "COW", self.base)):
            task = self.show(self.h1, "Volume.create", storagepoolID=self.pool_id,
                             storagedomainID=self.file_sd, imageID=self.img, volumeID=vol,
                             size=SIZE, volFormat=fmt, preallocate="SPARSE", desc="demo",
                             srcImgUUID=self.img if parent != BLANK else BLANK,
                             srcVolUUID=parent)
            self.h1.wait_task(task, f"Volume.create {fmt}")

        self.say("Host 2 runs the VM (TCG); its guest writes checksummed 64 KiB blocks "
                 "flat out and acknowledges each on the serial console")
        drive = {"poolID": self.pool_id, "domainID": self.file_sd, "imageID": self.img,
                 "volumeID": self.leaf, "format": "cow"}
        self.made.append("vm")
        self.show(self.h2, "VM.create", vmID=self.vm_id, vmParams={
            "vmName": "lsm-demo", "memSize": 128, "smp": 1, "accel": "tcg",
            "kernel": artifacts.kernel, "initrd": artifacts.initrd,
            "kernelArgs": guest.kernel_args(span_mb=SPAN_MB, rate=0, pattern="seq"),
            "serialLog": self.serial_log, "drives": [drive]})
        print(f"   (on host 2's libvirtd; guest writer: {SPAN_MB} MiB span, sequential, "
              "flat out)")
        serial = verifier.wait_for_acks(self.serial_log, 50, timeout=180)
        print(f"   the guest is writing: {len(serial.acks)} writes acknowledged")

        self.say("Move the disk from the file domain to the thin block domain while the "
                 "guest writes (move-disk on host 2, the SPM verbs to host 1)")
        if not self.move():
            return 1

        self.say("Stop the VM; the verifier reads the destination chain (prepared on host 1)")
        self.show(self.h2, "VM.destroy", vmID=self.vm_id)
        self.made.remove("vm")
        return self.verify()

    def move(self) -> bool:
        argv = [os.path.join(TOP, ".venv", "bin", "vdsm-lsm-client"),
                "--socket", self.h2.socket_path, "move-disk", self.vm_id, self.block_sd,
                "--spm", self.h1.socket_path, "--delete-source", "--timeout", "300",
                "--state-dir", os.path.join(self.workdir, "client-state")]
        print("   $ vdsm-lsm-client --socket HOST2 move-disk VM BLOCK_SD --spm HOST1 "
              "--delete-source", flush=True)
        print("   (the phases of move-disk; each extension of the destination: the replica "
              "while QEMU mirrors into it,\n    the source, i.e. the VM's own leaf, once the "
              "pivot put it on the block domain)", flush=True)
        names = {self.file_sd: "file", self.block_sd: "block"}
        extensions = demo_hosts.ExtensionWatch(self.h2, self.h1, self.vm_id, names).start()
        pauses = demo_hosts.PauseWatch(self.h2, self.vm_id).start()
        self.facts.update(extensions=extensions.found, pauses=pauses.pauses,
                          paused_for=pauses.paused_for)
        acks_before = len(verifier.parse_log(self.serial_log).acks)
        move_log = os.path.join(self.logdir, "move-disk.log")
        start = time.monotonic()
        try:
            rc = run_move(argv, move_log)
            self.facts["move_seconds"] = time.monotonic() - start
            if rc != 0:
                print(f"   move-disk failed (rc={rc}), see {move_log}:")
                with open(move_log, errors="replace") as f:
                    print("".join("     " + line for line in f.readlines()[-10:]))
                return False
            disk = self.disk()
            print(f"   moved in {self.facts['move_seconds']:.1f} s; the VM's disk is now on "
                  f"the {names.get(disk['domainID'], disk['domainID'])} domain, chain "
                  + " <- ".join(short(v["volumeID"]) for v in disk["volumeChain"]))
            self.facts["chain"] = [v["volumeID"] for v in disk["volumeChain"]]
            self.facts["acks_at_pivot"] = len(verifier.parse_log(self.serial_log).acks)
            if disk["domainID"] != self.block_sd or "replicate" in disk:
                print("   the VM is not on the destination")
                return False
            print("   the guest goes on writing on the block domain ...", flush=True)
            target = self.facts["acks_at_pivot"] + 2000
            verifier.wait_for_acks(self.serial_log, target, timeout=180)
        finally:
            extensions.stop()
            pauses.stop()
        disk = self.disk()
        self.facts["pause_code"] = disk["pauseCode"]
        self.facts["status"] = disk["status"]
        self.facts["acks_before"] = acks_before
        self.facts["images_left"] = self.h1.call("StorageDomain.getImages",
                                                 storagedomainID=self.file_sd)
        return True

    def disk(self) -> dict[str, Any]:
        stats = self.h2.call("VM.getStats", vmID=self.vm_id)
        stats = stats[0] if isinstance(stats, list) else stats
        return dict(stats["disks"]["vda"], status=stats["status"],
                    pauseCode=stats.get("pauseCode", "?"))

    def verify(self) -> int:
        leaf = self.facts["chain"][-1]
        args = {"storagepoolID": self.pool_id, "storagedomainID": self.block_sd,
                "imageID": self.img, "volumeID": leaf}
        path = self.h1.call("Image.prepare", **args)["path"]
        try:
            result = verifier.verify(self.serial_log, path, image_format="qcow2")
        finally:
            self.h1.call("Image.teardown", **args)
        print(f"   {result}")
        self.facts["result"] = result
        return 0 if result.ok and result.verified > 0 else 1

    # The summary.

    def summary(self, rc: int) -> None:
        f = self.facts
        print("\n== Summary")
        print(f"   moved      disk {short(self.img)} of VM lsm-demo (running on host 2) "
              f"from the file domain {short(self.file_sd)}")
        print(f"              to the thin block domain {short(self.block_sd)}; "
              f"host 1 was SPM (it ran every SPM verb and lvextend)")
        if "move_seconds" in f:
            left = "source deleted" if f.get("images_left") == [] else \
                f"source images left: {f.get('images_left')}"
            print(f"   took       {f['move_seconds']:.1f} s (move-disk), {left}")
        exts: list[demo_hosts.Extension] = f.get("extensions", [])
        timed = sorted(e.latency for e in exts if e.latency > 0)
        kinds = {w: sum(e.which == w for e in exts) for w in ("replica", "source")}
        line = f"   extensions {len(exts)} (replica {kinds['replica']}, source {kinds['source']})"
        if timed:
            line += (f", latency p50 {timed[len(timed) // 2]:.2f} s, "
                     f"max {timed[-1]:.2f} s (host 2's request to its refreshed LV)")
        print(line)
        if "pause_code" in f:
            serial = verifier.parse_log(self.serial_log)
            gap = verifier.largest_gap_ms(serial.acks)
            pauses = ", ".join(f.get("pauses", [])) or "none"
            lasted = "".join(f", ~{t:.1f} s" for t in f.get("paused_for", []))
            print(f"   pauses     {len(f.get('pauses', []))} ({pauses}{lasted}; VM.getStats polled "
                  f"during and after the move); at the end {f['status']}, "
                  f"pauseCode {f['pause_code']}")
            print(f"              largest gap between the guest's ACKs {gap} ms")
            print(f"   guest      {len(serial.acks)} writes acknowledged, "
                  f"{len(serial.acks) - f['acks_at_pivot']} after move-disk returned")
        result = f.get("result")
        if result is not None:
            print(f"   verifier   {'OK' if result.ok else 'FAILED'}: {result} "
                  "(every acknowledged write on the destination chain)")
        print(f"   result     {'the demo worked' if rc == 0 else 'FAILED'}")
        print(f"   logs       host 1: {self.h1.log_path}")
        print(f"              host 2: {self.h2.log_path}")
        print(f"              move-disk: {os.path.join(self.logdir, 'move-disk.log')}")

    # Clean-up.

    def cleanup(self) -> None:
        print("\n== Clean-up: the VM, host 2 leaves, the pool destroyed, domains formatted",
              flush=True)

        def quiet(host: demo_hosts.Host, method: str, **params: Any) -> Any:
            try:
                return host.call(method, **params)
            except (client.ClientError, OSError) as e:
                print(f"   [{host.name}] {method}: {e}")
                return None

        if "vm" in self.made:
            quiet(self.h2, "VM.destroy", vmID=self.vm_id)
        if "joined" in self.made:
            quiet(self.h2, "StoragePool.disconnect", storagepoolID=self.pool_id, hostID=2,
                  masterSdUUID=self.file_sd)
            for domain_type, con in self.connections.items():
                quiet(self.h2, "StoragePool.disconnectStorageServer", storagepoolID=BLANK,
                      domainType=domain_type, connectionParams=[con])
        if "pool" in self.made:
            for task_id, status in (quiet(self.h1, "Host.getAllTasksStatuses") or {}).items():
                if status["taskState"] != "finished":
                    quiet(self.h1, "Task.stop", taskID=task_id)
                quiet(self.h1, "Task.clear", taskID=task_id)
            quiet(self.h1, "StoragePool.destroy", storagepoolID=self.pool_id)
        if "domains" in self.made:
            for sd_id in (self.block_sd, self.file_sd):
                quiet(self.h1, "StorageDomain.format", storagedomainID=sd_id)
        print("   done", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    for name in ("host1", "host2", "log1", "log2", "workdir", "loop", "logdir"):
        parser.add_argument(f"--{name}", required=True)
    story = Story(parser.parse_args(argv))
    rc = 1
    try:
        rc = story.run()
    except (RuntimeError, TimeoutError, client.ClientError, OSError) as e:
        print(f"\n   FAILED: {e}", flush=True)
    finally:
        story.cleanup()
    story.summary(rc)
    return rc


if __name__ == "__main__":
    sys.exit(main())
