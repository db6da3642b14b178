"""The libvirt domain a new VM gets on this host: VM.create's and VM.migrationCreate's.

Both verbs (virt/api.py, virt/migration_dest.py) take the same checked
params (virt/vmparams.py) and prepare the drives the same way, then::

    domain_def.check_free(conn, vm_id)      VMExists if libvirt has a domain
                                            of that UUID (ours or not)
    domain_def.xml(vm_id, params, drives)   the domain XML (virt/domxml.py) on
                                            the drives' prepare links, with our
                                            metadata (virt/metadata.py) inside

VM.create then starts the domain; the destination of a migration answers
the XML to the source, which migrates the VM into it.
"""

from __future__ import annotations

import libvirt

from virt import connection, domxml, errors, metadata, vmparams
from virt import drive as drive_mod


def check_free(conn: connection.Connection, vm_id: str) -> None:
    """Raise VMExistsError if libvirt already has a domain with vm_id as its UUID."""
    try:
        conn.lookup(vm_id)
    except libvirt.libvirtError as e:
        if e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
            return
        raise
    raise errors.VMExistsError("a libvirt domain has this UUID", vm_id=vm_id)


def xml(vm_id: str, params: vmparams.VMParams, drives: list[drive_mod.Drive]) -> str:
    """The domain XML of the VM vm_id described by params, on its prepared drives."""
    spec = domxml.DomainSpec(
        vm_id=vm_id,
        name=params.name,
        memory_mib=params.memory_mib,
        vcpus=params.vcpus,
        domain_type=domxml.DOMAIN_TYPES[params.accel],
        kernel=params.kernel,
        initrd=params.initrd,
        cmdline=params.cmdline,
        serial_log=params.serial_log,
    )
    return domxml.build(spec, drives, metadata.to_element(drives))
