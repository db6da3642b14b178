"""The test guest: a kernel and initramfs whose writer logs acknowledged writes.

Build it with ``contrib/guest/build`` (or :func:`ensure_built`), boot it with
:func:`kernel_args` on the kernel command line and its serial console in a
file, then prove the writes with :mod:`contrib.guest.verifier`::

    from contrib import guest
    from contrib.guest import verifier

    art = guest.ensure_built()
    args = guest.kernel_args(count=200, span_mb=16)
    ... boot art.kernel / art.initrd with args, serial to LOG ...
    verifier.wait_for_acks(LOG, 200, timeout=120)
    assert verifier.verify(LOG, IMAGE, "qcow2").lost == 0
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

from storage import commands

log = logging.getLogger("contrib.guest")

DEFAULT_DIR = "/var/cache/vdsm-lsm/guest"
BUILD_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "build")
BUILD_TIMEOUT = 900.0


@dataclasses.dataclass(frozen=True)
class Artifacts:
    kernel: str  # vmlinuz
    initrd: str  # initrd.img
    writer: str  # the writer, static; runs on the host too


def ensure_built(out_dir: str = DEFAULT_DIR, timeout: float = BUILD_TIMEOUT) -> Artifacts:
    """Build the guest into out_dir unless it is up to date; return its files."""
    commands.run([BUILD_SCRIPT, "--out", out_dir], timeout=timeout)
    art = Artifacts(
        kernel=os.path.join(out_dir, "vmlinuz"),
        initrd=os.path.join(out_dir, "initrd.img"),
        writer=os.path.join(out_dir, "writer"),
    )
    log.debug("Guest ready kernel=%s initrd=%s", art.kernel, art.initrd)
    return art


def writer_params(
    count: int = 0,
    span_mb: int = 64,
    offset_mb: int = 0,
    bs: int = 65536,
    pattern: str = "random",
    rate: int = 0,
    seed: int | None = None,
    dev: str = "/dev/vda",
    run: int | None = None,
    poweroff: bool = False,
) -> str:
    """The writer's ``lsm.*`` parameters as command line words.

    count 0 writes forever; rate is in writes per second, 0 as fast as
    possible; pattern is "random" or "seq"; run and seed default to a random
    value chosen by the guest.
    """
    if pattern not in ("random", "seq"):
        raise ValueError(f"pattern must be random or seq, not {pattern!r}")
    words = [
        f"lsm.dev={dev}",
        f"lsm.span_mb={span_mb}",
        f"lsm.offset_mb={offset_mb}",
        f"lsm.bs={bs}",
        f"lsm.pattern={pattern}",
        f"lsm.rate={rate}",
        f"lsm.count={count}",
    ]
    if seed is not None:
        words.append(f"lsm.seed={seed}")
    if run is not None:
        words.append(f"lsm.run={run}")
    if poweroff:
        words.append("lsm.poweroff=1")
    return " ".join(words)


def kernel_args(**params: Any) -> str:
    """The guest's kernel command line: serial console plus writer_params(**params)."""
    return "console=ttyS0 " + writer_params(**params)
