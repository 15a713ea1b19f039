"""`scaling.num_workers`: a fixed count (`2`), or an elastic range (`1-4`)."""

from __future__ import annotations

import re

from tlray.errors import TlrayError

_RANGE = re.compile(r"^\s*(\d+)\s*-\s*(\d+)\s*$")


def worker_range(value: int | str) -> tuple[int, int]:
    """(fewest, most) workers: `2` -> (2, 2), `1-4` -> (1, 4)."""
    if isinstance(value, int) or str(value).strip().isdigit():
        low = high = int(value)
    elif match := _RANGE.match(str(value)):
        low, high = int(match[1]), int(match[2])
    else:
        raise TlrayError(f"--scaling.num_workers: expected a count (2) or a range MIN-MAX "
                         f"(1-4), got {value!r}")
    if not 1 <= low <= high:
        raise TlrayError(f"--scaling.num_workers: expected 1 <= MIN <= MAX, got {value!r}")
    return low, high
