"""virt/vmparams.py: semantic checks of VM.create's vmParams."""

from __future__ import annotations

import uuid

import pytest

from virt import errors, vmparams

VM_ID = str(uuid.uuid4())


@pytest.fixture
def params(tmp_path):
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"k")
    return {
        "vmName": "vm1",
        "memSize": 128,
        "kernel": str(kernel),
        "kernelArgs": "console=ttyS0",
        "serialLog": str(tmp_path / "serial.log"),
        "drives": [
            {
                "poolID": str(uuid.uuid4()),
                "domainID": str(uuid.uuid4()),
                "imageID": str(uuid.uuid4()),
                "volumeID": str(uuid.uuid4()),
                "format": "cow",
            }
        ],
    }


def test_defaults(params):
    p = vmparams.parse(VM_ID, params, "kvm")
    assert p.accel == "kvm"
    assert p.vcpus == 1
    assert p.initrd is None
    (d,) = p.drives
    assert (d.iface, d.propagate_errors, d.format) == ("virtio", "off", "cow")


def test_accel_and_digit_strings(params):
    p = vmparams.parse(VM_ID, dict(params, accel="tcg", memSize="256", smp="2"), "kvm")
    assert (p.accel, p.memory_mib, p.vcpus) == ("tcg", 256, 2)


@pytest.mark.parametrize(
    "change",
    [
        {"accel": "xen"},
        {"memSize": None},
        {"memSize": True},
        {"smp": 1000},
        {"kernel": "/nonexistent"},
        {"serialLog": "/nonexistent-dir/serial.log"},
        {"vmName": "a/b"},
        {"drives": "vda"},
    ],
)
def test_refused(params, change):
    with pytest.raises(errors.InvalidVMParamsError):
        vmparams.parse(VM_ID, dict(params, **change), "kvm")


@pytest.mark.parametrize(
    "change",
    [
        {"format": "qcow2"},
        {"iface": "ide"},
        {"device": "cdrom"},
        {"propagateErrors": "yes"},
        {"volumeID": "ABC"},
        {"imageID": str(uuid.uuid4()).upper()},
    ],
)
def test_refused_drive(params, change):
    params["drives"][0].update(change)
    with pytest.raises(errors.InvalidVMParamsError):
        vmparams.parse(VM_ID, params, "kvm")


def test_same_image_twice_refused(params):
    params["drives"].append(dict(params["drives"][0]))
    with pytest.raises(errors.InvalidVMParamsError):
        vmparams.parse(VM_ID, params, "kvm")


def test_bad_vm_id():
    with pytest.raises(errors.InvalidVMParamsError):
        vmparams.parse("nope", {}, "kvm")


# A hostile direct caller (issue 13): every bad value is InvalidVMParamsError,
# never a TypeError, ValueError or RecursionError.


def _deep(depth):
    value = []
    for _ in range(depth):
        value = [value]
    return value


DEEP = _deep(100_000)
HOSTILE = [
    None, True, False, 1.5, float("nan"), float("inf"), 2**200, 10**5000, -1, [], {}, DEEP,
    {"k": DEEP}, "", "a\x00b", "a\nb", "a\n", "\x1b[31m", "a\u2028b", "a\x85b", "a\ud800b",
    "\u00b2", "\u0663", "x" * 100_000,
]
HOSTILE_IDS = [f"{i}:{type(v).__name__}" for i, v in enumerate(HOSTILE)]
TOP_KEYS = ["vmName", "memSize", "smp", "accel", "kernel", "initrd", "kernelArgs", "serialLog",
            "drives"]
DRIVE_KEYS = ["poolID", "domainID", "imageID", "volumeID", "device", "iface", "format",
              "propagateErrors"]
# Keys whose falsy value ("", None, [], ...) means "the default".
DEFAULTED = {"vmName", "accel", "initrd", "kernelArgs", "serialLog", "drives"}


@pytest.mark.parametrize("key", TOP_KEYS)
@pytest.mark.parametrize("value", HOSTILE, ids=HOSTILE_IDS)
def test_hostile_values_refused(params, key, value):
    if key in DEFAULTED and not value:
        pytest.skip("the default")
    if key in ("vmName", "kernelArgs") and value in ("\u00b2", "\u0663"):
        pytest.skip("printable text")
    with pytest.raises(errors.InvalidVMParamsError) as info:
        vmparams.parse(VM_ID, dict(params, **{key: value}), "kvm")
    assert key in str(info.value) and len(str(info.value)) < 500


@pytest.mark.parametrize("key", DRIVE_KEYS)
@pytest.mark.parametrize("value", HOSTILE, ids=HOSTILE_IDS)
def test_hostile_drive_values_refused(params, key, value):
    params["drives"][0][key] = value
    with pytest.raises(errors.InvalidVMParamsError) as info:
        vmparams.parse(VM_ID, params, "kvm")
    assert key in str(info.value)


@pytest.mark.parametrize("value", HOSTILE + [str(uuid.uuid4()) + "\n"], ids=HOSTILE_IDS + ["nl"])
def test_hostile_vm_id_and_params_refused(params, value):
    with pytest.raises(errors.InvalidVMParamsError):
        vmparams.parse(value, params, "kvm")
    if not isinstance(value, dict):
        with pytest.raises(errors.InvalidVMParamsError):
            vmparams.parse(VM_ID, value, "kvm")


def test_uuid_with_trailing_newline_refused(params):
    params["drives"][0]["volumeID"] += "\n"
    with pytest.raises(errors.InvalidVMParamsError, match="volumeID .* is not a UUID"):
        vmparams.parse(VM_ID, params, "kvm")


@pytest.mark.parametrize("memory", [15, 1024 * 1024 + 1, "\u00b2", "1" * 19])
def test_memory_bounds(params, memory):
    with pytest.raises(errors.InvalidVMParamsError, match="memSize"):
        vmparams.parse(VM_ID, dict(params, memSize=memory), "kvm")
    assert vmparams.parse(VM_ID, dict(params, memSize=1024 * 1024), "kvm").memory_mib == 1024**2
