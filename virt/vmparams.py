"""VM.create's vmParams: semantic checks and defaults.

The schema already checked types, enums and UUID syntax for JSON-RPC callers;
this module checks what a schema cannot (files exist, values in range, a
drive named once) and is safe for direct callers too. Problems raise
:class:`virt.errors.InvalidVMParamsError` naming the offending key.
"""

from __future__ import annotations

import dataclasses
import os
import uuid
from typing import Any

from virt import domxml, errors
from virt import drive as drive_mod

ACCELS = tuple(domxml.DOMAIN_TYPES)
IFACES = ("virtio",)
DEVICES = ("disk",)
PROPAGATE_ERRORS = ("off", "on")
MAX_VCPUS = 64


@dataclasses.dataclass(frozen=True)
class DriveSpec:
    pool_id: str
    domain_id: str
    image_id: str
    volume_id: str
    format: str
    iface: str = "virtio"
    propagate_errors: str = "off"


@dataclasses.dataclass(frozen=True)
class VMParams:
    name: str
    memory_mib: int
    vcpus: int
    accel: str
    kernel: str
    initrd: str | None
    cmdline: str
    serial_log: str | None
    drives: list[DriveSpec]


def parse(vm_id: str, params: dict[str, Any], default_accel: str) -> VMParams:
    """Checked VM parameters, or InvalidVMParamsError."""

    def bad(reason: str) -> errors.InvalidVMParamsError:
        return errors.InvalidVMParamsError(reason, vm_id=vm_id)

    _check_uuid(vm_id, "vmID", bad)
    if not isinstance(params, dict):
        raise bad("vmParams must be a mapping")

    name = params.get("vmName") or f"vm-{vm_id}"
    if not isinstance(name, str) or "/" in name or len(name) > 200:
        raise bad(f"vmName {name!r} is not a valid name")

    memory = _int(params.get("memSize"), "memSize", bad)
    if memory < 16:
        raise bad(f"memSize {memory} MiB is too small")
    vcpus = _int(params.get("smp", 1), "smp", bad)
    if not 1 <= vcpus <= MAX_VCPUS:
        raise bad(f"smp {vcpus} out of range 1-{MAX_VCPUS}")

    accel = params.get("accel") or default_accel
    if accel not in ACCELS:
        raise bad(f"accel {accel!r} is not one of {', '.join(ACCELS)}")

    kernel = params.get("kernel")
    if not isinstance(kernel, str) or not os.path.isfile(kernel):
        raise bad(f"kernel {kernel!r} is not a file")
    initrd = params.get("initrd") or None
    if initrd is not None and (not isinstance(initrd, str) or not os.path.isfile(initrd)):
        raise bad(f"initrd {initrd!r} is not a file")
    cmdline = params.get("kernelArgs") or ""
    if not isinstance(cmdline, str):
        raise bad("kernelArgs must be a string")

    serial_log = params.get("serialLog") or None
    if serial_log is not None:
        if not isinstance(serial_log, str) or not os.path.isabs(serial_log):
            raise bad(f"serialLog {serial_log!r} is not an absolute path")
        if not os.path.isdir(os.path.dirname(serial_log)):
            raise bad(f"directory of serialLog {serial_log!r} does not exist")

    specs = params.get("drives") or []
    if not isinstance(specs, list):
        raise bad("drives must be a list")
    drives = [_drive(spec, i, bad) for i, spec in enumerate(specs)]
    images = [(d.domain_id, d.image_id) for d in drives]
    if len(set(images)) != len(images):
        raise bad("an image is given as more than one drive")

    return VMParams(
        name=name,
        memory_mib=memory,
        vcpus=vcpus,
        accel=accel,
        kernel=kernel,
        initrd=initrd,
        cmdline=cmdline,
        serial_log=serial_log,
        drives=drives,
    )


def _drive(spec: Any, index: int, bad: Any) -> DriveSpec:
    where = f"drives[{index}]"
    if not isinstance(spec, dict):
        raise bad(f"{where} must be a mapping")
    ids = {}
    for key in ("poolID", "domainID", "imageID", "volumeID"):
        ids[key] = _check_uuid(spec.get(key), f"{where}.{key}", bad)
    device = spec.get("device", "disk")
    if device not in DEVICES:
        raise bad(f"{where}.device {device!r} is not supported")
    iface = spec.get("iface", "virtio")
    if iface not in IFACES:
        raise bad(f"{where}.iface {iface!r} is not supported")
    fmt = spec.get("format", drive_mod.COW)
    if fmt not in drive_mod.FORMATS:
        raise bad(f"{where}.format {fmt!r} is not cow or raw")
    propagate = spec.get("propagateErrors", "off")
    if propagate not in PROPAGATE_ERRORS:
        raise bad(f"{where}.propagateErrors {propagate!r} is not off or on")
    return DriveSpec(
        pool_id=ids["poolID"],
        domain_id=ids["domainID"],
        image_id=ids["imageID"],
        volume_id=ids["volumeID"],
        format=fmt,
        iface=iface,
        propagate_errors=propagate,
    )


def _check_uuid(value: Any, key: str, bad: Any) -> str:
    try:
        canonical = str(uuid.UUID(value))
    except (TypeError, ValueError, AttributeError):
        raise bad(f"{key} {value!r} is not a UUID") from None
    if canonical != value:
        raise bad(f"{key} {value!r} is not a canonical lowercase UUID")
    return canonical


def _int(value: Any, key: str, bad: Any) -> int:
    if isinstance(value, bool):
        raise bad(f"{key} must be an integer")
    if isinstance(value, str) and value.isdigit():
        return int(value)
    if not isinstance(value, int):
        raise bad(f"{key} {value!r} must be an integer")
    return value
