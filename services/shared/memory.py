"""Handing memory the process has freed back to the system, so RSS follows what is in use.

CPython allocates objects larger than 512 bytes (Kafka record values, encoded klines, fetch responses) with the C
library's ``malloc``. glibc returns freed memory to the system only from the top of a heap; memory freed below a
chunk still in use stays in the process, counted in its RSS, although nothing uses it. A service that goes
through a burst (the aggregator catching up on a backlog: fetched batches, queued klines, checkpoint records) then
keeps the burst's high-water mark as its RSS for good. Measured with 2,000 symbols × 7 intervals
(``benchmarks/bench_scale.py``): the aggregator ended a catch-up at 254 MB RSS, 172 MB when it releases freed
memory every few seconds.

:func:`release_freed_memory` calls glibc's ``malloc_trim(0)``, which gives back every free page of every heap
(not only the top). It is a no-op where the C library has no ``malloc_trim`` (musl, macOS).
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
from functools import cache
from typing import Any


@cache
def _malloc_trim() -> Any | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        return ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):
        return None


def release_freed_memory() -> bool:
    """Give the system back the memory the C heap holds free; False where that is not possible."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


async def release_periodically(interval_s: float) -> None:
    """:func:`release_freed_memory` every ``interval_s`` seconds, until cancelled (a few milliseconds each)."""
    if _malloc_trim() is None:
        return
    while True:
        await asyncio.sleep(interval_s)
        release_freed_memory()
