"""Copying disk images with qemu-img: progress, abort, one layer at a time.

Two entry points:

- :func:`convert`, ``qemu-img convert -p`` with a progress callback and an
  abort flag (the process is killed and :class:`errors.ConvertAborted`
  raised);
- :func:`copy_layer`, the fast path of ``Image.syncData``: copy exactly one
  volume of a chain into the same volume of a destination chain of the same
  structure, keeping unallocated clusters unallocated (the backing shows
  through) and zero clusters zero.  See its docstring for how and why.

``convert`` does not read with ``-U`` (force share) by default: copying a
volume that is being written gives garbage.  A copy runs with the
parent-death signal set (:data:`PDEATHSIG`), so it never outlives the
daemon.  Inspecting images (``info``, ``map``, ``measure``...) is
:mod:`storage.qemuimg`.
"""

from __future__ import annotations

import logging
import os
import re
import selectors
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from typing import Protocol

from storage import errors, qemuimg

log = logging.getLogger("storage.qemuimg_copy")

# How often convert() looks at the abort flag when qemu-img is silent.
ABORT_POLL = 0.2

_PROGRESS_RE = re.compile(rb"\((\d+(?:\.\d+)?)/100%\)")


class Abortable(Protocol):
    """What convert() accepts as abort: a threading.Event or alike."""

    def is_set(self) -> bool: ...


ProgressCallback = Callable[[float], None]


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
    src_size: int | None = None,
    progress: ProgressCallback | None = None,
    abort: Abortable | None = None,
    timeout: float | None = None,
) -> None:
    """``qemu-img convert -p`` src to dst, reporting progress (0-100).

    src_size reads only the first src_size bytes of a raw src (its volume's
    capacity: an LV is rounded up to whole extents, so it can be larger).

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
    if src_size is not None and src_fmt != qemuimg.RAW:
        raise ValueError(f"src_size is for a raw source, not {src_fmt}")
    cmd = [
        qemuimg.QEMU_IMG,
        "convert",
        "-p",
        *(["--image-opts"] if src_size is not None else ["-f", src_fmt]),
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
        if dst_fmt == qemuimg.QCOW2:
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
    cmd += [raw_window(src, src_size) if src_size is not None else src, dst]
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
    src_size: int | None = None,
    progress: ProgressCallback | None = None,
    abort: Abortable | None = None,
    timeout: float | None = None,
) -> None:
    """Copy the data of one volume of a chain into the same volume of
    another chain of the same structure (src_size: as :func:`convert`'s).

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
    src_info = qemuimg.info(src, fmt=fmt, force_share=True)
    dst_info = qemuimg.info(dst, fmt=fmt, force_share=True)
    backing = src_info.get("backing-filename")
    backing_fmt = src_info.get("backing-filename-format")
    if dst_info.get("backing-filename") != backing:
        raise errors.LayerMismatch(
            src=src,
            dst=dst,
            reason=f"backing {dst_info.get('backing-filename')!r} is not {backing!r}",
        )
    size = src_size if src_size is not None else src_info["virtual-size"]
    if dst_info["virtual-size"] < size:
        raise errors.LayerMismatch(
            src=src, dst=dst, reason=f"virtual size {dst_info['virtual-size']} < {size}"
        )
    if fmt == qemuimg.QCOW2 and backing and dst_info["cluster-size"] > src_info["cluster-size"]:
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
        src_size=src_size,
        progress=progress,
        abort=abort,
        timeout=timeout,
    )


# Helpers


def raw_window(path: str, size: int) -> str:
    """The ``--image-opts`` of the first size bytes of a raw image at path."""
    return f"driver=raw,size={int(size)},file.filename={path.replace(',', ',,')}"


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
