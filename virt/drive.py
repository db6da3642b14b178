"""A VM's disk: which volume it runs on, the chain below it, sizes, a replica slot.

A :class:`Drive` names its image the way the engine does (pool, domain,
image, leaf volume) and keeps the chain that storage prepared for it, base
first, each link a path QEMU opens (the prepare links
``<run_dir>/storage/<sdUUID>/<imgUUID>/<volUUID>``). ``format`` follows the
drive spec convention ("cow" / "raw"); chain entries keep storage's ("COW" /
"RAW").

``replica`` is empty until a replication (``VM.diskReplicateStart``) fills
it with the destination volume and the mirror's state; BLOCK_JOB_2 events for
the drive move that state (``ready`` when the mirror converged, ``failed``).
Callers that wait for a block job use :meth:`Drive.wait_job`.  A replica's
:class:`MirrorRate` turns the successive ``cur``/``end`` readings of
``VM.getStats`` into the mirror's rate and an ETA.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import stat
import string
import threading
import time
from collections.abc import Callable
from typing import Any

import libvirt

COW = "cow"
RAW = "raw"
FORMATS = (COW, RAW)

FILE = "file"
BLOCK = "block"

COPYING = "copying"
READY = "ready"
FAILED = "failed"
REPLICA_STATES = (COPYING, READY, FAILED)

# The libvirt call that starts a mirror (virt/mirror.py; [replication] api).
BLOCKCOPY = "blockcopy"
BLOCKREBASE = "blockrebase"

# ETA when the mirror does not converge (or not enough readings yet).
NO_ETA = -1


@dataclasses.dataclass
class Volume:
    """One link of a chain, as storage's prepare returns it."""

    volume_id: str
    path: str
    format: str  # "COW" | "RAW"

    @property
    def qemu_format(self) -> str:
        return qemu_format(self.format)


class MirrorRate:
    """A mirror's rate and ETA from successive (cur, end) readings.

    ``rate`` is bytes copied per second (``cur``'s growth) over the last
    ``window`` seconds; the ETA is the remaining ``end - cur`` over the speed
    at which it shrinks (the copy rate less the rate the guest dirties),
    :data:`NO_ETA` when it does not shrink.  A ``cur`` that goes back (a new
    job) starts over.
    """

    WINDOW = 10.0

    def __init__(self, window: float = WINDOW, clock: Callable[[], float] = time.monotonic):
        self.window = window
        self.clock = clock
        self._samples: collections.deque[tuple[float, int, int]] = collections.deque()
        self._lock = threading.Lock()

    def sample(self, cur: int, end: int, ready: bool = False) -> tuple[int, int]:
        """Record a reading; (rate bytes/s, eta seconds) over the window."""
        now = self.clock()
        with self._lock:
            samples = self._samples
            if samples and cur < samples[-1][1]:
                samples.clear()
            samples.append((now, cur, end))
            while len(samples) > 2 and now - samples[1][0] >= self.window:
                samples.popleft()
            t0, cur0, end0 = samples[0]
        elapsed = now - t0
        rate = int((cur - cur0) / elapsed) if elapsed > 0 else 0
        remaining = max(end - cur, 0)
        if ready or remaining == 0:
            return rate, 0
        if elapsed <= 0:
            return rate, NO_ETA
        shrink = ((end0 - cur0) - remaining) / elapsed
        if shrink <= 0:
            return rate, NO_ETA
        return rate, int(remaining / shrink + 0.999)


@dataclasses.dataclass
class Replica:
    """The destination of a replication (virt/replication.py fills it).

    The drive holds one prepare reference on the destination leaf (prepared
    with its chain, ILLEGAL allowed) while the replica exists.
    """

    pool_id: str
    domain_id: str
    image_id: str
    volume_id: str
    chain: list[Volume] = dataclasses.field(default_factory=list)
    disk_type: str = FILE
    format: str = COW
    state: str = COPYING
    bandwidth: int = 0  # MiB/s, 0 = unlimited
    sync_writes: bool = False
    # Extend the replica before the source when the leaf fills (thin block).
    need_extend: bool = True
    # How the job was started (virt/mirror.py); not persisted: a running job
    # is pivoted or cancelled the same way whatever started it.
    api: str = dataclasses.field(default=BLOCKCOPY, compare=False)
    # The mirror was ready once: a later "not ready" is a flap (virt/pivot.py).
    ever_ready: bool = dataclasses.field(default=False, compare=False)
    rate: MirrorRate = dataclasses.field(default_factory=MirrorRate, compare=False, repr=False)

    @property
    def path(self) -> str:
        return self.chain[-1].path if self.chain else ""

    def spec(self) -> dict[str, str]:
        return {
            "poolID": self.pool_id,
            "domainID": self.domain_id,
            "imageID": self.image_id,
            "volumeID": self.volume_id,
        }


@dataclasses.dataclass
class Drive:
    name: str  # target device: vda, vdb, ...
    pool_id: str
    domain_id: str
    image_id: str
    volume_id: str  # the leaf the VM writes to
    format: str  # "cow" | "raw"
    chain: list[Volume]  # base first, leaf last
    disk_type: str = FILE  # "file" | "block": how the leaf is reached
    iface: str = "virtio"
    propagate_errors: str = "off"
    threshold: int = 0  # block threshold set on the leaf, 0 = none
    capacity: int = 0
    apparentsize: int = 0
    truesize: int = 0
    replica: Replica | None = None
    # Volumes whose prepare reference this drive holds (torn down at destroy).
    prepared: list[str] = dataclasses.field(default_factory=list)
    _job_cond: threading.Condition = dataclasses.field(
        default_factory=threading.Condition, repr=False, compare=False
    )
    # Last BLOCK_JOB_2 event: (job type, status), None if none seen.
    last_job_event: tuple[int, int] | None = dataclasses.field(default=None, compare=False)

    @property
    def path(self) -> str:
        return self.chain[-1].path

    @property
    def alias(self) -> str:
        """User alias of the disk device; IO error events name the disk by it."""
        return "ua-" + self.name

    def volume_chain(self) -> list[dict[str, str]]:
        return [{"volumeID": v.volume_id, "path": v.path} for v in self.chain]

    def stats(self) -> dict[str, Any]:
        return {
            "imageID": self.image_id,
            "domainID": self.domain_id,
            "poolID": self.pool_id,
            "volumeID": self.volume_id,
            "volumeChain": self.volume_chain(),
            "format": self.format,
            "capacity": self.capacity,
            "apparentsize": self.apparentsize,
            "truesize": self.truesize,
            "threshold": self.threshold,
        }

    def update_sizes(self, capacity: int, allocation: int, physical: int) -> None:
        """Sizes from virDomainBlockInfo: virtual size, allocation, physical size."""
        self.capacity = capacity
        self.truesize = allocation
        self.apparentsize = physical

    def on_block_job(self, job_type: int, status: int) -> None:
        """A BLOCK_JOB_2 event for this drive (event loop thread)."""
        with self._job_cond:
            self.last_job_event = (job_type, status)
            if self.replica is not None:
                if status == libvirt.VIR_DOMAIN_BLOCK_JOB_READY:
                    self.replica.state = READY
                    self.replica.ever_ready = True
                elif status == libvirt.VIR_DOMAIN_BLOCK_JOB_FAILED:
                    self.replica.state = FAILED
            self._job_cond.notify_all()

    def reset_job_event(self) -> None:
        """Forget the last BLOCK_JOB_2 event (before starting or ending a job)."""
        with self._job_cond:
            self.last_job_event = None

    def wait_job(self, predicate: Callable[[tuple[int, int] | None], bool], timeout: float) -> bool:
        """Wait until predicate(last_job_event) holds; False on timeout."""
        with self._job_cond:
            return self._job_cond.wait_for(lambda: predicate(self.last_job_event), timeout)


def target_name(index: int) -> str:
    """Virtio disk target for the index-th drive: vda ... vdz, vdaa ..."""
    letters = string.ascii_lowercase
    suffix = ""
    index += 1
    while index:
        index, rem = divmod(index - 1, 26)
        suffix = letters[rem] + suffix
    return "vd" + suffix


def qemu_format(fmt: str) -> str:
    """qcow2 / raw from a drive spec ("cow") or storage ("COW") format."""
    return "qcow2" if fmt.lower() == COW else "raw"


def disk_type(path: str) -> str:
    """ "block" if path (after links) is a block device, else "file"."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return FILE
    return BLOCK if stat.S_ISBLK(mode) else FILE


def chain_from_prepare(result: dict[str, Any]) -> list[Volume]:
    """The chain of a prepare result ({path, chain: [{volumeID, path, format}]})."""
    chain = [Volume(e["volumeID"], e["path"], e["format"]) for e in result["chain"]]
    if not chain:
        raise ValueError("prepare returned an empty chain")
    return chain
