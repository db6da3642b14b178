"""``move-disk --cleanup``: find and remove what migrations without a journal left.

A move-disk that runs to its end leaves nothing behind, and one that was
killed leaves a journal that the next run of the same move resumes from
(:mod:`vdsm_lsm.move_disk`).  What is left when the journal itself is gone
(another machine ran the move, the state directory was lost) is found here,
on the pool of the VMs of the hosts given (the VM's host and, with
``--spm``, the SPM):

``mirror``
    a drive replicating (``VM.getStats`` ``replicate``) with no journal for
    its VM and drive: nobody will pivot it.  Removed by aborting it
    (``VM.diskReplicateFinish(src, src)``); its destination image is then a
    leftover ``image``.
``image``
    an image on a domain of the pool that has an ILLEGAL volume, also
    exists on another domain of the pool (so it is a copy, never the only
    one), that no VM of these hosts runs or replicates to, and that no
    journal names: a clone that never became the drive.  Removed with
    ``Image.delete`` on the SPM.
``volume``
    a volume whose parent is the leaf a drive runs on (a snapshot leaf
    created for a snapshot that never happened) and that no journal names.
    Removed with ``Volume.delete``.

``--dry-run`` lists them and removes nothing.  VMs of hosts not given are
not seen: run it where move-disk is the one migration tool of the pool,
with the hosts that run its VMs.
"""

from __future__ import annotations

import logging
from typing import Any

from vdsm_lsm import client_errors, journal, move_base

log = logging.getLogger("vdsm_lsm.cleanup")

MIRROR = "mirror"
IMAGE = "image"
VOLUME = "volume"


class Cleanup(move_base.FlowBase):
    """Lists (and unless dry_run removes) the leftovers of migrations without a journal."""

    def __init__(
        self,
        rpc: move_base.Transport,
        state_dir: str,
        spm: move_base.Transport | None = None,
        pool_id: str | None = None,
        dry_run: bool = False,
        timeout: float = move_base.DEFAULT_TIMEOUT,
        poll_interval: float = 0.5,
    ) -> None:
        super().__init__(rpc, spm=spm, timeout=timeout, poll_interval=poll_interval)
        self.state_dir = state_dir
        self.pool_id = pool_id
        self.dry_run = dry_run

    def run(self) -> list[dict[str, Any]]:
        """The leftovers found, each with ``action`` and ``done`` (and ``error``)."""
        records = journal.all_records(self.state_dir)
        owned_drives = {(str(r.get("vmID")), str(r.get("drive"))) for r in records}
        owned_images = {(str(r.get(k)), str(r.get("imageID")))
                        for r in records for k in ("srcDomainID", "dstDomainID")}
        owned_volumes = {str(r.get("leafVolumeID")) for r in records}
        drives = self._drives()
        pool_id = self.pool_id or next((d["poolID"] for _, _, d in drives if d.get("poolID")),
                                       None)
        if not pool_id:
            raise move_base.error("InvalidParams", "no VM names a pool here: pass --pool")
        self.find_spm(pool_id)
        found: list[dict[str, Any]] = []
        # Mirrors nobody owns (aborting one leaves its destination image to the scan below).
        for vm_id, name, disk in drives:
            rep = disk.get("replicate")
            if rep is None or (vm_id, name) in owned_drives:
                continue
            src = {k: disk[k] for k in ("poolID", "domainID", "imageID", "volumeID")}
            item = {"kind": MIRROR, "vmID": vm_id, "drive": name,
                    "domainID": rep["dstDisk"]["domainID"], "imageID": disk["imageID"],
                    "action": "VM.diskReplicateFinish(src, src)"}
            found.append(self._remove(item, lambda src=src, vm_id=vm_id: self._call(
                self.rpc, "VM.diskReplicateFinish", vmID=vm_id, srcDisk=src, dstDisk=src)))
        running = {(d["domainID"], d["imageID"]) for _, _, d in drives}
        # Still mirrored into: by an owned mirror, or one whose abort failed
        # (a dry run lists an unowned mirror's destination as what would go).
        aborted = {(m["vmID"], m["drive"]) for m in found if m["done"] or self.dry_run}
        targets = {(d["replicate"]["dstDisk"]["domainID"], d["imageID"])
                   for v, n, d in drives if "replicate" in d and (v, n) not in aborted}
        found += self._images(pool_id, running | targets | owned_images)
        found += self._leaves(pool_id, drives, owned_volumes)
        return found

    # Scans

    def _drives(self) -> list[tuple[str, str, dict[str, Any]]]:
        """(vmID, drive, its stats) of every VM on the hosts given."""
        hosts = [self.rpc] + ([self.spm_given] if self.spm_given is not None else [])
        seen: set[str] = set()
        drives = []
        for host in hosts:
            for vm in self._call(host, "Host.getVMList"):
                vm_id = vm["vmId"]
                if vm_id in seen:
                    continue
                seen.add(vm_id)
                try:
                    stats = move_base.vm_stats(self._call(host, "VM.getStats", vmID=vm_id))
                except client_errors.ClientError as e:
                    log.warning("Cannot read VM %s: %s", vm_id, e.message)
                    continue
                for name, disk in stats.get("disks", {}).items():
                    drives.append((vm_id, name, disk))
        return drives

    def _images(self, pool_id: str, in_use: set[tuple[str, str]]) -> list[dict[str, Any]]:
        spm = self._spm()
        domains = list(self._call(spm, "StoragePool.getInfo",
                                  storagepoolID=pool_id)["dominfo"])
        images = {sd_id: set(self._call(spm, "StorageDomain.getImages", storagedomainID=sd_id))
                  for sd_id in domains}
        found = []
        for sd_id in domains:
            for img_id in sorted(images[sd_id]):
                if (sd_id, img_id) in in_use:
                    continue
                if not any(img_id in images[other] for other in domains if other != sd_id):
                    continue  # the only copy: never a leftover
                illegal = [v for v, info in self._volumes(pool_id, sd_id, img_id).items()
                           if info.get("legality") != "LEGAL"]
                if not illegal:
                    continue
                item = {"kind": IMAGE, "domainID": sd_id, "imageID": img_id,
                        "illegal": illegal, "action": "Image.delete"}
                found.append(self._remove(item, lambda sd_id=sd_id, img_id=img_id: self._task(
                    "Image.delete", imageID=img_id, storagepoolID=pool_id,
                    storagedomainID=sd_id)))
        return found

    def _leaves(self, pool_id: str, drives: list[tuple[str, str, dict[str, Any]]],
                owned: set[str]) -> list[dict[str, Any]]:
        found = []
        for vm_id, name, disk in drives:
            sd_id, img_id, leaf = disk["domainID"], disk["imageID"], disk["volumeID"]
            for vol_id, info in self._volumes(pool_id, sd_id, img_id).items():
                if info.get("parent") != leaf or vol_id in owned:
                    continue
                item = {"kind": VOLUME, "vmID": vm_id, "drive": name, "domainID": sd_id,
                        "imageID": img_id, "volumeID": vol_id, "action": "Volume.delete"}
                found.append(self._remove(item, lambda sd_id=sd_id, img_id=img_id,
                                          vol_id=vol_id: self._task(
                    "Volume.delete", storagepoolID=pool_id, storagedomainID=sd_id,
                    imageID=img_id, volumeID=vol_id)))
        return found

    def _volumes(self, pool_id: str, sd_id: str, img_id: str) -> dict[str, dict[str, Any]]:
        spm = self._spm()
        vols = self._call(spm, "StorageDomain.getVolumes", storagedomainID=sd_id,
                          storagepoolID=pool_id, imageID=img_id)
        return {v: self._call(spm, "Volume.getInfo", storagepoolID=pool_id,
                              storagedomainID=sd_id, imageID=img_id, volumeID=v)
                for v in vols}

    # Removing

    def _remove(self, item: dict[str, Any], action: Any) -> dict[str, Any]:
        item["done"] = False
        if self.dry_run:
            log.warning("Leftover (dry run, kept): %s", item)
            return item
        log.warning("Removing leftover: %s", item)
        try:
            action()
        except (client_errors.ClientError, OSError) as e:
            item["error"] = str(e)
            log.error("Cannot remove leftover %s: %s", item, e)
            return item
        item["done"] = True
        return item

    def _task(self, method: str, **params: Any) -> None:
        self._wait_task(self._call(self._spm(), method, **params), method, show=False)
