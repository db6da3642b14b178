"""Configuration: typed defaults, files, conf.d overrides, clear errors."""

from __future__ import annotations

import pytest

from vdsm_lsm import config


def test_defaults_without_files(tmp_path):
    cfg = config.load(str(tmp_path / "missing.conf"))
    assert cfg.addresses.management_port == 54321
    assert cfg.irs.volume_utilization_percent == 20
    assert cfg.irs.volume_utilization_chunk_mb == 2560
    assert cfg.thinp.monitor_interval == 2.0
    assert cfg.lvm.activation == "auto"
    assert cfg.vm.accel == "kvm"
    assert cfg.tls.enabled is False


def test_conf_d_overrides_in_sorted_order(tmp_path):
    main = tmp_path / "vdsm-lsm.conf"
    main.write_text("[irs]\nvolume_utilization_chunk_mb = 1024\n[vm]\naccel = kvm\n")
    (tmp_path / "conf.d").mkdir()
    (tmp_path / "conf.d" / "20-b.conf").write_text("[irs]\nvolume_utilization_chunk_mb = 64\n")
    (tmp_path / "conf.d" / "10-a.conf").write_text("[irs]\nvolume_utilization_chunk_mb = 128\n")
    (tmp_path / "conf.d" / "ignored.txt").write_text("[irs]\nvolume_utilization_chunk_mb = 1\n")
    cfg = config.load(str(main))
    assert cfg.irs.volume_utilization_chunk_mb == 64
    assert cfg.sources[("irs", "volume_utilization_chunk_mb")].endswith("20-b.conf")
    assert "from " + str(tmp_path / "conf.d" / "20-b.conf") in cfg.format()


@pytest.mark.parametrize(
    "text, section, key",
    [
        ("[irs]\nvolume_utilization_percent = lots\n", "irs", "volume_utilization_percent"),
        ("[irs]\nvolume_utilization_percent = 0\n", "irs", "volume_utilization_percent"),
        ("[lvm]\nactivation = magic\n", "lvm", "activation"),
        ("[tls]\nenabled = maybe\n", "tls", "enabled"),
        ("[irs]\nrun_dir = relative/dir\n", "irs", "run_dir"),
        ("[irs]\nno_such_key = 1\n", "irs", "no_such_key"),
        ("[nosection]\na = 1\n", "nosection", ""),
        ("[thinp]\nmonitor_interval = nan\n", "thinp", "monitor_interval"),
        ("[irs]\noop_timeout = inf\n", "irs", "oop_timeout"),
    ],
)
def test_bad_value_names_file_section_key(tmp_path, text, section, key):
    path = tmp_path / "vdsm-lsm.conf"
    path.write_text(text)
    with pytest.raises(config.ConfigError) as e:
        config.load(str(path))
    assert e.value.path == str(path)
    assert e.value.section == section and e.value.key == key
    assert str(path) in str(e.value) and f"[{section}]" in str(e.value)


def test_unreadable_file_is_a_config_error(tmp_path):
    path = tmp_path / "vdsm-lsm.conf"
    path.write_text("not an ini file\n")
    with pytest.raises(config.ConfigError, match="cannot read"):
        config.load(str(path))


def test_config_declares_every_schema_section():
    # Config's annotations tell the type checker which sections exist.
    assert set(config.Config.__annotations__) == set(config.SCHEMA)
