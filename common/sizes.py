"""Sizes that storage and virt must compute identically.

One copy of each rule: the size of a block device (or file) and the most
bytes a COW (qcow2) volume of a given virtual size may ever take, which bounds
both how large storage allocates a thin block volume and how far the thin
provisioning monitor extends one.
"""

from __future__ import annotations

import os

SECTOR = 512

# A qcow2 volume never needs more than its capacity plus 10% for metadata
# (VDSM's rule); thin block volumes are never extended beyond this.
COW_OVERHEAD = 1.1


def round_up(value: int, unit: int) -> int:
    """``value`` rounded up to a multiple of ``unit``."""
    return (value + unit - 1) // unit * unit


def cow_max_size(capacity: int) -> int:
    """The most bytes a COW volume of ``capacity`` virtual bytes may take,
    in whole sectors."""
    return round_up(int(capacity * COW_OVERHEAD), SECTOR)


def device_size(path: str) -> int:
    """Size in bytes of a block device (or file): where its end is."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)
