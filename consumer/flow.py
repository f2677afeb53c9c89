"""Per-route flow control: a concurrency limit, an optional request rate, and a circuit breaker.

The breaker's state machine is pure (time is passed in) so it is tested without waiting; the
`Gate` wraps it with asyncio primitives. A request that finds the breaker open waits for the
cool-down instead of hammering a provider that is down; after it one probe goes through, and its
result closes or re-opens the breaker.
"""

from __future__ import annotations

import asyncio
import enum
import time
from collections.abc import Callable

from consumer.config import FlowConfig


class BreakerState(enum.IntEnum):
    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2


class CircuitBreaker:
    """Opens after `failures` consecutive failures; after `cooldown` seconds lets one probe through."""

    def __init__(self, failures: int, cooldown: float) -> None:
        self.threshold = failures
        self.cooldown = cooldown
        self.state = BreakerState.CLOSED
        self.consecutive = 0
        self.opened_at = 0.0
        self.probing = False

    def wait_time(self, now: float) -> float | None:
        """None when a request may go now (and claims the probe when half-open); else seconds to wait."""
        if self.state is BreakerState.OPEN:
            remaining = self.opened_at + self.cooldown - now
            if remaining > 0:
                return remaining
            self.state = BreakerState.HALF_OPEN
        if self.state is BreakerState.HALF_OPEN:
            if self.probing:
                return min(self.cooldown, 0.05)
            self.probing = True
        return None

    def record(self, ok: bool, now: float) -> None:
        if ok:
            self.consecutive = 0
            self.state = BreakerState.CLOSED
            self.probing = False
            return
        self.consecutive += 1
        if self.state is BreakerState.HALF_OPEN or self.consecutive >= self.threshold:
            self.state = BreakerState.OPEN
            self.opened_at = now
            self.probing = False

    def release_probe(self) -> None:
        """A probe that ended without a verdict on the provider (e.g. cancelled) frees the slot."""
        self.probing = False


class RateLimiter:
    """A token bucket of `rate` requests per second with a burst of one second's worth."""

    def __init__(self, rate: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.capacity = max(1.0, rate)
        self.tokens = self.capacity
        self.clock = clock
        self.updated = clock()

    def delay(self) -> float:
        """Take a token; return how long to wait before using it (0 when one was available)."""
        now = self.clock()
        self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        self.tokens -= 1.0
        return 0.0 if self.tokens >= 0 else -self.tokens / self.rate


class Gate:
    """What a request passes before it is sent: breaker, rate, concurrency — in that order."""

    def __init__(
        self, cfg: FlowConfig, on_state: Callable[[BreakerState], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cfg = cfg
        self.breaker = CircuitBreaker(cfg.breaker_failures, cfg.breaker_cooldown)
        self.rate = RateLimiter(cfg.rate_limit, clock) if cfg.rate_limit else None
        self.slots = asyncio.Semaphore(cfg.concurrency)
        self.clock = clock
        self.on_state = on_state
        self._state = BreakerState.CLOSED

    async def enter(self) -> None:
        while (wait := self.breaker.wait_time(self.clock())) is not None:
            self._publish()
            await asyncio.sleep(wait)
        self._publish()
        if self.rate is not None:
            delay = self.rate.delay()
            if delay > 0:
                await asyncio.sleep(delay)
        try:
            await self.slots.acquire()
        except BaseException:
            self.breaker.release_probe()
            raise

    def leave(self, ok: bool | None) -> None:
        """Release the slot; `ok` None means the answer says nothing about the provider's health."""
        self.slots.release()
        if ok is None:
            self.breaker.release_probe()
        else:
            self.breaker.record(ok, self.clock())
        self._publish()

    def _publish(self) -> None:
        if self.breaker.state is not self._state:
            self._state = self.breaker.state
            if self.on_state is not None:
                self.on_state(self._state)
