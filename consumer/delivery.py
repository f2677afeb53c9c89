"""Delivers conversions: batches them per route, sends through flow control, retries, reports results.

The pipeline, as in Vector's sinks: conversions → `Batcher` (per route key) → the provider module's
`build` → `Gate` (breaker, rate, concurrency) → `Transport` → the module's `classify` → retry with
backoff, split on 413, re-authenticate once on 401 → one `Result` per conversion.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections import deque
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from consumer.batching import Batch, Batcher
from consumer.concurrency import Signal
from consumer.flow import BreakerState, Gate
from consumer.metrics import Metrics, status_class
from consumer.model import Conversion, Provider
from consumer.providers.base import Outcome, ProviderModule, Route, Verdict
from consumer.retry import backoff, budget_left
from consumer.transport import TokenCache, TokenError, Transport, TransportError

log = logging.getLogger(__name__)


class Status(enum.StrEnum):
    DELIVERED = "delivered"
    NOT_ACCEPTED = "not_accepted"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class Result:
    status: Status
    outcome: Outcome
    attempts: int


@dataclass(slots=True)
class Pending:
    """A conversion waiting for delivery, with whatever the caller needs to hear back about it."""

    conversion: Conversion
    ticket: Any


# Called once per request with its conversions and their common result (a batch is one provider's).
ResultCallback = Callable[[Sequence[Pending], Result], None]


def each(on_result: Callable[[Any, Conversion, Result], None]) -> ResultCallback:
    """A ResultCallback calling `on_result(ticket, conversion, result)` for each conversion."""

    def callback(items: Sequence[Pending], result: Result) -> None:
        for p in items:
            on_result(p.ticket, p.conversion, result)

    return callback


def load_signal(status: int, verdict: Verdict) -> Signal:
    """What an answer tells the adaptive limit: 429 is too much at once; other retryable answers (5xx,
    Conductrics' JSON 500) are errors; anything else is a processed request whose RTT is a sample."""
    if status == 429:
        return Signal.OVERLOAD
    return Signal.ERROR if verdict is Verdict.RETRY else Signal.OK


class Lane:
    """One provider project's flow control and its queue of batches waiting for a sender.

    At most twice the concurrency limit of batches have a task at a time (half may be in a retry
    backoff while the rest keep the connection slots busy); the others wait here as plain lists. A
    task per conversion would cost kilobytes each for Convert and Conductrics, whose batches are
    single conversions, and a backlog of them is exactly what the in-flight bound lets through.
    """

    __slots__ = ("backlog", "gate", "running")

    def __init__(self, gate: Gate) -> None:
        self.gate = gate
        self.running = 0
        self.backlog: deque[tuple[Sequence[Pending], Route, float]] = deque()

    @property
    def limit(self) -> int:
        return 2 * self.gate.limit  # follows an adaptive limit as it changes


class Dispatcher:
    """One for all providers; routes each conversion to its provider module."""

    def __init__(
        self,
        modules: Mapping[Provider, ProviderModule],
        transport: Transport,
        tokens: TokenCache,
        metrics: Metrics,
        on_result: ResultCallback,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.modules = modules
        self.transport = transport
        self.tokens = tokens
        self.metrics = metrics
        self.on_result = on_result
        self.clock = clock
        self.batcher: Batcher[Pending] = Batcher()
        self.lanes: dict[tuple[Provider, str], Lane] = {}
        self.tasks: set[asyncio.Task[None]] = set()
        self.outstanding = 0  # conversions submitted and not yet resulted
        self._idle = asyncio.Event()
        self._idle.set()

    # ------------------------------------------------------------------ intake

    def submit(self, conversion: Conversion, ticket: Any) -> None:
        module = self.modules[conversion.provider]
        route = module.route(conversion)
        now = self.clock()
        if not self.outstanding:
            self._idle.clear()
        self.outstanding += 1
        key = (conversion.provider, route.key)
        open_batches = self.batcher.open
        before = open_batches.get(key)
        closed = self.batcher.add(key, route.batch, Pending(conversion, ticket), module.item_bytes(conversion), now)
        for batch in closed:
            self._launch(batch)
        after = open_batches.get(key)
        if after is not None and after is not before:
            asyncio.get_running_loop().call_later(route.batch.linger, self._linger_expired, key, after)

    def _linger_expired(self, key: Hashable, batch: Batch[Pending]) -> None:
        if self.batcher.open.get(key) is batch:
            self._launch(self.batcher.open.pop(key))

    def flush(self) -> None:
        """Send every open batch now (shutdown)."""
        for batch in self.batcher.drain():
            self._launch(batch)

    async def wait_idle(self, timeout: float | None = None) -> bool:
        """True when every submitted conversion has its result."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True

    async def close(self) -> None:
        for lane in self.lanes.values():
            lane.backlog.clear()
        for task in list(self.tasks):
            task.cancel()
        if self.tasks:
            await asyncio.gather(*self.tasks, return_exceptions=True)

    # ------------------------------------------------------------------ sending

    def _launch(self, batch: Batch[Pending]) -> None:
        # Every item of a batch has the batch's route (its key is made from it); the retry budget runs
        # from the batch's first conversion, the oldest in it.
        first = batch.items[0].conversion
        self._send(batch.items, self.modules[first.provider].route(first), batch.opened_at)

    def _send(self, items: Sequence[Pending], route: Route, started: float) -> None:
        """Start delivering a batch now, or queue it behind its lane's running senders."""
        lane = self._lane(items[0].conversion.provider, route)
        if lane.running >= lane.limit:
            lane.backlog.append((items, route, started))
            return
        lane.running += 1
        task = asyncio.get_running_loop().create_task(self._deliver(items, route, started, lane.gate))
        self.tasks.add(task)
        task.add_done_callback(lambda t: self._sent(t, lane))

    def _sent(self, task: asyncio.Task[None], lane: Lane) -> None:
        self.tasks.discard(task)
        lane.running -= 1
        # More than one when an adaptive limit has grown since.
        while lane.backlog and lane.running < lane.limit and not task.cancelled():
            self._send(*lane.backlog.popleft())

    def _lane(self, provider: Provider, route: Route) -> Lane:
        lane = self.lanes.get((provider, route.project))
        if lane is None:
            state = self.metrics.circuit_state.labels(provider.slug, route.project)
            state.set(0)

            def publish(s: BreakerState) -> None:
                state.set(int(s))
                log.warning("circuit %s", s.name.lower(), extra={"provider": provider.slug, "project": route.project})

            limit = self.metrics.concurrency_limit.labels(provider.slug, route.project)
            lane = self.lanes[(provider, route.project)] = Lane(Gate(route.flow, publish, self.clock, limit.set))
        return lane

    async def _deliver(self, items: Sequence[Pending], route: Route, started: float, gate: Gate) -> None:
        provider = items[0].conversion.provider
        module = self.modules[provider]
        attempts = 0
        reauthed = False
        conversions = [p.conversion for p in items]
        try:
            while True:
                outcome, token = await self._attempt(module, gate, route, conversions)
                attempts += 1
                verdict = outcome.verdict
                if verdict is Verdict.DELIVERED or verdict is Verdict.NOT_ACCEPTED:
                    status = Status.DELIVERED if verdict is Verdict.DELIVERED else Status.NOT_ACCEPTED
                    self._finish(items, Result(status, outcome, attempts))
                    return
                if verdict is Verdict.SPLIT and len(items) > 1:
                    half = len(items) // 2
                    self.metrics.retries.labels(provider.slug, "split").inc()
                    self._send(items[:half], route, started)
                    self._send(items[half:], route, started)
                    return
                if verdict is Verdict.REAUTH and route.token is not None and not reauthed:
                    # A token the provider refused is dropped and replaced once; a second 401 is permanent.
                    if token is not None:
                        self.tokens.invalidate(route.token, token)
                    reauthed = True
                    attempts -= 1
                    continue
                if verdict is Verdict.RETRY:
                    delay = backoff(attempts, route.retry, outcome.retry_after)
                    if budget_left(attempts, self.clock() - started, delay, route.retry):
                        self.metrics.retries.labels(provider.slug, outcome.reason.split(" ")[0]).inc()
                        await asyncio.sleep(delay)
                        continue
                    outcome = Outcome(Verdict.PERMANENT, f"retries exhausted: {outcome.reason}", outcome.status)
                self._finish(items, Result(Status.FAILED, outcome, attempts))
                return
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug in a provider module must dead-letter, not wedge the partition
            log.exception("delivery failed unexpectedly", extra={"provider": provider.slug})
            self._finish(items, Result(Status.FAILED, Outcome(Verdict.PERMANENT, f"internal: {type(exc).__name__}"),
                                       attempts))

    async def _attempt(self, module: ProviderModule, gate: Gate, route: Route,
                       conversions: list[Conversion]) -> tuple[Outcome, str | None]:
        provider = module.provider
        token: str | None = None
        if route.token is not None:
            try:
                token = await self.tokens.get(route.token, route.flow.timeout)
            except TokenError as exc:
                verdict = Verdict.PERMANENT if exc.permanent else Verdict.RETRY
                return Outcome(verdict, str(exc), exc.status), None
        request = module.build(route, conversions, token)
        await gate.enter()
        started = time.perf_counter()
        healthy: bool | None = None
        signal, rtt = Signal.IGNORE, None
        try:
            try:
                resp = await self.transport.send(request, route.flow.timeout, provider)
            except TransportError as exc:
                rtt = time.perf_counter() - started
                self.metrics.http_duration.labels(provider.slug, "error").observe(rtt)
                healthy = False
                signal = Signal.OVERLOAD if exc.kind == "timeout" else Signal.ERROR
                return Outcome(Verdict.RETRY, exc.kind), token
            rtt = time.perf_counter() - started
            self.metrics.http_duration.labels(provider.slug, status_class(resp.status)).observe(rtt)
            self.metrics.batch_conversions.labels(provider.slug).observe(len(conversions))
            self.metrics.batch_bytes.labels(provider.slug).observe(len(request.body or b""))
            outcome = module.classify(request, resp.status, resp.headers, resp.body)
            # Only answers that say the provider is struggling count against its breaker.
            healthy = outcome.verdict is not Verdict.RETRY
            signal = load_signal(resp.status, outcome.verdict)
            if signal is Signal.OVERLOAD and gate.adaptive is not None:
                healthy = None  # a 429 is the adaptive limit's to answer: it says "fewer", not "down"
            return outcome, token
        finally:
            gate.leave(healthy, signal, rtt)

    def _finish(self, items: Sequence[Pending], result: Result) -> None:
        self.outstanding -= len(items)
        try:
            self.on_result(items, result)
        except Exception:
            log.exception("result callback failed")
        if self.outstanding == 0:
            self._idle.set()
