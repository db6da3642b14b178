"""storage.taskstore: one JSON file per task, written atomically, read back
skipping what is not a task record."""

from __future__ import annotations

import collections.abc
import json
import os
import shutil
import tempfile
from typing import Any

import pytest

from storage import errors, oop, taskstore

TASK_ID = "7d4bdb4e-8a4c-4bc4-9f3b-0c5c1c1e2f10"
OTHER_ID = "00000000-0000-4000-8000-000000000001"


@pytest.fixture
def store_dir() -> collections.abc.Iterator[str]:
    path = tempfile.mkdtemp(prefix="test-taskstore-", dir="/var/tmp")
    try:
        yield os.path.join(path, "master", "tasks")  # made by the first save
    finally:
        shutil.rmtree(path, ignore_errors=True)


def record(task_id: str = TASK_ID, **fields: Any) -> dict[str, Any]:
    return {"id": task_id, "verb": "Image.syncData", "state": "running", **fields}


def test_save_writes_one_versioned_file_per_task(store_dir: str) -> None:
    store = taskstore.TaskStore(store_dir)
    store.save(record(progress=10))
    store.save(record(OTHER_ID))
    assert sorted(os.listdir(store_dir)) == sorted([TASK_ID + ".task", OTHER_ID + ".task"])
    with open(store.path(TASK_ID)) as f:
        saved = json.load(f)
    assert saved == {**record(progress=10), "version": taskstore.RECORD_VERSION}
    assert store.path(TASK_ID) == os.path.join(store_dir, TASK_ID + taskstore.SUFFIX)
    assert oct(os.stat(store.path(TASK_ID)).st_mode & 0o777) == oct(0o644)


def test_save_replaces_the_record_and_leaves_no_temp_file(store_dir: str) -> None:
    store = taskstore.TaskStore(store_dir)
    store.save(record(state="running"))
    store.save(record(state="finished", result="success"))
    assert os.listdir(store_dir) == [TASK_ID + ".task"]
    [loaded] = store.load_all()
    assert (loaded["state"], loaded["result"]) == ("finished", "success")


def test_load_all_of_a_missing_directory_is_empty(store_dir: str) -> None:
    assert taskstore.TaskStore(store_dir).load_all() == []


def test_load_all_skips_what_is_not_a_task_record(store_dir: str) -> None:
    store = taskstore.TaskStore(store_dir)
    store.save(record())
    strangers = {
        "corrupt.task": "{not json",
        "list.task": "[1, 2]",
        f"{OTHER_ID}.task": json.dumps(record("00000000-0000-4000-8000-000000000009")),
        "noid.task": json.dumps({"state": "running"}),
        f".{OTHER_ID}.task.tmp": json.dumps(record(OTHER_ID)),  # an interrupted write
        f".{OTHER_ID}.task": json.dumps(record(OTHER_ID)),
        "notes.txt": "hello",
    }
    for name, text in strangers.items():
        with open(os.path.join(store_dir, name), "w") as f:
            f.write(text)

    assert [r["id"] for r in store.load_all()] == [TASK_ID]
    # Nothing is removed: a person may want to look at them.
    assert set(strangers) <= set(os.listdir(store_dir))


def test_load_all_is_sorted_by_file_name(store_dir: str) -> None:
    store = taskstore.TaskStore(store_dir)
    for task_id in (TASK_ID, OTHER_ID):
        store.save(record(task_id))
    assert [r["id"] for r in store.load_all()] == sorted([TASK_ID, OTHER_ID])


def test_remove_is_idempotent(store_dir: str) -> None:
    store = taskstore.TaskStore(store_dir)
    store.save(record())
    store.remove(TASK_ID)
    assert os.listdir(store_dir) == []
    store.remove(TASK_ID)  # already gone: fine
    assert store.load_all() == []


def test_save_failure_names_the_task_and_path(store_dir: str) -> None:
    os.makedirs(os.path.dirname(store_dir))
    with open(store_dir, "w"):
        pass  # a file where the directory should be
    store = taskstore.TaskStore(store_dir)
    with pytest.raises(errors.TaskMetaDataSaveError) as e:
        store.save(record())
    assert e.value.name == "TaskMetaDataSaveError"
    assert e.value.fields["task_id"] == TASK_ID
    assert e.value.fields["path"] == store.path(TASK_ID)


def test_unserializable_record_is_not_written(store_dir: str) -> None:
    store = taskstore.TaskStore(store_dir)
    with pytest.raises(TypeError):
        store.save(record(params=object()))
    assert store.load_all() == []


def test_store_through_an_oop_pool(store_dir: str) -> None:
    """On shared storage the files go through the out-of-process helpers."""
    with oop.Pool(max_workers=1, timeout=30) as files:
        store = taskstore.TaskStore(store_dir, files)
        store.save(record(progress=55))
        [loaded] = store.load_all()
        assert loaded["progress"] == 55
        store.remove(TASK_ID)
        assert store.load_all() == []
