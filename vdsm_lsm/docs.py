"""Generates the API reference (Markdown) from the schema: ``make docs``."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from rpc import schema
from vdsm_lsm import api_schema


def _type_text(spec: Any) -> str:
    if not isinstance(spec, dict):
        return f"`{spec}`"
    kind = spec["type"]
    if kind == "enum":
        return " \\| ".join(f"`{v}`" for v in spec["values"])
    if kind == "list":
        return f"list of {_type_text(spec.get('items', 'any'))}"
    return f"`{kind}`"


def _param_row(name: str, spec: dict[str, Any]) -> str:
    if "default" in spec:
        need = f"default `{json.dumps(spec['default'])}`"
    elif spec.get("required", True):
        need = "required"
    else:
        need = "optional"
    limits = []
    if "min" in spec:
        limits.append(f"min {spec['min']}")
    if "max" in spec:
        limits.append(f"max {spec['max']}")
    doc = "; ".join(filter(None, [spec.get("doc", ""), ", ".join(limits)]))
    return f"| `{name}` | {_type_text(spec)} | {need} | {doc} |"


def render(api: schema.Schema) -> str:
    out = [
        "# vdsm-lsm API reference",
        "",
        "Generated from `vdsm_lsm/api.yml` by `make docs`; do not edit by hand.",
        "",
        "JSON-RPC 2.0 over HTTP `POST /` on the unix socket and TCP port 54321.",
        "Params are passed by name. Sizes are bytes (an integer or a string of digits).",
        "",
        "## Verbs",
        "",
    ]
    for name, verb in api.verbs.items():
        if verb.target:
            continue
        out.append(f"### `{name}`")
        out.append("")
        if verb.doc:
            out.extend([verb.doc, ""])
        if verb.params:
            out.append("| param | type | | |")
            out.append("|---|---|---|---|")
            out.extend(_param_row(p.name, dict(p.spec)) for p in verb.params)
            out.append("")
        out.append(f"Returns: {verb.returns}")
        out.append("")
    out.extend(["## Aliases", "", "| alias | verb | params |", "|---|---|---|"])
    for name, verb in api.verbs.items():
        if verb.target and verb.param_map is not None:
            mapping = ", ".join(f"`{a}`→`{b}`" for a, b in verb.param_map.items())
            out.append(f"| `{name}` | `{verb.target}` | {mapping} |")
    out.extend(["", "## Types", ""])
    for name, spec in api.types.items():
        out.append(f"### `{name}`")
        out.append("")
        if spec.get("doc"):
            out.extend([spec["doc"], ""])
        out.append("| key | type | | |")
        out.append("|---|---|---|---|")
        out.extend(_param_row(k, dict(v)) for k, v in spec.get("properties", {}).items())
        out.append("")
    out.extend(["## Errors", "", "| code | name | meaning |", "|---|---|---|"])
    for name, code in sorted(api.errors.items(), key=lambda item: item[1]):
        out.append(f"| {code} | `{name}` | {api.error_messages[name]} |")
    out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("-o", "--output", default="-", help="file to write (default stdout)")
    args = parser.parse_args(argv)
    text = render(api_schema.load())
    if args.output == "-":
        sys.stdout.write(text)
    else:
        with open(args.output, "w", encoding="utf-8") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
