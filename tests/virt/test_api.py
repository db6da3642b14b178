"""virt/api.py: VM.create / destroy / cont / getStats, Host.getVMList, bad input."""

from __future__ import annotations

import os
import uuid

import libvirt
import pytest

from contrib.guest import verifier
from storage import errors as storage_errors
from tests.virt import conftest
from virt import errors
from virt import vm as vm_mod

pytestmark = [pytest.mark.root, pytest.mark.libvirt]

MiB = conftest.MiB


def lookup(vm_id: str) -> libvirt.virDomain | None:
    conn = conftest.libvirt_connection()
    try:
        return conn.lookupByUUIDString(vm_id)
    except libvirt.libvirtError:
        return None
    finally:
        conn.close()


@pytest.mark.guest
def test_create_writes_verify_destroy(make_api, any_env, vm_params):
    # A two-volume chain (RAW base, COW leaf) on a file or a block domain:
    # QEMU opens it through the prepare links, and every acknowledged write
    # is on the chain afterwards.
    env = any_env
    api = make_api(env)
    img, base, leaf = str(uuid.uuid4()), str(uuid.uuid4()), str(uuid.uuid4())
    env.create(img, base, 64 * MiB, "RAW")
    env.create(img, leaf, 64 * MiB, "COW", parent=base, initial_size=32 * MiB)
    g = vm_params([env.drive(img, leaf)], count=200, poweroff=True)

    result = api.vm_create(g.vm_id, g.params)

    assert result == {"vmId": g.vm_id, "status": vm_mod.UP}
    assert [(v["vmId"], v["status"]) for v in api.host_get_vm_list()] == [(g.vm_id, vm_mod.UP)]
    disk_type = "block" if env.is_block else "file"
    assert f"<disk type='{disk_type}' device='disk'>" in lookup(g.vm_id).XMLDesc(0)
    stats = api.vm_get_stats(g.vm_id)[0]
    disk = stats["disks"]["vda"]
    assert stats["status"] == vm_mod.UP
    assert stats["pauseCode"] == vm_mod.NOERR
    assert (disk["domainID"], disk["imageID"], disk["volumeID"]) == (env.sd_id, img, leaf)
    assert disk["volumeChain"] == [
        {"volumeID": base, "path": env.link_path(img, base)},
        {"volumeID": leaf, "path": env.link_path(img, leaf)},
    ]
    assert disk["capacity"] == 64 * MiB
    assert "replicate" not in disk
    # The guest writes 200 blocks and powers off: the VM goes Down by itself.
    g.wait_acks(200)
    conftest.wait_for(lambda: api.get_vm(g.vm_id).status == vm_mod.DOWN, 60, "guest poweroff")
    assert [(v["vmId"], v["status"]) for v in api.host_get_vm_list()] == [(g.vm_id, vm_mod.DOWN)]

    res = verifier.verify(g.serial_log, env.link_path(img, leaf), "qcow2")
    assert res.lost == 0
    assert res.verified > 0

    assert api.vm_destroy(g.vm_id) is True
    assert api.host_get_vm_list() == []
    assert env.held() == {}
    assert not os.path.exists(env.link_path(img, leaf))
    with pytest.raises(errors.NoVMError):
        api.vm_get_stats(g.vm_id)[0]


@pytest.mark.guest
def test_destroy_running_vm(api, file_env, vm_params):
    img, vol = file_env.new_image()
    g = vm_params([file_env.drive(img, vol)])
    api.vm_create(g.vm_id, g.params)
    g.wait_acks(5)

    api.vm_destroy(g.vm_id)

    assert lookup(g.vm_id) is None
    assert file_env.held() == {}
    assert api.host_get_vm_list() == []


def test_unknown_vm_is_no_vm(api):
    vm_id = str(uuid.uuid4())
    for call in (api.vm_get_stats, api.vm_destroy, api.vm_cont):
        with pytest.raises(errors.NoVMError) as e:
            call(vm_id)
        assert e.value.name == "noVM"
    with pytest.raises(errors.NoVMError):
        api.vm_snapshot(vm_id, [])


@pytest.mark.guest
def test_duplicate_vm_id_is_exist(api, file_env, vm_params):
    img, vol = file_env.new_image()
    img2, vol2 = file_env.new_image()
    g = vm_params([file_env.drive(img, vol)])
    api.vm_create(g.vm_id, g.params)
    params = dict(g.params, drives=[file_env.drive(img2, vol2)], vmName=g.params["vmName"] + "-2")

    with pytest.raises(errors.VMExistsError) as e:
        api.vm_create(g.vm_id, params)

    assert e.value.name == "exist"
    # The refused create took no reference and left the first VM alone.
    assert ("prepare", vol2) not in file_env.calls
    assert file_env.held() == {vol: 1}
    assert api.get_vm(g.vm_id).status == vm_mod.UP
    api.vm_destroy(g.vm_id)


def test_domain_with_same_uuid_is_exist(api, file_env, vm_params):
    # A domain the daemon does not know (another agent's) blocks the UUID too.
    img, vol = file_env.new_image()
    g = vm_params([file_env.drive(img, vol)])
    conn = conftest.libvirt_connection()
    try:
        name = g.params["vmName"] + "-foreign"
        conn.createXML(
            f"<domain type='qemu'><name>{name}</name><uuid>{g.vm_id}</uuid>"
            "<memory unit='MiB'>64</memory><os><type arch='x86_64'>hvm</type></os></domain>",
            libvirt.VIR_DOMAIN_START_PAUSED,
        )
    finally:
        conn.close()

    with pytest.raises(errors.VMExistsError):
        api.vm_create(g.vm_id, g.params)

    assert file_env.calls == []
    assert api.host_get_vm_list() == []


def test_unknown_volume_leaves_nothing_behind(api, file_env, vm_params):
    # The second drive names a volume storage does not have: storage's own
    # code reaches the caller, the first drive's volume is released, no domain.
    img, vol = file_env.new_image()
    img2, _ = file_env.new_image()
    missing = file_env.drive(img2, str(uuid.uuid4()))
    g = vm_params([file_env.drive(img, vol), missing])

    with pytest.raises(storage_errors.Error) as e:
        api.vm_create(g.vm_id, g.params)

    assert e.value.name == "VolumeDoesNotExist"
    assert lookup(g.vm_id) is None
    assert api.host_get_vm_list() == []
    assert ("prepare", vol) in file_env.calls
    assert file_env.held() == {}


def test_unknown_domain_is_storage_error(api, file_env, vm_params):
    img, vol = file_env.new_image()
    drive = dict(file_env.drive(img, vol), domainID=str(uuid.uuid4()))
    g = vm_params([drive])

    with pytest.raises(storage_errors.Error) as e:
        api.vm_create(g.vm_id, g.params)

    assert e.value.name == "StorageDomainDoesNotExist"
    assert lookup(g.vm_id) is None


def test_illegal_volume_is_refused(api, file_env, vm_params):
    img, vol = file_env.new_image()
    file_env.set_illegal(img, vol)
    g = vm_params([file_env.drive(img, vol)])

    with pytest.raises(storage_errors.Error):
        api.vm_create(g.vm_id, g.params)

    assert lookup(g.vm_id) is None
    assert file_env.held() == {}


def test_unexpected_storage_failure_is_image_err(api, file_env, vm_params):
    class Broken:
        # Fault injection: storage fails without a code of its own.
        def prepare(self, *ids):
            raise OSError("I/O error reading metadata")

        def teardown(self, *ids):
            raise AssertionError("nothing was prepared")

    api._storage = Broken()
    img, vol = file_env.new_image()
    g = vm_params([file_env.drive(img, vol)])

    with pytest.raises(errors.ImageError) as e:
        api.vm_create(g.vm_id, g.params)

    assert e.value.name == "imageErr"
    assert lookup(g.vm_id) is None


def test_format_mismatch_is_refused(api, file_env, vm_params):
    # A COW volume presented as raw would let the guest overwrite the qcow2
    # header: refused, and the reference released.
    img, vol = file_env.new_image()
    g = vm_params([file_env.drive(img, vol, fmt="raw")])

    with pytest.raises(errors.InvalidVMParamsError):
        api.vm_create(g.vm_id, g.params)

    assert file_env.held() == {}
    assert lookup(g.vm_id) is None


@pytest.mark.parametrize(
    "change",
    [
        {"accel": "hvf"},
        {"memSize": 1},
        {"smp": 0},
        {"kernel": "/nonexistent/vmlinuz"},
        {"initrd": "/nonexistent/initrd"},
        {"serialLog": "relative.log"},
        {"drives": [{"poolID": "not-a-uuid"}]},
    ],
)
def test_bad_params_are_refused(api, file_env, vm_params, change):
    img, vol = file_env.new_image()
    g = vm_params([file_env.drive(img, vol)])

    with pytest.raises(errors.InvalidVMParamsError) as e:
        api.vm_create(g.vm_id, dict(g.params, **change))

    assert e.value.name == "VMParamsInvalid"
    assert file_env.calls == []
    assert lookup(g.vm_id) is None


def test_libvirt_refusal_is_create_err(api, file_env, vm_params):
    # libvirt refuses a second domain with the same name: createErr, and the
    # prepared volume is released.
    img, vol = file_env.new_image()
    img2, vol2 = file_env.new_image()
    first = vm_params([file_env.drive(img, vol)])
    api.vm_create(first.vm_id, first.params)
    second = vm_params([file_env.drive(img2, vol2)])

    with pytest.raises(errors.CreateError) as e:
        api.vm_create(second.vm_id, dict(second.params, vmName=first.params["vmName"]))

    assert e.value.name == "createErr"
    assert file_env.refs(img2, vol2) == 0
    assert lookup(second.vm_id) is None
    assert [v["vmId"] for v in api.host_get_vm_list()] == [first.vm_id]


@pytest.mark.guest
def test_cont_resumes_paused_vm(api, file_env, vm_params):
    img, vol = file_env.new_image()
    g = vm_params([file_env.drive(img, vol)], rate=20)
    api.vm_create(g.vm_id, g.params)
    lookup(g.vm_id).suspend()
    conftest.wait_for(lambda: api.get_vm(g.vm_id).status == vm_mod.PAUSED, 30, "Paused")
    assert api.vm_get_stats(g.vm_id)[0]["pauseCode"] == vm_mod.NOERR

    assert api.vm_cont(g.vm_id) is True

    assert api.get_vm(g.vm_id).status == vm_mod.UP
    g.wait_acks(5)


def test_cont_down_vm_fails(api, file_env, vm_params):
    img, vol = file_env.new_image()
    g = vm_params([file_env.drive(img, vol)])
    api.vm_create(g.vm_id, g.params)
    lookup(g.vm_id).destroy()
    conftest.wait_for(lambda: api.get_vm(g.vm_id).status == vm_mod.DOWN, 30, "Down")

    with pytest.raises(errors.OperationError):
        api.vm_cont(g.vm_id)

    # A VM that went down stays listed until destroyed, as in VDSM.
    assert api.vm_get_stats(g.vm_id)[0]["status"] == vm_mod.DOWN
    api.vm_destroy(g.vm_id)
    assert file_env.held() == {}
