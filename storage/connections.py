"""This host's connections to shared storage (``StoragePool.connectStorageServer``).

Before a host can join a pool it connects to the pool's storage, as in VDSM:
``connectStorageServer(domainType, [{id, connection}])`` where a
connection is a file domain's directory (the ``typeArgs.path`` it was
created with) or one device of a block domain.  Each connection is checked
by its domain type (:mod:`storage.domain_types`, :mod:`storage.discovery`)
and answered with a status of its own, VDSM's ``[{id, status}]``: ``status``
is the *name* of the error that refused it, ``""`` when connected (the rpc
layer turns names into codes).  A refused connection changes nothing.

Connections are remembered in ``<state_dir>/connections.json``
(``{id: {"type", "connection"}}``), so a restarted daemon is connected to
the same storage at once (:meth:`Connections.check_all` says at start
which are no longer usable).  Nothing is mounted or logged in to: these
connections are paths this host already reaches.

:meth:`Connections.locate` finds a domain on the connected storage: what
the domain cache (:class:`storage.sd_registry.DomainCache`) asks for a
domain this host did not create.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from common import uuids
from storage import domain_types, errors, sd, sd_registry

log = logging.getLogger("storage.connections")

STATE_FILE = "connections.json"


@dataclasses.dataclass(frozen=True)
class Connection:
    id: str
    domain_type: str
    connection: str  # normalized: a directory or a device

    def as_dict(self) -> dict[str, str]:
        return {"type": self.domain_type, "connection": self.connection}


# Why a connection may not be dropped now (None: it may): given by the caller.
BusyCheck = Callable[[Connection], str | None]


class Connections:
    """The connections of this host, kept in its state directory."""

    def __init__(self, state_dir: str, env: sd.Env) -> None:
        self.path = os.path.join(state_dir, STATE_FILE)
        self.env = env
        self._lock = threading.Lock()

    # Reading.

    def all(self) -> list[Connection]:
        return list(self._load().values())

    def of_type(self, domain_type: str) -> list[Connection]:
        return [c for c in self.all() if c.domain_type == domain_type]

    def locate(self, sd_id: str) -> sd_registry.Located | None:
        """Where domain sd_id is on the connected storage, or None."""
        conns = self.all()
        for name, kind in domain_types.TYPES.items():
            mine = [c for c in conns if c.domain_type == name]
            if not mine:
                continue
            found = kind.find(sd_id, [c.connection for c in mine], self.env)
            if found is not None:
                used = tuple(c.id for c in mine if c.connection in found.used)
                log.info("Found domain sd=%s type=%s args=%s connections=%s",
                         sd_id, name, found.args, list(used))
                return sd_registry.Located(name, found.args, used)
        return None

    def check_all(self) -> None:
        """At daemon start: log the remembered connections, warn about those
        that are no longer usable (they stay: the storage may come back)."""
        for conn in self.all():
            try:
                domain_types.get(conn.domain_type).check_connection(conn.connection, self.env)
            except errors.Error as e:
                log.warning("Connection id=%s is not usable now: %s", conn.id, e)
            else:
                log.info("Connected id=%s type=%s connection=%s",
                         conn.id, conn.domain_type, conn.connection)

    # StoragePool.connectStorageServer / disconnectStorageServer.

    def connect(
        self, domain_type: str, params: Sequence[Mapping[str, Any]]
    ) -> list[dict[str, str]]:
        """Check and remember each connection; [{id, status}] in order."""
        kind = domain_types.get(domain_type)
        items = _items(params)
        statuses = []
        with self._lock:
            current = self._load()
            before = dict(current)
            for conn_id, given in items:
                try:
                    path = kind.check_connection(given, self.env)
                    new = Connection(conn_id, domain_type, path)
                    old = current.get(conn_id)
                    if old is not None and old != new:
                        raise errors.StorageServerConnectionError(
                            f"id {conn_id} names {old.domain_type} connection {old.connection}",
                            connection=given,
                        )
                    current[conn_id] = new
                    statuses.append({"id": conn_id, "status": ""})
                except errors.Error as e:
                    log.warning("Refused connection id=%s type=%s connection=%r: %s",
                                conn_id, domain_type, given, e)
                    statuses.append({"id": conn_id, "status": e.name})
            if current != before:
                self._save(current)
        for conn_id in sorted(set(current) - set(before)):
            c = current[conn_id]
            log.info("Connected storage id=%s type=%s connection=%s",
                     conn_id, c.domain_type, c.connection)
        return statuses

    def disconnect(
        self, domain_type: str, params: Sequence[Mapping[str, Any]], busy: BusyCheck
    ) -> tuple[list[dict[str, str]], list[Connection]]:
        """Forget each connection (an unknown id is already disconnected);
        ([{id, status}], the connections dropped).  busy(connection) says
        why one may not be dropped now."""
        domain_types.get(domain_type)
        items = _items(params)
        statuses = []
        removed: list[Connection] = []
        with self._lock:
            current = self._load()
            for conn_id, given in items:
                try:
                    old = current.get(conn_id)
                    if old is not None:
                        _check_same(old, domain_type, given)
                        reason = busy(old)
                        if reason:
                            raise errors.StorageServerDisconnectionError(reason, connection=given)
                        del current[conn_id]
                        removed.append(old)
                    statuses.append({"id": conn_id, "status": ""})
                except errors.Error as e:
                    log.warning("Refused disconnection id=%s connection=%r: %s", conn_id, given, e)
                    statuses.append({"id": conn_id, "status": e.name})
            if removed:
                self._save(current)
        for c in removed:
            log.info("Disconnected storage id=%s type=%s connection=%s",
                     c.id, c.domain_type, c.connection)
        return statuses, removed

    # State.

    def _load(self) -> dict[str, Connection]:
        try:
            with open(self.path, encoding="utf-8") as f:
                doc = json.load(f)
        except FileNotFoundError:
            return {}
        except ValueError:
            log.error("Ignoring corrupt connection state path=%s", self.path)
            return {}
        result = {}
        for conn_id, entry in (doc if isinstance(doc, dict) else {}).items():
            try:
                result[conn_id] = Connection(conn_id, entry["type"], entry["connection"])
            except (KeyError, TypeError):
                log.error("Ignoring corrupt connection id=%s entry=%r", conn_id, entry)
        return result

    def _save(self, conns: Mapping[str, Connection]) -> None:
        sd_registry.write_json_atomic(
            self.path, {conn_id: c.as_dict() for conn_id, c in sorted(conns.items())}
        )


def _items(params: Iterable[Mapping[str, Any]]) -> list[tuple[str, Any]]:
    """(id, connection) of each param; a malformed one refuses the whole
    call before anything is done (the schema refuses them first).  The
    connection itself is checked by its domain type, one status each."""
    items = []
    for entry in params:
        if not isinstance(entry, Mapping) or set(entry) != {"id", "connection"}:
            raise errors.InvalidConnectionParams(value=entry)
        conn_id = entry["id"]
        if not isinstance(conn_id, str) or not uuids.is_uuid(conn_id):
            raise errors.InvalidUUID(value=conn_id)
        items.append((conn_id.lower(), entry["connection"]))
    return items


def _check_same(old: Connection, domain_type: str, given: Any) -> None:
    """Refuse disconnecting an id that names another connection."""
    same = (
        old.domain_type == domain_type
        and isinstance(given, str)
        and os.path.normpath(given) == old.connection
    )
    if not same:
        raise errors.StorageServerDisconnectionError(
            f"id {old.id} names {old.domain_type} connection {old.connection}", connection=given
        )
