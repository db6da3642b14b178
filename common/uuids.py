"""UUIDs as the API and the storage layout use them: RFC 4122 text.

One pattern for every package: the schema validates requests with it, and
storage checks again wherever a value becomes a path or an LV name.
``fullmatch`` (not ``match`` with ``$``, which accepts a trailing newline).
"""

from __future__ import annotations

import re

# "None" where a UUID is expected: the parent of a base volume.
BLANK_UUID = "00000000-0000-0000-0000-000000000000"

_PATTERN = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
_ANY_CASE = re.compile(_PATTERN, re.IGNORECASE)
_CANONICAL = re.compile(_PATTERN)


def is_uuid(value: object) -> bool:
    """RFC 4122 text in either case (what a caller may send)."""
    return isinstance(value, str) and _ANY_CASE.fullmatch(value) is not None


def is_canonical(value: object) -> bool:
    """Lowercase RFC 4122 text (what the schema passes on to handlers)."""
    return isinstance(value, str) and _CANONICAL.fullmatch(value) is not None
