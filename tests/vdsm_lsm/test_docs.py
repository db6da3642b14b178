"""The committed API reference is generated from the schema."""

from __future__ import annotations

import os

import pytest

from rpc import schema
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


def test_reference_lists_the_events_and_the_transport():
    api = api_schema.load()
    text = docs.render(api)
    assert {"|virt|VM_status|<vmId>", "|virt|VM_replication|<vmId>",
            "|storage|task_finished|<taskID>"} <= set(api.events)
    for name in api.events:
        assert f"### `{name}`" in text
    for destination in ("jms.topic.vdsm_requests", "jms.topic.vdsm_irs_requests",
                        "jms.topic.vdsm_responses", "jms.topic.vdsm_irs_responses",
                        "jms.queue.events"):
        assert f"`{destination}`" in text
    assert "\n### Limits\n" in text and "-32602" in text


def test_compatibility_table_has_every_verb():
    api = api_schema.load()
    table = docs.compatibility(api)
    for name, verb in api.verbs.items():
        rows = [row for row in table if row.startswith(f"| `{name}` |")]
        assert len(rows) == (0 if verb.target else 1), name
    # The marks it is made of are the ones the schema's header describes.
    marks = {p.spec.get("vdsm") for v in api.verbs.values() for p in v.params}
    assert {"ours", "ignored"} <= marks


def test_event_naming_an_unknown_type_refused():
    with pytest.raises(ValueError, match="unknown type"):
        schema.Schema({"events": {"|a|b|<id>": {"params": {"x": {"type": "nope"}}}}})
