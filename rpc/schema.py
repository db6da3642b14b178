"""The API schema: verbs, their params, named types, aliases and error codes.

The schema (a YAML document, ``vdsm_lsm/api.yml``) is the single source of
truth: dispatch, argument validation, the CLI's help and the API reference
all read it through this module.  Validation turns request params into the
keyword arguments of a handler:

- every param is checked against its type before any handler runs; nothing
  from a request reaches a handler unvalidated (UUIDs are RFC 4122 text and
  are answered lowercase, so ``../`` can never become part of a path);
- unknown, missing, mistyped params and unknown enum values raise
  :class:`rpc.errors.InvalidParams` naming the param;
- what a hostile client sends is refused the same way, never reaching a
  handler: a string is one line of text (no NUL, no control character, no
  line break of any kind, no lone surrogate: it may become a path, an LV
  name or a line of metadata); integers and sizes are bounded (64-bit
  unless the spec says less; ``True`` is not a number); numbers are finite;
  a value nests at most :data:`MAX_DEPTH` lists and objects deep; enum
  values match exactly (no case folding, no stripping).  An error message
  shows a bounded excerpt of the value, whatever it is;
- param names are snake-cased for the handler (``storagepoolID`` ->
  ``storagepool_id``); nested dicts keep the caller's keys.

A verb whose ``returns`` is a type (not a line of text) has its handler's
result answered through that type (:meth:`Schema.answer`): today that maps
fields of type ``errorCode``.  A handler gives an error *name* there (``""``
for none); the caller gets its code from the error table (0 for none) and
the name beside it in ``error``.  With
:meth:`rpc.dispatch.Dispatcher.error_of` for raised errors, this is how
the daemon's answers get their codes: storage and virt carry names only.

It also lists the events the server pushes (``events:``, params checked like
results) and, for the docs, how verbs and params compare with VDSM's (``vdsm:``).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
import uuid
from collections.abc import Mapping
from typing import Any

import yaml

from common import uuids
from rpc import checks, errors

log = logging.getLogger("rpc.schema")

BLANK_UUID = uuids.BLANK_UUID

_ACRONYM_RE = re.compile(r"(?<=[A-Z])(?=[A-Z][a-z])")
_SNAKE_RE = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")
_BASIC_TYPES = {
    "uuid", "string", "int", "size", "bool", "number", "enum", "list", "dict", "map", "any",
}
# Types a result may use but a param may not.
ERROR_CODE = "errorCode"
_RESULT_TYPES = {ERROR_CODE}
# Where an errorCode field's name is answered, beside its number.
ERROR_NAME_KEY = "error"

# How deep a value may nest lists and objects (rpc.checks).
MAX_DEPTH = checks.MAX_DEPTH


def snake_case(name: str) -> str:
    """storagepoolID -> storagepool_id, dstSdUUID -> dst_sd_uuid, getVMList -> get_vm_list."""
    return _SNAKE_RE.sub("_", _ACRONYM_RE.sub("_", name)).lower()


def handler_name(verb: str) -> str:
    """Volume.create -> volume_create, StoragePool.spmStart -> storage_pool_spm_start."""
    namespace, _, name = verb.partition(".")
    return f"{snake_case(namespace)}_{snake_case(name)}"


@dataclasses.dataclass(frozen=True)
class Param:
    name: str
    spec: Mapping[str, Any]

    @property
    def required(self) -> bool:
        return "default" not in self.spec and self.spec.get("required", True)

    @property
    def type(self) -> str:
        return self.spec["type"]

    @property
    def doc(self) -> str:
        return self.spec.get("doc", "")


@dataclasses.dataclass(frozen=True)
class Verb:
    name: str
    doc: str
    params: tuple[Param, ...]
    returns: str
    # The type of the handler's result when the schema declares one.
    result: Mapping[str, Any] | None = None
    # For an alias: the verb it stands for and how its param names map.
    target: str | None = None
    param_map: Mapping[str, str] | None = None
    vdsm: Any = None  # docs only: None (VDSM's verb), False (VDSM has none) or a note

    @property
    def namespace(self) -> str:
        return self.name.partition(".")[0] if "." in self.name else ""


class Schema:
    def __init__(self, doc: Mapping[str, Any]) -> None:
        self.types: dict[str, Mapping[str, Any]] = dict(doc.get("types") or {})
        self.errors: dict[str, int] = {}
        self.error_messages: dict[str, str] = {}
        for name, entry in (doc.get("errors") or {}).items():
            if not isinstance(entry, dict) or set(entry) - {"code", "message"}:
                raise ValueError(f"Schema: error {name} must be {{code, message}}: {entry!r}")
            self.errors[name] = int(entry["code"])
            self.error_messages[name] = entry.get("message", name)
        self.verbs: dict[str, Verb] = {}
        for name, entry in (doc.get("verbs") or {}).items():
            params = tuple(Param(p, spec) for p, spec in (entry.get("params") or {}).items())
            returns = entry.get("returns", "")
            result = returns if isinstance(returns, Mapping) else None
            text = spec_text(result) if result is not None else str(returns)
            verb = Verb(name, entry.get("doc", ""), params, text, result, vdsm=entry.get("vdsm"))
            self.verbs[name] = verb
            for alias, mapping in (entry.get("aliases") or {}).items():
                by_target = {p.name: p for p in params}
                alias_params = tuple(
                    Param(src, by_target[dst].spec) for src, dst in mapping.items()
                )
                self.verbs[alias] = Verb(
                    alias,
                    f"Alias of {name}.",
                    alias_params,
                    verb.returns,
                    verb.result,
                    target=name,
                    param_map=dict(mapping),
                )
        self.events: dict[str, Verb] = {}  # |namespace|event|<id>: its doc and params
        for name, entry in (doc.get("events") or {}).items():
            params = tuple(Param(p, spec) for p, spec in (entry.get("params") or {}).items())
            self.events[name] = Verb(name, entry.get("doc", ""), params, "")
        self._check()

    @classmethod
    def load(cls, path: str) -> Schema:
        with open(path, encoding="utf-8") as f:
            return cls(yaml.load(f, Loader=_StrictLoader))  # noqa: S506 (a safe loader)

    def _check(self) -> None:
        """Reject a schema that names unknown types (a bug, found at start)."""
        for verb in self.verbs.values():
            for param in verb.params:
                self._check_spec(param.spec, f"{verb.name}.{param.name}", params=True)
            if verb.result is not None:
                self._check_spec(verb.result, f"{verb.name} returns")
        for name, spec in self.types.items():
            self._check_spec(spec, name)
        for event in self.events.values():
            for param in event.params:
                self._check_spec(param.spec, f"{event.name}.{param.name}")

    def _check_spec(
        self,
        spec: Mapping[str, Any],
        where: str,
        params: bool = False,
        seen: frozenset[str] = frozenset(),
    ) -> None:
        kind = spec.get("type")
        if kind not in _BASIC_TYPES and kind not in _RESULT_TYPES and kind not in self.types:
            raise ValueError(f"Schema: unknown type {kind!r} at {where}")
        if params and kind in _RESULT_TYPES:
            raise ValueError(f"Schema: type {kind!r} is for results only, at {where}")
        if params and kind in self.types and kind not in seen:
            # What a param may not hold, its named type may not either.
            self._check_spec(self.types[kind], f"{where} ({kind})", params, seen | {kind})
        if kind in ("list", "map") and "items" in spec:
            self._check_spec(_item_spec(spec), f"{where}[]", params, seen)
        for key, sub in (spec.get("properties") or {}).items():
            self._check_spec(sub, f"{where}.{key}", params, seen)

    # Validation

    def validate(self, method: str, params: Any) -> tuple[str, dict[str, Any]]:
        """Return (target verb name, handler kwargs) or raise InvalidParams."""
        verb = self.verbs.get(method)
        if verb is None:
            raise errors.MethodNotFound(method=method)
        if params is None:
            params = {}
        if isinstance(params, list):
            if params:
                raise errors.InvalidParams("params must be passed by name (a JSON object)")
            params = {}
        if not isinstance(params, Mapping):
            raise errors.InvalidParams("params must be a JSON object")
        known = {p.name for p in verb.params}
        unknown = set(params) - known
        if unknown:
            raise errors.InvalidParams(f"unknown param(s) {checks.names(unknown)} for {method}")
        values: dict[str, Any] = {}
        for param in verb.params:
            if param.name in params:
                values[param.name] = self.check_value(param.spec, params[param.name], param.name)
            elif "default" in param.spec:
                values[param.name] = param.spec["default"]
            elif param.spec.get("required", True):
                raise errors.InvalidParams(f"missing param {param.name}")
        target = verb.name
        if verb.target is not None:
            assert verb.param_map is not None
            values = {verb.param_map[k]: v for k, v in values.items()}
            target = verb.target
            # Defaults of the target's params that the alias does not carry.
            for param in self.verbs[target].params:
                if param.name not in values and "default" in param.spec:
                    values[param.name] = param.spec["default"]
        return target, {snake_case(k): v for k, v in values.items()}

    def check_value(self, spec: Mapping[str, Any], value: Any, where: str, depth: int = 0) -> Any:
        """value checked against spec; depth: how deep inside a param it is
        (a named type that names itself cannot make validation recurse
        without bound)."""
        if depth > checks.MAX_DEPTH:
            raise errors.InvalidParams(f"{where}: {checks.TOO_DEEP}")
        kind = spec["type"]
        if kind in self.types:
            merged = dict(self.types[kind])
            merged.update({k: v for k, v in spec.items() if k != "type"})
            merged["type"] = self.types[kind]["type"]
            return self.check_value(merged, value, where, depth)
        if kind in ("list", "map", "dict"):
            return getattr(self, f"_check_{kind}")(spec, value, where, depth)
        return getattr(self, f"_check_{kind}")(spec, value, where)

    def _check_any(self, spec: Mapping[str, Any], value: Any, where: str) -> Any:
        checks.check_depth(value, where)
        return value

    def _check_uuid(self, spec: Mapping[str, Any], value: Any, where: str) -> str:
        if not uuids.is_uuid(value):
            raise errors.InvalidParams(f"{where}: not a UUID: {checks.short(value)}")
        return str(uuid.UUID(value))

    def _check_string(self, spec: Mapping[str, Any], value: Any, where: str) -> str:
        if not isinstance(value, str):
            raise errors.InvalidParams(f"{where}: expected a string, got {checks.json_type(value)}")
        if len(value) > spec.get("max_length", 4096):
            raise errors.InvalidParams(f"{where}: string too long")
        problem = checks.text_problem(value)
        if problem:
            raise errors.InvalidParams(f"{where}: {problem}")
        return value

    def _check_bool(self, spec: Mapping[str, Any], value: Any, where: str) -> bool:
        if not isinstance(value, bool):
            raise errors.InvalidParams(
                f"{where}: expected a boolean, got {checks.json_type(value)}"
            )
        return value

    def _check_int(self, spec: Mapping[str, Any], value: Any, where: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise errors.InvalidParams(
                f"{where}: expected an integer, got {checks.json_type(value)}"
            )
        return self._check_range(spec, value, where, checks.INT_MIN, checks.INT_MAX)

    def _check_number(self, spec: Mapping[str, Any], value: Any, where: str) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise errors.InvalidParams(f"{where}: expected a number, got {checks.json_type(value)}")
        if isinstance(value, float) and not math.isfinite(value):
            raise errors.InvalidParams(f"{where}: {value} is not a finite number")
        if isinstance(value, int) and not checks.INT_MIN <= value <= checks.INT_MAX:
            raise errors.InvalidParams(f"{where}: {checks.short(value)} is out of range")
        return self._check_range(spec, value, where)

    def _check_size(self, spec: Mapping[str, Any], value: Any, where: str) -> int:
        # VDSM's engine sends sizes as strings of digits.
        if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) < 20:
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise errors.InvalidParams(
                f"{where}: expected a size in bytes, got {checks.short(value)}"
            )
        if value < 0:
            raise errors.InvalidParams(f"{where}: negative size {checks.short(value)}")
        return self._check_range(spec, value, where, 0, checks.INT_MAX)

    def _check_range(
        self, spec: Mapping[str, Any], value: Any, where: str,
        low: int | None = None, high: int | None = None,
    ) -> Any:
        """value within spec's min and max (default: low and high)."""
        low, high = spec.get("min", low), spec.get("max", high)
        if low is not None and value < low:
            raise errors.InvalidParams(f"{where}: {checks.short(value)} is below the minimum {low}")
        if high is not None and value > high:
            raise errors.InvalidParams(
                f"{where}: {checks.short(value)} is above the maximum {high}"
            )
        return value

    def _check_enum(self, spec: Mapping[str, Any], value: Any, where: str) -> str:
        allowed = [str(v) for v in spec["values"]]
        if not isinstance(value, str) or value not in allowed:
            raise errors.InvalidParams(
                f"{where}: {checks.short(value)} is not one of {', '.join(allowed)}"
            )
        return value

    def _check_list(
        self, spec: Mapping[str, Any], value: Any, where: str, depth: int = 0
    ) -> list[Any]:
        if not isinstance(value, list):
            raise errors.InvalidParams(f"{where}: expected a list, got {checks.json_type(value)}")
        if len(value) > spec.get("max_items", 1024):
            raise errors.InvalidParams(f"{where}: too many items")
        item_spec = _item_spec(spec)
        return [
            self.check_value(item_spec, v, f"{where}[{i}]", depth + 1) for i, v in enumerate(value)
        ]

    def _check_map(
        self, spec: Mapping[str, Any], value: Any, where: str, depth: int = 0
    ) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise errors.InvalidParams(
                f"{where}: expected an object, got {checks.json_type(value)}"
            )
        if len(value) > spec.get("max_items", 1024):
            raise errors.InvalidParams(f"{where}: too many items")
        item_spec = _item_spec(spec)
        result: dict[str, Any] = {}
        for key, item in value.items():
            key = self._check_string({}, key, f"{where} key")
            result[key] = self.check_value(item_spec, item, f"{where}.{key}", depth + 1)
        return result

    def _check_dict(
        self, spec: Mapping[str, Any], value: Any, where: str, depth: int = 0
    ) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise errors.InvalidParams(
                f"{where}: expected an object, got {checks.json_type(value)}"
            )
        props = spec.get("properties")
        if props is None:
            checks.check_depth(value, where, depth)
            return dict(value)
        result: dict[str, Any] = {}
        unknown = set(value) - set(props)
        if unknown and not spec.get("additional", False):
            raise errors.InvalidParams(f"{where}: unknown key(s) {checks.names(unknown)}")
        for key, sub in props.items():
            if key in value:
                result[key] = self.check_value(sub, value[key], f"{where}.{key}", depth + 1)
            elif "default" in sub:
                result[key] = sub["default"]
            elif sub.get("required", True):
                raise errors.InvalidParams(f"{where}: missing key {key}")
        return result

    # Results

    def answer(self, method: str, result: Any) -> Any:
        """A handler's result as the caller gets it, through the verb's
        result type (unchanged when the verb declares none)."""
        verb = self.verbs[method]
        if verb.result is None:
            return result
        return self._answer(verb.result, result)

    def _answer(self, spec: Mapping[str, Any], value: Any) -> Any:
        kind = spec["type"]
        if kind in self.types:
            return self._answer(self.types[kind], value)
        if kind == "list" and isinstance(value, list):
            item_spec = _item_spec(spec)
            return [self._answer(item_spec, v) for v in value]
        if kind == "map" and isinstance(value, Mapping):
            item_spec = _item_spec(spec)
            return {k: self._answer(item_spec, v) for k, v in value.items()}
        if kind == "dict" and isinstance(value, Mapping) and "properties" in spec:
            out = dict(value)
            for key, sub in spec["properties"].items():
                if key not in out:
                    continue
                if self._kind(sub) == ERROR_CODE:
                    given = out[key]
                    out[key], name = self.error_code_of(given)
                    if isinstance(given, str) or ERROR_NAME_KEY not in out:
                        out[ERROR_NAME_KEY] = name
                else:
                    out[key] = self._answer(sub, out[key])
            return out
        return value

    def _kind(self, spec: Mapping[str, Any]) -> str:
        kind = spec["type"]
        while kind in self.types:
            kind = self.types[kind]["type"]
        return str(kind)

    def error_code_of(self, value: Any) -> tuple[int, str]:
        """(code, name) of an errorCode field: a name ("" for none) gets its
        code (0 for none); a code already given stays as it is."""
        if isinstance(value, int) and not isinstance(value, bool):
            return value, self.error_name_of(value)
        name = str(value or "")
        if not name:
            return 0, ""
        code = self.code_of(name)
        if code is None:
            log.error("Error name %r has no code in the schema", name)
            return self.errors["GeneralException"], name
        return code, name

    # Errors

    def code_of(self, name: str) -> int | None:
        return self.errors.get(name)

    def error_name_of(self, code: int) -> str:
        """The name of an error code ("" for 0 or a code of no error)."""
        for name, number in self.errors.items():
            if number == code:
                return name
        return ""


class _StrictLoader(yaml.SafeLoader):
    """A safe loader that refuses duplicate keys (YAML would keep the last)."""

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                line = key_node.start_mark.line + 1
                raise ValueError(f"Schema: duplicate key {key!r} at line {line}")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _item_spec(spec: Mapping[str, Any]) -> Mapping[str, Any]:
    """The spec of a list's or a map's items (``items: TYPE`` or a spec)."""
    items = spec.get("items", "any")
    return items if isinstance(items, Mapping) else {"type": items}


def spec_text(spec: Mapping[str, Any]) -> str:
    """A result type as one line of text: ``TaskStatus``, ``{taskID: TaskStatus}``."""
    kind = spec["type"]
    if kind == "map":
        return f"{{{spec.get('key', 'key')}: {spec_text(_item_spec(spec))}}}"
    if kind == "list":
        return f"[{spec_text(_item_spec(spec))}]"
    return str(kind)
