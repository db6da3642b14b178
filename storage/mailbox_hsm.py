"""A host's side of the storage mailbox: its requests to the SPM and their replies.

:class:`HsmMailbox` runs on every host connected to a pool, from
:meth:`storage.pool.Pool.connect` to ``disconnect`` (the SPM host too: its
role may change; while it is SPM, extensions run in-process and this stays
idle).  The format and the layout are :mod:`storage.mailbox`'s.

- :meth:`HsmMailbox.start` writes the host's inbox region: a HELLO (the
  SPM's scan then counts this host in its used range) and empty request
  slots (what a previous life of this daemon left is dropped).
- :meth:`HsmMailbox.extend` takes a free slot (seven per host: several
  VMs, a replica and its source, may wait at once), writes the request
  and blocks until the reply.  The poller thread reads this host's own
  outbox region (4 KiB) every ``reply_interval`` (0.01 s) **only while a
  request is out**, so a reply costs at most 10 ms more, and an idle host
  does no I/O at all.  A request unanswered for longer than an extension
  takes (``FAST_WINDOW``, 0.5 s: the SPM is busy, or gone) is polled for
  every ``SLOW_INTERVAL`` (0.05 s) instead, so hosts waiting on a
  saturated or absent SPM do not add to its storage's load.  The reply's
  slot is emptied in the next write (the SPM then empties its reply slot
  too).
- A request without an answer after ``retry_interval`` is written again
  (same id, attempt + 1: the SPM serves it if it never saw it, torn or
  corrupt for instance, or answers again from memory); after
  ``request_timeout`` the caller gets ``SpmRequestUnavailable`` and the
  slot is freed (the watermark monitor asks again in its next cycle; a VM
  that ran out of room meanwhile stays paused with ENOSPC and is resumed
  once an extension arrives).
- A failed extension comes back as the SPM's error name and message
  (:class:`storage.mailbox.RemoteError`: the caller sees the SPM's code).
- :meth:`HsmMailbox.stop` wakes the callers still waiting
  (``SpmRequestUnavailable``) and, at disconnect, zeroes the region (this
  host leaves the SPM's used range at its next full scan).

All writes are the whole region, from this host's own copy, in order (a
write lock; the copy is taken under it), so a later write never carries
an older state.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
import uuid

from storage import errors, mailbox

log = logging.getLogger("storage.mailbox")

EXTEND = "extend a volume"
# Poll fast for this long after a request was written, slower afterwards.
FAST_WINDOW = 0.5
SLOW_INTERVAL = 0.05


@dataclasses.dataclass(frozen=True)
class Result:
    """A served request: the size reached and where the time went (wall
    clock: sent and received by this host, seen and done by the SPM)."""

    size: int
    sent: float
    seen: float
    done: float
    received: float
    attempts: int

    @property
    def total(self) -> float:
        return self.received - self.sent

    @property
    def spm_wait(self) -> float:
        """From the request written to the SPM's scan that read it."""
        return max(self.seen - self.sent, 0.0)

    @property
    def spm_work(self) -> float:
        """The SPM's time: queued for a worker and the extension."""
        return max(self.done - self.seen, 0.0)

    @property
    def reply_wait(self) -> float:
        """From the SPM done (and writing the reply) to this host reading it."""
        return max(self.received - self.done, 0.0)


@dataclasses.dataclass
class _Pending:
    request: mailbox.Message
    written: float  # monotonic
    event: threading.Event = dataclasses.field(default_factory=threading.Event)
    reply: mailbox.Message | None = None
    received: float = 0.0
    error: Exception | None = None


class HsmMailbox:
    def __init__(self, pool_id: str, host_id: int, inbox: mailbox.Box, outbox: mailbox.Box,
                 settings: mailbox.Settings) -> None:
        mailbox.check_host_id(host_id)
        self.pool_id = pool_id
        self.host_id = host_id
        self.inbox = inbox
        self.outbox = outbox
        self.settings = settings
        self._region = bytearray(mailbox.REGION_SIZE)
        self._pending: dict[int, _Pending] = {}
        self._cond = threading.Condition()
        self._write_lock = threading.Lock()
        self._next = 0
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._corrupt: dict[int, bytes] = {}
        self._failing = ""
        self.instance = str(uuid.uuid4())

    def __repr__(self) -> str:
        return f"<HsmMailbox pool={self.pool_id} host={self.host_id}>"

    # Life cycle.

    def start(self) -> HsmMailbox:
        hello = mailbox.Message(mailbox.HELLO, self.host_id, mailbox.HELLO_SLOT,
                                request_id=self.instance, sent=time.time())
        mailbox.put_slot(self._region, mailbox.HELLO_SLOT, mailbox.encode(hello))
        self._write()
        self._thread = threading.Thread(target=self._run, name="mailbox-hsm", daemon=True)
        self._thread.start()
        log.info("HSM mailbox started pool=%s host_id=%d inbox=%s outbox=%s",
                 self.pool_id, self.host_id, self.inbox.path, self.outbox.path)
        return self

    def stop(self, clear: bool = True) -> None:
        """Wake waiting callers (SpmRequestUnavailable); clear: zero this
        host's region (disconnect), best effort."""
        with self._cond:
            self._stopping = True
            for p in self._pending.values():
                p.error = errors.SpmRequestUnavailable(
                    "the mailbox stopped", pool_id=self.pool_id, request=EXTEND)
                p.event.set()
            self._pending.clear()
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if clear:
            with self._cond:
                self._region[:] = bytes(mailbox.REGION_SIZE)
            try:
                self._write()
            except (errors.Error, OSError) as e:
                log.error("Cannot clear the mailbox region pool=%s host_id=%d: %s",
                          self.pool_id, self.host_id, e)
        self.inbox.close()
        self.outbox.close()
        log.info("HSM mailbox stopped pool=%s host_id=%d", self.pool_id, self.host_id)

    # Requests.

    def extend(self, sd_id: str, img_id: str, vol_id: str, size: int,
               timeout: float | None = None) -> int:
        """Ask the SPM to grow the volume to size bytes; its size now."""
        return self.extend_timed(sd_id, img_id, vol_id, size, timeout).size

    def extend_timed(self, sd_id: str, img_id: str, vol_id: str, size: int,
                     timeout: float | None = None) -> Result:
        """extend, with where the time went."""
        timeout = self.settings.request_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        with self._cond:
            slot = self._take_slot(deadline, timeout)
            request = mailbox.Message(
                mailbox.REQUEST, self.host_id, slot, request_id=str(uuid.uuid4()),
                sd_id=sd_id, img_id=img_id, vol_id=vol_id, size=size, sent=time.time())
            p = _Pending(request, time.monotonic())
            self._pending[slot] = p
            mailbox.put_slot(self._region, slot, mailbox.encode(request))
            self._cond.notify_all()  # the poller starts polling
        try:
            self._write()
        except BaseException:
            self._give_up(slot, p)
            raise
        log.debug("Mailbox request sent pool=%s %s", self.pool_id, request)
        if not p.event.wait(max(deadline - time.monotonic(), 0)):
            self._give_up(slot, p)
            log.error("No reply from the SPM pool=%s %s timeout=%s attempts=%d",
                      self.pool_id, p.request, timeout, p.request.attempt + 1)
            raise errors.SpmRequestUnavailable(
                f"no reply from the SPM in {timeout:g} s", pool_id=self.pool_id,
                request=EXTEND)
        if p.error is not None:
            raise p.error
        reply = p.reply
        assert reply is not None
        result = Result(reply.size, request.sent, reply.seen, reply.done, p.received,
                        p.request.attempt + 1)
        if reply.status != mailbox.OK:
            log.error("SPM failed the request pool=%s %s: %s: %s", self.pool_id, request,
                      reply.error, reply.message)
            raise mailbox.RemoteError(reply.error, reply.message)
        log.info("Mailbox extension done pool=%s sd=%s vol=%s requested=%d size=%d "
                 "total=%.3f spm_wait=%.3f spm_work=%.3f reply_wait=%.3f attempts=%d",
                 self.pool_id, sd_id, vol_id, size, reply.size, result.total,
                 result.spm_wait, result.spm_work, result.reply_wait, result.attempts)
        return result

    def outstanding(self) -> int:
        with self._cond:
            return len(self._pending)

    def _take_slot(self, deadline: float, timeout: float) -> int:
        """A free request slot, round robin (caller holds the condition)."""
        slots = mailbox.REQUEST_SLOTS
        while True:
            if self._stopping:
                raise errors.SpmRequestUnavailable(
                    "the mailbox is stopped", pool_id=self.pool_id, request=EXTEND)
            for i in range(len(slots)):
                slot = slots[(self._next + i) % len(slots)]
                if slot not in self._pending:
                    self._next = (self._next + i + 1) % len(slots)
                    return slot
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self._cond.wait(remaining):
                raise errors.SpmRequestUnavailable(
                    f"all {len(slots)} mailbox slots busy for {timeout:g} s",
                    pool_id=self.pool_id, request=EXTEND)

    def _give_up(self, slot: int, p: _Pending) -> None:
        """Free a slot whose caller stopped waiting; written best effort."""
        with self._cond:
            if self._pending.get(slot) is not p:
                return
            del self._pending[slot]
            mailbox.put_slot(self._region, slot, mailbox.EMPTY)
            self._cond.notify_all()
        try:
            self._write()
        except (errors.Error, OSError) as e:
            log.warning("Cannot free mailbox slot pool=%s slot=%d: %s", self.pool_id, slot, e)

    def _write(self) -> None:
        with self._write_lock:
            with self._cond:
                data = bytes(self._region)
            self.inbox.write(self.host_id, data)

    # The poller.

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return
            try:
                if self._poll():
                    self._write()
                if self._failing:
                    log.info("HSM mailbox works again pool=%s", self.pool_id)
                    self._failing = ""
            except (errors.Error, OSError) as e:
                text = str(e)
                log.log(logging.DEBUG if text == self._failing else logging.ERROR,
                        "HSM mailbox cannot read or write pool=%s host_id=%d: %s",
                        self.pool_id, self.host_id, text)
                self._failing = text
            except Exception:
                log.exception("HSM mailbox poll failed pool=%s", self.pool_id)
            with self._cond:
                if self._stopping:
                    return
                self._cond.wait(self._interval())

    def _interval(self) -> float:
        """reply_interval while the newest request is young, else slower
        (the caller holds the condition)."""
        newest = max((p.written for p in self._pending.values()), default=0.0)
        if time.monotonic() - newest < FAST_WINDOW:
            return self.settings.reply_interval
        return max(SLOW_INTERVAL, self.settings.reply_interval)

    def _poll(self) -> bool:
        """Read this host's outbox region once: complete what was answered,
        resend what waited too long; whether the region must be written."""
        region = self.outbox.read(self.host_id, self.host_id)
        received = time.time()
        now = time.monotonic()
        changed = False
        with self._cond:
            for slot, p in list(self._pending.items()):
                reply = self._reply(region, slot)
                if reply is not None and reply.same_request(p.request):
                    p.reply, p.received = reply, received
                    del self._pending[slot]
                    mailbox.put_slot(self._region, slot, mailbox.EMPTY)
                    p.event.set()
                    changed = True
                elif now - p.written >= self.settings.retry_interval:
                    p.request = dataclasses.replace(p.request, attempt=p.request.attempt + 1)
                    p.written = now
                    mailbox.put_slot(self._region, slot, mailbox.encode(p.request))
                    changed = True
                    log.warning("No reply from the SPM yet, resending pool=%s %s",
                                self.pool_id, p.request)
            if changed:
                self._cond.notify_all()  # slots freed
        return changed

    def _reply(self, region: bytes, slot: int) -> mailbox.Message | None:
        raw = mailbox.slot_of(region, slot)
        try:
            reply = mailbox.decode(raw, self.host_id, slot)
        except mailbox.CorruptMessage as e:
            if self._corrupt.get(slot) != raw:
                self._corrupt[slot] = raw
                log.warning("Ignoring corrupt mailbox reply pool=%s: %s", self.pool_id, e)
            return None
        self._corrupt.pop(slot, None)
        if reply is None or reply.kind != mailbox.REPLY:
            return None
        return reply
