"""Per-route flow control: a concurrency limit (fixed or adaptive), a request rate, a circuit breaker, a pause.

The breaker's and the pause's state machines are pure (time is passed in) so they are tested without
waiting, as is the adaptive limit (`consumer/concurrency.py`); the `Gate` wraps them with asyncio
primitives. A request that finds the breaker open waits for the cool-down instead of hammering a
provider that is down; after it one probe goes through, and its result closes or re-opens the breaker.
The others wait for that probe's answer (not a poll): an outage of hours costs one request per cool-down.
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
                return self.cooldown  # at most: the Gate wakes its waiters when the probe is answered
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
        self._probe_answered: asyncio.Future[None] | None = None  # what requests behind a probe wait for
        if on_limit is not None:
            on_limit(self.slots.limit)

    @property
    def limit(self) -> int:
        """Requests allowed at once now."""
        return self.slots.limit

    async def enter(self) -> None:
        while (wait := self.breaker.wait_time(self.clock())) is not None:
            self._publish()
            if self.breaker.state is BreakerState.HALF_OPEN:
                await self._after_probe(wait)
            else:
                await asyncio.sleep(wait)
        self._publish()
        try:
            if self.rate is not None:
                delay = self.rate.delay()
                if delay > 0:
                    await asyncio.sleep(delay)
            await self.slots.acquire()
        except BaseException:  # cancelled holding the probe: free it, or those behind it wait a cool-down
            self.breaker.release_probe()
            self._wake_probe_waiters()
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
        self._wake_probe_waiters()
        self._publish()
        if self.adaptive is not None and self.adaptive.finished(self.clock(), signal, rtt):
            self.slots.resize(self.adaptive.limit)
            if self.on_limit is not None:
                self.on_limit(self.adaptive.limit)

    def cancel_entry(self) -> None:
        """Undo an `enter` whose request will not be sent (its project was paused meanwhile)."""
        self.slots.release()
        self.breaker.release_probe()
        self._wake_probe_waiters()

    async def _after_probe(self, timeout: float) -> None:
        """Wait until the probe in flight is answered (or `timeout`): one timer for all who wait, no polling."""
        fut = self._probe_answered
        if fut is None or fut.done():
            fut = self._probe_answered = asyncio.get_running_loop().create_future()
        await asyncio.wait((fut,), timeout=timeout)

    def _wake_probe_waiters(self) -> None:
        fut, self._probe_answered = self._probe_answered, None
        if fut is not None and not fut.done():
            fut.set_result(None)

    def _publish(self) -> None:
        if self.breaker.state is not self._state:
            self._state = self.breaker.state
            if self.on_state is not None:
                self.on_state(self._state)


class PausedBy(enum.StrEnum):
    CREDENTIALS = "credentials"  # the provider refused them: a 401 after re-authentication, or a 403
    OPERATOR = "operator"  # someone asked (Dispatcher.pause, the control API)


class Pause:
    """Whether a provider project's requests may be sent, and why not; pure (time is passed in).

    Two holds, each independent of the other: an operator's, until resumed; and the credentials',
    set by a refused request and lifted by a probe that is not refused (one request retried every
    `interval`, re-authenticating first) or by a resume. `held` is a plain attribute: the hot path
    reads it once per batch. Every method that changes what `held`, `paused_by` or `reason` say
    returns True, so the caller publishes the change once.
    """

    __slots__ = ("credentials", "credentials_since", "held", "next_probe", "operator", "operator_since", "probing")

    def __init__(self) -> None:
        self.held = False
        self.operator: str | None = None  # the operator's reason while held by one
        self.operator_since: float | None = None
        self.credentials: str | None = None  # what the provider answered while held on refused credentials
        self.credentials_since: float | None = None
        self.next_probe: float | None = None  # when a probe is due (held on credentials only)
        self.probing = False

    @property
    def paused_by(self) -> PausedBy | None:
        """The operator's hold is named first: nothing is sent, not even a probe, until it is lifted."""
        if self.operator is not None:
            return PausedBy.OPERATOR
        return PausedBy.CREDENTIALS if self.credentials is not None else None

    @property
    def reason(self) -> str | None:
        return self.operator if self.operator is not None else self.credentials

    @property
    def since(self) -> float | None:
        return self.operator_since if self.operator is not None else self.credentials_since

    def hold(self, reason: str, now: float) -> bool:
        """An operator's pause (again: its reason is replaced, its start kept)."""
        changed = self.operator != reason
        if self.operator is None:
            self.operator_since = now
        self.operator = reason
        self.held = True
        return changed

    def refused(self, reason: str, now: float, interval: float) -> bool:
        """A request was refused for its credentials; the first probe is due `interval` from now."""
        if self.credentials is not None:
            return False  # the others already in flight when it was paused: nothing new
        self.credentials, self.credentials_since = reason, now
        self.next_probe = now + interval
        self.held = True
        return True

    def probe_due(self, now: float) -> bool:
        """Whether a probe should go now: held on credentials alone, none in flight, its time come."""
        return (self.operator is None and self.credentials is not None and not self.probing
                and self.next_probe is not None and now >= self.next_probe)

    def start_probe(self) -> None:
        self.probing = True

    def probe_answered(self, accepted: bool, now: float, interval: float) -> bool:
        """`accepted`: the credentials were not refused (and the provider answered); else the next probe
        is due `interval` from now. True when that lifted the hold on credentials."""
        self.probing = False
        if not accepted or self.credentials is None:
            if self.credentials is not None:
                self.next_probe = now + interval
            return False
        self._lift_credentials()
        return True

    def resume(self) -> bool:
        """Lift both holds (a project resumed on credentials retries at once)."""
        changed = self.held
        self.operator = self.operator_since = None
        self._lift_credentials()
        return changed

    def _lift_credentials(self) -> None:
        self.credentials = self.credentials_since = self.next_probe = None
        self.probing = False
        self.held = self.operator is not None
