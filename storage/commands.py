"""Running external commands: argument lists, timeouts, errors that say why.

Every subprocess of the daemon goes through :func:`run`. A command is an
argument list (never a shell string) and always has a timeout; a failure
raises :class:`storage.errors.CommandFailed` carrying the command, its exit
code and its standard error.
"""

from __future__ import annotations

import logging
import os
import subprocess
import time
from collections.abc import Mapping, Sequence

from storage import errors

log = logging.getLogger("storage.commands")

DEFAULT_TIMEOUT = 120.0


def run(
    cmd: Sequence[str],
    timeout: float = DEFAULT_TIMEOUT,
    env: Mapping[str, str] | None = None,
    input: bytes | None = None,
    check: bool = True,
) -> subprocess.CompletedProcess[bytes]:
    """Run cmd, wait at most timeout seconds, return the completed process.

    Raises CommandTimeout if the command did not finish in time (the process
    is killed), CommandFailed if it exited non-zero and check is true.
    """
    argv = [str(a) for a in cmd]
    full_env = None
    if env is not None:
        full_env = dict(os.environ)
        full_env.update(env)
    start = time.monotonic()
    log.debug("Running cmd=%s", argv)
    try:
        proc = subprocess.run(
            argv,
            input=input,
            stdin=None if input is not None else subprocess.DEVNULL,
            capture_output=True,
            timeout=timeout,
            env=full_env,
            check=False,
        )
    except subprocess.TimeoutExpired as e:
        raise errors.CommandTimeout(cmd=argv, timeout=timeout) from e
    except FileNotFoundError as e:
        raise errors.CommandFailed(cmd=argv, rc=127, err=str(e)) from e
    elapsed = time.monotonic() - start
    log.debug("Finished cmd=%s rc=%d elapsed=%.3f", argv[0], proc.returncode, elapsed)
    if check and proc.returncode != 0:
        raise errors.CommandFailed(
            cmd=argv, rc=proc.returncode, err=proc.stderr.decode("utf-8", "replace").strip()
        )
    return proc
