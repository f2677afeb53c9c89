"""A 10 ms timer on the running event loop: the longest gap between its ticks is the longest the loop was blocked."""

from __future__ import annotations

import asyncio
import time


class LoopWatch:
    def __init__(self, every: float = 0.01) -> None:
        self.every = every
        self.gaps: list[float] = []
        self._task: asyncio.Task[None] | None = None

    def start(self) -> LoopWatch:
        self._task = asyncio.get_running_loop().create_task(self._tick())
        return self

    async def _tick(self) -> None:
        last = time.monotonic()
        while True:
            await asyncio.sleep(self.every)
            now = time.monotonic()
            self.gaps.append(now - last)
            last = now

    @property
    def longest(self) -> float:
        return max(self.gaps, default=0.0)

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
