"""Per-route flow control: a concurrency limit (fixed or adaptive), an optional request rate, and a circuit breaker.

The breaker's state machine is pure (time is passed in) so it is tested without waiting, as is the
adaptive limit (`consumer/concurrency.py`); the `Gate` wraps them with asyncio primitives. A request
that finds the breaker open waits for the cool-down instead of hammering a provider that is down;
after it one probe goes through, and its result closes or re-opens the breaker.
"""

from __future__ import annotations

import asyncio
import enum
import time
from collections import deque
from collections.abc import Callable

from consumer.concurrency import AdaptiveLimit, AdaptiveSettings, Signal
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


class Slots:
    """A semaphore whose size can change while it is in use (first come, first served).

    Shrinking takes no slot away from a request holding one: the excess drains as requests finish.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    async def acquire(self) -> None:
        if self.used < self.limit and not self._waiters:
            self.used += 1
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            await fut
        except BaseException:
            if fut.done() and not fut.cancelled():
                self.release()  # granted, then cancelled before it could run: hand the slot on
            elif fut in self._waiters:
                self._waiters.remove(fut)
            raise

    def release(self) -> None:
        self.used -= 1
        self._wake()

    def resize(self, limit: int) -> None:
        self.limit = limit
        self._wake()

    def _wake(self) -> None:
        while self._waiters and self.used < self.limit:
            fut = self._waiters.popleft()
            if not fut.done():
                self.used += 1
                fut.set_result(None)


def adaptive_settings(cfg: FlowConfig) -> AdaptiveSettings:
    return AdaptiveSettings(min_limit=cfg.min_concurrency, max_limit=cfg.max_concurrency, initial=cfg.concurrency)


class Gate:
    """What a request passes before it is sent: breaker, rate, concurrency — in that order."""

    def __init__(
        self, cfg: FlowConfig, on_state: Callable[[BreakerState], None] | None = None,
        clock: Callable[[], float] = time.monotonic, on_limit: Callable[[int], None] | None = None,
    ) -> None:
        self.cfg = cfg
        self.breaker = CircuitBreaker(cfg.breaker_failures, cfg.breaker_cooldown)
        self.rate = RateLimiter(cfg.rate_limit, clock) if cfg.rate_limit else None
        self.adaptive = AdaptiveLimit(adaptive_settings(cfg)) if cfg.adaptive else None
        self.slots = Slots(cfg.concurrency)
        self.clock = clock
        self.on_state = on_state
        self.on_limit = on_limit
        self._state = BreakerState.CLOSED
        if on_limit is not None:
            on_limit(self.slots.limit)

    @property
    def limit(self) -> int:
        """Requests allowed at once now."""
        return self.slots.limit

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
        if self.adaptive is not None:
            self.adaptive.started()

    def leave(self, ok: bool | None, signal: Signal = Signal.IGNORE, rtt: float | None = None) -> None:
        """Release the slot; `ok` None means the answer says nothing about the provider's health.

        `signal` and `rtt` (seconds the request took) are what the adaptive limit learns from.
        """
        self.slots.release()
        if ok is None:
            self.breaker.release_probe()
        else:
            self.breaker.record(ok, self.clock())
        self._publish()
        if self.adaptive is not None and self.adaptive.finished(self.clock(), signal, rtt):
            self.slots.resize(self.adaptive.limit)
            if self.on_limit is not None:
                self.on_limit(self.adaptive.limit)

    def _publish(self) -> None:
        if self.breaker.state is not self._state:
            self._state = self.breaker.state
            if self.on_state is not None:
                self.on_state(self._state)
