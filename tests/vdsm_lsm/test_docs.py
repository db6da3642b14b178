"""The committed API reference is generated from the schema."""

from __future__ import annotations

import os

from vdsm_lsm import api_schema, docs

TOP = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))


def test_committed_reference_is_fresh():
    with open(os.path.join(TOP, "docs", "api.md"), encoding="utf-8") as f:
        committed = f.read()
    assert committed == docs.render(api_schema.load()), "docs/api.md is stale: run make docs"


def test_reference_lists_every_verb_and_error():
    api = api_schema.load()
    text = docs.render(api)
    for name in api.verbs:
        assert f"`{name}`" in text
    for name in api.errors:
        assert f"`{name}`" in text
