"""Boot the test guest under plain QEMU (no libvirt), for tests and benchmarks.

::

    with qemu.Guest(art, image, "qcow2", serial_log, guest.kernel_args(count=200)) as g:
        verifier.wait_for_acks(serial_log, 200, timeout=120, alive=g.alive)
    # QEMU is gone here, also when the block raised.

QEMU runs under coreutils ``timeout``, so it dies by itself after
``lifetime`` seconds even if the process that started it is killed.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
from collections.abc import Sequence
from types import TracebackType

from contrib import guest

log = logging.getLogger("contrib.guest.qemu")

QEMU = "qemu-system-x86_64"
DEFAULT_LIFETIME = 600


class Guest:
    """A QEMU process running the test guest with one virtio disk."""

    def __init__(
        self,
        artifacts: guest.Artifacts,
        image: str | os.PathLike[str],
        image_format: str,
        serial_log: str | os.PathLike[str],
        append: str,
        memory_mb: int = 256,
        accel: str = "tcg",
        cache: str = "none",
        lifetime: int = DEFAULT_LIFETIME,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.serial_log = os.fspath(serial_log)
        self.stderr_log = self.serial_log + ".qemu-stderr"
        # fmt: off
        self.argv = [
            "timeout", "--kill-after=5", str(lifetime),
            QEMU,
            "-nodefaults",
            "-machine", f"accel={accel}",
            "-m", str(memory_mb),
            "-display", "none",
            "-monitor", "none",
            "-no-reboot",
            "-kernel", artifacts.kernel,
            "-initrd", artifacts.initrd,
            "-append", append,
            "-drive", f"file={os.fspath(image)},if=virtio,format={image_format},cache={cache}",
            "-serial", f"file:{self.serial_log}",
            *extra_args,
        ]
        # fmt: on
        self._proc: subprocess.Popen[bytes] | None = None
        self.started_at: float | None = None

    def start(self) -> None:
        log.info("Starting guest serial_log=%s", self.serial_log)
        with open(self.stderr_log, "wb") as err:
            self.started_at = time.monotonic()
            self._proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=err,
                stderr=err,
                start_new_session=True,
            )

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def wait(self, timeout: float) -> int:
        """Wait until QEMU exits (the guest powered off); return its exit code."""
        assert self._proc is not None
        return self._proc.wait(timeout)

    def stop(self) -> None:
        """Kill QEMU (the disk image is consistent: QEMU flushed every ACK)."""
        if self._proc is None:
            return
        if self._proc.poll() is None:
            # timeout(1) passes SIGTERM on to QEMU, which closes its images.
            self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(30)
            except subprocess.TimeoutExpired:
                log.warning("QEMU ignored SIGTERM, killing pgid=%d", self._proc.pid)
                os.killpg(self._proc.pid, signal.SIGKILL)
                self._proc.wait(30)
        log.info("Guest stopped serial_log=%s rc=%s", self.serial_log, self._proc.returncode)

    def stderr_text(self) -> str:
        try:
            with open(self.stderr_log, errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def __enter__(self) -> Guest:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
