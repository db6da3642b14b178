"""The ``vdsm-lsm-client`` command: call any verb, or run the move-disk flow.

::

    vdsm-lsm-client [--socket PATH | -a HOST -p PORT [--tls-key K --tls-cert C --tls-ca CA]]
                    Namespace verb [key=value ...] [-f params.json|-]

Values are parsed as JSON where they parse (``size=1073741824``,
``domainList='["..."]'``), else taken as strings.  The result is printed as
JSON; an error prints its code and message and exits with status 1.
``vdsm-lsm-client -h`` lists the verbs, ``Namespace verb -h`` their params,
both from the schema.

    vdsm-lsm-client [connection options] move-disk VMID DSTDOMAIN [--drive vda]
                    [--pool POOL] [--delete-source] [--bandwidth MiB/s] [--timeout S]

runs the whole live storage migration of a running VM's drive
(:mod:`vdsm_lsm.move_disk`) with a progress bar on stderr, and prints a
JSON summary.

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

from rpc import schema
from vdsm_lsm import api_schema, client, client_errors, move_disk, move_progress

PROG = "vdsm-lsm-client"
MOVE_DISK = "move-disk"

MOVE_DISK_USAGE = (
    f"Flow ({PROG} [connection options] {MOVE_DISK} -h for options):\n"
    f"  {MOVE_DISK} VMID DSTDOMAIN [--drive vda] [--pool POOL] [--delete-source]"
    " [--bandwidth MiB/s] [--timeout S]"
)


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
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("-f", "--params-file", help="JSON object of params; - for stdin")
    parser.add_argument("words", nargs="*")
    return parser


def build_move_disk_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"{PROG} [connection options] {MOVE_DISK}",
        description="Move a running VM's drive to another domain of its pool "
        "(live storage migration), with a progress bar on stderr.",
    )
    parser.add_argument("vm_id", metavar="VMID")
    parser.add_argument("dst_domain", metavar="DSTDOMAIN")
    parser.add_argument("--drive", default="vda", help="target name of the drive (default vda)")
    parser.add_argument("--pool", help="pool ID (default: the drive's, from VM.getStats)")
    parser.add_argument("--delete-source", action="store_true",
                        help="delete the source image after the pivot")
    parser.add_argument("--bandwidth", type=int, default=0, metavar="MiB/s",
                        help="mirror bandwidth limit (default 0: unlimited)")
    parser.add_argument("--timeout", type=float, default=move_disk.DEFAULT_TIMEOUT, metavar="S",
                        help="give up and roll back after S seconds "
                        f"(default {move_disk.DEFAULT_TIMEOUT:g})")
    return parser


def client_from_args(args: argparse.Namespace) -> client.Client:
    return client.Client(
        socket_path=args.socket,
        host=args.address,
        port=args.port,
        tls_key=args.tls_key,
        tls_cert=args.tls_cert,
        tls_ca=args.tls_ca,
        timeout=args.timeout,
    )


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
    rpc = client_from_args(build_parser().parse_args(connection_argv))
    args = build_move_disk_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format=f"{PROG}: %(message)s")
    bar = move_progress.ProgressBar(sys.stderr)
    flow = move_disk.MoveDisk(
        rpc, args.vm_id, args.dst_domain, drive=args.drive, pool_id=args.pool,
        delete_source=args.delete_source, bandwidth=args.bandwidth, timeout=args.timeout,
        progress=bar,
    )
    try:
        summary = flow.run()
    except client_errors.ClientError as e:
        bar.close()
        print(f"error {e.code}: {e.message}", file=sys.stderr)
        return 1
    except OSError as e:
        bar.close()
        print(f"{PROG}: cannot reach the daemon: {e}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        bar.close()
        print(f"{PROG}: interrupted; the move was rolled back", file=sys.stderr)
        return 130
    finally:
        rpc.close()
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
