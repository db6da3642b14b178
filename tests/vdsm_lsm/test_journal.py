"""vdsm_lsm/journal.py: move-disk's journal on disk, its lock, its test hook.

The hook is tried for real: a process that records a step with
VDSM_LSM_MOVE_DISK_STOP_AFTER set stops there and is killed with SIGKILL;
the journal it leaves is whole, and its lock went with it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from vdsm_lsm import journal

TOP = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_a_record_is_written_whole_at_each_step(tmp_path):
    j = journal.Journal(str(tmp_path), "vm1", "vda")
    assert not j.exists()

    j.begin(poolID="p", imageID="i", leafVolumeID="l")
    j.step("started")
    j.step("clone_submitted", task_id="t1", pending="")

    again = journal.Journal(str(tmp_path), "vm1", "vda")
    rec = again.load()
    assert rec["steps"] == ["started", "clone_submitted"]
    assert again.task("clone_submitted") == "t1" and again.done("started")
    assert rec["vmID"] == "vm1" and rec["leafVolumeID"] == "l"
    assert rec["rollingBack"] is False and rec["version"] == journal.VERSION
    # Atomic writes leave no temporary file behind.
    assert sorted(os.listdir(tmp_path)) == ["vm1-vda.json"]

    again.forget("clone_submitted")
    assert j.load()["steps"] == ["started"] and j.task("clone_submitted") is None
    j.remove()
    assert not j.exists() and journal.all_records(str(tmp_path)) == []


def test_a_second_run_of_the_same_drive_is_refused(tmp_path):
    first = journal.Journal(str(tmp_path), "vm1", "vda")
    with first.locked():
        with pytest.raises(journal.Busy):
            journal.Journal(str(tmp_path), "vm1", "vda").lock()
        # Another drive of the same VM is another journal.
        other = journal.Journal(str(tmp_path), "vm1", "vdb")
        other.lock()
        other.unlock()
    again = journal.Journal(str(tmp_path), "vm1", "vda")
    again.lock()
    again.begin(poolID="p")
    again.unlock()
    # A journal left (to resume) keeps its lock file; one removed takes it along.
    assert sorted(os.listdir(tmp_path)) == ["vm1-vda.json", "vm1-vda.lock"]
    again.lock()
    again.remove()
    again.unlock()
    assert os.listdir(tmp_path) == []


def test_unreadable_and_foreign_files_are_refused_or_skipped(tmp_path):
    (tmp_path / "vm1-vda.json").write_text("{not json")
    (tmp_path / "vm2-vda.json").write_text(json.dumps({"version": 99}))
    (tmp_path / "notes.txt").write_text("hello")
    good = journal.Journal(str(tmp_path), "vm3", "vda")
    good.begin(poolID="p")

    with pytest.raises(journal.JournalError):
        journal.Journal(str(tmp_path), "vm1", "vda").load()
    with pytest.raises(journal.JournalError):
        journal.Journal(str(tmp_path), "vm2", "vda").load()
    assert [r["vmID"] for r in journal.all_records(str(tmp_path))] == ["vm3"]
    assert journal.all_records(str(tmp_path / "missing")) == []


def test_memory_journal_keeps_nothing_on_disk(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    j = journal.MemoryJournal("vm", "vda")
    j.lock()
    j.begin(poolID="p")
    j.step("started")
    assert j.done("started") and not j.exists()
    assert os.listdir(tmp_path) == []


def test_default_dir(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert journal.default_dir() == "/var/lib/vdsm-lsm-client"
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setenv("XDG_STATE_HOME", "/home/u/.state")
    assert journal.default_dir() == "/home/u/.state/vdsm-lsm"


WRITER = """
import sys
from vdsm_lsm import journal
j = journal.Journal(sys.argv[1], "vm1", "vda")
j.lock()
j.begin(poolID="p")
for step in ("started", "cloned", "synced"):
    j.step(step)
"""


def test_the_hook_stops_after_a_step_and_the_kill_is_real(tmp_path):
    env = dict(os.environ, **{journal.STOP_AFTER_ENV: "cloned"})
    err = tmp_path / "stderr"
    with open(err, "w") as f:
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path / "state")],
                                cwd=TOP, env=env, stderr=f)
    try:
        deadline = time.monotonic() + 30
        while "stopped after step cloned" not in err.read_text():
            assert proc.poll() is None, err.read_text()
            assert time.monotonic() < deadline, "the hook never stopped the writer"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    assert proc.returncode == -signal.SIGKILL

    j = journal.Journal(str(tmp_path / "state"), "vm1", "vda")
    assert j.load()["steps"] == ["started", "cloned"]
    j.lock()  # the killed writer's lock went with it
