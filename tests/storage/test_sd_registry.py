"""Where this host finds its domains (storage/sd_registry.py) and the one
registry of domain types (storage/domain_types.py): no storage touched."""

from __future__ import annotations

import json
import os
import uuid
from typing import Any

import pytest

from storage import block_sd, domain_types, errors, file_sd, oop, sd, sd_registry


def new_id() -> str:
    return str(uuid.uuid4())


@pytest.fixture
def env(tmp_path: Any) -> sd.Env:
    return sd.Env(oop=oop.InProcess(), run_dir=str(tmp_path / "run"))


def test_registry_remembers_domains(tmp_path: Any) -> None:
    registry = sd_registry.Registry(str(tmp_path))
    a, b = sorted([new_id(), new_id()])
    assert list(registry) == []
    assert registry.get(a) is None
    registry.add(a, sd.FILE, {"path": "/mnt/x"})
    registry.add(b, sd.BLOCK, {"devices": ["/dev/loop1"]})
    assert list(registry) == [a, b]
    assert registry.get(a) == {"type": sd.FILE, "path": "/mnt/x"}
    # A local JSON file per domain, nothing else left behind.
    assert sorted(os.listdir(registry.dir)) == [f"{a}.json", f"{b}.json"]
    with open(os.path.join(registry.dir, f"{b}.json")) as f:
        assert json.load(f) == {"type": sd.BLOCK, "devices": ["/dev/loop1"]}
    registry.remove(a)
    registry.remove(a)  # idempotent
    assert list(registry) == [b]
    # A new registry over the same directory (a restarted daemon) knows b.
    assert list(sd_registry.Registry(str(tmp_path))) == [b]


def test_registry_refuses_non_uuids(tmp_path: Any) -> None:
    registry = sd_registry.Registry(str(tmp_path))
    with pytest.raises(errors.InvalidUUID):
        registry.add("../escape", sd.FILE, {"path": "/"})
    with pytest.raises(errors.InvalidUUID):
        registry.get("../escape")
    assert os.listdir(tmp_path) == ["domains"]


def test_write_json_atomic_replaces(tmp_path: Any) -> None:
    path = str(tmp_path / "state.json")
    sd_registry.write_json_atomic(path, {"b": 1, "a": [1, 2]})
    sd_registry.write_json_atomic(path, {"c": None})
    with open(path) as f:
        assert json.load(f) == {"c": None}
    assert os.listdir(tmp_path) == ["state.json"]


class Opened(sd.StorageDomain):
    pass


def test_cache_opens_each_domain_once(tmp_path: Any, env: sd.Env) -> None:
    opened: list[tuple[str, dict[str, Any]]] = []

    def open_memory(sd_id: str, args: dict[str, Any], env_: sd.Env) -> sd.StorageDomain:
        opened.append((sd_id, args))
        manifest = sd.DomainManifest(sd_id, env_)
        return Opened(manifest)

    registry = sd_registry.Registry(str(tmp_path))
    cache = sd_registry.DomainCache(registry, env, {"memory": open_memory})
    sd_id = new_id()
    with pytest.raises(errors.StorageDomainDoesNotExist):
        cache.get(sd_id)
    registry.add(sd_id, "memory", {"where": "here"})
    dom = cache.get(sd_id)
    assert cache.get(sd_id) is dom
    assert opened == [(sd_id, {"where": "here"})]
    assert dom.env is env
    assert cache.known() == [sd_id]
    cache.forget(sd_id)
    assert cache.known() == []
    with pytest.raises(errors.StorageDomainDoesNotExist):
        cache.get(sd_id)


def test_cache_add_registers(tmp_path: Any, env: sd.Env) -> None:
    registry = sd_registry.Registry(str(tmp_path))
    cache = sd_registry.DomainCache(registry, env, domain_types.openers())
    dom = file_sd.open_domain(new_id(), {"path": str(tmp_path)}, env)
    cache.add(dom, {"path": str(tmp_path)})
    assert cache.get(dom.sd_id) is dom
    assert registry.get(dom.sd_id) == {"type": sd.FILE, "path": str(tmp_path)}
    # A new cache opens it from the registry, with the file opener.
    again = sd_registry.DomainCache(registry, env, domain_types.openers()).get(dom.sd_id)
    assert isinstance(again, file_sd.FileDomain)
    assert again.manifest.root == os.path.join(str(tmp_path), dom.sd_id)


# The domain types.


def test_one_entry_per_type() -> None:
    assert sorted(domain_types.TYPES) == [sd.BLOCK, sd.FILE]
    assert domain_types.get(sd.FILE).open is file_sd.open_domain
    assert domain_types.get(sd.BLOCK).open is block_sd.open_domain
    assert domain_types.openers() == {
        sd.FILE: file_sd.open_domain, sd.BLOCK: block_sd.open_domain,
    }
    with pytest.raises(errors.InvalidDomainArgs) as e:
        domain_types.get("nfs")
    assert e.value.domain_type == "nfs"


@pytest.mark.parametrize("domain_type, type_args, args", [
    (sd.FILE, {"path": "/mnt/a", "other": 1}, {"path": "/mnt/a"}),
    (sd.BLOCK, {"devices": ["/dev/loop0", "/dev/loop1"]},
     {"devices": ["/dev/loop0", "/dev/loop1"]}),
])
def test_args_of(domain_type: str, type_args: dict[str, Any], args: dict[str, Any]) -> None:
    assert domain_types.get(domain_type).args_of(type_args) == args


@pytest.mark.parametrize("domain_type, type_args", [
    (sd.FILE, {}),
    (sd.FILE, {"path": ""}),
    (sd.FILE, {"path": 3}),
    (sd.FILE, {"devices": ["/dev/loop0"]}),
    (sd.BLOCK, {}),
    (sd.BLOCK, {"devices": []}),
    (sd.BLOCK, {"devices": "/dev/loop0"}),
    (sd.BLOCK, {"devices": ["/dev/loop0", ""]}),
    (sd.BLOCK, {"path": "/mnt/a"}),
])
def test_args_of_refuses(domain_type: str, type_args: dict[str, Any]) -> None:
    with pytest.raises(errors.InvalidDomainArgs) as e:
        domain_types.get(domain_type).args_of(type_args)
    assert e.value.name == "InvalidParams"
    assert e.value.domain_type == domain_type
