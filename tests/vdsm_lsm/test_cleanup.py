"""``move-disk --cleanup`` (vdsm_lsm/cleanup.py) against the real daemon and guest.

Leftovers are made as an operator's bad day makes them: move-disk killed
for real (SIGKILL, at a step of its journal's test hook), then its journal
lost.  ``--cleanup --dry-run`` lists them and changes nothing, ``--cleanup``
removes them, and the guest keeps every acknowledged write.  What a journal
still owns is left alone (the next move-disk of that drive resumes it).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from contrib.guest import verifier
from tests.vdsm_lsm.test_move_disk import (  # noqa: F401
    Site,
    new_id,
    site,
    start_guest,
)
from tests.virt.conftest import domains, guest_files, vm_params, workdir  # noqa: F401
from vdsm_lsm import journal, move_disk


def cleanup(site: Site, *more: str) -> list[dict[str, Any]]:  # noqa: F811
    proc = site.move_disk("--cleanup", *more)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def lose_journals(site: Site) -> None:  # noqa: F811
    for name in os.listdir(site.state_dir):
        if name.endswith(journal.SUFFIX):
            os.unlink(os.path.join(site.state_dir, name))


def drive(site: Site, vm: Any) -> dict[str, Any]:  # noqa: F811
    return move_disk.vm_stats(site.call("VM.getStats", vmID=vm.vm_id))["disks"]["vda"]


def wait_tasks(site: Site) -> None:  # noqa: F811
    """Every task a killed run left finishes on its own (nobody clears it)."""
    deadline = time.monotonic() + 120
    while any(s["taskState"] != "finished"
              for s in site.call("Host.getAllTasksStatuses").values()):
        assert time.monotonic() < deadline
        time.sleep(0.2)


def test_cleanup_lists_then_removes_what_journal_less_moves_left(site, vm_params):  # noqa: F811
    img, base, leaf = new_id(), new_id(), new_id()
    site.create_volume(img, base, "RAW")
    site.create_volume(img, leaf, "COW", parent=base)
    vm = start_guest(site, vm_params, img, leaf)
    assert cleanup(site) == []  # nothing to do on a clean pool

    # 1. A snapshot leaf made for a snapshot that never happened.
    site.move_disk_killed_after("leaf_submitted", vm.vm_id, site.dst_sd)
    lose_journals(site)
    wait_tasks(site)
    (found,) = cleanup(site, "--dry-run")
    assert found["kind"] == "volume" and found["done"] is False
    assert found["domainID"] == site.src_sd and found["imageID"] == img
    orphan = found["volumeID"]
    assert orphan in site.call("StorageDomain.getVolumes", storagedomainID=site.src_sd,
                               storagepoolID=site.pool_id, imageID=img)
    (removed,) = cleanup(site)
    assert removed["volumeID"] == orphan and removed["done"] is True
    assert orphan not in site.call("StorageDomain.getVolumes", storagedomainID=site.src_sd,
                                   storagepoolID=site.pool_id, imageID=img)
    assert cleanup(site, "--dry-run") == []

    # 2. A mirror nobody owns, into a destination image nobody owns.
    site.move_disk_killed_after("mirror_started", vm.vm_id, site.dst_sd)
    lose_journals(site)
    wait_tasks(site)
    found = cleanup(site, "--dry-run")
    assert sorted(f["kind"] for f in found) == ["image", "mirror"]
    assert all(f["done"] is False for f in found)
    assert "replicate" in drive(site, vm)
    removed = cleanup(site)
    assert sorted(f["kind"] for f in removed) == ["image", "mirror"]
    assert all(f["done"] is True for f in removed), removed
    disk = drive(site, vm)
    assert disk["domainID"] == site.src_sd and "replicate" not in disk
    assert site.call("StorageDomain.getImages", storagedomainID=site.dst_sd) == []
    assert cleanup(site, "--dry-run") == []

    # 3. What a journal still owns is not a leftover: the move resumes it.
    site.move_disk_killed_after("cloned", vm.vm_id, site.dst_sd)
    assert cleanup(site, "--dry-run") == []
    assert cleanup(site) == []
    assert site.call("StorageDomain.getImages", storagedomainID=site.dst_sd) == [img]
    proc = site.move_disk(vm.vm_id, site.dst_sd, "--delete-source")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["resumed"] is True
    assert cleanup(site, "--dry-run") == []

    vm.wait_acks(vm.acks() + 10)
    chain = [v["volumeID"] for v in drive(site, vm)["volumeChain"]]
    site.call("VM.destroy", vmID=vm.vm_id)
    result = verifier.verify(vm.serial_log, site.volume_path(site.dst_sd, img, chain[-1]),
                             image_format="qcow2")
    assert result.ok and result.lost == 0, str(result)
