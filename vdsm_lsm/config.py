"""Configuration: typed defaults in code, overridden by INI files.

Files read, in order, each overriding the previous:

1. ``/etc/vdsm-lsm/vdsm-lsm.conf`` (or the file given with ``--config``),
2. ``conf.d/*.conf`` beside it, sorted by name.

Every key must be known and its value must parse as the key's type; a bad
value is a start-up error naming the file, section and key.  The resulting
:class:`Config` is read by the daemon only (``vdsm_lsm/daemon.py`` for its
listeners and logging, ``vdsm_lsm/app.py`` for everything else): app.py
turns it, once, into each package's own settings; no package sees this
object or imports it as a global.  ``vdsm-lsm --show-config`` prints the
effective values and where each came from.
"""

from __future__ import annotations

import configparser
import dataclasses
import glob
import math
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

DEFAULT_FILE = "/etc/vdsm-lsm/vdsm-lsm.conf"


@dataclasses.dataclass(frozen=True)
class Option:
    parse: Callable[[str], Any]
    default: Any
    doc: str


def _bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"not a boolean: {text!r}")


def _int(low: int | None = None, high: int | None = None) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = int(text.strip())
        if low is not None and value < low:
            raise ValueError(f"{value} is below {low}")
        if high is not None and value > high:
            raise ValueError(f"{value} is above {high}")
        return value

    return parse


def _float(low: float = 0.0) -> Callable[[str], float]:
    def parse(text: str) -> float:
        value = float(text.strip())
        if not math.isfinite(value):
            raise ValueError(f"{text.strip()} is not a finite number")
        if value < low:
            raise ValueError(f"{value} is below {low}")
        return value

    return parse


def _choice(*values: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        value = text.strip()
        if value not in values:
            raise ValueError(f"{value!r} is not one of {', '.join(values)}")
        return value

    return parse


def _path(text: str) -> str:
    value = text.strip()
    if value and not os.path.isabs(value):
        raise ValueError(f"not an absolute path: {value!r}")
    return value


def _str(text: str) -> str:
    return text.strip()


SCHEMA: dict[str, dict[str, Option]] = {
    "addresses": {
        "management_ip": Option(_str, "127.0.0.1", "TCP address to listen on"),
        "management_port": Option(_int(0, 65535), 54321, "TCP port (0: any free port)"),
        "unix_socket": Option(_path, "/run/vdsm-lsm/api.sock", "unix socket (mode 0660)"),
    },
    "tls": {
        "enabled": Option(_bool, False, "mutual TLS on the TCP listener"),
        "key": Option(_path, "/etc/pki/vdsm-lsm/keys/vdsmkey.pem", "server private key"),
        "cert": Option(_path, "/etc/pki/vdsm-lsm/certs/vdsmcert.pem", "server certificate"),
        "ca": Option(_path, "/etc/pki/vdsm-lsm/certs/cacert.pem", "CA that signs clients"),
    },
    "irs": {
        "run_dir": Option(_path, "/run/vdsm-lsm", "run-time state: lock, links, loop state"),
        "state_dir": Option(
            _path, "/var/lib/vdsm-lsm", "state kept across reboots: known domains, pool"
        ),
        "volume_utilization_percent": Option(
            _int(1, 100), 20, "extend a thin volume when free space drops below this %"
        ),
        "volume_utilization_chunk_mb": Option(
            _int(1), 2560, "initial size and extension step of thin block volumes"
        ),
        "copy_rate_limit_mb": Option(_int(0), 0, "qemu-img copy rate limit, MiB/s (0: none)"),
        "task_workers": Option(_int(1, 64), 10, "SPM tasks that run at once"),
        "oop_timeout": Option(_float(0.1), 60.0, "seconds before a file operation times out"),
        "block_extent_size_mb": Option(_int(1, 1024), 128, "LVM extent size of new block domains"),
    },
    "thinp": {
        "monitor_interval": Option(_float(0.1), 2.0, "watermark monitor period, seconds"),
    },
    "mailbox": {
        "idle_interval": Option(
            _float(0.01), 0.1, "SPM: seconds between inbox reads while no request comes"
        ),
        "busy_interval": Option(
            _float(0.005), 0.02, "SPM: seconds between inbox reads while requests come"
        ),
        "reply_interval": Option(
            _float(0.001), 0.01, "HSM: seconds between reads of its reply slots (requests out)"
        ),
        "retry_interval": Option(_float(0.1), 2.0, "HSM: resend an unanswered request after"),
        "request_timeout": Option(
            _float(0.1), 20.0, "HSM: give up on an unanswered extension after, seconds"
        ),
        "workers": Option(_int(1, 64), 8, "SPM: extensions served at once"),
    },
    "lvm": {
        "activation": Option(_choice("auto", "dm", "loop"), "auto", "LV activation mode"),
    },
    "sanlock": {
        "cluster_lock": Option(_choice("auto", "sanlock", "local"), "auto", "SPM lease"),
        "io_timeout": Option(
            _int(1, 300), 10,
            "sanlock I/O timeout (s) of new domains' lockspaces and of add_lockspace",
        ),
    },
    "vm": {
        "accel": Option(_choice("kvm", "tcg"), "kvm", "default accelerator of new VMs"),
        "migration_destination_timeout": Option(
            _float(1.0), 300.0,
            "seconds a host that accepted VM.migrationCreate waits for the VM to arrive",
        ),
        "migration_peer_timeout": Option(
            _float(1.0), 10.0,
            "seconds the destination daemon may not answer before a migration is aborted",
        ),
    },
    "replication": {
        "api": Option(
            _choice("blockcopy", "blockrebase"), "blockcopy",
            "libvirt call that starts a mirror: blockcopy (also carries syncWrites) "
            "or blockrebase (REBASE_COPY; syncWrites refused)",
        ),
        "job_stall_timeout": Option(
            _float(0.1), 10.0,
            "seconds a mirror asked to pivot or abort may make no progress before it is "
            "cancelled in QEMU (the VM stays on the source)",
        ),
        "job_end_timeout": Option(
            _float(1.0), 60.0,
            "seconds a pivot or abort that still copies is waited for (then changeDisk: retry)",
        ),
    },
    "libvirt": {
        "uri": Option(_str, "qemu:///system", "libvirt connection URI"),
        "unavailable_wait": Option(
            _float(0.0), 30.0,
            "seconds a call waits for libvirtd to answer again (a restart) before it fails "
            "with LibvirtConnectionError 3402",
        ),
        "migration_uri": Option(
            _str, "",
            "how other hosts' libvirtd reach this host's, for VMs migrating here "
            "(empty: qemu+tls://<the address the source was given>/system)",
        ),
        "migration_socket_dir": Option(
            _path, "",
            "directory for the unix sockets of incoming migration streams (memory, NBD), "
            "seen by both hosts' QEMU (empty: TCP, libvirt's choice)",
        ),
    },
    "logging": {
        "level": Option(_choice("DEBUG", "INFO", "WARNING", "ERROR"), "INFO", "log level"),
        "file": Option(_path, "", "also log to this file (empty: stderr only)"),
    },
}


class ConfigError(Exception):
    def __init__(self, path: str, section: str, key: str, reason: str) -> None:
        self.path, self.section, self.key, self.reason = path, section, key, reason
        where = f"[{section}]" + (f" {key}" if key else "")
        super().__init__(f"{path}: {where}: {reason}")


class Section:
    """Values of one section as attributes: ``config.irs.run_dir``."""

    def __init__(self, values: dict[str, Any]) -> None:
        self.__dict__.update(values)

    if TYPE_CHECKING:
        # Keys come from SCHEMA at run time; tell the type checker so.
        def __getattr__(self, key: str) -> Any: ...


class Config:
    # One attribute per SCHEMA section, set in __init__.
    addresses: Section
    tls: Section
    irs: Section
    thinp: Section
    mailbox: Section
    lvm: Section
    sanlock: Section
    vm: Section
    replication: Section
    libvirt: Section
    logging: Section

    def __init__(self, values: dict[str, dict[str, Any]], sources: dict[tuple[str, str], str]):
        self._values = values
        self.sources = sources
        for section, entries in values.items():
            setattr(self, section, Section(entries))

    def get(self, section: str, key: str) -> Any:
        return self._values[section][key]

    def as_dict(self) -> dict[str, dict[str, Any]]:
        return {s: dict(v) for s, v in self._values.items()}

    def format(self) -> str:
        """The effective configuration as an INI text, with sources."""
        lines = []
        for section, options in SCHEMA.items():
            lines.append(f"[{section}]")
            for key, option in options.items():
                source = self.sources.get((section, key), "default")
                lines.append(f"# {option.doc} (from {source})")
                lines.append(f"{key} = {_format_value(self._values[section][key])}")
            lines.append("")
        return "\n".join(lines)


def _format_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def files_for(main_file: str) -> list[str]:
    """The main file then conf.d/*.conf beside it, sorted; only those that exist."""
    found = [main_file] if os.path.exists(main_file) else []
    conf_d = os.path.join(os.path.dirname(main_file), "conf.d")
    found.extend(sorted(glob.glob(os.path.join(conf_d, "*.conf"))))
    return found


def load(
    main_file: str = DEFAULT_FILE, overrides: dict[str, dict[str, str]] | None = None
) -> Config:
    values = {s: {k: o.default for k, o in opts.items()} for s, opts in SCHEMA.items()}
    sources: dict[tuple[str, str], str] = {}
    for path in files_for(main_file):
        parser = configparser.ConfigParser(interpolation=None)
        try:
            with open(path, encoding="utf-8") as f:
                parser.read_file(f, source=path)
        except (OSError, configparser.Error) as e:
            raise ConfigError(path, "", "", f"cannot read: {e}") from e
        for section in parser.sections():
            for key, text in parser.items(section):
                _apply(values, sources, path, section, key, text)
    for section, entries in (overrides or {}).items():
        for key, text in entries.items():
            _apply(values, sources, "override", section, key, text)
    return Config(values, sources)


def _apply(
    values: dict[str, dict[str, Any]],
    sources: dict[tuple[str, str], str],
    path: str,
    section: str,
    key: str,
    text: str,
) -> None:
    if section not in SCHEMA:
        raise ConfigError(path, section, "", "unknown section")
    option = SCHEMA[section].get(key)
    if option is None:
        raise ConfigError(path, section, key, "unknown key")
    try:
        values[section][key] = option.parse(text)
    except ValueError as e:
        raise ConfigError(path, section, key, f"bad value {text.strip()!r}: {e}") from e
    sources[(section, key)] = path
