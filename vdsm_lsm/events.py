"""The daemon's pushed events: what virt and storage report, as the schema names it.

:class:`Events` is virt's notifier (:class:`virt.notify.Notifier`) and
storage's task-finished callback; it turns each report into the JSON-RPC
notification the schema's ``events:`` section lists and hands it to its
``publish`` sink, ``rpc.server.Server.publish`` (set by the daemon once its
server exists; until then, and in tools that run no server, reports are
dropped).  The server pushes them to STOMP subscribers of
``jms.queue.events``, adding ``notify_time``:

=================================  =============================================
event                              params
=================================  =============================================
``|virt|VM_status|<vmId>``         ``{<vmId>: {status, pauseCode (Paused),
                                   exitCode/exitReason/exitMessage (Down),
                                   statusTime}}`` (VDSM's event)
``|virt|VM_replication|<vmId>``    ``{drive, state}``: ready or failed
``|storage|task_finished|<id>``    ``{taskID, taskResult, code}``: the code is
                                   the schema's number of the error name
=================================  =============================================
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from rpc import schema

log = logging.getLogger("vdsm_lsm.events")

VM_STATUS = "|virt|VM_status|<vmId>"
VM_REPLICATION = "|virt|VM_replication|<vmId>"
TASK_FINISHED = "|storage|task_finished|<taskID>"
NAMES = (VM_STATUS, VM_REPLICATION, TASK_FINISHED)

PAUSED = "Paused"

Publish = Callable[[str, Any], None]


def method(name: str, ident: str) -> str:
    """An event's method: its schema name with the <placeholder> filled in."""
    head, _, _ = name.rpartition("|")
    return f"{head}|{ident}"


class Events:
    """Reports in, notifications out to ``publish`` (None: dropped)."""

    def __init__(self, api: schema.Schema, publish: Publish | None = None) -> None:
        missing = [name for name in NAMES if name not in api.events]
        if missing:
            raise ValueError(f"The schema lists no event {missing}")
        self.schema = api
        self.publish = publish

    # virt.notify.Notifier

    def vm_status(self, vm_id: str, status: str, pause_code: str,
                  exit_info: dict[str, Any] | None = None) -> None:
        params: dict[str, Any] = {"status": status, "statusTime": str(int(time.monotonic() * 1000))}
        if status == PAUSED:
            params["pauseCode"] = pause_code
        params.update(exit_info or {})  # Down: exitCode, exitReason, exitMessage
        self._push(method(VM_STATUS, vm_id), {vm_id: params})

    def replication(self, vm_id: str, drive: str, state: str) -> None:
        self._push(method(VM_REPLICATION, vm_id), {"drive": drive, "state": state})

    # storage: the pool's task manager's on_finished

    def task_finished(self, status: dict[str, Any]) -> None:
        """status: Task.getStatus' shape, ``code`` an error name ("" for none)."""
        code, _ = self.schema.error_code_of(status.get("code", ""))
        task_id = str(status["taskID"])
        self._push(method(TASK_FINISHED, task_id), {
            "taskID": task_id, "taskResult": status.get("taskResult", ""), "code": code,
        })

    def _push(self, name: str, params: dict[str, Any]) -> None:
        publish = self.publish
        log.debug("Event %s %s%s", name, params, "" if publish else " (no subscribers' sink)")
        if publish is None:
            return
        try:
            publish(name, params)
        except Exception:
            log.exception("Cannot publish event %s", name)
