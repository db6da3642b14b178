"""Rules for values a hostile client sends, and safe excerpts of them.

:mod:`rpc.schema` validates every param with these: a string is one line of
text, integers are bounded, nesting is capped, and an error message shows a
bounded excerpt of whatever it was given.  Each rule answers a problem as
text (the schema raises ``InvalidParams`` with it) and never raises itself,
whatever the value: a list nested 100,000 deep is not recursed into, an
integer of 100,000 digits is not converted to text (Python refuses more
than 4300 digits), a control character is never echoed.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from rpc import errors

# How deep a value may nest lists and objects.
MAX_DEPTH = 32
TOO_DEEP = f"nested more than {MAX_DEPTH} levels deep"
# Bounds of int and size params whose spec gives none: a 64-bit signed
# value (what a file offset, a size or a C int64 holds).
INT_MIN = -(2**63)
INT_MAX = 2**63 - 1
# Characters a string may not hold: C0 and C1 controls, DEL, and the line and
# paragraph separators (str.splitlines() breaks on all of them, so a name
# holding one could add a line to KEY=VALUE metadata).
_FORBIDDEN_RE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def text_problem(text: str) -> str:
    """What makes text unfit to be one line of text ("" if nothing): a
    control character or line break, or a lone surrogate (JSON ``"\\ud800"``:
    it cannot be written as UTF-8)."""
    bad = _FORBIDDEN_RE.search(text)
    if bad is not None:
        return f"control character U+{ord(bad.group()):04X} at {bad.start()}"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return f"not valid Unicode text at {e.start}"
    return ""


def check_depth(value: Any, where: str, depth: int = 0) -> None:
    """Refuse (InvalidParams) a value nesting lists and objects more than
    MAX_DEPTH deep; depth: levels above it already.  Walked without recursion."""
    stack = [(value, depth + 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, (list, tuple)):
            children = list(item)
        elif isinstance(item, Mapping):
            children = list(item.values())
        else:
            continue
        if level > MAX_DEPTH:
            raise errors.InvalidParams(f"{where}: {TOO_DEEP}")
        stack.extend((child, level + 1) for child in children)


def json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def short(value: Any, limit: int = 60) -> str:
    """A bounded excerpt of any value, for a message."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 200:
        text = f"<integer of {value.bit_length()} bits>"
    elif isinstance(value, (str, bytes)):
        text = repr(value[:limit])
    elif value is None or isinstance(value, (bool, int, float)):
        text = repr(value)
    elif isinstance(value, (list, tuple)):
        text = f"<array of {len(value)} item(s)>"
    elif isinstance(value, Mapping):
        text = f"<object of {len(value)} key(s)>"
    else:
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def names(keys: Any) -> str:
    """Some of a request's unknown keys, sorted, for a message."""
    keys = list(keys)
    shown = sorted(
        k[:40] if isinstance(k, str) and k.isprintable() else short(k, 40) for k in keys[:1000]
    )
    more = len(keys) - 5
    return ", ".join(shown[:5]) + (f" and {more} more" if more > 0 else "")
