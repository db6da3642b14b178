"""A small fake of the libvirt objects a VM talks to, for fault injection.

:class:`Domain` answers the ``virDomain`` calls :mod:`virt.vm` makes, records
them, and raises the error set in ``failures`` for a call (by method name).
:class:`Connection` is a :class:`virt.connection.Connection` whose live
``virConnect`` is itself: it looks domains up by UUID as libvirt does
(``VIR_ERR_NO_DOMAIN`` for one that is gone). Tests of the connection itself
use the real libvirtd (tests/virt/test_connection.py), not this.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import libvirt

from virt import connection

T = TypeVar("T")


def error(code: int, message: str = "injected failure") -> libvirt.libvirtError:
    """A libvirtError as libvirt raises it, with its error code."""
    e = libvirt.libvirtError(message)
    e.err = (code, libvirt.VIR_FROM_QEMU, message, libvirt.VIR_ERR_ERROR, None, None, None, 0, 0)
    return e


class Domain:
    def __init__(
        self,
        uuid: str,
        state: tuple[int, int] = (libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_RUNNING_BOOTED),
    ) -> None:
        self.uuid = uuid
        self.domain_state = state
        self.disk_errors: dict[str, int] = {}
        self.block_info: dict[str, list[int]] = {}  # dev -> [capacity, allocation, physical]
        self.block_jobs: dict[str, dict[str, int]] = {}
        self.metadata_xml: str | None = None
        self.failures: dict[str, libvirt.libvirtError] = {}
        self.calls: list[str] = []

    def _call(self, name: str) -> None:
        self.calls.append(name)
        if name in self.failures:
            raise self.failures[name]

    # virDomain's names

    def UUIDString(self) -> str:  # noqa: N802
        return self.uuid

    def name(self) -> str:
        return f"vm-{self.uuid[:8]}"

    def state(self, flags: int = 0) -> list[int]:
        self._call("state")
        return list(self.domain_state)

    def diskErrors(self, flags: int = 0) -> dict[str, int]:  # noqa: N802
        self._call("diskErrors")
        return dict(self.disk_errors)

    def resume(self) -> int:
        self._call("resume")
        self.domain_state = (libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_RUNNING_UNPAUSED)
        return 0

    def destroy(self) -> int:
        self._call("destroy")
        self.domain_state = (libvirt.VIR_DOMAIN_SHUTOFF, libvirt.VIR_DOMAIN_SHUTOFF_DESTROYED)
        return 0

    def blockInfo(self, dev: str, flags: int = 0) -> list[int]:  # noqa: N802
        self._call("blockInfo")
        return list(self.block_info[dev])

    def blockJobInfo(self, dev: str, flags: int = 0) -> dict[str, int]:  # noqa: N802
        self._call("blockJobInfo")
        return dict(self.block_jobs.get(dev, {}))

    def setMetadata(  # noqa: N802
        self, kind: int, text: str, prefix: str, uri: str, flags: int = 0
    ) -> int:
        self._call("setMetadata")
        self.metadata_xml = text
        return 0

    def metadata(self, kind: int, uri: str, flags: int = 0) -> str:
        self._call("metadata")
        if self.metadata_xml is None:
            raise error(libvirt.VIR_ERR_NO_DOMAIN_METADATA, "no metadata")
        return self.metadata_xml


class Connection(connection.Connection):
    """Running domains by UUID; remove one from ``domains`` and it is gone."""

    def __init__(self, *domains: Domain) -> None:
        super().__init__()
        self.domains = {d.uuid: d for d in domains}
        self.lookups = 0

    def call(self, fn: Callable[[Any], T], retry: bool = True) -> T:
        return fn(self)

    def lookupByUUIDString(self, uuid: str) -> Domain:  # noqa: N802
        self.lookups += 1
        dom = self.domains.get(uuid)
        if dom is None:
            raise error(libvirt.VIR_ERR_NO_DOMAIN, f"Domain not found: no domain with UUID {uuid}")
        return dom

    def lookup(self, vm_id: str) -> Any:
        return self.call(lambda c: c.lookupByUUIDString(vm_id))
