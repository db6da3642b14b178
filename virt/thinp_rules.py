"""The watermark monitor's decisions (virt/thinp.py): plain arithmetic on sizes.

When a thin volume is extended (its allocation crossed ``physical -
watermark``), to what size, in which order with a mirror's replica, and
the block threshold that makes libvirt tell the monitor in time.
"""

from __future__ import annotations

from common import sizes


def watermark(chunk: int, utilization_percent: int) -> int:
    """Free bytes left in the LV below which it is extended."""
    return chunk * utilization_percent // 100


def threshold(physical: int, mark: int) -> int:
    """The block threshold for a volume of physical bytes (0: none)."""
    return max(physical - mark, 0)


def needs_extension(capacity: int, allocation: int, physical: int, mark: int) -> bool:
    """Whether the allocation crossed physical - watermark and there is room to grow."""
    return allocation >= physical - mark and physical < sizes.cow_max_size(capacity)


def next_size(capacity: int, physical: int, chunk: int) -> int:
    """The size to extend to: one chunk more, at most the maximum size."""
    return min(physical + chunk, max(sizes.cow_max_size(capacity), physical))


def extension_plan(
    capacity: int, physical: int, replica_physical: int | None, chunk: int
) -> list[tuple[str, int]]:
    """The extensions to grow a drive: [("replica", size), ("source", size)].

    The replica (when there is one to extend) comes first and gets the same
    size as the source, never less than the source has now.
    """
    size = next_size(capacity, physical, chunk)
    plan = []
    if replica_physical is not None and replica_physical < size:
        plan.append(("replica", size))
    if physical < size:
        plan.append(("source", size))
    return plan


def replica_size(capacity: int, allocation: int, replica_physical: int, chunk: int) -> int:
    """The size to extend the replica of a source that is not thin to: a
    chunk past what the source holds (or the replica has), at most the
    maximum size."""
    return next_size(capacity, max(replica_physical, allocation), chunk)
