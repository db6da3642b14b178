"""The schema is loaded once, from vdsm_lsm/api.yml, and names every error code."""

from __future__ import annotations

import os

import pytest

from rpc import schema
from vdsm_lsm import api_schema


def test_the_schema_is_loaded_once_from_the_package():
    assert os.path.isfile(api_schema.SCHEMA_PATH)
    assert api_schema.SCHEMA_PATH.endswith(os.path.join("vdsm_lsm", "api.yml"))
    assert api_schema.load() is api_schema.load()
    assert isinstance(api_schema.load(), schema.Schema)


def test_code_of_names_the_schema_errors():
    api = api_schema.load()
    for name, code in api.errors.items():
        assert api_schema.code_of(name) == code
    with pytest.raises(KeyError, match="noSuchError"):
        api_schema.code_of("noSuchError")
