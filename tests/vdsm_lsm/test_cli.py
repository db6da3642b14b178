"""The vdsm-lsm-client command (vdsm_lsm/cli.py): a light client.

Reading the schema for help, parsing a verb's words and calling it, and
parsing a move-disk command line pull in none of the daemon: no libvirt, no
pyudev, no storage or virt package, no wiring (vdsm_lsm.app).  The transport
(client.py) and the flow (move_disk.py) do not import each other; the
command sits on top of both.  The calls against a real daemon are in
test_client.py and test_move_disk.py.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys

import pytest

from vdsm_lsm import api_schema, cli

TOP = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HEAVY = ("libvirt", "pyudev", "sanlock", "storage", "virt", "vdsm_lsm.app")

LIGHT_CLIENT = f"""
import contextlib, io, sys
from vdsm_lsm import cli

out = io.StringIO()
with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
    assert cli.main(["-h"]) == 0
    assert cli.main(["Volume", "create", "-h"]) == 0
    # The whole verb path, up to the call of a daemon that is not there.
    assert cli.main(["--socket", sys.argv[1], "StorageDomain", "getInfo",
                     "storagedomainID=x"]) == 3
    args = cli.build_move_disk_parser().parse_args(["vm", "sd", "--drive", "vdb"])
    assert args.drive == "vdb"
assert "volFormat: COW|RAW" in out.getvalue(), out.getvalue()
heavy = {HEAVY!r}
loaded = sorted(m for m in sys.modules if m in heavy or m.split(".")[0] in heavy)
print(" ".join(loaded))
"""


def test_the_client_imports_none_of_the_daemon(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-c", LIGHT_CLIENT, str(tmp_path / "none.sock")],
        cwd=TOP, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "", f"the client imported: {proc.stdout}"


def imported_modules(path: str) -> set[str]:
    """Every module a file imports, at any depth (functions, TYPE_CHECKING blocks)."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


@pytest.mark.parametrize("module, forbidden", [
    ("client", {"vdsm_lsm.cli", "vdsm_lsm.move_disk", "vdsm_lsm.move_progress"}),
    ("move_disk", {"vdsm_lsm.cli", "vdsm_lsm.client"}),
    ("move_progress", {"vdsm_lsm.cli", "vdsm_lsm.client", "vdsm_lsm.move_disk"}),
    ("client_errors", {"vdsm_lsm.cli", "vdsm_lsm.client", "vdsm_lsm.move_disk"}),
    ("api_schema", {"vdsm_lsm.app", "vdsm_lsm.cli", "vdsm_lsm.client"}),
])
def test_the_command_sits_on_top_of_the_transport_and_the_flow(module, forbidden):
    imports = imported_modules(os.path.join(TOP, "vdsm_lsm", f"{module}.py"))
    assert not imports & forbidden


def test_python_m_vdsm_lsm_client_is_the_same_command():
    def run(module: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", module, "Volume", "create", "-h"],
                              cwd=TOP, capture_output=True, text=True, timeout=120)

    old, new = run("vdsm_lsm.client"), run("vdsm_lsm.cli")
    assert old.returncode == new.returncode == 0
    assert old.stdout == new.stdout and "volFormat: COW|RAW" in new.stdout


def test_words_name_a_verb_or_an_alias():
    api = api_schema.load()
    assert cli.method_from_words(api, ["Image", "prepare", "a=1"]) == ("Image.prepare", ["a=1"])
    assert cli.method_from_words(api, ["cloneImageStructure", "a=1"]) == (
        "cloneImageStructure", ["a=1"])
    with pytest.raises(ValueError, match="unknown verb: Volume explode"):
        cli.method_from_words(api, ["Volume", "explode"])


def test_move_disk_splits_connection_options_from_the_flow_options(tmp_path, capsys):
    sock = str(tmp_path / "none.sock")
    assert cli.main(["--socket", sock, "move-disk", "vm", "sd"]) == 3
    assert "cannot reach the daemon" in capsys.readouterr().err


@pytest.mark.parametrize("text, expected", [
    ("/run/vdsm-lsm/api.sock", ("/run/vdsm-lsm/api.sock", None, 0)),
    ("unix:api.sock", ("api.sock", None, 0)),
    ("host1", (None, "host1", 54321)),
    ("10.0.0.1:5000", (None, "10.0.0.1", 5000)),
    ("[::1]:5000", (None, "::1", 5000)),
    ("[::1]", (None, "::1", 54321)),
    ("::1", (None, "::1", 54321)),
])
def test_spm_address_is_a_socket_or_host_and_port(text, expected):
    assert cli.parse_address(text, 54321) == expected


@pytest.mark.parametrize("text", ["host:", "host:port", "host:70000", "[::1", "unix:", ":5"])
def test_a_bad_spm_address_is_refused(text):
    with pytest.raises(ValueError):
        cli.parse_address(text, 54321)


def test_move_disk_names_the_unreachable_spm(tmp_path, capsys):
    vm_sock, spm_sock = str(tmp_path / "vm.sock"), str(tmp_path / "spm.sock")
    assert cli.main(["--socket", vm_sock, "move-disk", "vm", "sd", "--spm", "host:x"]) == 2
    assert "--spm: bad address" in capsys.readouterr().err
    assert cli.main(["--socket", vm_sock, "move-disk", "vm", "sd", "--spm", spm_sock]) == 3
    assert f"the VM's host (unix:{vm_sock})" in capsys.readouterr().err


def test_move_disk_durations_and_bandwidth_are_checked(capsys):
    parser = cli.build_move_disk_parser()
    args = parser.parse_args(["vm", "sd", "--enospc-timeout", "45", "--stall-timeout", "2.5"])
    assert (args.enospc_timeout, args.stall_timeout) == (45.0, 2.5)
    assert parser.parse_args(["vm", "sd"]).enospc_timeout == 30.0
    for bad in (["--enospc-timeout", "0"], ["--stall-timeout", "-1"], ["--timeout", "nan"],
                ["--timeout", "soon"], ["--enospc-timeout", "inf"], ["--bandwidth", "-5"],
                ["--bandwidth", "1.5"]):
        with pytest.raises(SystemExit) as e:
            parser.parse_args(["vm", "sd", *bad])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert f"argument {bad[0]}" in err and bad[1] in err, err
