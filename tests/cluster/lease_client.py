"""python3-sanlock calls from inside a host's namespace, one process per client.

Run inside a :class:`tests.cluster.namespaces.HostNamespace` (so that it
talks to that host's sanlock daemon); :class:`tests.cluster.sanlockd.LeaseClient`
drives it.  It reads one JSON request a line on stdin
(``{"op": "acquire", "args": {...}}``) and answers one JSON line on stdout:
``{"ok": true, "result": ..., "seconds": ...}`` or ``{"ok": false, "errno": N,
"error": "..."}``.  It registers with the daemon once, so the paxos leases
it acquires are held by this process until it releases them or exits.

Names (lockspace, resource) are given as str and passed to sanlock as bytes.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import sanlock


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    if isinstance(value, dict):
        return {_jsonable(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


class Client:
    def __init__(self) -> None:
        self._fd: int | None = None

    def fd(self) -> int:
        if self._fd is None:
            self._fd = sanlock.register()
        return self._fd

    def op_write_lockspace(self, lockspace: str, path: str, offset: int = 0,
                           iotimeout: int = 0) -> None:
        sanlock.write_lockspace(lockspace.encode(), path, offset=offset, iotimeout=iotimeout)

    def op_write_resource(self, lockspace: str, resource: str, path: str, offset: int) -> None:
        sanlock.write_resource(lockspace.encode(), resource.encode(), [(path, offset)])

    def op_add_lockspace(self, lockspace: str, host_id: int, path: str, offset: int = 0,
                         iotimeout: int = 0) -> None:
        sanlock.add_lockspace(lockspace.encode(), host_id, path, offset=offset,
                              iotimeout=iotimeout)

    def op_rem_lockspace(self, lockspace: str, host_id: int, path: str, offset: int = 0) -> None:
        sanlock.rem_lockspace(lockspace.encode(), host_id, path, offset=offset)

    def op_inq_lockspace(self, lockspace: str, host_id: int, path: str,
                         offset: int = 0) -> bool:
        return bool(sanlock.inq_lockspace(lockspace.encode(), host_id, path, offset=offset))

    def op_get_lockspaces(self) -> Any:
        return sanlock.get_lockspaces()

    def op_get_hosts(self, lockspace: str, host_id: int = 0) -> Any:
        return sanlock.get_hosts(lockspace.encode(), host_id)

    def op_acquire(self, lockspace: str, resource: str, path: str, offset: int) -> Any:
        sanlock.acquire(lockspace.encode(), resource.encode(), [(path, offset)], slkfd=self.fd())
        return sanlock.inquire(slkfd=self.fd())

    def op_release(self, lockspace: str, resource: str, path: str, offset: int) -> None:
        sanlock.release(lockspace.encode(), resource.encode(), [(path, offset)], slkfd=self.fd())

    def op_inquire(self) -> Any:
        return sanlock.inquire(slkfd=self.fd())

    def op_read_resource_owners(self, lockspace: str, resource: str, path: str,
                                offset: int) -> Any:
        return sanlock.read_resource_owners(lockspace.encode(), resource.encode(),
                                            [(path, offset)])


def main() -> None:
    client = Client()
    for line in sys.stdin:
        request = json.loads(line)
        start = time.monotonic()
        try:
            method = getattr(client, "op_" + request["op"])
            result = method(**request.get("args", {}))
            answer = {"ok": True, "result": _jsonable(result)}
        except sanlock.SanlockException as e:
            answer = {"ok": False, "errno": e.errno, "error": str(e)}
        except Exception as e:  # a bad request: report, keep serving
            answer = {"ok": False, "errno": None, "error": f"{type(e).__name__}: {e}"}
        answer["seconds"] = time.monotonic() - start
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
