"""qemu-img: create, inspect and compare disk images.

Every function runs the real ``qemu-img`` (never parses qcow2 itself) and
reads its ``--output json``.  Failures raise ``storage.errors.CommandFailed``
carrying the command, exit code and stderr.

Copying (``qemu-img convert`` with progress and abort, and the one-layer
copy of ``Image.syncData``) is :mod:`storage.qemuimg_copy`.

Images in use by a VM are read with ``-U`` (force share) where that is safe:
``info``, ``map``, ``measure`` and ``compare`` default to it.
"""

from __future__ import annotations

import json
import logging
import os
import stat
import subprocess
from typing import Any, Literal, overload

from storage import commands, errors

log = logging.getLogger("storage.qemuimg")

QEMU_IMG = "qemu-img"

QCOW2 = "qcow2"
RAW = "raw"

DEFAULT_TIMEOUT = 120.0


def create(
    path: str,
    fmt: str,
    size: int | None = None,
    backing: str | None = None,
    backing_fmt: str | None = None,
    cluster_size: int | None = None,
    preallocation: str | None = None,
    compat: str | None = "1.1",
    timeout: float = DEFAULT_TIMEOUT,
) -> None:
    """Create an image at path (a file or an existing block device).

    A qcow2 backing is stored as given; pass the bare parent volume UUID so
    it resolves relative to the image's directory and the chain stays valid
    when copied to another domain.  size defaults to the backing's.
    """
    cmd = [QEMU_IMG, "create", "-f", fmt]
    options = []
    if fmt == QCOW2:
        if compat:
            options.append(f"compat={compat}")
        if cluster_size:
            options.append(f"cluster_size={cluster_size}")
    elif cluster_size or backing:
        raise ValueError(f"cluster_size and backing need qcow2, not {fmt}")
    if preallocation:
        options.append(f"preallocation={preallocation}")
    if options:
        cmd += ["-o", ",".join(options)]
    if backing:
        if not backing_fmt:
            raise ValueError("backing needs backing_fmt")
        cmd += ["-b", backing, "-F", backing_fmt]
    elif size is None:
        raise ValueError("size is required without backing")
    cmd.append(path)
    if size is not None:
        cmd.append(str(size))
    commands.run(cmd, timeout=timeout)
    log.info("Created image path=%s fmt=%s size=%s backing=%s", path, fmt, size, backing)


@overload
def info(
    path: str,
    fmt: str | None = ...,
    force_share: bool = ...,
    backing_chain: Literal[False] = ...,
    timeout: float = ...,
) -> dict[str, Any]: ...


@overload
def info(
    path: str,
    fmt: str | None = ...,
    force_share: bool = ...,
    *,
    backing_chain: Literal[True],
    timeout: float = ...,
) -> list[dict[str, Any]]: ...


def info(
    path: str,
    fmt: str | None = None,
    force_share: bool = True,
    backing_chain: bool = False,
    timeout: float = DEFAULT_TIMEOUT,
) -> dict[str, Any] | list[dict[str, Any]]:
    """``qemu-img info --output json``: a dict, or with backing_chain a list
    of dicts from path down to the base."""
    cmd = [QEMU_IMG, "info", "--output", "json"]
    if fmt:
        cmd += ["-f", fmt]
    if force_share:
        cmd.append("-U")
    if backing_chain:
        cmd.append("--backing-chain")
    cmd.append(path)
    return _json(commands.run(cmd, timeout=timeout), cmd)


def map(  # the qemu-img command's name
    path: str, fmt: str | None = None, force_share: bool = True, timeout: float = DEFAULT_TIMEOUT
) -> list[dict[str, Any]]:
    """``qemu-img map --output json``: extents with start, length, depth,
    zero, data (and present/offset); depth 0 is the image itself."""
    cmd = [QEMU_IMG, "map", "--output", "json"]
    if fmt:
        cmd += ["-f", fmt]
    if force_share:
        cmd.append("-U")
    cmd.append(path)
    return _json(commands.run(cmd, timeout=timeout), cmd)


def measure(
    path: str | None = None,
    size: int | None = None,
    fmt: str | None = None,
    out_fmt: str = QCOW2,
    backing: bool = True,
    force_share: bool = True,
    timeout: float = DEFAULT_TIMEOUT,
) -> dict[str, Any]:
    """``qemu-img measure``: bytes needed to hold path (or a new image of
    size) in out_fmt: ``{"required", "fully-allocated", ...}``.

    With backing=False only path's own layer is measured (what copying that
    one volume needs), not the whole chain; that needs fmt.
    """
    if (path is None) == (size is None):
        raise ValueError("measure needs exactly one of path and size")
    cmd = [QEMU_IMG, "measure", "--output", "json", "-O", out_fmt]
    if size is not None:
        cmd += ["--size", str(size)]
    else:
        assert path is not None
        if force_share:
            cmd.append("-U")
        if backing:
            if fmt:
                cmd += ["-f", fmt]
            cmd.append(path)
        else:
            if not fmt:
                raise ValueError("measure with backing=False needs fmt")
            cmd.append(_layer_filename(path, fmt))
    return _json(commands.run(cmd, timeout=timeout), cmd)


def compare(
    a: str,
    b: str,
    fmt_a: str | None = None,
    fmt_b: str | None = None,
    strict: bool = False,
    force_share: bool = True,
    timeout: float = DEFAULT_TIMEOUT,
) -> bool:
    """True if a and b (with their backing chains) read the same.

    strict also requires the same allocation and the same size.
    """
    cmd = [QEMU_IMG, "compare"]
    if fmt_a:
        cmd += ["-f", fmt_a]
    if fmt_b:
        cmd += ["-F", fmt_b]
    if strict:
        cmd.append("-s")
    if force_share:
        cmd.append("-U")
    cmd += [a, b]
    proc = commands.run(cmd, timeout=timeout, check=False)
    if proc.returncode == 0:
        return True
    if proc.returncode == 1:
        log.info("Images differ a=%s b=%s: %s", a, b, proc.stdout.decode(errors="replace").strip())
        return False
    raise errors.CommandFailed(
        cmd=[str(c) for c in cmd], rc=proc.returncode, err=proc.stderr.decode(errors="replace")
    )


def check(
    path: str, fmt: str = QCOW2, force_share: bool = False, timeout: float = DEFAULT_TIMEOUT
) -> dict[str, Any]:
    """``qemu-img check --output json``.

    Returns the report also when it finds corruptions (key "corruptions")
    or leaks ("leaks"); raises CommandFailed if the check itself fails or
    the format has no checks (raw).
    """
    cmd = [QEMU_IMG, "check", "--output", "json", "-f", fmt]
    if force_share:
        cmd.append("-U")
    cmd.append(path)
    proc = commands.run(cmd, timeout=timeout, check=False)
    # 0: clean, 2: corruptions, 3: leaked clusters.
    if proc.returncode not in (0, 2, 3):
        raise errors.CommandFailed(
            cmd=[str(c) for c in cmd], rc=proc.returncode, err=proc.stderr.decode(errors="replace")
        )
    return _json(proc, cmd)


def resize(
    path: str,
    size: int,
    fmt: str,
    shrink: bool = False,
    preallocation: str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> None:
    """Change the virtual size of path to size bytes."""
    cmd = [QEMU_IMG, "resize", "-f", fmt]
    if preallocation:
        cmd.append(f"--preallocation={preallocation}")
    if shrink:
        cmd.append("--shrink")
    cmd += [path, str(size)]
    commands.run(cmd, timeout=timeout)
    log.info("Resized image path=%s size=%d", path, size)


def rebase_unsafe(
    path: str, backing: str, backing_fmt: str, timeout: float = DEFAULT_TIMEOUT
) -> None:
    """Rewrite path's backing reference only (``rebase -u``); no data moves."""
    cmd = [QEMU_IMG, "rebase", "-u", "-f", QCOW2, "-b", backing, "-F", backing_fmt, path]
    commands.run(cmd, timeout=timeout)
    log.info("Rebased image path=%s backing=%s", path, backing)


# Helpers


def _json(proc: subprocess.CompletedProcess[bytes], cmd: list[str]) -> Any:
    try:
        return json.loads(proc.stdout)
    except ValueError as e:
        raise errors.CommandFailed(
            cmd=[str(c) for c in cmd], rc=proc.returncode, err=f"cannot parse JSON output: {e}"
        ) from e


def _layer_filename(path: str, fmt: str) -> str:
    """A json: filename opening path without its backing chain."""
    protocol = "host_device" if stat.S_ISBLK(os.stat(path).st_mode) else "file"
    spec: dict[str, Any] = {"driver": fmt, "file": {"driver": protocol, "filename": path}}
    if fmt == QCOW2:
        spec["backing"] = None
    return "json:" + json.dumps(spec)
