"""qemu-img: create, inspect, compare and copy disk images.

Every function runs the real ``qemu-img`` (never parses qcow2 itself) and
reads its ``--output json``.  Failures raise ``storage.errors.CommandFailed``
carrying the command, exit code and stderr.

Copying has two entry points:

- :func:`convert`, ``qemu-img convert -p`` with a progress callback and an
  abort flag (the process is killed and :class:`errors.ConvertAborted`
  raised);
- :func:`copy_layer`, the fast path of ``Image.syncData``: copy exactly one
  volume of a chain into the same volume of a destination chain of the same
  structure, keeping unallocated clusters unallocated (the backing shows
  through) and zero clusters zero.  See its docstring for how and why.

Images in use by a VM are read with ``-U`` (force share) where that is safe:
``info``, ``map``, ``measure`` and ``compare`` default to it; ``convert``
does not (copying a volume that is being written gives garbage).
"""

from __future__ import annotations

import json
import logging
import os
import re
import selectors
import shutil
import signal
import stat
import subprocess
import time
from collections.abc import Callable
from typing import Any, Literal, Protocol, overload

from storage import commands, errors

log = logging.getLogger("storage.qemuimg")

QEMU_IMG = "qemu-img"

QCOW2 = "qcow2"
RAW = "raw"

DEFAULT_TIMEOUT = 120.0

# How often convert() looks at the abort flag when qemu-img is silent.
ABORT_POLL = 0.2

_PROGRESS_RE = re.compile(rb"\((\d+(?:\.\d+)?)/100%\)")


class Abortable(Protocol):
    """What convert() accepts as abort: a threading.Event or alike."""

    def is_set(self) -> bool: ...


ProgressCallback = Callable[[float], None]


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


def convert(
    src: str,
    dst: str,
    src_fmt: str,
    dst_fmt: str,
    *,
    create: bool = False,
    backing: str | None = None,
    backing_fmt: str | None = None,
    cluster_size: int | None = None,
    compat: str | None = "1.1",
    preallocation: str | None = None,
    src_cache: str = "none",
    dst_cache: str = "none",
    out_of_order: bool = True,
    coroutines: int = 16,
    target_is_zero: bool = False,
    rate_limit_bps: int | None = None,
    force_share: bool = False,
    progress: ProgressCallback | None = None,
    abort: Abortable | None = None,
    timeout: float | None = None,
) -> None:
    """``qemu-img convert -p`` src to dst, reporting progress (0-100).

    create=False (the default) writes into an existing dst (``-n``);
    create=True makes dst, with backing/cluster_size/compat/preallocation.
    backing with create=False (``-B``) copies only what src's own layer
    holds (see copy_layer).  target_is_zero (``--target-is-zero``) tells
    qemu-img that an existing dst without backing reads as zeros, so zero
    areas are skipped.  Cache modes are qemu-img's ``-T``/``-t``; "none"
    (O_DIRECT) needs a file system that supports it (not tmpfs).

    abort.is_set() is polled while qemu-img runs; once set the process is
    killed and ConvertAborted raised (dst is then partly written).
    """
    if coroutines < 1 or coroutines > 16:
        raise ValueError(f"coroutines must be 1-16, not {coroutines}")
    cmd = [
        QEMU_IMG,
        "convert",
        "-p",
        "-f",
        src_fmt,
        "-O",
        dst_fmt,
        "-T",
        src_cache,
        "-t",
        dst_cache,
    ]
    if force_share:
        cmd.append("-U")
    if out_of_order:
        cmd.append("-W")
    cmd += ["-m", str(coroutines)]
    if rate_limit_bps:
        cmd += ["-r", str(int(rate_limit_bps))]
    if create:
        if target_is_zero:
            raise ValueError("target_is_zero needs an existing target (create=False)")
        options = []
        if dst_fmt == QCOW2:
            if compat:
                options.append(f"compat={compat}")
            if cluster_size:
                options.append(f"cluster_size={cluster_size}")
        if preallocation:
            options.append(f"preallocation={preallocation}")
        if options:
            cmd += ["-o", ",".join(options)]
    else:
        if cluster_size or preallocation:
            raise ValueError("cluster_size and preallocation need create=True")
        cmd.append("-n")
        if target_is_zero:
            if backing:
                # qemu-img 7.2 prints an error for this and still exits 0.
                raise ValueError("target_is_zero cannot be used with a backing")
            cmd.append("--target-is-zero")
    if backing:
        cmd += ["-B", backing]
        if backing_fmt:
            cmd += ["-F", backing_fmt]
    cmd += [src, dst]
    start = time.monotonic()
    _run_with_progress(cmd, src, dst, progress, abort, timeout)
    log.info(
        "Copied image src=%s dst=%s fmt=%s->%s elapsed=%.3f",
        src,
        dst,
        src_fmt,
        dst_fmt,
        time.monotonic() - start,
    )


def copy_layer(
    src: str,
    dst: str,
    fmt: str,
    *,
    src_cache: str = "none",
    dst_cache: str = "none",
    out_of_order: bool = True,
    coroutines: int = 16,
    rate_limit_bps: int | None = None,
    progress: ProgressCallback | None = None,
    abort: Abortable | None = None,
    timeout: float | None = None,
) -> None:
    """Copy the data of one volume of a chain into the same volume of
    another chain of the same structure.

    dst must exist with the same format and backing reference as src (as
    Image.cloneStructure makes it) and the volumes below both must be
    reachable through their backing references (prepared).  After the copy:
    clusters unallocated in src are unallocated in dst (dst's backing shows
    through), zero clusters are zero clusters, data clusters hold src's data,
    so ``qemu-img map`` of dst shows src's own clusters and, once every
    layer is copied, ``compare`` of the two chains says identical.

    How: ``qemu-img convert -n -B <backing>`` with src opened *with* its
    backing chain.  With a target backing, qemu-img asks for the block
    status of src above src's own backing only: unallocated areas are
    skipped, zero areas are written as zero clusters (which a qcow2 with a
    backing stores explicitly), data areas are copied.  With -n, -B only
    switches that mode on; dst's header is left alone.  Opening src
    *without* its backing (``"backing": null``) would be wrong: its holes
    then read as zeros and would be written as zero clusters, hiding the
    destination's backing.  dst is opened with its own backing chain, which
    qcow2 needs to store zero clusters that shadow backing data.

    A raw volume (a base) is copied whole, zeros included, since an LV is
    not known to read as zeros.  Copying a layer again is harmless: only
    src's clusters are written, with the same data.
    """
    src_info = info(src, fmt=fmt, force_share=True)
    dst_info = info(dst, fmt=fmt, force_share=True)
    backing = src_info.get("backing-filename")
    backing_fmt = src_info.get("backing-filename-format")
    if dst_info.get("backing-filename") != backing:
        raise errors.LayerMismatch(
            src=src,
            dst=dst,
            reason=f"backing {dst_info.get('backing-filename')!r} is not {backing!r}",
        )
    if dst_info["virtual-size"] < src_info["virtual-size"]:
        raise errors.LayerMismatch(
            src=src,
            dst=dst,
            reason=f"virtual size {dst_info['virtual-size']} < {src_info['virtual-size']}",
        )
    if fmt == QCOW2 and backing and dst_info["cluster-size"] > src_info["cluster-size"]:
        # A partly written destination cluster would be filled from dst's
        # backing, which need not be copied yet.
        raise errors.LayerMismatch(
            src=src,
            dst=dst,
            reason=f"cluster size {dst_info['cluster-size']} > {src_info['cluster-size']}",
        )
    log.info("Copying layer src=%s dst=%s fmt=%s backing=%s", src, dst, fmt, backing)
    convert(
        src,
        dst,
        fmt,
        fmt,
        create=False,
        backing=backing,
        backing_fmt=backing_fmt,
        src_cache=src_cache,
        dst_cache=dst_cache,
        out_of_order=out_of_order,
        coroutines=coroutines,
        rate_limit_bps=rate_limit_bps,
        progress=progress,
        abort=abort,
        timeout=timeout,
    )


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


def _run_with_progress(
    cmd: list[str],
    src: str,
    dst: str,
    progress: ProgressCallback | None,
    abort: Abortable | None,
    timeout: float | None,
) -> None:
    argv = [str(c) for c in cmd]
    log.debug("Running cmd=%s", argv)
    deadline = None if timeout is None else time.monotonic() + timeout
    # A copy must not outlive the daemon (kill -9 included): the kernel kills
    # it when the thread that started it dies.  The task re-runs it.
    proc = subprocess.Popen(
        [*PDEATHSIG, *argv],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    err = bytearray()
    pending = b""
    last = -1.0
    try:
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ)
            sel.register(proc.stderr, selectors.EVENT_READ)
            while sel.get_map():
                if abort is not None and abort.is_set():
                    _kill(proc)
                    log.info("Aborted copy src=%s dst=%s", src, dst)
                    raise errors.ConvertAborted(src=src, dst=dst)
                if deadline is not None and time.monotonic() > deadline:
                    _kill(proc)
                    raise errors.CommandTimeout(cmd=argv, timeout=timeout)
                for key, _ in sel.select(ABORT_POLL):
                    data = os.read(key.fd, 65536)
                    if not data:
                        sel.unregister(key.fileobj)
                    elif key.fileobj is proc.stderr:
                        err += data
                    else:
                        # qemu-img rewrites one line: "    (12.34/100%)\r".
                        pending += data
                        values = _PROGRESS_RE.findall(pending)
                        pending = pending[-64:]
                        if values and progress is not None:
                            value = float(values[-1])
                            if value != last:
                                last = value
                                progress(value)
            rc = proc.wait()
    finally:
        if proc.poll() is None:
            _kill(proc)
        proc.stdout.close()
        proc.stderr.close()
    if rc != 0:
        raise errors.CommandFailed(cmd=argv, rc=rc, err=err.decode("utf-8", "replace").strip())


# util-linux's setpriv sets the parent-death signal, then execs the command.
PDEATHSIG = ["setpriv", "--pdeathsig", "SIGKILL", "--"] if shutil.which("setpriv") else []


def _kill(proc: subprocess.Popen[bytes]) -> None:
    try:
        proc.send_signal(signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
