"""``release_freed_memory``: memory freed below a live allocation goes back to the system (glibc)."""

from __future__ import annotations

import asyncio
import os
import platform

import pytest

from services.shared import memory

pytestmark = pytest.mark.unit


def rss_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc_trim is glibc's")
def test_memory_freed_behind_live_blocks_is_returned() -> None:
    blocks = [bytes(2000) + bytes([i % 256]) for i in range(100_000)]  # ~200 MB through malloc
    kept = blocks[::64]  # live blocks spread over the heap: free() alone can trim nothing below them
    del blocks
    before = rss_mb()
    assert memory.release_freed_memory() is True
    after = rss_mb()
    assert before - after > 100, f"RSS {before:.0f} MB -> {after:.0f} MB"
    assert len(kept) == 1563


async def test_the_periodic_release_runs_until_cancelled(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    monkeypatch.setattr(memory, "release_freed_memory", lambda: calls.append(1) or True)
    task = asyncio.create_task(memory.release_periodically(0.01))
    await asyncio.sleep(0.1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert memory._malloc_trim() is None or len(calls) >= 3
