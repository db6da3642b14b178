"""Every verb of the real schema tried by a hostile client, through the real wiring.

The daemon's :class:`vdsm_lsm.app.App` is built on a temporary config (the
local cluster lock, no libvirt started, no guest) with one real file domain.
For every verb, each param in turn (and each key of a nested object, each
item of a list) is replaced by values a careless or hostile client sends: a
UUID with a trailing newline, strings with NUL, line breaks, control
characters or lone surrogates, booleans for numbers, NaN and Infinity, huge
and negative integers, lists for objects, params nested 100,000 deep, enum
values in another case or with spaces, missing and unknown params.  Every one
of them must be refused by validation (-32602, naming the param), the
answer is never GeneralException (100) nor a server error (-32603), and
nothing on disk changes: the state dir, the run dir and the file domain are
the same afterwards.  The valid base request of each verb also answers a
coded error (it names an unknown pool, domain, VM or task, or a missing
path), never 100 or -32603, and changes nothing either.
"""

from __future__ import annotations

import copy
import hashlib
import math
import os
import uuid
from collections.abc import Iterator, Mapping
from typing import Any

import pytest

from rpc import schema
from vdsm_lsm import app, config

INVALID_PARAMS = -32602
FORBIDDEN = {100, -32603}
DEEP = 100_000

# A known file domain of the app: read-only verbs reach it (deeper code);
# verbs that change storage get unknown ids instead.
READ_ONLY_ON_DOMAIN = {
    "StorageDomain.create",  # already exists: refused before anything is made
    "StorageDomain.getInfo",
    "StorageDomain.getStats",
    "StorageDomain.getImages",
    "StorageDomain.getVolumes",
}


def _deep_list(depth: int) -> list[Any]:
    value: list[Any] = []
    for _ in range(depth):
        value = [value]
    return value


def _deep_dict(depth: int, key: str = "a") -> dict[str, Any]:
    value: dict[str, Any] = {}
    for _ in range(depth):
        value = {key: value}
    return value


DEEP_LIST = _deep_list(DEEP)
DEEP_DICT = _deep_dict(DEEP)

# Values wrong for any type of param.
NOT_SCALAR: list[tuple[str, Any]] = [
    ("null", None),
    ("deep list", DEEP_LIST),
    ("deep dict", DEEP_DICT),
]
NOT_NUMBER: list[tuple[str, Any]] = [
    ("nan", math.nan),
    ("inf", math.inf),
    ("-inf", -math.inf),
    ("float", 1.5),
]
BAD_STRINGS: list[tuple[str, Any]] = [
    ("NUL", "a\x00b"),
    ("newline", "a\nb"),
    ("trailing newline", "a\n"),
    ("carriage return", "a\rb"),
    ("escape", "\x1b[31mred"),
    ("DEL", "a\x7fb"),
    ("NEL", "a\x85b"),
    ("line separator", "a\u2028b"),
    ("paragraph separator", "a\u2029b"),
    ("vertical tab", "a\x0bb"),
    ("lone surrogate", "a\ud800b"),
    ("too long", "x" * 100_000),
]


class Resolver:
    def __init__(self, api: schema.Schema) -> None:
        self.api = api

    def spec(self, spec: Mapping[str, Any]) -> dict[str, Any]:
        """spec with its named type merged in (as Schema.check_value does)."""
        merged = dict(spec)
        while merged["type"] in self.api.types:
            named = dict(self.api.types[merged["type"]])
            named.update({k: v for k, v in merged.items() if k != "type"})
            merged = named
        return merged

    def item(self, spec: Mapping[str, Any]) -> dict[str, Any]:
        items = spec.get("items", "any")
        return self.spec(items if isinstance(items, Mapping) else {"type": items})

    def base(self, spec: Mapping[str, Any], name: str, ids: Mapping[str, str]) -> Any:
        """A valid value for spec."""
        spec = self.spec(spec)
        kind = spec["type"]
        if "default" in spec:
            return copy.deepcopy(spec["default"])
        if kind == "uuid":
            return ids.get(name) or str(uuid.uuid4())
        if kind == "string":
            return "/nonexistent/hostile" if name in PATHS else "x"
        if kind in ("int", "size"):
            return max(spec.get("min", 1), 1) if spec.get("max", 1) >= 1 else spec["min"]
        if kind == "number":
            return 1.0
        if kind == "bool":
            return False
        if kind == "enum":
            return spec["values"][0]
        if kind == "list":
            return [self.base(self.item(spec), name, ids)]
        if kind == "dict":
            return {
                key: self.base(sub, key, ids)
                for key, sub in (spec.get("properties") or {}).items()
                if "default" not in sub and sub.get("required", True) or key in PATHS
            }
        return "x"

    def hostile(
        self, spec: Mapping[str, Any], name: str, ids: Mapping[str, str]
    ) -> Iterator[tuple[str, Any]]:
        """(label, value) pairs that validation must refuse for spec."""
        spec = self.spec(spec)
        kind = spec["type"]
        yield from NOT_SCALAR
        if kind != "bool":
            yield "true", True
            yield "false", False
        if kind == "uuid":
            good = str(uuid.uuid4())
            yield from [
                ("uuid + newline", good + "\n"),
                ("newline + uuid", "\n" + good),
                ("uuid + space", good + " "),
                ("uuid + NUL", good + "\x00"),
                ("braced uuid", "{" + good + "}"),
                ("urn uuid", "urn:uuid:" + good),
                ("hex uuid", good.replace("-", "")),
                ("unicode digit uuid", "\u0663" + good[1:]),
                ("path", "../../../etc"),
                ("empty", ""),
                ("int", 1),
                ("list", [good]),
            ]
            yield from BAD_STRINGS
        elif kind == "string":
            yield from BAD_STRINGS
            yield from [("int", 1), ("list", ["x"]), ("dict", {"x": "y"})]
            yield from NOT_NUMBER
        elif kind in ("int", "size", "number"):
            if kind != "number":
                yield from NOT_NUMBER
                yield "float integer", 1.0
            else:
                yield from NOT_NUMBER[:3]
            yield "huge", 2**200
            yield "huger", 10**5000
            yield "-huge", -(2**200)
            yield "list", [1]
            yield "dict", {"value": 1}
            if "min" in spec:
                yield "below min", spec["min"] - 1
            else:
                yield "negative", -1
            if "max" in spec:
                yield "above max", spec["max"] + 1
            if kind == "size":
                yield from [
                    ("exponent string", "1e3"), ("spaced string", " 12"),
                    ("newline string", "12\n"), ("negative string", "-1"),
                    ("unicode digit string", "\u0663"), ("superscript string", "\u00b2"),
                    ("hex string", "0x10"), ("empty string", ""),
                    ("huge string", "9" * 30),
                ]
            else:
                yield "digit string", "1"
        elif kind == "bool":
            yield from [("0", 0), ("1", 1), ("string", "true"), ("list", [True])]
            yield from NOT_NUMBER[:1]
        elif kind == "enum":
            for v in map(str, spec["values"]):
                for variant in {v.upper(), v.lower(), v.swapcase(), v.capitalize()} - {v}:
                    yield f"case {variant!r}", variant
                yield f"space {v!r}", f" {v}"
                yield f"trailing space {v!r}", f"{v} "
                yield f"newline {v!r}", f"{v}\n"
                yield f"list {v!r}", [v]
            yield from [("empty", ""), ("int", 0)]
        elif kind == "list":
            base_item = self.base(self.item(spec), name, ids)
            yield from [("string", "x"), ("dict", {"0": base_item}), ("int", 1)]
            yield "too many", [base_item] * (spec.get("max_items", 1024) + 1)
            for label, value in self.hostile(self.item(spec), name, ids):
                yield f"item {label}", [value]
        elif kind == "dict":
            base = self.base(spec, name, ids)
            yield from [("string", "x"), ("list of it", [base]), ("int", 1), ("empty list", [])]
            yield "unknown key", {**base, "hostileKey": 1}
            yield "unknown deep key", {**base, "hostileKey": DEEP_DICT}
            yield "case of a key", {k.upper(): v for k, v in base.items()} or {"X": 1}
            props = spec.get("properties") or {}
            for key, sub in props.items():
                if "default" not in sub and sub.get("required", True):
                    yield f"missing {key}", {k: v for k, v in base.items() if k != key}
                for label, value in self.hostile(sub, key, ids):
                    yield f"{key}: {label}", {**base, key: value}


# String params that are paths (a base value that exists nowhere).
PATHS = {"path", "kernel", "initrd", "serialLog", "connection"}


def _tree(root: str) -> dict[str, str]:
    """Every path under root with a digest of its content (or link target)."""
    result: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            result[os.path.relpath(os.path.join(dirpath, name), root)] = "dir"
        for name in filenames:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root)
            if os.path.islink(path):
                result[rel] = "link:" + os.readlink(path)
            elif name.endswith(".sock") or not os.path.isfile(path):
                result[rel] = "special"
            else:
                with open(path, "rb") as f:
                    result[rel] = hashlib.sha256(f.read()).hexdigest()
    return result


@pytest.fixture(scope="module")
def hostile_app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[app.App, str, Any]]:
    tmp = tmp_path_factory.mktemp("hostile")
    conf = tmp / "vdsm-lsm.conf"
    conf.write_text(
        f"[irs]\nrun_dir = {tmp}/run\nstate_dir = {tmp}/state\n"
        "[sanlock]\ncluster_lock = local\n"
        "[lvm]\nactivation = loop\n"
        "[vm]\naccel = tcg\n"
    )
    a = app.App(config.load(str(conf)))
    domain = tmp / "domain"
    domain.mkdir()
    sd_id = str(uuid.uuid4())
    ok, result = a.dispatcher.handle(
        "StorageDomain.create",
        {"storagedomainID": sd_id, "domainType": "file", "typeArgs": {"path": str(domain)},
         "name": "hostile"},
    )
    assert ok, result

    def snapshot() -> dict[str, dict[str, str]]:
        return {str(root): _tree(str(root)) for root in (tmp / "run", tmp / "state", domain)}

    try:
        yield a, sd_id, snapshot
    finally:
        a.storage.close()


def _cases(api: schema.Schema, sd_id: str) -> Iterator[tuple[str, str, dict[str, Any], bool]]:
    """(verb, label, params, must_be_invalid) for every verb of the schema."""
    resolver = Resolver(api)
    for method, verb in sorted(api.verbs.items()):
        ids: dict[str, str] = {}
        target = verb.target or method
        if target in READ_ONLY_ON_DOMAIN:
            ids = {p.name: sd_id for p in verb.params if p.name in ("storagedomainID", "sdUUID")}
        base = {
            p.name: resolver.base(p.spec, p.name, ids)
            for p in verb.params
            if p.required or resolver.spec(p.spec)["type"] in ("dict",)
        }
        yield method, "base", base, False
        yield method, "unknown param", {**base, "hostileParam": 1}, True
        yield method, "unknown param, different case", {
            **{k.lower(): v for k, v in base.items()}, "X": 1}, True
        yield method, "params as a list", [1], True
        yield method, "params as a string", "x", True
        yield method, "params deep", DEEP_LIST, True
        for p in verb.params:
            if p.required:
                yield method, f"missing {p.name}", {
                    k: v for k, v in base.items() if k != p.name}, True
            for label, value in resolver.hostile(p.spec, p.name, ids):
                yield method, f"{p.name}: {label}", {**base, p.name: value}, True


def test_every_verb_refuses_hostile_params(hostile_app: tuple[app.App, str, Any]) -> None:
    a, sd_id, snapshot = hostile_app
    before = snapshot()
    problems: list[str] = []
    count = 0
    for method, label, params, invalid in _cases(a.schema, sd_id):
        count += 1
        ok, answer = a.dispatcher.handle(method, params)
        code = None if ok else answer[0]
        if code in FORBIDDEN:
            problems.append(f"{method} [{label}]: {code} {str(answer[1])[:200]}")
        elif invalid and code != INVALID_PARAMS:
            problems.append(f"{method} [{label}]: not refused: {str(answer)[:200]}")
        elif invalid and len(str(answer[1])) > 500:
            problems.append(f"{method} [{label}]: message of {len(str(answer[1]))} characters")
        elif invalid:
            param = label.split(":")[0].removeprefix("missing ")
            names = {p.name for p in a.schema.verbs[method].params}
            if param in names and param not in str(answer[1]):
                problems.append(f"{method} [{label}]: message does not name {param}: {answer}")
    assert count > 2000
    assert problems == [], "\n".join(problems)
    assert snapshot() == before


def _probes(api: schema.Schema, sd_id: str, tmp: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """Odd requests that pass validation and reach the handlers: BLANK and
    uppercase UUIDs, and storage arguments no domain can be made of (a
    regular file, a character device, a relative path...).  Never a real
    block device or an existing directory: those would be made domains."""
    resolver = Resolver(api)
    for method, verb in sorted(api.verbs.items()):
        ids: dict[str, str] = {}
        if (verb.target or method) in READ_ONLY_ON_DOMAIN:
            ids = {p.name: sd_id for p in verb.params if p.name in ("storagedomainID", "sdUUID")}
        base = {p.name: resolver.base(p.spec, p.name, ids) for p in verb.params if p.required}
        for p in verb.params:
            if resolver.spec(p.spec)["type"] == "uuid" and p.name in base:
                yield method, {**base, p.name: schema.BLANK_UUID}
                yield method, {**base, p.name: base[p.name].upper()}
    regular = os.path.join(tmp, "regular-file")
    with open(regular, "w") as f:
        f.write("not a domain")
    odd_paths = [regular, "relative/dir", "/nonexistent/../nonexistent",
                 "/dev/null", "/dev/zero", "/dev/loop-control", "/dev/no such device", "\u00e9"]
    for path in odd_paths:
        new = str(uuid.uuid4())
        yield "StorageDomain.create", {"storagedomainID": new, "domainType": "file",
                                       "typeArgs": {"path": path}, "name": "odd"}
        yield "StorageDomain.create", {"storagedomainID": new, "domainType": "block",
                                       "typeArgs": {"devices": [path]}, "name": "odd"}
        for kind in ("file", "block"):
            yield "StoragePool.connectStorageServer", {
                "storagepoolID": str(uuid.uuid4()), "domainType": kind,
                "connectionParams": [{"id": str(uuid.uuid4()), "connection": path}]}
    new = str(uuid.uuid4())
    for args in ({}, {"path": regular, "devices": ["/dev/null"]}, {"devices": []},
                 {"devices": ["/dev/zero", "/dev/zero"]}, {"path": ""}):
        for kind in ("file", "block"):
            yield "StorageDomain.create", {"storagedomainID": new, "domainType": kind,
                                           "typeArgs": args, "name": "odd"}
    yield "StoragePool.create", {"storagepoolID": str(uuid.uuid4()), "name": "p",
                                 "masterSdUUID": sd_id, "domainList": []}
    yield "StoragePool.connect", {"storagepoolID": str(uuid.uuid4()), "hostID": 2000,
                                  "masterSdUUID": sd_id}
    yield "StorageDomain.getVolumes", {"storagedomainID": sd_id,
                                       "storagepoolID": schema.BLANK_UUID,
                                       "imageID": schema.BLANK_UUID}


def test_odd_but_valid_requests_answer_coded_errors(
    hostile_app: tuple[app.App, str, Any], tmp_path: Any
) -> None:
    a, sd_id, snapshot = hostile_app
    before = snapshot()
    problems = []
    for method, params in _probes(a.schema, sd_id, str(tmp_path)):
        ok, answer = a.dispatcher.handle(method, params)
        if not ok and answer[0] in FORBIDDEN:
            problems.append(f"{method} {params}: {answer}")
        elif ok and method in ("StorageDomain.create", "StoragePool.create"):
            problems.append(f"{method} {params}: made something: {answer}")
        elif ok and method == "StoragePool.connectStorageServer" and answer[0]["status"] == 0:
            problems.append(f"{method} {params}: connected: {answer}")
    assert problems == [], "\n".join(problems)
    assert snapshot() == before


def test_base_requests_are_valid(hostile_app: tuple[app.App, str, Any]) -> None:
    # The base requests pass validation: what they answer comes from the
    # handlers (an unknown pool, domain, VM or task, a missing path).
    a, sd_id, _ = hostile_app
    refused = []
    for method, label, params, _invalid in _cases(a.schema, sd_id):
        if label == "base":
            ok, answer = a.dispatcher.handle(method, params)
            if not ok and answer[0] in FORBIDDEN | {INVALID_PARAMS}:
                refused.append((method, answer))
    assert refused == []
