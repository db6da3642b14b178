"""The API schema of this daemon, ``vdsm_lsm/api.yml``, loaded once.

The one place that knows where the schema lives.  The daemon's wiring
(:mod:`vdsm_lsm.app`), the client command (:mod:`vdsm_lsm.cli`), the
move-disk flow and the reference generator (:mod:`vdsm_lsm.docs`) all read
it from here; this module imports only :mod:`rpc.schema`, so reading the
schema never pulls in libvirt, pyudev or the storage and virt packages.
"""

from __future__ import annotations

import functools
import os

from rpc import schema

SCHEMA_PATH = os.path.join(os.path.dirname(__file__), "api.yml")


@functools.cache
def load() -> schema.Schema:
    """The schema, parsed and checked on first use; the same object afterwards."""
    return schema.Schema.load(SCHEMA_PATH)


def code_of(name: str) -> int:
    """The code of the schema error ``name``; a name the schema lacks is a bug."""
    code = load().code_of(name)
    if code is None:
        raise KeyError(f"no error {name!r} in {SCHEMA_PATH}")
    return code
