"""Recovery on a libvirtd shared by several hosts' daemons: a restarted
daemon adopts only the running VMs whose drives are its own prepare links."""

from __future__ import annotations

import uuid

from tests.virt import fake_libvirt
from tests.virt.test_vm import make_drive
from virt import metadata, recovery


class NoStorage:
    """Recovery must not reach storage for a domain it does not adopt."""

    def __getattr__(self, name: str) -> object:
        raise AssertionError(f"storage.{name} called for another host's VM")


def domain_on(path_root: str) -> fake_libvirt.Domain:
    drive = make_drive()
    for vol in drive.chain:
        vol.path = vol.path.replace("/run/sd", path_root)
    dom = fake_libvirt.Domain(str(uuid.uuid4()))
    dom.metadata_xml = metadata.to_xml([drive])
    return dom


def test_a_vm_on_another_hosts_links_is_not_adopted():
    dom = domain_on("/run/host2/storage")
    conn = fake_libvirt.Connection(dom)
    vm = recovery.recover_domain(conn, NoStorage(), NoStorage(), dom, "/run/host1/storage")
    assert vm is None
    # Nothing was written to the other host's domain.
    assert "setMetadata" not in dom.calls


def test_a_prefix_of_the_root_is_not_the_root():
    # /run/host1/storage-old is not under /run/host1/storage.
    dom = domain_on("/run/host1/storage-old")
    conn = fake_libvirt.Connection(dom)
    vm = recovery.recover_domain(conn, NoStorage(), NoStorage(), dom, "/run/host1/storage")
    assert vm is None
