"""VM.create's vmParams: semantic checks and defaults.

The schema already checked types, enums and UUID syntax for JSON-RPC callers;
this module checks what a schema cannot (files exist, values in range, a
drive named once) and is safe for direct callers too: whatever they pass
(a list for a mapping, ``True`` or ``"\u00b2"`` for a number, a name with a
newline, a value nested 100,000 deep), problems raise
:class:`virt.errors.InvalidVMParamsError` naming the offending key, never
anything else.  Strings become domain XML (names, paths, the kernel command
line), so they are one line of printable text: no NUL, no control
character, no line separator, no lone surrogate.  UUIDs are canonical
(:func:`common.uuids.is_canonical`: ``fullmatch``, no trailing newline).
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any

from common import uuids
from virt import domxml, errors
from virt import drive as drive_mod

ACCELS = tuple(domxml.DOMAIN_TYPES)
IFACES = ("virtio",)
DEVICES = ("disk",)
PROPAGATE_ERRORS = ("off", "on")
MAX_VCPUS = 64
MIN_MEMORY_MIB = 16
MAX_MEMORY_MIB = 1024 * 1024  # 1 TiB, the schema's bound
MAX_NAME = 200
MAX_TEXT = 4096
# C0 and C1 controls, DEL, line and paragraph separators.
_CONTROL_RE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


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

    shown_id = vm_id if uuids.is_uuid(vm_id) else _show(vm_id)

    def bad(reason: str) -> errors.InvalidVMParamsError:
        return errors.InvalidVMParamsError(reason, vm_id=shown_id)

    _check_uuid(vm_id, "vmID", bad)
    if not isinstance(params, dict):
        raise bad("vmParams must be a mapping")

    name = _text(params.get("vmName") or f"vm-{vm_id}", "vmName", bad, MAX_NAME)
    if "/" in name:
        raise bad(f"vmName {_show(name)} is not a valid name")

    memory = _int(params.get("memSize"), "memSize", bad)
    if not MIN_MEMORY_MIB <= memory <= MAX_MEMORY_MIB:
        raise bad(f"memSize {_show(memory)} MiB out of range {MIN_MEMORY_MIB}-{MAX_MEMORY_MIB}")
    vcpus = _int(params.get("smp", 1), "smp", bad)
    if not 1 <= vcpus <= MAX_VCPUS:
        raise bad(f"smp {_show(vcpus)} out of range 1-{MAX_VCPUS}")

    accel = params.get("accel") or default_accel
    if not isinstance(accel, str) or accel not in ACCELS:
        raise bad(f"accel {_show(accel)} is not one of {', '.join(ACCELS)}")

    kernel = _text(params.get("kernel"), "kernel", bad)
    if not os.path.isfile(kernel):
        raise bad(f"kernel {_show(kernel)} is not a file")
    initrd = params.get("initrd") or None
    if initrd is not None:
        initrd = _text(initrd, "initrd", bad)
        if not os.path.isfile(initrd):
            raise bad(f"initrd {_show(initrd)} is not a file")
    cmdline = _text(params.get("kernelArgs") or "", "kernelArgs", bad)

    serial_log = params.get("serialLog") or None
    if serial_log is not None:
        serial_log = _text(serial_log, "serialLog", bad)
        if not os.path.isabs(serial_log):
            raise bad(f"serialLog {_show(serial_log)} is not an absolute path")
        if not os.path.isdir(os.path.dirname(serial_log)):
            raise bad(f"directory of serialLog {_show(serial_log)} does not exist")

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
    _choice(spec.get("device", "disk"), DEVICES, f"{where}.device", bad, "is not supported")
    iface = _choice(spec.get("iface", "virtio"), IFACES, f"{where}.iface", bad,
                    "is not supported")
    fmt = _choice(spec.get("format", drive_mod.COW), drive_mod.FORMATS, f"{where}.format", bad,
                  "is not cow or raw")
    propagate = _choice(spec.get("propagateErrors", "off"), PROPAGATE_ERRORS,
                        f"{where}.propagateErrors", bad, "is not off or on")
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
    if not uuids.is_canonical(value):
        if uuids.is_uuid(value):
            raise bad(f"{key} {_show(value)} is not a canonical lowercase UUID")
        raise bad(f"{key} {_show(value)} is not a UUID")
    return str(value)


def _int(value: Any, key: str, bad: Any) -> int:
    if isinstance(value, bool):
        raise bad(f"{key} must be an integer")
    # Digit strings as VDSM's engine sends them: ASCII digits only ("\u00b2"
    # is a digit to str.isdigit() but not to int()).
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 18:
        return int(value)
    if not isinstance(value, int):
        raise bad(f"{key} {_show(value)} must be an integer")
    return value


def _text(value: Any, key: str, bad: Any, limit: int = MAX_TEXT) -> str:
    """value is a string of at most limit characters of one line of text."""
    if not isinstance(value, str):
        raise bad(f"{key} {_show(value)} must be a string")
    if len(value) > limit:
        raise bad(f"{key} is longer than {limit} characters")
    found = _CONTROL_RE.search(value)
    if found is not None:
        raise bad(f"{key} has a control character U+{ord(found.group()):04X} at {found.start()}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise bad(f"{key} is not valid Unicode text at {e.start}") from None
    return value


def _choice(value: Any, allowed: tuple[str, ...], key: str, bad: Any, problem: str) -> str:
    if not isinstance(value, str) or value not in allowed:
        raise bad(f"{key} {_show(value)} {problem}")
    return value


def _show(value: Any, limit: int = 60) -> str:
    """A bounded excerpt of any value for a message (no recursion into
    nesting, no conversion of a huge integer to text)."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 200:
        text = f"<integer of {value.bit_length()} bits>"
    elif isinstance(value, str):
        text = repr(value[:limit])
    elif value is None or isinstance(value, (bool, int, float)):
        text = repr(value)
    elif isinstance(value, (list, tuple, dict)):
        text = f"<{type(value).__name__} of {len(value)}>"
    else:
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."
