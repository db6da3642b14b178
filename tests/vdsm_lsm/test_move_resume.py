"""The move-disk flow's journal, resume, convergence and verify, against a fake daemon.

tests/vdsm_lsm/fake_site.py keeps the state a daemon would (drive, mirror,
images, tasks).  A "kill" after each step the journal records leaves the
fake as a kill -9 of move-disk would (no rollback runs); a second run with
the same journal must finish the move with nothing left behind.  The same
matrix with real kills, a real daemon and a writing guest is in
test_move_disk.py.
"""

from __future__ import annotations

import logging

import pytest

from tests.vdsm_lsm import fake_site
from vdsm_lsm import api_schema, client_errors, journal, move_disk

STEPS = ["started", "leaf_submitted", "snapshot", "clone_submitted", "cloned",
         "mirror_started", "sync_submitted", "synced", "pivoted", "legal", "verified",
         "delete_submitted"]


def code(name: str) -> int:
    return api_schema.code_of(name)


def flow(site: fake_site.FakeSite, state_dir: str, **kw) -> move_disk.MoveDisk:
    kw.setdefault("delete_source", True)
    return move_disk.MoveDisk(site, site.vm_id, site.dst, poll_interval=0, timeout=30,
                              journal=journal.Journal(state_dir, site.vm_id, "vda"), **kw)


def assert_moved_and_clean(site: fake_site.FakeSite, state_dir: str) -> None:
    assert site.on == site.dst and site.replicate is None
    assert site.images(site.src) == [] and site.images(site.dst) == [site.img]
    assert all(v["legality"] == "LEGAL" for v in site.volumes[site.dst].values())
    # The chain the VM runs is the destination's whole image: no stray volume.
    assert set(site.volumes[site.dst]) == set(site._chain(site.dst))
    assert site.tasks == {}  # every task waited for and cleared
    assert journal.all_records(state_dir) == []


def test_a_move_writes_its_journal_and_removes_it_at_the_end(tmp_path):
    site = fake_site.FakeSite()
    seen: list[list[str]] = []
    f = flow(site, str(tmp_path))
    real_write = f.journal._write

    def spy() -> None:
        real_write()
        seen.append(list(f.journal.record["steps"]))

    f.journal._write = spy  # type: ignore[method-assign]
    summary = f.run()

    assert summary["resumed"] is False and summary["verified"] is True
    assert seen[-1][-1] == "delete_submitted"
    assert [s for s in STEPS if s in seen[-1]] == STEPS[:]
    assert_moved_and_clean(site, str(tmp_path))
    # Verified before the source went: Image.verify, then Image.delete.
    methods = site.methods()
    assert methods.index("Image.verify") < methods.index("Image.delete")


@pytest.mark.parametrize("step", STEPS)
def test_killed_after_any_step_a_second_run_finishes_the_move(step, tmp_path, monkeypatch):
    site = fake_site.FakeSite()
    site.kill_after(step, monkeypatch)
    with pytest.raises(fake_site.Killed):
        flow(site, str(tmp_path)).run()
    assert journal.all_records(str(tmp_path))  # the killed run left its journal
    site.revive()

    summary = flow(site, str(tmp_path)).run()

    assert summary["resumed"] is True
    assert_moved_and_clean(site, str(tmp_path))
    # One clone only, unless the killed run's was unfinished and made again.
    assert site.methods().count("VM.snapshot") == 1


def test_a_rollback_killed_half_way_is_finished_then_the_move_runs_again(tmp_path,
                                                                         monkeypatch):
    site = fake_site.FakeSite()
    site.kill_after("mirror_started", monkeypatch)
    with pytest.raises(fake_site.Killed):
        flow(site, str(tmp_path)).run()
    site.revive()
    j = journal.Journal(str(tmp_path), site.vm_id, "vda")
    j.load()
    j.update(rollingBack=True)  # as a run killed during its rollback leaves it

    flow(site, str(tmp_path)).run()

    methods = site.methods()
    assert methods.count("VM.snapshot") == 2  # rolled back, then moved afresh
    assert methods.count("Image.cloneStructure") == 2
    assert_moved_and_clean(site, str(tmp_path))


def test_a_mirror_that_does_not_converge_is_restarted_write_blocking(tmp_path, caplog):
    site = fake_site.FakeSite()
    site.ready_after = None  # a background mirror never gets there
    caplog.set_level(logging.WARNING)

    summary = flow(site, str(tmp_path), stall_timeout=0.05).run()

    assert summary["syncWrites"] is True
    starts = [p for m, p in site.calls if m == "VM.diskReplicateStart"]
    assert [p["syncWrites"] for p in starts] == [False, True]
    finishes = [p for m, p in site.calls if m == "VM.diskReplicateFinish"]
    assert finishes[0]["dstDisk"] == finishes[0]["srcDisk"]  # the abort before the restart
    assert finishes[-1]["dstDisk"]["domainID"] == site.dst
    assert "not converging" in caplog.text
    assert_moved_and_clean(site, str(tmp_path))


def test_sync_writes_on_starts_write_blocking_and_falls_back_when_refused(tmp_path):
    site = fake_site.FakeSite()
    summary = flow(site, str(tmp_path), sync_writes="on").run()
    assert summary["syncWrites"] is True
    assert [p["syncWrites"] for m, p in site.calls if m == "VM.diskReplicateStart"] == [True]

    # A daemon with [replication] api = blockrebase refuses write-blocking.
    site = fake_site.FakeSite()
    site.sync_writes_supported = False
    summary = flow(site, str(tmp_path), sync_writes="on").run()
    assert summary["syncWrites"] is False
    assert [p["syncWrites"] for m, p in site.calls
            if m == "VM.diskReplicateStart"] == [True, False]
    assert_moved_and_clean(site, str(tmp_path))


def test_sync_writes_off_only_warns(tmp_path, caplog):
    site = fake_site.FakeSite()
    site.ready_after = 30
    caplog.set_level(logging.WARNING)
    f = flow(site, str(tmp_path), sync_writes="off", stall_timeout=0.0)
    f.poll_interval = 0.001

    summary = f.run()

    assert summary["syncWrites"] is False
    assert "not converging" in caplog.text
    assert [m for m in site.methods() if m == "VM.diskReplicateStart"] == [
        "VM.diskReplicateStart"]


def test_a_copy_that_does_not_verify_keeps_the_source(tmp_path):
    site = fake_site.FakeSite()
    site.verify_equal = False

    with pytest.raises(client_errors.ClientError) as e:
        flow(site, str(tmp_path)).run()

    assert e.value.code == code("CopyNotVerified") and "source is kept" in e.value.message
    assert site.on == site.dst and site.images(site.src) == [site.img]
    assert "Image.delete" not in site.methods()
    # The journal stays (the source is owned); a run without --delete-source ends it.
    assert journal.all_records(str(tmp_path))
    summary = flow(site, str(tmp_path), delete_source=False).run()
    assert summary["sourceDeleted"] is False
    assert journal.all_records(str(tmp_path)) == []
    assert site.images(site.src) == [site.img]


def test_a_second_move_of_the_same_drive_is_refused_while_one_runs(tmp_path):
    site = fake_site.FakeSite()
    holder = journal.Journal(str(tmp_path), site.vm_id, "vda")
    with holder.locked():
        with pytest.raises(client_errors.ClientError) as e:
            flow(site, str(tmp_path)).run()
    assert e.value.code == code("AcquireLockFailure")
    assert site.calls == []


def test_a_journal_to_another_destination_is_not_taken_over(tmp_path, monkeypatch):
    site = fake_site.FakeSite()
    site.kill_after("cloned", monkeypatch)
    with pytest.raises(fake_site.Killed):
        flow(site, str(tmp_path)).run()
    site.revive()
    other = move_disk.MoveDisk(site, site.vm_id, site.src, poll_interval=0,
                               journal=journal.Journal(str(tmp_path), site.vm_id, "vda"))
    with pytest.raises(client_errors.ClientError) as e:
        other.run()
    assert e.value.code == code("replicaErr") and site.dst in e.value.message


def test_a_pivot_whose_record_was_lost_is_never_rolled_back(tmp_path, monkeypatch):
    site = fake_site.FakeSite()
    real_step = journal.Journal.step

    def full_disk(j, step, task_id=None, **fields):
        if step == "pivoted":
            raise journal.JournalError("cannot write the journal: No space left on device")
        real_step(j, step, task_id, **fields)

    with monkeypatch.context() as m:
        m.setattr(journal.Journal, "step", full_disk)
        with pytest.raises(journal.JournalError):
            flow(site, str(tmp_path)).run()
    # The drive runs on the destination: nothing was deleted, the journal stays.
    assert site.on == site.dst and site.images(site.dst) == [site.img]
    assert "Image.delete" not in site.methods()
    assert journal.all_records(str(tmp_path))

    flow(site, str(tmp_path)).run()
    assert_moved_and_clean(site, str(tmp_path))


def test_a_vm_gone_before_its_pivot_leaves_no_copy_behind(tmp_path, monkeypatch):
    site = fake_site.FakeSite()
    site.kill_after("synced", monkeypatch)
    with pytest.raises(fake_site.Killed):
        flow(site, str(tmp_path)).run()
    site.revive()
    gone = fake_site.refusal("noVM", "no such VM")
    monkeypatch.setattr(site, "vm_get_stats", lambda vm_id: (_ for _ in ()).throw(gone))
    site.replicate = None  # the mirror died with QEMU

    with pytest.raises(client_errors.ClientError) as e:
        flow(site, str(tmp_path)).run()

    assert e.value.code == code("noVM")
    assert site.images(site.dst) == [] and site.images(site.src) == [site.img]
    assert journal.all_records(str(tmp_path)) == []
