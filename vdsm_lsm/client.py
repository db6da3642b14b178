"""JSON-RPC client and the ``vdsm-lsm-client`` command.

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
"""

from __future__ import annotations

import argparse
import http.client
import itertools
import json
import socket
import ssl
import sys
from typing import Any

DEFAULT_SOCKET = "/run/vdsm-lsm/api.sock"


class ClientError(Exception):
    def __init__(self, code: int, message: str) -> None:
        self.code = code
        self.message = message
        super().__init__(f"[{code}] {message}")


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self.unix_path)
        self.sock = sock


class Client:
    """Talks JSON-RPC 2.0 to the daemon over its unix socket or TCP (TLS)."""

    def __init__(
        self,
        socket_path: str | None = None,
        host: str | None = None,
        port: int = 54321,
        tls_key: str | None = None,
        tls_cert: str | None = None,
        tls_ca: str | None = None,
        timeout: float = 600.0,
    ) -> None:
        if host is None and socket_path is None:
            socket_path = DEFAULT_SOCKET
        self.socket_path = socket_path
        self.host = host
        self.port = port
        self.timeout = timeout
        self._ssl: ssl.SSLContext | None = None
        if tls_ca or tls_cert:
            ctx = ssl.create_default_context(cafile=tls_ca)
            ctx.check_hostname = False
            if tls_cert:
                ctx.load_cert_chain(tls_cert, tls_key)
            self._ssl = ctx
        self._ids = itertools.count(1)
        self._conn: http.client.HTTPConnection | None = None

    def _connection(self) -> http.client.HTTPConnection:
        if self.host is not None:
            if self._ssl is not None:
                return http.client.HTTPSConnection(
                    self.host, self.port, timeout=self.timeout, context=self._ssl
                )
            return http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        assert self.socket_path is not None
        return _UnixHTTPConnection(self.socket_path, self.timeout)

    def post(self, body: bytes | str) -> Any:
        """POST a raw body; return the decoded JSON answer (None if empty).

        The HTTP connection is kept open between calls (a Client belongs to
        one thread); a connection the daemon closed while idle is reopened
        once.
        """
        if isinstance(body, str):
            body = body.encode("utf-8")
        for attempt in (1, 2):
            fresh = self._conn is None
            if self._conn is None:
                self._conn = self._connection()
            try:
                self._conn.request("POST", "/", body, {"Content-Type": "application/json"})
                response = self._conn.getresponse()
                data = response.read()
                if response.getheader("Connection", "").lower() == "close":
                    self.close()
                break
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                self.close()
                if fresh or attempt == 2:
                    raise
            except BaseException:
                self.close()
                raise
        return json.loads(data) if data else None

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def call(self, method: str, **params: Any) -> Any:
        request = {"jsonrpc": "2.0", "id": next(self._ids), "method": method, "params": params}
        response = self.post(json.dumps(request))
        if response is None:
            raise ClientError(-32603, "Empty response")
        if "error" in response:
            error = response["error"]
            raise ClientError(error.get("code", -32603), error.get("message", ""))
        return response.get("result")

    def notify(self, method: str, **params: Any) -> Any:
        return self.post(json.dumps({"jsonrpc": "2.0", "method": method, "params": params}))


def parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def parse_params(pairs: list[str], params_file: str | None) -> dict[str, Any]:
    params: dict[str, Any] = {}
    if params_file:
        if params_file == "-":
            params.update(json.load(sys.stdin))
        else:
            with open(params_file, encoding="utf-8") as f:
                params.update(json.load(f))
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"expected key=value, got {pair!r}")
        params[key] = parse_value(value)
    return params


def _load_schema() -> Any:
    from vdsm_lsm import app  # the schema lives with the daemon

    return app.load_schema()


def format_verbs(api: Any) -> str:
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
        lines.append("Aliases (call as: vdsm-lsm-client NAME key=value ...):")
        lines.extend(aliases)
    return "\n".join(lines)


def format_verb(api: Any, name: str) -> str:
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vdsm-lsm-client", add_help=False, description="Call any vdsm-lsm verb."
    )
    parser.add_argument("-h", "--help", action="store_true")
    parser.add_argument("--socket", help=f"unix socket (default {DEFAULT_SOCKET})")
    parser.add_argument("-a", "--address", help="TCP address of the daemon")
    parser.add_argument("-p", "--port", type=int, default=54321)
    parser.add_argument("--tls-key")
    parser.add_argument("--tls-cert")
    parser.add_argument("--tls-ca")
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("-f", "--params-file", help="JSON object of params; - for stdin")
    parser.add_argument("words", nargs="*")
    return parser


def client_from_args(args: argparse.Namespace) -> Client:
    return Client(
        socket_path=args.socket,
        host=args.address,
        port=args.port,
        tls_key=args.tls_key,
        tls_cert=args.tls_cert,
        tls_ca=args.tls_ca,
        timeout=args.timeout,
    )


def method_from_words(api: Any, words: list[str]) -> tuple[str, list[str]]:
    """("Image", "prepare", k=v...) -> "Image.prepare"; an alias is one word."""
    if words and words[0] in api.verbs:
        return words[0], words[1:]
    if len(words) >= 2 and f"{words[0]}.{words[1]}" in api.verbs:
        return f"{words[0]}.{words[1]}", words[2:]
    raise ValueError(f"unknown verb: {' '.join(words[:2])} (see vdsm-lsm-client -h)")


MOVE_DISK_USAGE = (
    "Flow (vdsm-lsm-client [connection options] move-disk -h for options):\n"
    "  move-disk VMID DSTDOMAIN [--drive vda] [--pool POOL] [--delete-source]"
    " [--bandwidth MiB/s] [--timeout S]"
)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    if "move-disk" in argv:
        from vdsm_lsm import move_disk

        at = argv.index("move-disk")
        return move_disk.main(argv[:at], argv[at + 1 :])
    args = parser.parse_args(argv)
    api = _load_schema()
    if not args.words:
        print(parser.format_usage().strip())
        print(format_verbs(api))
        print(MOVE_DISK_USAGE)
        return 0 if args.help else 2
    try:
        method, pairs = method_from_words(api, args.words)
    except ValueError as e:
        print(f"vdsm-lsm-client: {e}", file=sys.stderr)
        return 2
    if args.help:
        print(format_verb(api, method))
        return 0
    try:
        params = parse_params(pairs, args.params_file)
    except (ValueError, OSError) as e:
        print(f"vdsm-lsm-client: {e}", file=sys.stderr)
        return 2
    client = client_from_args(args)
    try:
        result = client.call(method, **params)
    except ClientError as e:
        print(f"error {e.code}: {e.message}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"vdsm-lsm-client: cannot reach the daemon: {e}", file=sys.stderr)
        return 3
    print(json.dumps(result, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
