"""The SPM's side of the storage mailbox: one thread that reads every host's
requests, a few workers that extend, replies written back at once.

:class:`SpmMailbox` runs while this host is the pool's SPM (started by
:meth:`storage.pool.Pool.spm_start`, stopped by ``spm_stop``, fenced
without another write when the SPM lease is lost).  The format and the
layout are :mod:`storage.mailbox`'s.

The scan, and why it stays cheap with many hosts:

- **one sequential O_DIRECT read per cycle** of the *used range* of
  ``inbox``: the regions of host ids 1..N+8, N the highest host id whose
  region is not empty (every connected host has its HELLO there).  N is
  found by a *full* read (all 250 regions, 1 MiB) every
  ``full_scan_interval`` (5 s).  Host ids are given out from 1 up (the
  engine's ``vds_spm_id``), so a host that just connected is found by the
  next cycle within the 8 regions of headroom, and any other by the next
  full scan, long before its VMs need an extension (it connects first).
  So a cycle costs 4 KiB per host in use: 288 KiB for 64 hosts, 1 MiB for
  250, one I/O either way;
- **only what changed is decoded**: the cycle's bytes are compared with
  the previous cycle's (a memcmp), then region by region and sector by
  sector; only a sector that changed since its last read is decoded, so
  250 idle hosts cost one 1 MiB compare and a busy host one decode per new
  message;
- **an adaptive poll interval**: ``busy_interval`` (0.02 s) while requests
  flow (and for ``busy_linger``, 5 s, after the last one), ``idle_interval``
  (0.1 s) otherwise.  The idle interval is what the first request of a
  burst waits for (0.05 s on average, 0.1 s at most: inside the goal of
  p50 0.3 s / p99 1 s with ~0.2 s of LVM work), and the second request of
  a pair (the source, after the replica) finds the SPM polling fast.  Idle,
  the SPM reads 10 times a second 4 KiB per host in use (plus 8), plus
  1 MiB every 5 s (for 10 hosts: 0.9 MiB/s; VDSM reads 1 MiB every 2 s, or
  every 0.5 s with its events, whatever the number of hosts).

A new request (a request id not seen in that slot) goes to one of
``workers`` threads, which runs the extension (``extend``: the in-process
SPM path, :meth:`storage.spm_requests.SpmRequests.extend_in_process`, the
same as when the VM runs on the SPM; extensions of one volume are
serialized by :class:`storage.extend.Extender`) and writes the reply into
this host's copy of ``outbox`` and then to storage at once (one write of
the dirty regions; replies that are ready together share it): the reply
path never waits for the next cycle.  The same request seen again (the
HSM resends after ``retry_interval``) is answered from memory if it was
answered, ignored while it runs.  A slot the HSM emptied has its reply
slot emptied too.  A torn or corrupt message is logged once and ignored;
the HSM's resend, once valid, is served.

At start the SPM takes ``outbox`` as it finds it (replies of the previous
SPM stay) and treats every request it reads as new: requests that were
waiting when the previous SPM died are served now.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import threading
import time
from collections.abc import Callable

from common import errors as common_errors
from storage import errors, mailbox

log = logging.getLogger("storage.mailbox")

# (sd_id, img_id, vol_id, size) -> the volume's size now.
Extend = Callable[[str, str, str, int], int]
EMPTY_REGION = bytes(mailbox.REGION_SIZE)
# Regions read past the highest host id in use (new hosts found at once).
HEADROOM = 8


@dataclasses.dataclass
class _Entry:
    """The request in one slot, as this SPM knows it."""

    request: mailbox.Message
    reply: mailbox.Message | None = None


class SpmMailbox:
    def __init__(self, name: str, inbox: mailbox.Box, outbox: mailbox.Box, extend: Extend,
                 settings: mailbox.Settings) -> None:
        self.name = name
        self.inbox = inbox
        self.outbox = outbox
        self._extend = extend
        self.settings = settings
        self._lock = threading.Lock()  # state below
        self._write_lock = threading.Lock()  # outbox writes, in order
        self._entries: dict[tuple[int, int], _Entry] = {}
        self._corrupt: dict[tuple[int, int], bytes] = {}
        self._seen: dict[int, bytes] = {}  # host id -> its region, last read
        self._raw: dict[tuple[int, int], bytes] = {}  # (host, slot) -> its sector
        self._last_read = b""
        self._out = bytearray(mailbox.SIZE)  # outbox, regions 0..MAX_HOST_ID
        self._dirty: set[int] = set()
        self._fenced = False
        self._used = mailbox.MAX_HOST_ID
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._workers: concurrent.futures.ThreadPoolExecutor | None = None
        self._failing = ""
        # Counters (benchmark, tests).
        self.cycles = 0
        self.served = 0
        self.resent = 0
        self.corrupt = 0

    # Life cycle.

    def start(self) -> SpmMailbox:
        """Take outbox as it is, then start scanning."""
        self._out[mailbox.REGION_SIZE:] = self.outbox.read(1, mailbox.MAX_HOST_ID)
        self._workers = concurrent.futures.ThreadPoolExecutor(
            max_workers=self.settings.workers, thread_name_prefix="mailbox-spm-worker")
        self._thread = threading.Thread(target=self._run, name="mailbox-spm", daemon=True)
        self._thread.start()
        log.info("SPM mailbox started %s inbox=%s outbox=%s idle_interval=%s "
                 "busy_interval=%s workers=%d", self.name, self.inbox.path, self.outbox.path,
                 self.settings.idle_interval, self.settings.busy_interval,
                 self.settings.workers)
        return self

    def stop(self, fence: bool = False) -> None:
        """Stop scanning.  fence (the SPM lease is lost): write nothing more,
        let running extensions end unanswered; else wait for them and write
        their replies."""
        if fence:
            with self._lock:
                self._fenced = True
        self._stopping.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._workers is not None:
            self._workers.shutdown(wait=not fence, cancel_futures=fence)
            self._workers = None
        if not fence:
            try:
                self._flush()
            except (errors.Error, OSError) as e:
                log.error("Cannot write the last replies %s: %s", self.name, e)
        self.inbox.close()
        self.outbox.close()
        log.info("SPM mailbox stopped %s%s served=%d resent=%d corrupt=%d", self.name,
                 " (fenced)" if fence else "", self.served, self.resent, self.corrupt)

    # The scan.

    def _run(self) -> None:
        next_full = 0.0
        busy_until = 0.0
        while not self._stopping.is_set():
            now = time.monotonic()
            full = now >= next_full
            try:
                if self._cycle(full):
                    busy_until = time.monotonic() + self.settings.busy_linger
                self._flush()  # what a failed write left
                if self._failing:
                    log.info("SPM mailbox works again %s", self.name)
                    self._failing = ""
            except (errors.Error, OSError) as e:
                self._log_failure(e)
            except Exception:
                log.exception("SPM mailbox cycle failed %s", self.name)
            if full:
                next_full = now + self.settings.full_scan_interval
            busy = time.monotonic() < busy_until
            self._stopping.wait(self.settings.busy_interval if busy
                                else self.settings.idle_interval)

    def _log_failure(self, e: BaseException) -> None:
        text = str(e)
        log.log(logging.DEBUG if text == self._failing else logging.ERROR,
                "SPM mailbox cannot read or write %s: %s", self.name, text)
        self._failing = text

    def _cycle(self, full: bool) -> bool:
        """One read of the used range (full: of every region); whether a
        request is new or still running."""
        last = mailbox.MAX_HOST_ID if full else min(self._used + HEADROOM, mailbox.MAX_HOST_ID)
        self.cycles += 1
        data = self.inbox.read(1, last)
        seen = time.time()
        new = False
        if data != self._last_read:  # one compare when nothing changed
            self._last_read = data
            for host_id in range(1, last + 1):
                start = (host_id - 1) * mailbox.REGION_SIZE
                region = data[start:start + mailbox.REGION_SIZE]
                if self._seen.get(host_id) != region:
                    self._seen[host_id] = region
                    new |= self._host_changed(host_id, region, seen)
        present = [h for h, r in self._seen.items() if r != EMPTY_REGION]
        if full or (present and max(present) > self._used):
            self._used = max(present, default=0)
        with self._lock:
            running = any(e.reply is None for e in self._entries.values())
        return new or running

    def _host_changed(self, host_id: int, region: bytes, seen: float) -> bool:
        new = False
        for slot in mailbox.REQUEST_SLOTS:
            raw = mailbox.slot_of(region, slot)
            key = (host_id, slot)
            if self._raw.get(key) == raw:
                continue  # this slot did not change
            self._raw[key] = raw
            try:
                msg = mailbox.decode(raw, host_id, slot)
                if msg is not None and msg.kind != mailbox.REQUEST:
                    raise mailbox.CorruptMessage(host_id, slot, f"kind {msg.kind} in a "
                                                 "request slot")
            except mailbox.CorruptMessage as e:
                if self._corrupt.get(key) != raw:
                    self._corrupt[key] = raw
                    self.corrupt += 1
                    log.warning("Ignoring corrupt mailbox message %s: %s (not acted on; "
                                "the sender resends)", self.name, e)
                continue
            self._corrupt.pop(key, None)
            if msg is None:
                self._slot_emptied(key)
            else:
                new |= self._request(key, msg, seen)
        return new

    def _slot_emptied(self, key: tuple[int, int]) -> None:
        host_id, slot = key
        with self._lock:
            self._entries.pop(key, None)
            region = self._region(host_id)
            if mailbox.slot_of(region, slot) != mailbox.EMPTY:
                mailbox.put_slot(region, slot, mailbox.EMPTY)
                self._dirty.add(host_id)

    def _request(self, key: tuple[int, int], msg: mailbox.Message, seen: float) -> bool:
        """A valid request read in a slot; whether it is new."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and entry.request.same_request(msg):
                if msg.attempt == entry.request.attempt:
                    return False
                entry.request = msg
                if entry.reply is None:
                    log.debug("Mailbox request resent while running %s %s", self.name, msg)
                    return False
                # Answered already: the reply again, from memory, at once.
                self._put_reply(entry.reply)
                self.resent += 1
                log.info("Mailbox request resent, answered again %s %s reply_size=%d",
                         self.name, msg, entry.reply.size)
                return False
            self._entries[key] = _Entry(msg)
        log.info("Mailbox request %s %s waited=%.3f", self.name, msg, max(seen - msg.sent, 0))
        workers = self._workers
        if workers is None:
            return False
        try:
            workers.submit(self._serve, key, msg, seen)
        except RuntimeError:  # shutting down
            return False
        return True

    # The work.

    def _serve(self, key: tuple[int, int], msg: mailbox.Message, seen: float) -> None:
        start = time.time()
        try:
            size = self._extend(msg.sd_id, msg.img_id, msg.vol_id, msg.size)
            reply = msg.reply(size, seen, time.time())
        except common_errors.Error as e:
            log.error("Mailbox extension failed %s %s: %s", self.name, msg, e)
            reply = msg.reply(0, seen, time.time(), error=e.name, message=str(e))
        except Exception as e:
            log.exception("Mailbox extension failed %s %s", self.name, msg)
            reply = msg.reply(0, seen, time.time(), error=common_errors.GENERAL,
                              message=str(e) or type(e).__name__)
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or not entry.request.same_request(msg):
                log.info("Mailbox request gone before its reply %s %s", self.name, msg)
                return
            entry.reply = reply
            self._put_reply(reply)
            self.served += 1
        log.info("Mailbox reply %s host=%d slot=%d id=%s sd=%s img=%s vol=%s requested=%d "
                 "size=%d status=%s queued=%.3f extend=%.3f", self.name, msg.host_id,
                 msg.slot, msg.request_id, msg.sd_id, msg.img_id, msg.vol_id, msg.size,
                 reply.size, reply.error or "ok", start - seen, reply.done - start)
        try:
            self._flush()
        except (errors.Error, OSError) as e:  # the scan thread writes it again
            self._log_failure(e)

    def _region(self, host_id: int) -> memoryview:
        start = host_id * mailbox.REGION_SIZE
        return memoryview(self._out)[start:start + mailbox.REGION_SIZE]

    def _put_reply(self, reply: mailbox.Message) -> None:
        """Into this host's copy of outbox (the caller holds the lock)."""
        region = self._out
        start = reply.host_id * mailbox.REGION_SIZE + reply.slot * mailbox.SLOT_SIZE
        region[start:start + mailbox.SLOT_SIZE] = mailbox.encode(reply)
        self._dirty.add(reply.host_id)

    def _flush(self) -> None:
        """Write the dirty regions of outbox: one write per run of adjacent
        host ids.  A failed write leaves them dirty for the next cycle."""
        with self._write_lock:
            with self._lock:
                if self._fenced or not self._dirty:
                    return
                hosts = sorted(self._dirty)
                self._dirty.clear()
                runs = _runs(hosts)
                data = [bytes(self._out[first * mailbox.REGION_SIZE:
                                        (last + 1) * mailbox.REGION_SIZE])
                        for first, last in runs]
            for i, ((first, _), chunk) in enumerate(zip(runs, data, strict=True)):
                try:
                    self.outbox.write(first, chunk)
                except Exception:
                    with self._lock:
                        for f, la in runs[i:]:
                            self._dirty.update(range(f, la + 1))
                    raise


def _runs(hosts: list[int], gap: int = 4) -> list[tuple[int, int]]:
    """Sorted host ids as (first, last) runs; gaps up to gap regions are
    written through (one larger write beats two)."""
    runs: list[tuple[int, int]] = []
    for h in hosts:
        if runs and h - runs[-1][1] <= gap + 1:
            runs[-1] = (runs[-1][0], h)
        else:
            runs.append((h, h))
    return runs
