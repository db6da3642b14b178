"""The size rules storage and virt share (common/sizes.py)."""

from __future__ import annotations

import os
from typing import Any

import pytest

from common import sizes

MiB = 1024**2
GiB = 1024**3


@pytest.mark.parametrize("value, unit, expected", [
    (0, 512, 0), (1, 512, 512), (512, 512, 512), (513, 512, 1024), (5, 4, 8),
])
def test_round_up(value: int, unit: int, expected: int) -> None:
    assert sizes.round_up(value, unit) == expected


@pytest.mark.parametrize("capacity, expected", [
    # capacity * 1.1, rounded up to whole sectors.
    (GiB, 1181116416),  # int(1181116006.4) -> next sector
    (40 * MiB, 44 * MiB),
    (512, 1024),  # 563.2 -> 563 -> 1024
    (1, 512),
])
def test_cow_max_size(capacity: int, expected: int) -> None:
    result = sizes.cow_max_size(capacity)
    assert result == expected
    assert result % sizes.SECTOR == 0
    assert result >= capacity * sizes.COW_OVERHEAD - 1


def test_device_size_of_a_file(tmp_path: Any) -> None:
    path = str(tmp_path / "disk")
    with open(path, "wb") as f:
        f.truncate(3 * MiB + 512)
    assert sizes.device_size(path) == 3 * MiB + 512
    with pytest.raises(FileNotFoundError):
        sizes.device_size(str(tmp_path / "missing"))
    # The descriptor is closed again.
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(10):
        sizes.device_size(path)
    assert len(os.listdir("/proc/self/fd")) == before
