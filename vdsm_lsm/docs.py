"""Generates the API reference (Markdown) from the schema: ``make docs``.

Everything in ``docs/api.md`` comes from the schema (verbs, types, events,
errors, and the VDSM compatibility table from its ``vdsm:`` notes) or from
the transport's own constants (destinations in :mod:`rpc.stomp_session`,
limits in :class:`rpc.connection.Limits`), so the reference cannot drift
from the code; ``tests/vdsm_lsm/test_docs.py`` checks it is fresh.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator, Mapping
from typing import Any

from rpc import connection, schema, stomp, stomp_session
from vdsm_lsm import api_schema

# Codes of our own errors (VDSM's numbers elsewhere: tests/rpc/test_vdsm_codes.py).
OWN_CODES = (3100, 3999)


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
    doc = "; ".join(filter(None, [spec.get("doc", ""), ", ".join(limits), _vdsm_text(spec)]))
    return f"| `{name}` | {_type_text(spec)} | {need} | {doc} |"


def _vdsm_text(spec: Mapping[str, Any]) -> str:
    mark = spec.get("vdsm")
    if mark == "ours":
        return "not VDSM's (ours)"
    if mark == "ignored":
        return "VDSM's, accepted and ignored"
    return f"VDSM: {mark}" if mark else ""


def _seconds(value: float) -> str:
    return f"{value:g} s"


def _mib(value: int) -> str:
    return f"{value // (1024 * 1024)} MiB" if value >= 1024 * 1024 else f"{value // 1024} KiB"


def transport() -> list[str]:
    """The transport section: HTTP and STOMP on the same listeners."""
    lim = connection.Limits()
    s = stomp_session
    return [
        "## Transport",
        "",
        "The daemon listens on a unix socket (`[addresses] unix_socket`, default",
        "`/run/vdsm-lsm/api.sock`, mode 0660) and on TCP (`[addresses] management_ip` and",
        "`management_port`, default `127.0.0.1:54321`). Every listener speaks two protocols,",
        "told apart by the first bytes a client sends (after the TLS handshake when TLS is",
        "on): a STOMP command line (" + ", ".join(f"`{c}`" for c in stomp.OPENING_COMMANDS)
        + ") or a bare EOL (a heart-beat) means STOMP, anything else HTTP.",
        "",
        "### HTTP JSON-RPC",
        "",
        "`POST /` with a `Content-Length` (or a chunked body) carries one JSON-RPC 2.0",
        "request or a batch; the answer is `200` with the JSON-RPC response (empty for",
        "notifications). Connections are kept alive. Other paths are 404, other methods",
        "501, a body without a length 411, a malformed request 400. This is what",
        "`vdsm-lsm-client` speaks by default; it has no events (`move-disk` polls over",
        "HTTP; with `--stomp` the client speaks STOMP and `move-disk` waits on events).",
        "",
        "### STOMP 1.2 (VDSM's wire protocol)",
        "",
        "What VDSM's clients speak (the engine's vdsm-jsonrpc-java, `vdsm-client`):",
        "",
        "- `CONNECT` or `STOMP` with `accept-version` offering 1.2 is answered `CONNECTED`",
        "  `version:1.2` with the negotiated `heart-beat`. `SUBSCRIBE` and `SEND` are also",
        "  accepted before `CONNECT` (the engine subscribes first), but `CONNECT` must come",
        f"  within {_seconds(lim.request_timeout)}.",
        f"- Requests: `SEND` to `{s.REQUESTS}` or `{s.IRS_REQUESTS}` (or a `.`-child of",
        "  either), one JSON-RPC request or a batch per frame.",
        "- Replies: a `MESSAGE` to the request's `reply-to` destination, or without one",
        f"  (the engine) to `{s.RESPONSES}` / `{s.IRS_RESPONSES}` after the request's",
        "  destination, carrying the `subscription` id of each of the client's",
        "  subscriptions to it (or to a `.`-parent of it). A reply nobody is subscribed",
        "  to is dropped.",
        f"- Events: `SUBSCRIBE` to `{s.EVENTS}` to receive the [events](#events) as",
        "  JSON-RPC notifications in `MESSAGE` frames.",
        "- Heart-beats: the server sends a heart-beat (an EOL) whenever it has sent nothing",
        "  for the interval the client asked for in `heart-beat` (at least",
        f"  {_seconds(lim.min_heartbeat)}), so a long call does not look like a dead",
        "  connection (VDSM's client resets one silent for 30 s). A client that promised",
        "  heart-beats and stays silent twice its interval plus a second is disconnected.",
        "- `UNSUBSCRIBE`; `ACK`/`NACK` are accepted and ignored (subscriptions are",
        "  `ack:auto`); `receipt` is honoured on every frame; `DISCONNECT` is answered once",
        "  the requests in flight are answered. Transactions are refused.",
        "- `ERROR` frames: a frame that cannot be parsed (unknown command, bad header or",
        "  escape, too large, not received in time) gets an `ERROR` and the connection is",
        "  closed; a frame that parses but cannot be served (missing header, unknown",
        "  destination, a subscription id in use) gets an `ERROR` and the connection stays.",
        "- Frames may carry `content-length` or end at the first NUL; header values use",
        "  STOMP 1.2's escapes (`\\c \\n \\r \\\\`).",
        "",
        "### Limits",
        "",
        "Fixed in `rpc/connection.py` (`Limits`); one event loop serves every connection",
        f"and {lim.workers} worker threads run the requests.",
        "",
        "| limit | value | when reached |",
        "|---|---|---|",
        f"| connections | {lim.max_connections} | the connection idle the longest is closed to "
        "make room; only when all are busy is the new one refused |",
        f"| request or frame body | {_mib(lim.max_request)} | refused from its declared length, "
        "before it is read: HTTP 413, STOMP `ERROR` |",
        f"| HTTP request line and headers | {_mib(lim.max_header)} | 431 |",
        f"| STOMP header block | {_mib(stomp.MAX_HEADER_BYTES)}, {stomp.MAX_HEADERS} headers | "
        "`ERROR`, closed |",
        f"| sending one request (headers and body, or one frame) | "
        f"{_seconds(lim.request_timeout)} from its first byte | HTTP 408, STOMP `ERROR` |",
        f"| TLS handshake | {_seconds(lim.handshake_timeout)} | closed |",
        f"| an idle HTTP keep-alive connection | {_seconds(lim.idle_timeout)} | closed "
        "(STOMP connections stay, as with VDSM) |",
        f"| STOMP requests running per connection | {lim.max_inflight} | further frames "
        "wait, unread |",
        f"| STOMP subscriptions per connection | {lim.max_subscriptions} | `ERROR` |",
        f"| output the client does not read | {_seconds(lim.write_timeout)} | closed |",
        f"| an event subscriber's backlog | {_mib(lim.max_event_backlog)} | disconnected |",
        f"| request bytes buffered by all connections | {_mib(lim.input_budget)} | "
        "connections buffering a large body wait, unread |",
        "",
        "### TLS",
        "",
        "With `[tls] enabled`, the TCP listener is mutual TLS (TLS 1.2 or later) for both",
        "protocols, as VDSM's port 54321 is: the client must present a certificate signed",
        "by `[tls] ca`, and checks the daemon's `[tls] cert` against its own CA. The daemon",
        "refuses to start with TCP on a non-loopback address without TLS. The unix socket",
        "has no TLS; its file mode guards it.",
        "",
    ]


def events(api: schema.Schema) -> list[str]:
    out = [
        "## Events",
        "",
        "JSON-RPC notifications (no `id`) pushed to STOMP subscribers of",
        f"`{stomp_session.EVENTS}`. The method is the event name with its `<placeholder>`",
        "filled in; every event's params also carry `notify_time` (milliseconds of a",
        "monotonic clock, as VDSM sends).",
        "",
    ]
    for event in api.events.values():
        out.extend([f"### `{event.name}`", ""])
        if event.doc:
            out.extend([event.doc, ""])
        out.extend(["| param | type | | |", "|---|---|---|---|"])
        for param in event.params:
            out.append(_param_row(param.name, dict(param.spec)))
            for key, sub in _properties(api, param.spec):
                out.append(_param_row(f"{param.name}.{key}", dict(sub)))
        out.append("")
    return out


def _properties(api: schema.Schema, spec: Mapping[str, Any]) -> Iterator[tuple[str, Any]]:
    """The properties of a dict spec, or of the named type it is."""
    kind = spec.get("type")
    if kind in api.types:
        spec = api.types[kind]
    yield from (spec.get("properties") or {}).items()


def _marked(api: schema.Schema, name: str, spec: Mapping[str, Any]) -> Iterator[tuple[str, Any]]:
    """(name, vdsm mark) of a param and of the marked properties of its type."""
    yield name, spec.get("vdsm")
    for key, sub in _properties(api, spec):
        if "vdsm" in sub:
            yield f"{name}.{key}", sub["vdsm"]


def compatibility(api: schema.Schema) -> list[str]:
    """The VDSM compatibility table, from the schema's ``vdsm:`` notes."""
    out = [
        "## VDSM compatibility",
        "",
        "The verbs VDSM also has take VDSM's names and params (see",
        "`lib/vdsm/api/vdsm-api.yml` in VDSM). For each verb: VDSM's params that are",
        "honoured, those accepted and ignored, and our additions (optional unless",
        "listed as required above). **Unknown params are refused with -32602**, where",
        "VDSM only logs them: a VDSM param not listed here is not accepted yet.",
        "",
        "| verb | VDSM's params, honoured | accepted, ignored | ours | notes |",
        "|---|---|---|---|---|",
    ]
    for verb in api.verbs.values():
        if verb.target:
            continue
        honoured, ignored, ours, notes = [], [], [], []
        if verb.vdsm is False:
            notes.append("not a VDSM verb")
        elif verb.vdsm:
            notes.append(str(verb.vdsm))
        for param in verb.params:
            for name, mark in _marked(api, param.name, param.spec):
                if mark == "ignored":
                    ignored.append(name)
                elif mark == "ours" or (verb.vdsm is False and name == param.name):
                    ours.append(name)
                elif name == param.name:
                    honoured.append(name)
                    if mark:
                        notes.append(f"`{name}`: {mark}")
        if verb.result is not None:
            ours.extend(
                f"answer: {key}" for key, sub in _properties(api, verb.result)
                if sub.get("vdsm") == "ours"
            )
        cells = [", ".join(f"`{n}`" for n in group) for group in (honoured, ignored, ours)]
        if not verb.params:
            cells[0] = "(no params)"
        out.append(f"| `{verb.name}` | {' | '.join(cells)} | {'; '.join(notes)} |")
    out.append("")
    return out


def render(api: schema.Schema) -> str:
    out = [
        "# vdsm-lsm API reference",
        "",
        "Generated from `vdsm_lsm/api.yml` by `make docs`; do not edit by hand.",
        "",
        "JSON-RPC 2.0 over HTTP (`POST /`) and over STOMP 1.2 (VDSM's wire protocol), both",
        "on the unix socket and on TCP port 54321 (see [Transport](#transport)).",
        "Params are passed by name. Sizes are bytes (an integer or a string of digits).",
        "An unknown, missing or mistyped param is refused with -32602 before any handler",
        "runs (VDSM only logs an unknown one); see [VDSM compatibility](#vdsm-compatibility).",
        "",
    ]
    out.extend(transport())
    out.extend(["## Verbs", ""])
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
    out.extend(events(api))
    out.extend(compatibility(api))
    out.extend([
        "## Errors",
        "",
        'An error is `{"code": N, "message": "..."}`. Where VDSM has the error, the',
        f"name and the code are VDSM's; our own errors are {OWN_CODES[0]}-{OWN_CODES[1]}, a "
        "range no VDSM",
        "module uses. 100 (`GeneralException`) is only for the unexpected.",
        "",
        "| code | name | meaning |",
        "|---|---|---|",
    ])
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
