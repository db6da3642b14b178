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
