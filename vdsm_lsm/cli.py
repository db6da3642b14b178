"""The ``vdsm-lsm-client`` command: call any verb, or run the move-disk flow.

::

    vdsm-lsm-client [--socket PATH | -a HOST -p PORT [--tls-key K --tls-cert C --tls-ca CA]]
                    [--stomp] Namespace verb [key=value ...] [-f params.json|-]

Values are parsed as JSON where they parse (``size=1073741824``,
``domainList='["..."]'``), else taken as strings.  The result is printed as
JSON; an error prints its code and message and exits with status 1.
``vdsm-lsm-client -h`` lists the verbs, ``Namespace verb -h`` their params,
both from the schema.

    vdsm-lsm-client [connection options] move-disk VMID DSTDOMAIN [--drive vda]
                    [--spm ADDRESS|SOCKET] [--pool POOL] [--delete-source]
                    [--bandwidth MiB/s] [--timeout S] [--to-host ADDRESS|SOCKET
                    [--serial-log PATH]] [--sync-writes auto|on|off] [--state-dir DIR]
    vdsm-lsm-client [connection options] move-disk --cleanup [--dry-run] [--pool POOL]
                    [--spm ADDRESS|SOCKET] [--state-dir DIR]

runs the whole live storage migration of a running VM's drive
(:mod:`vdsm_lsm.move_disk`) with a progress bar on stderr, and prints a
JSON summary.  The connection options name the VM's host; ``--spm`` the
pool's SPM, as a unix socket path (``/run/vdsm-lsm/api.sock``,
``unix:PATH``) or a TCP address (``HOST``, ``HOST:PORT``, ``[IPv6]:PORT``;
the port defaults to ``-p``'s, the TLS options apply to both hosts).
Without ``--spm`` the VM's host must be the SPM itself.  With ``--stomp``
both daemons are spoken to in STOMP frames (VDSM's protocol,
:mod:`vdsm_lsm.stomp_client`) and the flow waits on their pushed events
(task finished, mirror ready) instead of polling.  ``--to-host`` names
another host that sees DSTDOMAIN when the VM's host does not: the VM is
live-migrated there and its leaf travels with it (:mod:`vdsm_lsm.move_vm`).
The move keeps a journal under ``--state-dir`` (:mod:`vdsm_lsm.journal`):
run again after being killed, it finishes the move or rolls it back.
``--sync-writes`` (default ``auto``) restarts a mirror that does not
converge write-blocking (``on``: from the start; ``off``: never).
``--cleanup`` lists and removes the leftovers of moves whose journal is gone
(:mod:`vdsm_lsm.cleanup`; ``--dry-run``: list only) and prints them as JSON.

Exit status: 0 done, 1 an error answer, 2 a bad command line, 3 the daemon
cannot be reached, 130 a move interrupted (and rolled back).

This module sits on top: it parses the command line, reads the schema
(:mod:`vdsm_lsm.api_schema`, never the daemon's wiring) and hands a
:class:`vdsm_lsm.client.Client` either a verb or the flow.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any

from rpc import schema
from vdsm_lsm import (
    api_schema,
    cleanup,
    client,
    client_errors,
    journal,
    move_disk,
    move_progress,
    move_vm,
    stomp_client,
)

PROG = "vdsm-lsm-client"
MOVE_DISK = "move-disk"

MOVE_DISK_USAGE = (
    f"Flow ({PROG} [connection options] {MOVE_DISK} -h for options):\n"
    f"  {MOVE_DISK} VMID DSTDOMAIN [--drive vda] [--spm ADDRESS|SOCKET] [--pool POOL]"
    " [--delete-source] [--bandwidth MiB/s] [--timeout S] [--to-host ADDRESS|SOCKET]"
    " [--sync-writes auto|on|off] [--state-dir DIR]\n"
    f"  {MOVE_DISK} --cleanup [--dry-run] [--pool POOL] [--spm ADDRESS|SOCKET] [--state-dir DIR]"
)
UNIX_PREFIX = "unix:"

# HTTP JSON-RPC (the default) or STOMP (--stomp: VDSM's protocol, with events).
Client = client.Client | stomp_client.StompClient


# Help from the schema


def format_verbs(api: schema.Schema) -> str:
    lines = ["Verbs (Namespace verb [key=value ...]; Namespace verb -h for params):"]
    by_namespace: dict[str, list[str]] = {}
    aliases = []
    for name, verb in api.verbs.items():
        if verb.target:
            aliases.append(f"  {name} -> {verb.target}")
            continue
        namespace, _, short = name.partition(".")
        by_namespace.setdefault(namespace, []).append(short)
    for namespace, names in by_namespace.items():
        lines.append(f"  {namespace}: {', '.join(names)}")
    if aliases:
        lines.append(f"Aliases (call as: {PROG} NAME key=value ...):")
        lines.extend(aliases)
    return "\n".join(lines)


def format_verb(api: schema.Schema, name: str) -> str:
    verb = api.verbs[name]
    lines = [name + (f": {verb.doc}" if verb.doc else "")]
    for param in verb.params:
        spec = param.spec
        kind = spec["type"]
        if kind == "enum":
            kind = "|".join(str(v) for v in spec["values"])
        elif kind == "list":
            kind = f"list of {spec.get('items', 'any')}"
        extra = ""
        if "default" in spec:
            extra = f" (default {json.dumps(spec['default'])})"
        elif not param.required:
            extra = " (optional)"
        doc = f"  {spec['doc']}" if spec.get("doc") else ""
        lines.append(f"  {param.name}: {kind}{extra}{doc}")
    lines.append(f"returns: {verb.returns}")
    return "\n".join(lines)


def method_from_words(api: schema.Schema, words: list[str]) -> tuple[str, list[str]]:
    """("Image", "prepare", k=v...) -> "Image.prepare"; an alias is one word."""
    if words and words[0] in api.verbs:
        return words[0], words[1:]
    if len(words) >= 2 and f"{words[0]}.{words[1]}" in api.verbs:
        return f"{words[0]}.{words[1]}", words[2:]
    raise ValueError(f"unknown verb: {' '.join(words[:2])} (see {PROG} -h)")


# Command lines


def _seconds(text: str) -> float:
    """A command-line duration: a positive number of seconds."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds: {text!r}")
    return value


def _mib_per_s(text: str) -> int:
    """A bandwidth limit: MiB/s, 0 for none."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number of MiB/s: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 (no limit) or more: {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The connection options and a verb's words."""
    parser = argparse.ArgumentParser(
        prog=PROG, add_help=False, description="Call any vdsm-lsm verb."
    )
    parser.add_argument("-h", "--help", action="store_true")
    parser.add_argument("--socket", help=f"unix socket (default {client.DEFAULT_SOCKET})")
    parser.add_argument("-a", "--address", help="TCP address of the daemon")
    parser.add_argument("-p", "--port", type=int, default=54321)
    parser.add_argument("--tls-key")
    parser.add_argument("--tls-cert")
    parser.add_argument("--tls-ca")
    parser.add_argument("--timeout", type=_seconds, default=600.0)
    parser.add_argument("--stomp", action="store_true",
                        help="talk JSON-RPC over STOMP (VDSM's protocol) instead of HTTP; "
                        "move-disk then waits on the daemons' events instead of polling")
    parser.add_argument("-f", "--params-file", help="JSON object of params; - for stdin")
    parser.add_argument("words", nargs="*")
    return parser


def build_move_disk_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"{PROG} [connection options] {MOVE_DISK}",
        description="Move a running VM's drive to another domain of its pool "
        "(live storage migration), with a progress bar on stderr.",
    )
    parser.add_argument("vm_id", metavar="VMID", nargs="?")
    parser.add_argument("dst_domain", metavar="DSTDOMAIN", nargs="?")
    parser.add_argument("--drive", default="vda", help="target name of the drive (default vda)")
    parser.add_argument("--spm", metavar="ADDRESS|SOCKET",
                        help="the pool's SPM, when the VM's host (the connection options) "
                        "is not: a unix socket path or unix:PATH, or HOST[:PORT] "
                        "(default: the VM's host, if it is the SPM)")
    parser.add_argument("--pool", help="pool ID (default: the drive's, from VM.getStats)")
    parser.add_argument("--delete-source", action="store_true",
                        help="delete the source image after the pivot")
    parser.add_argument("--bandwidth", type=_mib_per_s, default=0, metavar="MiB/s",
                        help="mirror bandwidth limit (default 0: unlimited)")
    parser.add_argument("--timeout", type=_seconds, default=move_disk.DEFAULT_TIMEOUT, metavar="S",
                        help="give up and roll back after S seconds "
                        f"(default {move_disk.DEFAULT_TIMEOUT:g})")
    parser.add_argument("--to-host", metavar="ADDRESS|SOCKET",
                        help="move the VM too: live-migrate it to this host's daemon, which "
                        "sees DSTDOMAIN when the VM's host does not (forms as --spm; the "
                        "VM's host reaches it at this address)")
    parser.add_argument("--serial-log", metavar="PATH",
                        help="with --to-host: the VM's serial console file there "
                        "(default: the same path)")
    parser.add_argument("--sync-writes", choices=move_disk.SYNC_WRITES_MODES, default="auto",
                        help="write-blocking mirror: auto (restart it write-blocking if it "
                        "does not converge; the default), on (from the start), off (never)")
    parser.add_argument("--stall-timeout", type=_seconds, default=move_disk.STALL_TIMEOUT,
                        metavar="S", help="seconds without progress before a mirror counts "
                        f"as not converging (default {move_disk.STALL_TIMEOUT:g})")
    parser.add_argument("--enospc-timeout", type=_seconds, default=move_disk.ENOSPC_TIMEOUT,
                        metavar="S", help="seconds the VM may stay paused out of space "
                        "during the mirror before the move rolls back "
                        f"(default {move_disk.ENOSPC_TIMEOUT:g})")
    parser.add_argument("--state-dir", metavar="DIR", default=journal.default_dir(),
                        help="where the journals of moves are kept (default "
                        f"{journal.default_dir()})")
    parser.add_argument("--cleanup", action="store_true",
                        help="instead of a move: list and remove the leftovers of moves "
                        "whose journal is gone (no VMID DSTDOMAIN)")
    parser.add_argument("--dry-run", action="store_true",
                        help="with --cleanup: list the leftovers, remove nothing")
    return parser


def client_from_args(args: argparse.Namespace) -> Client:
    return client_class(args)(
        socket_path=args.socket,
        host=args.address,
        port=args.port,
        tls_key=args.tls_key,
        tls_cert=args.tls_cert,
        tls_ca=args.tls_ca,
        timeout=args.timeout,
    )


def parse_address(text: str, default_port: int) -> tuple[str | None, str | None, int]:
    """--spm's value: (socket path, None, 0) or (None, host, port).

    A socket is ``unix:PATH`` or any text with a ``/``; else ``HOST``,
    ``HOST:PORT`` or ``[IPv6]:PORT`` (a bare IPv6 address has no port).
    """
    if text.startswith(UNIX_PREFIX):
        path = text[len(UNIX_PREFIX):]
        if not path:
            raise ValueError(f"no socket path in {text!r}")
        return path, None, 0
    if "/" in text:
        return text, None, 0
    host, port = text, str(default_port)
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"bad address {text!r}")
        port = rest[1:] or port
    elif text.count(":") == 1:
        host, _, port = text.partition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"bad address {text!r}: expected HOST[:PORT] or a socket path")
    return None, host, int(port)


def client_class(args: argparse.Namespace) -> type[Client]:
    return stomp_client.StompClient if args.stomp else client.Client


def spm_client(text: str, conn: argparse.Namespace) -> Client:
    """The SPM's client: --spm's address, with the connection options' protocol, TLS
    and timeout."""
    socket_path, host, port = parse_address(text, conn.port)
    return client_class(conn)(
        socket_path=socket_path,
        host=host,
        port=port,
        tls_key=conn.tls_key,
        tls_cert=conn.tls_cert,
        tls_ca=conn.tls_ca,
        timeout=conn.timeout,
    )


class Named:
    """A client whose unreachable-daemon errors say which daemon (move-disk talks to two)."""

    def __init__(self, rpc: Client, name: str) -> None:
        self.rpc = rpc
        self.name = name

    def call(self, method: str, **params: Any) -> Any:
        try:
            return self.rpc.call(method, **params)
        except OSError as e:
            raise OSError(f"{self.name}: {e}") from e

    def close(self) -> None:
        self.rpc.close()


def events_of(named: Named | None) -> stomp_client.StompClient | None:
    """The events of a STOMP connection (move-disk waits on them); HTTP has none."""
    if named is not None and isinstance(named.rpc, stomp_client.StompClient):
        return named.rpc
    return None


def describe(rpc: Client) -> str:
    if rpc.host is not None:
        return f"{rpc.host}:{rpc.port}"
    return f"unix:{rpc.socket_path}"


# The two paths


def call_verb(args: argparse.Namespace, api: schema.Schema) -> int:
    """``vdsm-lsm-client [options] Namespace verb [key=value ...]``: one call."""
    try:
        method, pairs = method_from_words(api, args.words)
    except ValueError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 2
    if args.help:
        print(format_verb(api, method))
        return 0
    try:
        params = client.parse_params(pairs, args.params_file)
    except (ValueError, OSError) as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 2
    rpc = client_from_args(args)
    try:
        result = rpc.call(method, **params)
    except client_errors.ClientError as e:
        print(f"error {e.code}: {e.message}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"{PROG}: cannot reach the daemon: {e}", file=sys.stderr)
        return 3
    print(json.dumps(result, indent=2, sort_keys=True))
    return 0


def run_move_disk(connection_argv: list[str], argv: list[str]) -> int:
    """``vdsm-lsm-client [connection_argv] move-disk [argv]``: exits 0 on success."""
    conn = build_parser().parse_args(connection_argv)
    parser = build_move_disk_parser()
    args = parser.parse_args(argv)
    if not args.cleanup and (args.vm_id is None or args.dst_domain is None):
        parser.error("VMID and DSTDOMAIN are required (or --cleanup)")
    spm = dest = None
    try:
        if args.spm:
            c = spm_client(args.spm, conn)
            spm = Named(c, f"the SPM ({describe(c)})")
    except ValueError as e:
        print(f"{PROG}: --spm: {e}", file=sys.stderr)
        return 2
    try:
        if args.to_host:
            c = spm_client(args.to_host, conn)
            dest = Named(c, f"the destination host ({describe(c)})")
    except ValueError as e:
        print(f"{PROG}: --to-host: {e}", file=sys.stderr)
        return 2
    c = client_from_args(conn)
    rpc = Named(c, f"the VM's host ({describe(c)})")
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format=f"{PROG}: %(message)s")
    bar = move_progress.ProgressBar(sys.stderr)
    flow: move_disk.MoveDisk | move_vm.MoveVM | cleanup.Cleanup
    if args.cleanup:
        flow = cleanup.Cleanup(rpc, args.state_dir, spm=spm, pool_id=args.pool,
                               dry_run=args.dry_run, timeout=args.timeout)
    elif dest is not None:
        flow = move_vm.MoveVM(
            rpc, dest, describe(dest.rpc), args.vm_id, args.dst_domain, drive=args.drive,
            pool_id=args.pool, delete_source=args.delete_source, bandwidth=args.bandwidth,
            timeout=args.timeout, progress=bar, spm=spm, serial_log=args.serial_log,
        )
    else:
        flow = move_disk.MoveDisk(
            rpc, args.vm_id, args.dst_domain, drive=args.drive, pool_id=args.pool,
            delete_source=args.delete_source, bandwidth=args.bandwidth, timeout=args.timeout,
            progress=bar, spm=spm, events=events_of(rpc), spm_events=events_of(spm),
            sync_writes=args.sync_writes, stall_timeout=args.stall_timeout,
            enospc_timeout=args.enospc_timeout,
            journal=journal.Journal(args.state_dir, args.vm_id, args.drive),
        )
    try:
        summary: Any = flow.run()
    except client_errors.ClientError as e:
        bar.close()
        print(f"error {e.code}: {e.message}", file=sys.stderr)
        return 1
    except OSError as e:
        bar.close()
        print(f"{PROG}: cannot reach the daemon: {e}", file=sys.stderr)
        return 3
    except journal.JournalError as e:
        bar.close()
        print(f"{PROG}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        bar.close()
        print(f"{PROG}: interrupted; the move was rolled back", file=sys.stderr)
        return 130
    finally:
        rpc.close()
        for other in (spm, dest):
            if other is not None:
                other.close()
    print(json.dumps(summary, indent=2, sort_keys=True))
    return 0


def main(argv: list[str] | None = None) -> int:
    """The ``vdsm-lsm-client`` console script."""
    argv = sys.argv[1:] if argv is None else argv
    if MOVE_DISK in argv:
        at = argv.index(MOVE_DISK)
        return run_move_disk(argv[:at], argv[at + 1 :])
    parser = build_parser()
    args = parser.parse_args(argv)
    api = api_schema.load()
    if not args.words:
        print(parser.format_usage().strip())
        print(format_verbs(api))
        print(MOVE_DISK_USAGE)
        return 0 if args.help else 2
    return call_verb(args, api)


if __name__ == "__main__":
    sys.exit(main())
