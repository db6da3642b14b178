"""Storage errors. Each names its code in the schema's error table."""

from __future__ import annotations

from rpc import errors


class Error(errors.Error):
    name = "StorageException"
    msg = "Storage error"


class CommandFailed(Error):
    name = "CommandFailed"
    msg = "Command {cmd} failed rc={rc} err={err!r}"


class CommandTimeout(Error):
    name = "CommandTimeout"
    msg = "Command {cmd} timed out after {timeout}s"
