"""The schema: validation of params, aliases, and the error table."""

from __future__ import annotations

import importlib
import pkgutil

import pytest
import yaml

from rpc import errors, schema
from vdsm_lsm import app

UUID = "4c3a1f0e-3b9a-4d0f-9e59-5c4b7a6e8d21"
UUID2 = "e0f6a4a2-8a1d-4a55-b1cf-6a0c49c9b8b7"


@pytest.fixture(scope="module")
def api() -> schema.Schema:
    return app.load_schema()


# Every verb of DESIGN.md section 4, and the seed's aliases.
DESIGN_VERBS = """
Host.ping2 Host.getCapabilities Host.getDeviceList Host.getVMList Host.getAllTasksStatuses
Host.getAllTasksInfo StorageDomain.create StorageDomain.getInfo StorageDomain.getStats
StorageDomain.getImages StorageDomain.getVolumes StorageDomain.format StoragePool.create
StoragePool.connect StoragePool.disconnect StoragePool.spmStart StoragePool.spmStop
StoragePool.getSpmStatus StoragePool.getInfo StoragePool.attachStorageDomain
StoragePool.detachStorageDomain StoragePool.destroy Volume.create Volume.getInfo Volume.delete
Image.prepare Image.teardown Image.cloneStructure Image.syncData Image.delete Task.getStatus
Task.getInfo Task.clear Task.stop VM.create VM.destroy VM.cont VM.getStats VM.snapshot
VM.diskReplicateStart VM.diskReplicateFinish
StoragePool.connectStorageServer StoragePool.disconnectStorageServer Volume.setLegality
Image.verify
VM.migrate VM.migrationCreate VM.getMigrationStatus VM.migrateCancel
cloneImageStructure syncImageData diskReplicateStart diskReplicateFinish
""".split()


def test_schema_has_every_design_verb(api):
    assert sorted(api.verbs) == sorted(DESIGN_VERBS)


def test_error_codes_are_unique(api):
    codes = list(api.errors.values())
    duplicates = {c for c in codes if codes.count(c) > 1}
    assert not duplicates


def test_vdsm_error_numbers(api):
    expected = {
        "noVM": 1, "exist": 4, "imageErr": 13, "unavail": 40, "changeDisk": 41, "noimpl": 44,
        "replicaErr": 55, "ReplicationNotInProgress": 88, "RecoveryInProgress": 99,
        "GeneralException": 100, "VolumeDoesNotExist": 201, "VolumeAlreadyExists": 212,
        "StoragePoolUnknown": 309, "StorageDomainDoesNotExist": 358, "UnknownTask": 401,
        "TaskNotFinished": 403, "SpmStatusError": 654,
        "ParseError": -32700, "InvalidRequest": -32600, "MethodNotFound": -32601,
        "InvalidParams": -32602,
    }
    for name, code in expected.items():
        assert api.errors[name] == code, name


def test_own_codes_never_general(api):
    own = [n for n, c in api.errors.items() if c >= 2000]
    assert own and api.errors["GeneralException"] == 100


def test_duplicate_key_in_schema_refused(tmp_path):
    path = tmp_path / "api.yml"
    path.write_text("errors:\n  a: {code: 1}\n  a: {code: 2}\n")
    with pytest.raises(ValueError, match="duplicate key"):
        schema.Schema.load(str(path))


def test_error_entry_with_stray_keys_refused():
    # An unquoted comma in a flow mapping splits the message into a new key.
    doc = yaml.safe_load("errors:\n  E: {code: 1, message: one, two}\n")
    with pytest.raises(ValueError, match="must be"):
        schema.Schema(doc)


def test_unknown_type_in_schema_refused():
    with pytest.raises(ValueError, match="unknown type"):
        schema.Schema({"verbs": {"A.b": {"params": {"x": {"type": "nope"}}}}})


def _error_classes() -> list[type]:
    for package in ("rpc", "storage", "virt", "vdsm_lsm"):
        pkg = importlib.import_module(package)
        for info in pkgutil.iter_modules(pkg.__path__):
            importlib.import_module(f"{package}.{info.name}")
    seen, todo = [], [errors.Error]
    while todo:
        cls = todo.pop()
        seen.append(cls)
        todo.extend(cls.__subclasses__())
    return seen


def test_every_error_class_has_a_code(api):
    missing = [
        f"{c.__module__}.{c.__name__} ({c.name})"
        for c in _error_classes()
        if c.__module__.split(".")[0] != "tests" and c.name not in api.errors
    ]
    assert not missing


@pytest.mark.parametrize(
    "params, fragment",
    [
        ({"storagedomainID": "not-a-uuid"}, "not a UUID"),
        ({"storagedomainID": "../../etc/passwd"}, "not a UUID"),
        ({"storagedomainID": "4c3a1f0e-3b9a-4d0f-9e59-5c4b7a6e8d21/../x"}, "not a UUID"),
        ({"storagedomainID": 12}, "not a UUID"),
        ({}, "missing param storagedomainID"),
        ({"storagedomainID": UUID, "extra": 1}, "unknown param"),
    ],
)
def test_invalid_params(api, params, fragment):
    with pytest.raises(errors.InvalidParams, match=fragment):
        api.validate("StorageDomain.getInfo", params)


def test_uuid_answered_lowercase(api):
    _, kwargs = api.validate("StorageDomain.getInfo", {"storagedomainID": UUID.upper()})
    assert kwargs == {"storagedomain_id": UUID}


def _volume_create(**over):
    params = {
        "storagepoolID": UUID, "storagedomainID": UUID, "imageID": UUID, "volumeID": UUID2,
        "size": 1 << 30, "volFormat": "COW", "preallocate": "SPARSE",
    }
    params.update(over)
    return params


def test_defaults_and_snake_case(api):
    target, kwargs = api.validate("Volume.create", _volume_create())
    assert target == "Volume.create"
    assert kwargs["src_vol_uuid"] == schema.BLANK_UUID
    assert kwargs["desc"] == ""
    assert "initial_size" not in kwargs
    assert kwargs["vol_format"] == "COW"


def test_size_accepts_digit_strings(api):
    _, kwargs = api.validate("Volume.create", _volume_create(size="1073741824"))
    assert kwargs["size"] == 1073741824


@pytest.mark.parametrize(
    "size, fragment",
    [(-1, "negative"), ("-5", "expected a size"), ("1e9", "expected a size"), (True, "size"),
     (0, "below the minimum"), (1 << 60, "above the maximum"), (1.5, "expected a size")],
)
def test_bad_sizes(api, size, fragment):
    with pytest.raises(errors.InvalidParams, match=fragment):
        api.validate("Volume.create", _volume_create(size=size))


def test_unknown_enum(api):
    with pytest.raises(errors.InvalidParams, match="not one of COW, RAW"):
        api.validate("Volume.create", _volume_create(volFormat="QCOW"))


def test_wrong_types(api):
    with pytest.raises(errors.InvalidParams, match="expected an integer"):
        api.validate("StoragePool.connect", {"storagepoolID": UUID, "hostID": "1",
                                             "masterSdUUID": UUID})
    with pytest.raises(errors.InvalidParams, match="expected a list"):
        api.validate("StoragePool.create", {"storagepoolID": UUID, "name": "p",
                                            "masterSdUUID": UUID, "domainList": UUID})
    with pytest.raises(errors.InvalidParams, match=r"domainList\[1\]: not a UUID"):
        api.validate("StoragePool.create", {"storagepoolID": UUID, "name": "p",
                                            "masterSdUUID": UUID, "domainList": [UUID, "x"]})


def test_nested_types_checked(api):
    drive = {"poolID": UUID, "domainID": UUID, "imageID": UUID, "volumeID": "bad"}
    with pytest.raises(errors.InvalidParams, match=r"srcDisk.volumeID: not a UUID"):
        api.validate("VM.diskReplicateStart", {"vmID": UUID, "srcDisk": drive, "dstDisk": drive})
    drive["volumeID"] = UUID
    drive["evil"] = 1
    with pytest.raises(errors.InvalidParams, match="unknown key"):
        api.validate("VM.diskReplicateStart", {"vmID": UUID, "srcDisk": drive, "dstDisk": drive})


def test_vm_params_nested_drives(api):
    params = {
        "vmID": UUID,
        "vmParams": {
            "vmName": "t", "memSize": 128, "kernel": "/k",
            "drives": [{"poolID": UUID, "domainID": UUID, "imageID": UUID, "volumeID": UUID,
                        "format": "cow"}],
        },
    }
    _, kwargs = api.validate("VM.create", params)
    drive = kwargs["vm_params"]["drives"][0]
    assert drive["iface"] == "virtio" and drive["propagateErrors"] == "off"
    params["vmParams"]["accel"] = "xen"
    with pytest.raises(errors.InvalidParams, match="accel"):
        api.validate("VM.create", params)


def test_alias_maps_params(api):
    target, kwargs = api.validate(
        "cloneImageStructure",
        {"spUUID": UUID, "sdUUID": UUID, "imgUUID": UUID2, "dstSdUUID": UUID2},
    )
    assert target == "Image.cloneStructure"
    assert kwargs == {"storagepool_id": UUID, "storagedomain_id": UUID, "image_id": UUID2,
                      "dst_sd_uuid": UUID2}


def test_alias_fills_target_defaults(api):
    drive = {"poolID": UUID, "domainID": UUID, "imageID": UUID, "volumeID": UUID}
    target, kwargs = api.validate(
        "diskReplicateStart", {"vmId": UUID, "srcDisk": drive, "dstDisk": drive}
    )
    assert target == "VM.diskReplicateStart"
    assert kwargs["need_extend"] is True and kwargs["bandwidth"] == 0


def test_positional_params_refused(api):
    with pytest.raises(errors.InvalidParams, match="by name"):
        api.validate("StorageDomain.getInfo", [UUID])
    assert api.validate("Host.ping2", []) == ("Host.ping2", {})


def test_unknown_method(api):
    with pytest.raises(errors.MethodNotFound):
        api.validate("Host.nope", {})


def test_handler_names():
    assert schema.handler_name("Volume.create") == "volume_create"
    assert schema.handler_name("StoragePool.spmStart") == "storage_pool_spm_start"
    assert schema.handler_name("Host.getVMList") == "host_get_vm_list"
    assert schema.snake_case("dstSdUUID") == "dst_sd_uuid"


def test_schema_file_is_plain_yaml():
    with open(app.SCHEMA_PATH) as f:
        doc = yaml.safe_load(f)
    assert set(doc) >= {"verbs", "errors", "types"}


# Result types: task statuses carry error names, the caller gets codes.


def _status(code: object, **extra: object) -> dict[str, object]:
    return {"taskID": UUID, "taskState": "finished", "taskResult": "cleanFailure",
            "code": code, "message": "m", "progress": 100, **extra}


def test_task_status_error_name_answered_as_its_code(api):
    answer = api.answer("Task.getStatus", _status("VolumeDoesNotExist"))
    assert answer == _status(201, error="VolumeDoesNotExist")


def test_task_status_without_error_answers_zero(api):
    answer = api.answer("Task.getStatus", _status(""))
    assert answer["code"] == 0 and answer["error"] == ""


def test_task_status_with_a_code_already_kept(api):
    # What a handler that still converts itself gives: left as it is.
    given = _status(411, error="TaskAborted")
    assert api.answer("Task.getStatus", given) == given
    assert api.answer("Task.getStatus", _status(0))["error"] == ""


def test_every_status_of_the_map_answered(api):
    other = "e0f6a4a2-8a1d-4a55-b1cf-6a0c49c9b8b7"
    answer = api.answer(
        "Host.getAllTasksStatuses", {UUID: _status("TaskAborted"), other: _status("")}
    )
    assert (answer[UUID]["code"], answer[UUID]["error"]) == (411, "TaskAborted")
    assert (answer[other]["code"], answer[other]["error"]) == (0, "")


def test_error_name_without_code_answered_as_general(api, caplog):
    answer = api.answer("Task.getStatus", _status("NoSuchError"))
    assert (answer["code"], answer["error"]) == (100, "NoSuchError")
    assert "NoSuchError" in caplog.text


def test_results_of_untyped_verbs_unchanged(api):
    result = {"code": "VolumeDoesNotExist"}
    assert api.answer("Volume.getInfo", result) is result


def test_typed_returns_documented_as_text(api):
    assert api.verbs["Task.getStatus"].returns == "TaskStatus"
    assert api.verbs["Host.getAllTasksStatuses"].returns == "{taskID: TaskStatus}"
    assert api.verbs["Task.getInfo"].returns == "{id, verb}"


def test_error_code_refused_in_params():
    doc = {
        "types": {"T": {"type": "dict", "properties": {"c": {"type": "errorCode"}}}},
        "verbs": {"A.b": {"params": {"x": {"type": "T"}}}},
    }
    with pytest.raises(ValueError, match="results only"):
        schema.Schema(doc)
    doc["verbs"] = {"A.b": {"params": {}, "returns": {"type": "T"}}}
    assert schema.Schema(doc).verbs["A.b"].result == {"type": "T"}


def test_map_params_check_every_value():
    api = schema.Schema({"verbs": {"A.b": {"params": {"m": {"type": "map", "items": "uuid"}}}}})
    assert api.validate("A.b", {"m": {"x": UUID.upper()}}) == ("A.b", {"m": {"x": UUID}})
    with pytest.raises(errors.InvalidParams, match=r"m\.y: not a UUID"):
        api.validate("A.b", {"m": {"x": UUID, "y": "z"}})
    with pytest.raises(errors.InvalidParams, match="expected an object"):
        api.validate("A.b", {"m": [UUID]})


# A hostile client (issue 13): every class of bad input is InvalidParams.


@pytest.mark.parametrize(
    "value",
    [UUID + "\n", "\n" + UUID, UUID + " ", UUID + "\x00", "{" + UUID + "}",
     "urn:uuid:" + UUID, UUID.replace("-", ""), "\u0664" + UUID[1:], UUID + "\u2028"],
)
def test_uuid_is_exactly_rfc4122_text(api, value):
    # A `$`-anchored pattern would take the trailing newline.
    with pytest.raises(errors.InvalidParams, match="not a UUID"):
        api.validate("StorageDomain.getInfo", {"storagedomainID": value})


@pytest.mark.parametrize(
    "text",
    ["a\x00b", "a\nb", "a\n", "a\rb", "\x1b[31m", "a\tb", "a\x7fb", "a\x85b", "a\u2028b",
     "a\u2029b", "a\x0bb", "a\x0cb"],
)
def test_strings_are_one_line_of_text(api, text):
    # A name becomes a line of domain metadata: "x\nROLE=Master" would add a key.
    params = {"storagedomainID": UUID, "domainType": "file", "typeArgs": {"path": "/d"},
              "name": text}
    with pytest.raises(errors.InvalidParams, match=r"name: control character U\+"):
        api.validate("StorageDomain.create", params)


def test_strings_must_be_encodable(api):
    params = {"storagedomainID": UUID, "domainType": "file", "typeArgs": {"path": "/d\ud800"},
              "name": "n"}
    with pytest.raises(errors.InvalidParams, match="typeArgs.path: not valid Unicode"):
        api.validate("StorageDomain.create", params)
    params["typeArgs"] = {"path": "/d/\u00e9\u4e2d\U0001f600"}  # any real text is fine
    _, kwargs = api.validate("StorageDomain.create", params)
    assert kwargs["type_args"]["path"].endswith("\U0001f600")


@pytest.mark.parametrize(
    "host_id, fragment",
    [(True, "expected an integer"), (1.0, "expected an integer"),
     (float("nan"), "expected an integer"), (2**200, "above the maximum"),
     (10**5000, "<integer of 16610 bits> is above"), (-(2**200), "below the minimum")],
    ids=["true", "float", "nan", "2**200", "10**5000", "-2**200"],
)
def test_bad_integers(api, host_id, fragment):
    params = {"storagepoolID": UUID, "hostID": host_id, "masterSdUUID": UUID}
    with pytest.raises(errors.InvalidParams, match=fragment):
        api.validate("StoragePool.connect", params)


@pytest.mark.parametrize("size", [2**200, 10**5000, "9" * 19, 2**63],
                         ids=["2**200", "10**5000", "19 nines", "2**63"])
def test_sizes_are_bounded_without_a_max(size):
    api = schema.Schema({"verbs": {"A.b": {"params": {"s": {"type": "size"}}}}})
    with pytest.raises(errors.InvalidParams, match="above the maximum"):
        api.validate("A.b", {"s": size})
    assert api.validate("A.b", {"s": 2**63 - 1}) == ("A.b", {"s": 2**63 - 1})


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf"), 2**200, True])
def test_numbers_are_finite(value):
    api = schema.Schema({"verbs": {"A.b": {"params": {"n": {"type": "number"}}}}})
    with pytest.raises(errors.InvalidParams, match="n: "):
        api.validate("A.b", {"n": value})
    assert api.validate("A.b", {"n": 0.5}) == ("A.b", {"n": 0.5})


@pytest.mark.parametrize("value", ["cow", "Cow", " COW", "COW ", "COW\n", ["COW"], "", None])
def test_enum_values_match_exactly(api, value):
    with pytest.raises(errors.InvalidParams, match="volFormat: .* is not one of COW, RAW"):
        api.validate("Volume.create", _volume_create(volFormat=value))


def _deep(depth, make):
    value = make(None)
    for _ in range(depth):
        value = make(value)
    return value


@pytest.mark.parametrize("make", [lambda v: [v], lambda v: {"k": v}])
def test_nesting_is_capped_without_recursion(make):
    # 100,000 levels: neither validation nor the error message recurses.
    api = schema.Schema({"verbs": {"A.b": {"params": {
        "any": {"type": "any", "required": False},
        "free": {"type": "dict", "required": False},
        "u": {"type": "uuid", "required": False}}}}})
    deep = _deep(100_000, make)
    for name in ("any", "u"):
        with pytest.raises(errors.InvalidParams, match=f"{name}: "):
            api.validate("A.b", {name: deep})
    with pytest.raises(errors.InvalidParams, match="nested more than 32 levels"):
        api.validate("A.b", {"free": {"k": deep}})
    shallow = _deep(schema.MAX_DEPTH - 1, make)
    assert api.validate("A.b", {"any": shallow})[1] == {"any": shallow}


def test_a_type_that_names_itself_is_capped():
    api = schema.Schema({
        "types": {"Tree": {"type": "dict", "properties": {
            "child": {"type": "Tree", "required": False}}}},
        "verbs": {"A.b": {"params": {"t": {"type": "Tree"}}}},
    })
    with pytest.raises(errors.InvalidParams, match="nested more than 32 levels"):
        api.validate("A.b", {"t": _deep(100_000, lambda v: {} if v is None else {"child": v})})
    assert api.validate("A.b", {"t": _deep(10, lambda v: {} if v is None else {"child": v})})


def test_unknown_keys_are_named_briefly(api):
    params = {"storagedomainID": UUID, **{f"k{i}\n": i for i in range(10_000)}}
    with pytest.raises(errors.InvalidParams) as info:
        api.validate("StorageDomain.getInfo", params)
    message = str(info.value)
    assert "and 9995 more" in message and "\n" not in message and len(message) < 400


def test_lists_and_dicts_are_not_interchangeable(api):
    drive = {"poolID": UUID, "domainID": UUID, "imageID": UUID, "volumeID": UUID}
    with pytest.raises(errors.InvalidParams, match="srcDisk: expected an object, got array"):
        api.validate("VM.diskReplicateStart", {"vmID": UUID, "srcDisk": [drive],
                                               "dstDisk": drive})
    with pytest.raises(errors.InvalidParams, match="domainList: expected a list, got object"):
        api.validate("StoragePool.create", {"storagepoolID": UUID, "name": "p",
                                            "masterSdUUID": UUID, "domainList": {"0": UUID}})
