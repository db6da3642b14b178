"""Running lvm2 (storage/lvm_cmd.py): the --config string, report parsing,
reading lvm2's errors, VG locks and generations.  Pure: nothing runs lvm2
(tests/storage/test_lvm.py runs it)."""

from __future__ import annotations

import json
import uuid

import pytest

from storage import errors, lvm_cmd


def test_config_accepts_only_the_devices() -> None:
    config = lvm_cmd.config(["/dev/loop3", "/dev/loop10"], activation=False)
    assert 'filter=["a|^/dev/loop3$|", "a|^/dev/loop10$|", "r|.*|"]' in config
    assert "global { activation=0 " in config
    assert "use_devicesfile=0" in config
    assert "backup { backup=0 archive=0 }" in config
    assert "global { activation=1 " in lvm_cmd.config(["/dev/loop3"], activation=True)


@pytest.mark.parametrize("dev", ["loop3", "/dev/loop3$", "/dev/a|b", '/dev/"x"', "/dev/a b"])
def test_config_refuses_unsafe_devices(dev: str) -> None:
    with pytest.raises(ValueError):
        lvm_cmd.config([dev], activation=False)


def test_check_name() -> None:
    lvm_cmd.check_name(str(uuid.uuid4()))
    lvm_cmd.check_name("metadata")
    for bad in ("", "-x", "a/b", "a b", "../x"):
        with pytest.raises(ValueError):
            lvm_cmd.check_name(bad)


def test_tag_args_delete_first() -> None:
    assert lvm_cmd.tag_args(["b"], ["a"]) == ["--deltag", "a", "--addtag", "b"]
    assert lvm_cmd.tag_args([], []) == []


def test_report() -> None:
    args = lvm_cmd.report_args("lvs", "lv_name,lv_size", ["vg"], ["--select", "x"])
    assert args == ["lvs", "--reportformat", "json", "--units", "b", "--nosuffix",
                    "-o", "lv_name,lv_size", "--select", "x", "vg"]
    out = json.dumps({"report": [{"lv": [{"lv_name": "a"}]}, {"lv": [{"lv_name": "b"}]},
                                 {"pv": []}]})
    assert lvm_cmd.parse_report("lvs", "lv", out) == [{"lv_name": "a"}, {"lv_name": "b"}]
    with pytest.raises(errors.CommandFailed) as e:
        lvm_cmd.parse_report("lvs", "lv", "not json")
    assert e.value.cmd == ["lvm", "lvs"]
    assert "cannot parse JSON report" in e.value.err


def test_clean_drops_noise() -> None:
    err = (
        "  WARNING: Activation disabled. No device-mapper interaction will be attempted.\n"
        "  Insufficient free space: 3 extents needed, but only 1 available\n"
        "\n"
        "  WARNING: Logical volume vg/lv not zeroed.\n"
    )
    assert lvm_cmd.clean(err) == "Insufficient free space: 3 extents needed, but only 1 available"


def failed(err: str) -> errors.CommandFailed:
    return errors.CommandFailed(cmd=["lvm", "lvs"], rc=5, err=err)


def test_raise_not_found() -> None:
    with pytest.raises(errors.VolumeGroupDoesNotExist) as vg_error:
        lvm_cmd.raise_not_found(failed('  Volume group "vg" not found'), "vg", "lv")
    assert (vg_error.value.vg, vg_error.value.rc, vg_error.value.cmd) == ("vg", 5, ["lvm", "lvs"])
    with pytest.raises(errors.LogicalVolumeDoesNotExistError) as lv_error:
        lvm_cmd.raise_not_found(failed('  Failed to find logical volume "vg/lv"'), "vg", "lv")
    assert (lv_error.value.vg, lv_error.value.lv) == ("vg", "lv")
    # Without an LV to blame, or another failure: returns.
    lvm_cmd.raise_not_found(failed('  Failed to find logical volume "vg/lv"'), "vg")
    lvm_cmd.raise_not_found(failed("  Insufficient free space"), "vg", "lv")
    assert lvm_cmd.failure(failed("x")) == {"cmd": ["lvm", "lvs"], "rc": 5, "err": "x"}


def test_vg_lock_counts_changes_even_failed_ones() -> None:
    vg = f"vg-{uuid.uuid4().hex}"
    assert lvm_cmd.generation(vg) == 0
    with lvm_cmd.vg_lock(vg):
        pass
    with pytest.raises(RuntimeError), lvm_cmd.vg_lock(vg):
        raise RuntimeError("lvcreate failed")
    assert lvm_cmd.generation(vg) == 2
    assert lvm_cmd.generation(f"vg-{uuid.uuid4().hex}") == 0
