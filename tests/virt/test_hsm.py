"""virt on a host that is not the pool's SPM (an HSM): what it asks of the SPM path.

virt reaches storage through two parts (virt/storage_iface.py): the host's
own service (prepare, teardown, refresh, volume info) and the SPM-request
path (extend, set legality). On an HSM the SPM path refuses every request
with storage's coded error (no mailbox yet) and virt writes nothing itself:
the watermark monitor logs the refusal once and keeps the VM paused on
ENOSPC; after a pivot the destination leaf is left to the SPM. Fakes of
both parts here (the pivot of a real guest on an HSM is in
test_replication.py).
"""

from __future__ import annotations

import logging
import os
import uuid

import pytest

from common import errors as common_errors
from tests.virt import test_thinp
from virt import replication, thinp
from virt import vm as vm_mod

MiB = 1024**2


class SpmRequestUnavailable(common_errors.Error):
    """What the storage side answers an HSM's SPM request with (its own class)."""

    name = "SpmRequestUnavailable"
    msg = "Not SPM: cannot {request} (pool {pool_id})"


class NotSpm:
    """The SPM-request path of an HSM: every request refused, nothing written."""

    def __init__(self) -> None:
        self.requests: list[str] = []

    def is_spm(self, pool_id: str) -> bool:
        return False

    def extend(self, pool_id: str, sd_id: str, img_id: str, vol_id: str, new_size: int) -> int:
        self.requests.append("extend")
        raise SpmRequestUnavailable(request="extend", pool_id=pool_id)

    def set_volume_legality(
        self, pool_id: str, sd_id: str, img_id: str, vol_id: str, legal: bool
    ) -> None:
        self.requests.append("set_volume_legality")
        raise AssertionError("an HSM must not ask to write legality")


class Spm(NotSpm):
    def __init__(self) -> None:
        super().__init__()
        self.legal: list[tuple[str, bool]] = []

    def is_spm(self, pool_id: str) -> bool:
        return True

    def set_volume_legality(
        self, pool_id: str, sd_id: str, img_id: str, vol_id: str, legal: bool
    ) -> None:
        self.legal.append((vol_id, legal))


def test_hsm_extension_is_refused_logged_once_and_the_vm_stays_paused(tmp_path, caplog):
    dom = test_thinp.FakeDomain(64 * MiB, 8 * MiB, 8 * MiB)
    vm = test_thinp.fake_vm(dom)
    host = test_thinp.FakeStorage(dom)
    spm = NotSpm()
    mon = thinp.Monitor(host, spm, lambda: [vm], thinp.Config(1, 50, test_thinp.CHUNK_MB))
    vm.set_status(vm_mod.PAUSED, vm_mod.ENOSPC)
    mon.on_io_error(vm, vm.drive("vda"), "enospc")

    with caplog.at_level(logging.DEBUG, logger="virt.thinp"):
        mon.check_all()
        mon.check_all()

    assert spm.requests == ["extend", "extend"]
    # Refused: this host's device is not refreshed, nothing grew.
    assert host.calls == [] and dom.info[2] == 8 * MiB
    assert (vm.status, vm.pause_code, dom.resumed) == (vm_mod.PAUSED, vm_mod.ENOSPC, 0)
    failures = [r for r in caplog.records if r.getMessage().startswith("Extension failed")]
    assert [r.levelno for r in failures] == [logging.ERROR, logging.DEBUG]
    assert "Not SPM: cannot extend" in failures[0].getMessage()


def test_hsm_replica_extension_before_mirroring_raises_the_spm_error(tmp_path):
    replica = tmp_path / "replica"
    replica.write_bytes(b"")
    os.truncate(replica, 8 * MiB)
    dom = test_thinp.FakeDomain(64 * MiB, 1 * MiB, 16 * MiB)
    vm = test_thinp.fake_vm(dom, str(replica))
    d = vm.drive("vda")
    mon = thinp.Monitor(test_thinp.FakeStorage(dom, str(replica)), NotSpm(), lambda: [vm],
                        thinp.Config(1, 50, test_thinp.CHUNK_MB))

    assert d.replica is not None
    with pytest.raises(SpmRequestUnavailable):
        mon.prepare_replica(vm, d, d.replica)

    assert os.path.getsize(replica) == 8 * MiB


def test_pivoted_leaf_is_marked_legal_only_by_the_spm():
    ids = ("pool", "dst-sd", "img", "leaf")
    hsm, spm = NotSpm(), Spm()

    replication.mark_leaf_legal(hsm, str(uuid.uuid4()), "vda", *ids)
    replication.mark_leaf_legal(spm, str(uuid.uuid4()), "vda", *ids)

    assert hsm.requests == []
    assert spm.legal == [("leaf", True)]


def test_a_failed_legality_request_after_the_pivot_is_logged_not_raised(caplog):
    class Broken(Spm):
        def set_volume_legality(self, *args: object) -> None:
            raise OSError("metadata write failed")

    replication.mark_leaf_legal(Broken(), "vm", "vda", "pool", "sd", "img", "leaf")

    assert "Cannot mark destination leaf LEGAL" in caplog.text
