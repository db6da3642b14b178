"""What the move-disk flow and its clean-up share: transports, calls, tasks, progress.

:class:`FlowBase` holds the two daemons a flow talks to (the VM's host,
``rpc``; the pool's SPM, ``spm``, once found) and the helpers every step
uses: a call that retries ``unavail`` (40), a quiet call for rollbacks,
waiting for an SPM task (by its pushed ``task_finished`` event when there
are events, else by polling), stopping one that ran out of time, the
deadline, and the phase and percent shown on the progress bar.
:mod:`vdsm_lsm.move_disk` (the flow), :mod:`vdsm_lsm.move_mirror` (its
mirror and pivot) and :mod:`vdsm_lsm.cleanup` build on it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

from vdsm_lsm import api_schema, client_errors, move_progress

log = logging.getLogger("vdsm_lsm.move_disk")

DEFAULT_TIMEOUT = 3600.0
ROLLBACK_TIMEOUT = 300.0

# Error codes by schema name (codes are never written in Python).
UNAVAIL = "unavail"
CHANGE_DISK = "changeDisk"
PIVOT_IMPOSSIBLE = "PivotImpossible"
NOT_IN_PROGRESS = "ReplicationNotInProgress"
NOT_SPM = "SpmStatusError"
UNKNOWN_TASK = "UnknownTask"
LIBVIRT_GONE = "LibvirtConnectionError"

# StoragePool.getSpmStatus().spmStatus of the host holding the role.
SPM_STATUS = "SPM"

# Pushed events (the schema's events:), their names up to the <id>; with
# events, a status is read again when one comes, or after EVENT_WAIT.
TASK_FINISHED = "|storage|task_finished|"
VM_REPLICATION = "|virt|VM_replication|"
EVENT_WAIT = 5.0


class Transport(Protocol):
    """What the flow asks of its connection to a daemon.

    ``call`` returns a verb's result; it raises
    :class:`vdsm_lsm.client_errors.ClientError` for an error answer and
    :class:`OSError` when the daemon cannot be reached.
    """

    def call(self, method: str, **params: Any) -> Any: ...


class Events(Protocol):
    """A daemon's pushed events (vdsm_lsm.stomp_client.StompClient; HTTP has none).

    ``wait`` answers the params of the first event received whose name
    starts with prefix and that predicate accepts (waiting up to timeout),
    None if none came.
    """

    def wait(self, prefix: str, predicate: Callable[[dict[str, Any]], bool] | None = None,
             timeout: float = 60.0) -> dict[str, Any] | None: ...


def vm_stats(answer: Any) -> Any:
    """A VM's stats from VM.getStats' answer: a list of one (VDSM's shape;
    a dict, as older daemons answered, is taken as it is)."""
    if isinstance(answer, list):
        return answer[0] if answer else None
    return answer


def error(name: str, message: str) -> client_errors.ClientError:
    """A refusal of the flow, with the code of the schema error ``name``."""
    return client_errors.ClientError(api_schema.code_of(name), message)


def is_error(e: client_errors.ClientError, name: str) -> bool:
    return e.code == api_schema.code_of(name)


def who_is_spm(status: dict[str, Any]) -> str:
    """Which host is SPM, from a StoragePool.getSpmStatus answer."""
    spm_id = status.get("spmId", -1)
    if isinstance(spm_id, int) and spm_id > 0:
        return f"the SPM is host {spm_id}"
    return "no host is SPM now"


class FlowBase:
    """The daemons, the deadline, the progress and the calls of a flow."""

    def __init__(
        self,
        rpc: Transport,
        spm: Transport | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        progress: move_progress.ProgressBar | None = None,
        poll_interval: float = 0.5,
        events: Events | None = None,
        spm_events: Events | None = None,
        phases: list[str] | None = None,
    ) -> None:
        self.rpc = rpc
        self.spm_given = spm
        # The SPM's transport, once known (find_spm: spm_given, or rpc if it is SPM).
        self.spm: Transport | None = None
        self.timeout = timeout
        self.bar = progress
        self.poll_interval = poll_interval
        self.events = events
        self.spm_events = spm_events if spm is not None else events
        self._seen: set[str] = set()  # events waited for and received
        self.progress = move_progress.Progress(phases or list(move_progress.PHASES))
        self.phase = self.progress.phases[0]
        self._deadline = time.monotonic() + timeout

    def find_spm(self, pool_id: str) -> Transport:
        """The SPM's transport: the one given (checked), else the VM host if it is SPM."""
        if self.spm_given is not None:
            status = self._call(self.spm_given, "StoragePool.getSpmStatus",
                                storagepoolID=pool_id)
            if status.get("spmStatus") != SPM_STATUS:
                raise error(NOT_SPM, f"the host given as SPM is not the SPM of pool {pool_id}"
                            f" ({who_is_spm(status)})")
            self.spm = self.spm_given
            return self.spm_given
        status = self._call(self.rpc, "StoragePool.getSpmStatus", storagepoolID=pool_id)
        if status.get("spmStatus") != SPM_STATUS:
            raise error(NOT_SPM, f"the VM's host is not the SPM of pool {pool_id} "
                        f"({who_is_spm(status)}): pass the SPM's address with --spm")
        log.info("The VM's host is the SPM of pool=%s: it serves both roles", pool_id)
        self.spm = self.rpc
        return self.rpc

    # Calls

    def _spm(self) -> Transport:
        assert self.spm is not None, "find_spm first"
        return self.spm

    def _call(self, rpc: Transport, method: str, **params: Any) -> Any:
        """Call method on rpc, retrying while it answers unavail (40)."""
        while True:
            try:
                return rpc.call(method, **params)
            except client_errors.ClientError as e:
                if not is_error(e, UNAVAIL):
                    raise
                log.info("%s unavailable, retrying: %s", method, e.message)
            self._check_deadline(method)
            self._sleep(self.poll_interval)

    def _quietly(self, rpc: Transport, method: str, **params: Any) -> Any:
        try:
            return rpc.call(method, **params)
        except (client_errors.ClientError, OSError) as e:
            log.error("Rollback %s failed: %s", method, e)
            return None

    def _vm_stats(self, vm_id: str) -> dict[str, Any]:
        return dict(vm_stats(self._call(self.rpc, "VM.getStats", vmID=vm_id)))

    # SPM tasks

    def _task_status(self, task_id: str) -> dict[str, Any] | None:
        """A task's status; None if the SPM does not know it (cleared, or never made)."""
        try:
            return dict(self._call(self._spm(), "Task.getStatus", taskID=task_id))
        except client_errors.ClientError as e:
            if is_error(e, UNKNOWN_TASK):
                return None
            raise

    def _wait_task(self, task_id: str, what: str, show: bool = True) -> dict[str, Any]:
        """Wait for an SPM task to finish; clear it; raise its error if it failed."""
        spm = self._spm()
        while True:
            status = self._call(spm, "Task.getStatus", taskID=task_id)
            if show:
                self._show(status.get("progress", 0) / 100.0, what)
            if status["taskState"] == "finished":
                break
            if time.monotonic() > self._deadline:
                self._stop_task(task_id)
                raise error("ResourceTimeout", f"{what} did not finish in {self.timeout}s")
            self._pause(self.spm_events, TASK_FINISHED + task_id)
        self._quietly(spm, "Task.clear", taskID=task_id)
        if status["taskResult"] != "success":
            log.info("Task failed task=%s what=%s status=%s", task_id, what, status)
            raise client_errors.ClientError(status["code"], f"{what}: {status['message']}")
        return dict(status)

    def _wait_unowned(self, verb: str) -> None:
        """Wait (bounded) until no unfinished SPM task of verb is left: one a
        killed run submitted before it could write the task's id down."""
        spm = self._spm()
        deadline = time.monotonic() + ROLLBACK_TIMEOUT
        while time.monotonic() < deadline:
            info = self._quietly(spm, "Host.getAllTasksInfo") or {}
            statuses = self._quietly(spm, "Host.getAllTasksStatuses") or {}
            busy = [t for t, i in info.items() if i.get("verb") == verb
                    and statuses.get(t, {}).get("taskState") != "finished"]
            if not busy:
                return
            log.info("Waiting for unfinished %s tasks %s", verb, busy)
            self._sleep(self.poll_interval)

    def _stop_task(self, task_id: str, why: str = "out of time") -> None:
        """Stop a task (that ran out of time) and wait (bounded) until it ends."""
        spm = self._spm()
        log.warning("Stopping task %s: %s", task_id, why)
        self._quietly(spm, "Task.stop", taskID=task_id)
        deadline = time.monotonic() + ROLLBACK_TIMEOUT
        while time.monotonic() < deadline:
            status = self._quietly(spm, "Task.getStatus", taskID=task_id)
            if status is None or status["taskState"] == "finished":
                break
            self._sleep(self.poll_interval)
        self._quietly(spm, "Task.clear", taskID=task_id)

    # Time and progress

    def _check_deadline(self, what: str) -> None:
        if time.monotonic() > self._deadline:
            raise error("ResourceTimeout", f"gave up waiting for {what} after {self.timeout}s")

    def _set_phase(self, phase: str) -> None:
        self.phase = phase
        self._show(0.0)

    def _show(self, fraction: float, detail: str = "") -> None:
        percent = self.progress.percent(self.phase, fraction)
        if self.bar is not None:
            self.bar.update(round(percent, 1), self.phase, detail)

    def _sleep(self, seconds: float) -> None:
        time.sleep(seconds)

    def _pause(self, events: Events | None, name: str,
               predicate: Callable[[dict[str, Any]], bool] | None = None) -> None:
        """Until the next look at a status: the event name (once), else poll_interval."""
        if events is None or name in self._seen:
            self._sleep(self.poll_interval)
            return
        timeout = max(0.0, min(EVENT_WAIT, self._deadline - time.monotonic()))
        if events.wait(name, predicate, timeout) is not None:
            log.debug("Event %s", name)
            self._seen.add(name)
