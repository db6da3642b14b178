"""The one registry of domain types: how each kind of domain is created,
opened and described.

Everything that must tell a file domain from a block domain asks this table
(``StorageDomain.create``, opening a domain from this host's registry,
connecting to storage and finding a domain on it, connecting to the pool)
instead of branching on the type itself.  A domain type is:

- ``args_of(type_args)``: the connection arguments this host remembers for
  the domain (``{"path"}`` or ``{"devices"}``), from the caller's
  ``typeArgs``; refuses what does not fit with ``InvalidDomainArgs``;
- ``create(sd_id, args, name, env)``: make a new domain on the storage;
- ``open(sd_id, args, env)``: the domain object of an existing domain;
- ``check_connection(connection, env)``: a connection to storage of this
  type (``StoragePool.connectStorageServer``: a file domain's directory, a
  block device), normalized; refuses what is not usable with
  ``StorageServerValidationError`` (:mod:`storage.discovery`);
- ``find(sd_id, connections, env)``: where the domain is on the connected
  storage of this type (:class:`storage.discovery.Found`), or None.

Behaviour that differs per type once a domain is open (extension, activation,
leases) is the domain object's own method, never a branch here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

from storage import block_sd, discovery, errors, file_sd, sd, sd_registry

Args = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class DomainType:
    name: str
    args_of: Callable[[Args], Args]
    create: Callable[[str, Args, str, sd.Env], sd.StorageDomain]
    open: sd_registry.Opener
    check_connection: Callable[[str, sd.Env], str]
    find: Callable[[str, Sequence[str], sd.Env], discovery.Found | None]


def _file_args(type_args: Args) -> Args:
    path = type_args.get("path")
    if not isinstance(path, str) or not path:
        raise errors.InvalidDomainArgs("needs typeArgs.path", domain_type=sd.FILE)
    return {"path": path}


def _block_args(type_args: Args) -> Args:
    devices = type_args.get("devices")
    if not isinstance(devices, list) or not devices:
        raise errors.InvalidDomainArgs("needs typeArgs.devices", domain_type=sd.BLOCK)
    if not all(isinstance(d, str) and d for d in devices):
        raise errors.InvalidDomainArgs("typeArgs.devices must be paths", domain_type=sd.BLOCK)
    return {"devices": list(devices)}


TYPES: dict[str, DomainType] = {
    sd.FILE: DomainType(
        name=sd.FILE,
        args_of=_file_args,
        create=lambda sd_id, args, name, env: file_sd.create(sd_id, args["path"], name, env),
        open=file_sd.open_domain,
        check_connection=discovery.check_directory,
        find=discovery.find_file_domain,
    ),
    sd.BLOCK: DomainType(
        name=sd.BLOCK,
        args_of=_block_args,
        create=lambda sd_id, args, name, env: block_sd.create(sd_id, args["devices"], name, env),
        open=block_sd.open_domain,
        check_connection=discovery.check_block_device,
        find=discovery.find_block_domain,
    ),
}


def get(domain_type: str) -> DomainType:
    try:
        return TYPES[domain_type]
    except KeyError:
        raise errors.InvalidDomainArgs("unknown domainType", domain_type=domain_type) from None


def openers() -> dict[str, sd_registry.Opener]:
    """For :class:`storage.sd_registry.DomainCache`: open a remembered domain by type."""
    return {name: t.open for name, t in TYPES.items()}
