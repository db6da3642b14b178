"""Running lvm2: the command line, its reports and its failures.

What every command of :class:`storage.lvm.LVM` shares:

- :func:`config`, the ``--config`` string restricting lvm2 to some devices:
  a device filter accepting only them (``a|^/dev/loop3$|``, then
  ``r|.*|``), no udev device list, no devices file, no hints, so commands
  neither scan nor touch anything else on the host; ``global{activation=0}``
  in metadata-only mode; no udev synchronisation, no monitoring, no
  metadata backups (the VG is shared; a host-local backup of it would be
  stale at once);
- :func:`run` and :func:`report` (``--reportformat json --units b
  --nosuffix``), through :func:`storage.commands.run`;
- reading lvm2's error text: :func:`raise_not_found` turns "not found"
  messages into ``VolumeGroupDoesNotExist`` /
  ``LogicalVolumeDoesNotExistError``, :func:`clean` drops the noise;
- :func:`vg_lock`, serializing commands that change a VG within this process
  (lvm2's own file locks serialize processes on one host) and counting them
  (:func:`generation`), which tells whether a reading of the VG is current.
"""

from __future__ import annotations

import collections
import json
import re
import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from storage import commands, errors

LVM_COMMAND = "lvm"
ENV = {"LVM_SUPPRESS_FD_WARNINGS": "1"}
DEFAULT_TIMEOUT = 120.0

# Device paths allowed in a filter: they go into a regex inside a quoted
# config string, so keep them plain.  Matched with fullmatch ("$" would
# accept a trailing newline).
_DEVICE_RE = re.compile(r"/dev/[A-Za-z0-9_./:+-]+")
_NAME_RE = re.compile(r"[A-Za-z0-9_+.-]+")

# stderr lines lvm2 prints on every command in metadata-only mode, or that
# only repeat our own choices; they are dropped from error messages.
_NOISE = (
    "WARNING: Activation disabled",
    "NOT backed up",
    "not zeroed",
)

METADATA_ONLY = "LVM is metadata-only on this host (no device-mapper)"

_VG_NOT_FOUND = re.compile(r'Volume group "([^"]+)" not found')
_LV_NOT_FOUND = re.compile(r'Failed to find logical volume "([^"]+)"')
VG_EXISTS = re.compile(r"volume group called .* already exists", re.IGNORECASE)
LV_EXISTS = re.compile(r"already exists in volume group")
NO_SPACE = re.compile(r"insufficient (free )?(space|extents)|Insufficient free", re.IGNORECASE)

# pvs sorts by PV name by default ("/dev/loop10" before "/dev/loop9"); sorted
# by the VG name alone, rows keep the VG's PV order (what vgs reports), each
# PV's segments in PE order.  Followed by the --select expression.
VG_ORDER = ["--sort", "vg_name", "--select"]

_vg_locks: collections.defaultdict[str, threading.Lock] = collections.defaultdict(threading.Lock)
_vg_locks_guard = threading.Lock()
# VG name -> number of commands of this process that changed it (or tried
# to): a reading of the VG taken at generation g is current while the count
# is still g.  Changes by other processes or hosts are not counted.
_generations: collections.Counter[str] = collections.Counter()


def config(devices: Sequence[str], activation: bool) -> str:
    """The --config string for a command over devices."""
    for dev in devices:
        check_device(dev)
    accept = ", ".join(f'"a|^{dev}$|"' for dev in devices)
    return (
        f'devices {{ filter=[{accept}, "r|.*|"] obtain_device_list_from_udev=0 '
        'use_devicesfile=0 write_cache_state=0 hints="none" } '
        f"global {{ activation={int(activation)} notify_dbus=0 use_lvmpolld=0 }} "
        "activation { udev_sync=0 udev_rules=0 monitoring=0 } "
        "backup { backup=0 archive=0 }"
    )


def run(args: Sequence[str], config_string: str, timeout: float) -> str:
    """Run ``lvm <args[0]> --config <config_string> <args[1:]>``; its stdout."""
    cmd = [LVM_COMMAND, args[0], "--config", config_string, *args[1:]]
    proc = commands.run(cmd, timeout=timeout, env=ENV)
    return proc.stdout.decode("utf-8", "replace")


def report_args(
    command: str, fields: str, targets: Sequence[str], extra_args: Sequence[str] = ()
) -> list[str]:
    """Arguments of a JSON report command (pvs, vgs, lvs) of fields."""
    return [
        command,
        "--reportformat",
        "json",
        "--units",
        "b",
        "--nosuffix",
        "-o",
        fields,
        *extra_args,
        *targets,
    ]


def parse_report(command: str, kind: str, out: str) -> list[dict[str, str]]:
    """The rows of kind ("pv", "vg", "lv", "pvseg") of a JSON report."""
    try:
        doc = json.loads(out)
        rows: list[dict[str, str]] = []
        for report in doc["report"]:
            rows.extend(report.get(kind, []))
    except (ValueError, KeyError, TypeError) as e:
        raise errors.CommandFailed(
            cmd=[LVM_COMMAND, command],
            rc=0,
            err=f"cannot parse JSON report: {e}: {out[:200]!r}",
        ) from e
    return rows


@contextmanager
def vg_lock(vg: str) -> Iterator[None]:
    """Serialize a command changing vg; counts it in vg's generation."""
    with _vg_locks_guard:
        lock = _vg_locks[vg]
    with lock:
        try:
            yield
        finally:
            with _vg_locks_guard:
                _generations[vg] += 1


def generation(vg: str) -> int:
    """How many commands of this process changed (or tried to change) vg."""
    with _vg_locks_guard:
        return _generations[vg]


def check_device(dev: str) -> None:
    if not _DEVICE_RE.fullmatch(dev):
        raise ValueError(f"Unsupported device path for an LVM filter: {dev!r}")


def check_name(name: str) -> None:
    if not _NAME_RE.fullmatch(name) or name.startswith("-"):
        raise ValueError(f"Invalid LVM name: {name!r}")


def tag_args(add: Iterable[str], delete: Iterable[str]) -> list[str]:
    args: list[str] = []
    for tag in delete:
        args += ["--deltag", tag]
    for tag in add:
        args += ["--addtag", tag]
    return args


def clean(err: str) -> str:
    """lvm2's stderr without the lines it prints on every command."""
    lines = [line.strip() for line in err.splitlines()]
    return "; ".join(line for line in lines if line and not any(n in line for n in _NOISE))


def failure(e: errors.CommandFailed) -> dict[str, Any]:
    """The fields every LVM error carries from the failed command."""
    return {"cmd": e.cmd, "rc": e.rc, "err": e.err}


def raise_not_found(e: errors.CommandFailed, vg: str, lv: str | None = None) -> None:
    """Raise VolumeGroupDoesNotExist or LogicalVolumeDoesNotExistError if
    lvm2 says so; else return."""
    if _VG_NOT_FOUND.search(e.err):
        raise errors.VolumeGroupDoesNotExist(vg=vg, **failure(e)) from e
    if lv is not None and _LV_NOT_FOUND.search(e.err):
        raise errors.LogicalVolumeDoesNotExistError(vg=vg, lv=lv, **failure(e)) from e
