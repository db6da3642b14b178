"""Finding storage domains on the storage this host is connected to.

A host reaches shared storage through *connections*
(``StoragePool.connectStorageServer``, :mod:`storage.connections`): a file
domain's directory, or one device of a block domain.  This module knows,
for each domain type, what a usable connection is and how a domain is found
on the connections of that type (as VDSM's storage domain cache finds a
domain by looking, never by remembering):

=======  ================================  ======================================
type     a connection is                   domain ``<sd>`` is there when
=======  ================================  ======================================
file     an existing absolute directory    ``<dir>/<sd>/dom_md/metadata`` exists
         (the domain's ``typeArgs.path``)
block    an existing block device          the VG named ``<sd>`` has PVs among the
                                           connected devices (one ``pvs`` over
                                           them, with an LVM filter accepting
                                           those devices only)
=======  ================================  ======================================

What is found is the domain's connection arguments (``{"path"}`` or
``{"devices"}``, what :mod:`storage.domain_types` opens a domain with) and
the connections it was found on.  Nothing here writes to storage or keeps a
reading: each look is made afresh, so a domain another host just created
or attached is found.  :mod:`storage.domain_types` puts these functions in
its table.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import stat
from collections.abc import Sequence
from typing import Any

from storage import errors, file_sd, lvm, lvm_cmd, sd

log = logging.getLogger("storage.discovery")


@dataclasses.dataclass(frozen=True)
class Found:
    """Where a domain was found."""

    args: dict[str, Any]  # its connection arguments: {"path": DIR} or {"devices": [...]}
    used: tuple[str, ...]  # the connections (directories or devices) it lives on


def _invalid(domain_type: str, connection: str, reason: str) -> errors.Error:
    return errors.StorageServerValidationError(
        reason, domain_type=domain_type, connection=connection
    )


def _absolute(domain_type: str, connection: str) -> str:
    if not isinstance(connection, str) or not connection or "\0" in connection:
        raise _invalid(domain_type, str(connection), "not a path")
    if not os.path.isabs(connection):
        raise _invalid(domain_type, connection, "not an absolute path")
    return os.path.normpath(connection)


# File domains.


def check_directory(connection: str, env: sd.Env) -> str:
    """The connection of a file domain, normalized: an existing absolute
    directory (looked at through oop: a hung mount fails with OopTimeout)."""
    path = _absolute(sd.FILE, connection)
    try:
        st = env.oop.stat(path)
    except FileNotFoundError:
        raise _invalid(sd.FILE, connection, "does not exist") from None
    except OSError as e:
        raise _invalid(sd.FILE, connection, e.strerror or str(e)) from e
    if not stat.S_ISDIR(st.st_mode):
        raise _invalid(sd.FILE, connection, "not a directory")
    return path


def find_file_domain(sd_id: str, dirs: Sequence[str], env: sd.Env) -> Found | None:
    """The first directory holding ``<sd_id>/dom_md/metadata``."""
    sd.check_uuid(sd_id)
    for path in dirs:
        metadata = os.path.join(path, sd_id, file_sd.DOM_MD, "metadata")
        try:
            if env.oop.exists(metadata):
                return Found({"path": path}, (path,))
        except errors.Error as e:  # a hung or broken mount: look at the others
            log.warning("Cannot look for domain sd=%s in %s: %s", sd_id, path, e)
    return None


# Block domains.


def check_block_device(connection: str, env: sd.Env) -> str:
    """The connection of a block domain, normalized: an existing block device
    whose path an LVM device filter can name."""
    path = _absolute(sd.BLOCK, connection)
    try:
        lvm_cmd.check_device(path)
    except ValueError:
        raise _invalid(sd.BLOCK, connection, "not a device path LVM can filter on") from None
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise _invalid(sd.BLOCK, connection, "does not exist") from None
    except OSError as e:
        raise _invalid(sd.BLOCK, connection, e.strerror or str(e)) from e
    if not stat.S_ISBLK(st.st_mode):
        raise _invalid(sd.BLOCK, connection, "not a block device")
    return path


def find_block_domain(sd_id: str, devices: Sequence[str], env: sd.Env) -> Found | None:
    """The VG named sd_id on the connected devices, in the VG's PV order."""
    sd.check_uuid(sd_id)
    if not devices:
        return None
    lvm_ = lvm.LVM(list(dict.fromkeys(devices)), activation=False)
    try:
        pvs = lvm_.pvs()
        members = {dev for dev, vg in pvs.items() if vg == sd_id}
        if not members:
            return None
        order = [pv.name for pv in lvm_.vg_info(sd_id).pvs if pv.name in members]
    except errors.Error as e:
        log.warning("Cannot look for domain sd=%s on %s: %s", sd_id, list(devices), e)
        return None
    found = order or sorted(members)
    return Found({"devices": found}, tuple(found))
