"""Tests that are not about the cluster lock say which lock they use.

``cluster_lock = auto`` (the product's default) picks sanlock when a sanlock
daemon answers, so a daemon that happens to run on the machine would change
what such a test does.  Every storage provider and daemon the tests make
therefore names its lock:

- the test daemon (tests/daemon.py) is configured ``cluster_lock = local``
  unless a test overrides it (tests/cluster's hosts say local or sanlock);
- every ``StorageAPI``/``StorageCore`` built in tests/ or contrib/ passes
  ``cluster_lock_mode``, literally or through one of the shared option dicts
  checked below;
- every config text a test writes for an in-process ``App`` has a
  ``[sanlock] cluster_lock``.

The sources are parsed, not run: this costs nothing and fails as soon as a
new construction forgets its lock.
"""

from __future__ import annotations

import ast
import os

from tests import daemon as daemon_mod
from vdsm_lsm import config as config_mod

TOP = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCANNED = ("tests", "contrib")
CONSTRUCTORS = ("StorageAPI", "StorageCore")
# ``**name`` arguments known to carry cluster_lock_mode (checked below).
OPTION_DICTS = {"API_OPTIONS", "PROVIDER_OPTIONS", "storage_env.PROVIDER_OPTIONS", "OPTIONS",
                "options", "args['options']"}
# Tests about the lock itself, which use "auto" on purpose.
ABOUT_THE_LOCK = {"tests/storage/test_clusterlock.py", "tests/cluster/test_hosts.py"}


def _sources() -> dict[str, str]:
    found = {}
    for top in SCANNED:
        for dirpath, _, names in os.walk(os.path.join(TOP, top)):
            for name in names:
                if name.endswith(".py"):
                    path = os.path.join(dirpath, name)
                    with open(path, encoding="utf-8") as f:
                        found[os.path.relpath(path, TOP)] = f.read()
    return found


def _name(node: ast.expr) -> str:
    if isinstance(node, ast.Attribute):
        return node.attr
    if isinstance(node, ast.Name):
        return node.id
    return ""


def test_the_test_daemon_says_which_lock(tmp_path) -> None:
    d = daemon_mod.Daemon(str(tmp_path))
    cfg = config_mod.load(d.conf_path)
    assert cfg.sanlock.cluster_lock == "local"
    assert cfg.sources[("sanlock", "cluster_lock")] == d.conf_path
    # A test can still choose another.
    other = daemon_mod.Daemon(str(tmp_path / "b"), {"sanlock": {"cluster_lock": "sanlock"}})
    assert config_mod.load(other.conf_path).sanlock.cluster_lock == "sanlock"


def test_the_shared_provider_options_say_which_lock() -> None:
    # Imported here, not at collection: they import pytest plugin modules.
    from contrib.bench import bench_storage
    from tests.storage import domain_helpers
    from tests.virt import storage_env

    assert domain_helpers.API_OPTIONS["cluster_lock_mode"] == "local"
    assert storage_env.PROVIDER_OPTIONS["cluster_lock_mode"] == "local"

    assert bench_storage.OPTIONS["cluster_lock_mode"] == "local"


def test_every_storage_provider_in_the_tests_names_its_lock() -> None:
    missing = []
    for path, text in _sources().items():
        for node in ast.walk(ast.parse(text, path)):
            if not isinstance(node, ast.Call) or _name(node.func) not in CONSTRUCTORS:
                continue
            keywords = {k.arg for k in node.keywords if k.arg}
            spread = {ast.unparse(k.value) for k in node.keywords if k.arg is None}
            if "cluster_lock_mode" in keywords or spread & OPTION_DICTS:
                continue
            missing.append(f"{path}:{node.lineno}: {ast.unparse(node)[:80]}")
    assert missing == [], "say cluster_lock_mode=... (or pass a shared option dict)"


def test_every_app_config_a_test_writes_names_its_lock() -> None:
    missing = []
    for path, text in _sources().items():
        if path in ABOUT_THE_LOCK or "App(" not in text:
            continue
        if "[sanlock]" not in text or "cluster_lock" not in text:
            missing.append(path)
    assert missing == []
