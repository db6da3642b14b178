"""The Host namespace: liveness, capabilities and block devices of this host."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable
from typing import Any

import pyudev

from storage import commands

log = logging.getLogger("vdsm_lsm.host")

VERSION = "0.1.0"

# What this build of the daemon can do; an engine checks these before use.
FEATURES = [
    "jsonrpc",
    "file_domains",
    "block_domains",
    "spm_tasks",
    "clone_image_structure",
    "sync_image_data",
    "live_snapshot",
    "disk_replicate",
    "watermark_monitor",
]

_VERSION_RE = re.compile(r"(\d+\.\d+(?:\.\d+)?)")


def _first_version(text: str) -> str:
    match = _VERSION_RE.search(text)
    return match.group(1) if match else ""


def _libvirt_number(value: int) -> str:
    """libvirt encodes versions as major * 1,000,000 + minor * 1,000 + micro."""
    return f"{value // 1000000}.{value // 1000 % 1000}.{value % 1000}"


def command_version(argv: list[str], pattern: str | None = None) -> str:
    """The version a command prints, or "" if the command is missing."""
    try:
        out = commands.run(argv, timeout=30).stdout.decode("utf-8", "replace")
    except Exception as e:  # a missing tool is reported, not fatal
        log.warning("Cannot get version cmd=%s: %s", argv, e)
        return ""
    if pattern:
        match = re.search(pattern, out)
        return match.group(1) if match else ""
    return _first_version(out)


class HostAPI:
    """Serves Host.ping2, Host.getCapabilities and Host.getDeviceList.

    libvirt_conn returns the daemon's libvirt connection (reconnecting if
    needed); modes returns the cluster lock and activation modes in effect;
    used_by maps a device path to what uses it (a VG name, a file system).
    """

    def __init__(
        self,
        libvirt_conn: Callable[[], Any],
        modes: Callable[[], dict[str, str]],
        used_by: Callable[[list[str]], dict[str, str]] | None = None,
    ) -> None:
        self._libvirt_conn = libvirt_conn
        self._modes = modes
        self._used_by = used_by or (lambda devices: {})
        self._static: dict[str, str] | None = None

    def host_ping2(self) -> bool:
        return True

    def host_get_capabilities(self) -> dict[str, Any]:
        conn = self._libvirt_conn()
        caps: dict[str, Any] = {
            "version": VERSION,
            "libvirtVersion": _libvirt_number(conn.getLibVersion()),
            "qemuVersion": _libvirt_number(conn.getVersion()),
        }
        caps.update(self._static_versions())
        caps["features"] = list(FEATURES)
        caps.update(self._modes())
        return caps

    def _static_versions(self) -> dict[str, str]:
        if self._static is None:
            self._static = {
                "qemuImgVersion": command_version(["qemu-img", "--version"]),
                "lvmVersion": command_version(
                    ["lvm", "version"], r"LVM version:\s*(\d+\.\d+\.\d+)"
                ),
            }
        return dict(self._static)

    def host_get_device_list(
        self,
        storage_type: str | None = None,
        guids: list[str] | None = None,
        check_status: bool = True,
        refresh: bool = True,
    ) -> list[dict[str, Any]]:
        """Block devices; guids (VDSM's) keeps those whose path or serial is
        listed.  storage_type, check_status and refresh: VDSM's, ignored (no
        FC or iSCSI here; usedBy is always read; udev is always current)."""
        context = pyudev.Context()
        found = []
        for dev in context.list_devices(subsystem="block", DEVTYPE="disk"):
            node = dev.device_node
            if not node or dev.sys_name.startswith(("ram", "zram")):
                continue
            size = _sys_int(os.path.join(dev.sys_path, "size")) * 512
            if size == 0:
                continue  # an unbound loop device, an empty drive
            found.append((node, size, dev))
        used_by = self._used_by([node for node, _, _ in found])
        devices = [
            {
                "path": node,
                "size": size,
                "serial": _serial(dev),
                "usedBy": used_by.get(node) or _fs_type(dev),
            }
            for node, size, dev in found
        ]
        if guids:
            devices = [d for d in devices if d["path"] in guids or d["serial"] in guids]
        devices.sort(key=lambda d: d["path"])
        return devices


def _sys_int(path: str) -> int:
    try:
        with open(path) as f:
            return int(f.read().strip() or 0)
    except (OSError, ValueError):
        return 0


def _serial(dev: pyudev.Device) -> str:
    serial = dev.properties.get("ID_SERIAL") or dev.properties.get("ID_SERIAL_SHORT")
    if serial:
        return serial
    for attr in ("device/serial", "serial", "loop/backing_file"):
        path = os.path.join(dev.sys_path, attr)
        try:
            with open(path) as f:
                value = f.read().strip()
        except OSError:
            continue
        if value:
            return value
    return ""


def _fs_type(dev: pyudev.Device) -> str:
    return dev.properties.get("ID_FS_TYPE", "")
