"""The domains this host knows: where each lives, and their open objects.

:class:`Registry` remembers, on this host, where each domain it *created*
lives (a directory or a list of devices), so a restarted daemon finds its
domains again; :class:`DomainCache` turns a domain UUID into a domain
object, opening it on first use with the opener of its type
(``storage.domain_types.openers``, passed in, so this module knows no
domain type).  A domain this host did not create is found on the storage
it is connected to (the ``locate`` function passed in:
:meth:`storage.connections.Connections.locate`) and kept in memory only, as
*learned*, until the pool or the connection it came with is disconnected.
The registry is a cache of where domains are, never the list of a pool's
domains (that is the master domain's metadata, storage.pool).

The state directory is local to the host (not shared storage), so plain file
operations are used; :func:`write_json_atomic` writes its files.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import threading
from collections.abc import Callable, Iterator
from typing import Any

from storage import errors, sd

log = logging.getLogger("storage.sd_registry")

# Opens a remembered domain: (sd_id, its connection arguments, env) -> domain.
Opener = Callable[[str, dict[str, Any], sd.Env], sd.StorageDomain]


@dataclasses.dataclass(frozen=True)
class Located:
    """A domain found on the connected storage."""

    domain_type: str
    args: dict[str, Any]  # what its opener takes: {"path"} or {"devices"}
    connections: tuple[str, ...]  # ids of the connections it was found on


# Finds a domain on the connected storage: sd_id -> where it is, or None.
Locator = Callable[[str], Located | None]


class Registry:
    """Where this host finds each domain it knows: ``<state_dir>/domains/<sd>.json``
    holding ``{"type": "file", "path": DIR}`` or ``{"type": "block", "devices": [...]}``.
    """

    def __init__(self, state_dir: str) -> None:
        self.dir = os.path.join(state_dir, "domains")
        os.makedirs(self.dir, exist_ok=True)
        self._lock = threading.Lock()

    def _path(self, sd_id: str) -> str:
        sd.check_uuid(sd_id)
        return os.path.join(self.dir, f"{sd_id}.json")

    def add(self, sd_id: str, domain_type: str, args: dict[str, Any]) -> None:
        entry = {"type": domain_type, **args}
        with self._lock:
            write_json_atomic(self._path(sd_id), entry)

    def remove(self, sd_id: str) -> None:
        with self._lock:
            try:
                os.unlink(self._path(sd_id))
            except FileNotFoundError:
                pass

    def get(self, sd_id: str) -> dict[str, Any] | None:
        try:
            with open(self._path(sd_id), encoding="utf-8") as f:
                entry: dict[str, Any] = json.load(f)
                return entry
        except FileNotFoundError:
            return None

    def __iter__(self) -> Iterator[str]:
        names = sorted(os.listdir(self.dir))
        return iter(n[: -len(".json")] for n in names if n.endswith(".json"))


def write_json_atomic(path: str, value: Any) -> None:
    """Write a local JSON file atomically (temp, fsync, rename, fsync dir)."""
    tmp = f"{path}.tmp"
    data = json.dumps(value, indent=1, sort_keys=True).encode("utf-8")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, path)
    dir_fd = os.open(os.path.dirname(path), os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class DomainCache:
    """Domain objects by UUID: opened from the registry, or found on the
    connected storage (locate), on first use."""

    def __init__(self, registry: Registry, env: sd.Env, openers: dict[str, Opener],
                 locate: Locator | None = None) -> None:
        self.registry = registry
        self.env = env
        self.openers = openers
        self.locate = locate
        self._domains: dict[str, sd.StorageDomain] = {}
        # Learned domains (found by locate) -> the connections they were found on.
        self._learned: dict[str, tuple[str, ...]] = {}
        self._lock = threading.Lock()

    def get(self, sd_id: str) -> sd.StorageDomain:
        """The domain, or StorageDomainDoesNotExist."""
        with self._lock:
            dom = self._domains.get(sd_id)
            if dom is not None:
                return dom
            entry = self.registry.get(sd_id)
            if entry is not None:
                args = {k: v for k, v in entry.items() if k != "type"}
                dom = self.openers[entry["type"]](sd_id, args, self.env)
                self._domains[sd_id] = dom
                return dom
        # Not held while looking: that runs commands (lvm2) and file I/O.
        located = self.locate(sd_id) if self.locate is not None else None
        if located is None:
            raise errors.StorageDomainDoesNotExist(sd_id=sd_id)
        found = self.openers[located.domain_type](sd_id, located.args, self.env)
        with self._lock:
            dom = self._domains.get(sd_id)
            if dom is not None:
                return dom
            self._domains[sd_id] = found
            self._learned[sd_id] = located.connections
        log.info("Learned domain sd=%s type=%s args=%s", sd_id, located.domain_type,
                 located.args)
        return found

    def add(self, dom: sd.StorageDomain, args: dict[str, Any]) -> None:
        """Remember a domain made (or explicitly learned) on this host."""
        with self._lock:
            self.registry.add(dom.sd_id, dom.domain_type, args)
            self._domains[dom.sd_id] = dom
            self._learned.pop(dom.sd_id, None)

    def forget(self, sd_id: str) -> None:
        with self._lock:
            self._domains.pop(sd_id, None)
            self._learned.pop(sd_id, None)
            self.registry.remove(sd_id)

    def learned(self) -> dict[str, tuple[str, ...]]:
        """Domains found on the connected storage -> their connections' ids."""
        with self._lock:
            return dict(self._learned)

    def is_learned(self, sd_id: str) -> bool:
        with self._lock:
            return sd_id in self._learned

    def forget_learned(self, sd_id: str) -> sd.StorageDomain | None:
        """Drop a learned domain (it will be looked for again); the domain
        object, or None if sd_id is not a learned domain."""
        with self._lock:
            if self._learned.pop(sd_id, None) is None:
                return None
            return self._domains.pop(sd_id, None)

    def known(self) -> list[str]:
        """Domains this host created (the registry) or learned."""
        with self._lock:
            learned = set(self._learned)
        return sorted(set(self.registry) | learned)
