"""Delivers conversions: batches them per route, sends through flow control, retries, pauses, reports results.

The pipeline, as in Vector's sinks: conversions → `Batcher` (per route key) → the provider module's
`build` → `Gate` (breaker, rate, concurrency) → `Transport` → the module's `classify` → retry with
backoff, split on 413, re-authenticate once on 401 → one `Result` per conversion.

Two answers never end in a Result, so the event's offset stays uncommitted and a restart reads it again
(the conversions "wait durably"):
- a transient failure (5xx, 429, a timeout, a refused or reset connection, Conductrics' JSON 500) is
  retried with capped, jittered backoff for as long as the provider is down, behind its circuit breaker,
  unless `[<provider>.retry] give_up_after` is set;
- refused credentials (a 401 after one re-authentication, a 403, a refused token grant, and the egress
  proxy's or TLS's refusals: `TransportError.refused`) pause the provider project: its batches wait in
  its `Lane`, one of them is retried every `auth_probe_interval` (re-authenticating first), and sending
  resumes when one is not refused, or on `Dispatcher.resume`.
An operator's `Dispatcher.pause` holds a project's batches the same way until it is resumed.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections import deque
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from consumer.batching import Batch, Batcher
from consumer.concurrency import Signal
from consumer.config import RetryConfig
from consumer.flow import BreakerState, Gate, Pause, PausedBy
from consumer.metrics import Metrics, status_class
from consumer.model import Conversion, Provider
from consumer.providers.base import Outcome, ProviderModule, Route, Verdict
from consumer.retry import backoff, gives_up
from consumer.transport import TokenCache, TokenError, Transport, TransportError

log = logging.getLogger(__name__)

REASON_CHARS = 200  # an operator's pause reason as kept and shown


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


def refused(outcome: Outcome) -> bool:
    """Whether an answer refuses the credentials rather than the conversions: a 401 the module did not
    answer with a re-authentication (or that came after one), or a 403. Such a project pauses."""
    return outcome.status in (401, 403) and (outcome.verdict is Verdict.PERMANENT or outcome.verdict is Verdict.REAUTH)


@dataclass(frozen=True)
class ProjectStatus:
    """One provider project as the control plane shows it (what Kafka Connect's status is for a task).

    state: "paused" while held (by an operator, or on refused credentials: `paused_by`); "failed" while
    its provider is failing (the circuit is not closed, or as many transient failures in a row as open
    it: its conversions wait and are retried); else "running". `since` is on the dispatcher's clock
    (time.monotonic by default). `circuit`: "closed", "half_open" or "open". `in_flight` counts
    conversions waiting (in an open batch, queued, parked by a pause, in a backoff) or being sent.
    `counts`: conversions delivered, not_accepted, dead_lettered; retries (requests retried). No field
    ever holds a secret: reasons are the provider modules' bounded texts or what the operator wrote.
    """

    provider: str
    project: str
    state: str
    reason: str | None
    paused_by: str | None
    since: float | None
    circuit: str
    in_flight: int
    last_error: str | None
    counts: dict[str, int]


class ProjectLookupError(LookupError):
    """`pause`/`resume` named a project this dispatcher cannot tell apart or does not serve."""


class UnknownProject(ProjectLookupError):
    pass


class AmbiguousProject(ProjectLookupError):
    pass


class CredentialsRefused(Exception):
    """Credentials were refused before the provider could answer: the token endpoint refused the client
    credentials (a 400, 401 or 403 to the grant), the egress proxy its own, or TLS a certificate."""

    def __init__(self, outcome: Outcome) -> None:
        super().__init__(outcome.reason)
        self.outcome = outcome


Queued = tuple[Sequence[Pending], Route, float]  # a batch waiting for a sender: items, route, when it opened


class Lane:
    """One provider project's flow control, its queue of batches waiting for a sender, its pause and counts.

    At most twice the concurrency limit of batches have a task at a time (half may be in a retry
    backoff while the rest keep the connection slots busy); the others wait here as plain tuples. A
    task per conversion would cost kilobytes each for Convert and Conductrics, whose batches are
    single conversions, and a backlog of them is exactly what the in-flight bound lets through.
    While the project is paused no task is started and running ones put their batch back at the head
    of the queue at their next attempt, so a paused project or an outage of any length holds at most
    this many tasks (each with one timer: a backoff, or the breaker's cool-down) and the queue is
    bounded by the pipeline's in-flight budget, which pauses the partitions when it is full.
    """

    __slots__ = ("backlog", "dead_lettered", "delivered", "failing", "gate", "in_flight", "key", "last_error",
                 "not_accepted", "pause", "probe_timer", "retries", "retry", "running")

    def __init__(self, key: tuple[Provider, str], gate: Gate, pause: Pause, retry: RetryConfig) -> None:
        self.key = key
        self.gate = gate
        self.pause = pause
        self.retry = retry
        self.running = 0
        self.backlog: deque[Queued] = deque()
        self.in_flight = 0  # conversions launched (queued, parked, retrying or being sent), not yet resulted
        self.delivered = self.not_accepted = self.dead_lettered = self.retries = 0
        self.last_error: str | None = None
        self.failing = 0  # transient failures in a row (a token endpoint's too, which the breaker never sees)
        self.probe_timer: asyncio.TimerHandle | None = None

    @property
    def limit(self) -> int:
        return 2 * self.gate.limit  # follows an adaptive limit as it changes


class Dispatcher:
    """Routes each conversion to its provider module; one lane per (provider, project).

    The control surface (`statuses`, `status`, `paused`, `pause`, `resume`, `on_pause`,
    `pause_changes`) is what the service's control API and readiness detail are built on; call it
    on the event loop's thread (an aiohttp handler is). `projects` (optional: `Config.rules()`'s
    keys) names every configured (provider, project), so `statuses()` lists projects that have sent
    nothing yet and `pause` refuses a name that is not one of them. A pause lives in this process:
    making it survive a restart and hold for every member is the control plane's to do (it calls
    `pause` again at start).
    """

    def __init__(
        self,
        modules: Mapping[Provider, ProviderModule],
        transport: Transport,
        tokens: TokenCache,
        metrics: Metrics,
        on_result: ResultCallback,
        clock: Callable[[], float] = time.monotonic,
        *,
        projects: Iterable[tuple[Provider, str]] = (),
        on_pause: Callable[[ProjectStatus], None] | None = None,
    ) -> None:
        self.modules = modules
        self.transport = transport
        self.tokens = tokens
        self.metrics = metrics
        self.on_result = on_result
        self.clock = clock
        self.on_pause = on_pause  # called with the project's status whenever its pause starts, changes or ends
        self.pause_changes = 0  # incremented at every such change: cheap to poll
        self.batcher: Batcher[Pending] = Batcher()
        self.lanes: dict[tuple[Provider, str], Lane] = {}
        self.pauses: dict[tuple[Provider, str], Pause] = {}
        self.projects: tuple[tuple[Provider, str], ...] = tuple(projects)
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
        """Stop: queued and parked batches are dropped without a result (their offsets stay uncommitted)."""
        for lane in self.lanes.values():
            lane.backlog.clear()
            if lane.probe_timer is not None:
                lane.probe_timer.cancel()
                lane.probe_timer = None
        for task in list(self.tasks):
            task.cancel()
        if self.tasks:
            await asyncio.gather(*self.tasks, return_exceptions=True)

    # ------------------------------------------------------------------ control

    def statuses(self) -> list[ProjectStatus]:
        """Every provider project known (configured, paused, or with traffic), sorted by provider and project."""
        keys = set(self.projects) | set(self.lanes) | set(self.pauses)
        waiting = self._open_per_project()
        return [self._status(k, waiting.get(k, 0)) for k in sorted(keys, key=lambda k: (k[0].slug, k[1]))]

    def status(self, project: str, provider: Provider | str | None = None) -> ProjectStatus:
        key = self._project_key(project, provider)
        return self._status(key, self._open_per_project().get(key, 0))

    def paused(self) -> dict[str, str]:
        """"provider/project" -> why ("credentials: …" or "operator: …"), for every paused project: the
        readiness detail, JSON as it is."""
        return {f"{p.slug}/{project}": f"{pause.paused_by}: {pause.reason}"
                for (p, project), pause in sorted(self.pauses.items(), key=lambda i: (i[0][0].slug, i[0][1]))
                if pause.held}

    def pause(self, project: str, reason: str, provider: Provider | str | None = None) -> None:
        """An operator's pause: the project's batches stop being sent (those being sent finish) and wait,
        queued, until `resume`. Pausing again replaces the reason."""
        key = self._project_key(project, provider)
        text = "".join(c if c.isprintable() else " " for c in reason)[:REASON_CHARS].strip() or "paused by an operator"
        if self._pause_of(key).hold(text, self.clock()):
            log.warning("project paused by an operator", extra={"provider": key[0].slug, "project": key[1]})
            self._pause_changed(key)

    def resume(self, project: str, provider: Provider | str | None = None) -> None:
        """Lift an operator's pause and a pause on refused credentials; the queued batches go at once (the
        first request re-authenticates). A project that is not paused is left as it is."""
        key = self._project_key(project, provider)
        pause = self.pauses.get(key)
        if pause is None or not pause.resume():
            return
        log.warning("project resumed", extra={"provider": key[0].slug, "project": key[1]})
        lane = self.lanes.get(key)
        if lane is not None:
            if lane.probe_timer is not None:
                lane.probe_timer.cancel()
                lane.probe_timer = None
            self._drain(lane)
        self._pause_changed(key)

    def _project_key(self, project: str, provider: Provider | str | None) -> tuple[Provider, str]:
        providers = list(self.modules)
        if provider is not None:
            providers = [p for p in providers if provider in (p, p.slug)]
            if not providers:
                raise UnknownProject(f"this dispatcher serves no provider {str(provider)!r}")
        known = {k for k in (*self.projects, *self.lanes, *self.pauses) if k[1] == project and k[0] in providers}
        if len(known) == 1:
            return known.pop()
        if len(known) > 1:
            raise AmbiguousProject(f"project {project!r} is served for {', '.join(sorted(k[0].slug for k in known))}: "
                                   "name the provider")
        if len(providers) == 1 and not self.projects:
            return (providers[0], project)  # nothing configured to check it against: take the name as it is
        raise UnknownProject(f"no project {project!r}" + (f" for {providers[0].slug}" if len(providers) == 1 else ""))

    def _pause_of(self, key: tuple[Provider, str]) -> Pause:
        pause = self.pauses.get(key)
        if pause is None:
            pause = self.pauses[key] = Pause()
        return pause

    def _open_per_project(self) -> dict[tuple[Provider, str], int]:
        """Conversions in open batches (not yet launched), per project: not on the hot path."""
        out: dict[tuple[Provider, str], int] = {}
        for batch in self.batcher.open.values():
            if batch.items:
                first = batch.items[0].conversion
                key = (first.provider, self.modules[first.provider].route(first).project)
                out[key] = out.get(key, 0) + len(batch.items)
        return out

    def _status(self, key: tuple[Provider, str], lingering: int) -> ProjectStatus:
        lane = self.lanes.get(key)
        pause = self.pauses.get(key)
        circuit = lane.gate.breaker.state if lane is not None else BreakerState.CLOSED
        last_error = lane.last_error if lane is not None else None
        failing = lane is not None and lane.failing >= lane.gate.breaker.threshold
        if pause is not None and pause.held:
            state, reason = "paused", pause.reason
        elif circuit is not BreakerState.CLOSED or failing:
            state, reason = "failed", f"provider failing: {last_error}" if last_error else "provider failing"
        else:
            state, reason = "running", None
        held = pause is not None and pause.held
        counts = {"delivered": 0, "not_accepted": 0, "dead_lettered": 0, "retries": 0}
        if lane is not None:
            counts = {"delivered": lane.delivered, "not_accepted": lane.not_accepted,
                      "dead_lettered": lane.dead_lettered, "retries": lane.retries}
        return ProjectStatus(
            provider=key[0].slug,
            project=key[1],
            state=state,
            reason=reason,
            paused_by=str(pause.paused_by) if held and pause is not None else None,
            since=pause.since if held and pause is not None else None,
            circuit=circuit.name.lower(),
            in_flight=(lane.in_flight if lane is not None else 0) + lingering,
            last_error=last_error,
            counts=counts,
        )

    def _pause_changed(self, key: tuple[Provider, str]) -> None:
        pause = self._pause_of(key)
        gauge = self.metrics.project_paused
        for by in PausedBy:
            held = pause.operator is not None if by is PausedBy.OPERATOR else pause.credentials is not None
            gauge.labels(key[0].slug, key[1], by.value).set(1 if held else 0)
        self.pause_changes += 1
        if self.on_pause is not None:
            try:
                self.on_pause(self._status(key, self._open_per_project().get(key, 0)))
            except Exception:
                log.exception("pause callback failed")

    # ------------------------------------------------------------------ sending

    def _launch(self, batch: Batch[Pending]) -> None:
        # Every item of a batch has the batch's route (its key is made from it); the give-up age runs
        # from the batch's first conversion, the oldest in it.
        first = batch.items[0].conversion
        route = self.modules[first.provider].route(first)
        lane = self._lane(first.provider, route)
        lane.in_flight += len(batch.items)
        self._send(lane, batch.items, route, batch.opened_at)

    def _send(self, lane: Lane, items: Sequence[Pending], route: Route, started: float) -> None:
        """Start delivering a batch now, or queue it behind its lane's running senders or its pause."""
        if lane.running >= lane.limit or lane.pause.held:
            lane.backlog.append((items, route, started))
            return
        self._start(lane, items, route, started)

    def _start(self, lane: Lane, items: Sequence[Pending], route: Route, started: float, probe: bool = False) -> None:
        lane.running += 1
        task = asyncio.get_running_loop().create_task(self._deliver(lane, items, route, started, probe))
        self.tasks.add(task)
        task.add_done_callback(lambda t: self._sent(t, lane))

    def _sent(self, task: asyncio.Task[None], lane: Lane) -> None:
        self.tasks.discard(task)
        lane.running -= 1
        if not task.cancelled():
            self._drain(lane)

    def _drain(self, lane: Lane) -> None:
        # More than one when an adaptive limit has grown since, or when a pause has just ended.
        while lane.backlog and lane.running < lane.limit and not lane.pause.held:
            self._start(lane, *lane.backlog.popleft())

    def _lane(self, provider: Provider, route: Route) -> Lane:
        key = (provider, route.project)
        lane = self.lanes.get(key)
        if lane is None:
            state = self.metrics.circuit_state.labels(provider.slug, route.project)
            state.set(0)

            def publish(s: BreakerState) -> None:
                state.set(int(s))
                log.warning("circuit %s", s.name.lower(), extra={"provider": provider.slug, "project": route.project})

            limit = self.metrics.concurrency_limit.labels(provider.slug, route.project)
            gate = Gate(route.flow, publish, self.clock, limit.set)
            lane = self.lanes[key] = Lane(key, gate, self._pause_of(key), route.retry)
        return lane

    async def _deliver(self, lane: Lane, items: Sequence[Pending], route: Route, started: float,
                       probe: bool) -> None:
        """Deliver one batch to its result, or park it in its lane while the project is paused.

        `probe`: the one request a project paused on refused credentials retries; it goes despite the
        pause, with a token granted after the refusal (so a 401 to it is final), and its answer decides
        whether the pause ends.
        """
        provider, _ = lane.key
        module = self.modules[provider]
        pause = lane.pause
        attempts = 0
        reauthed = probe  # the refused token was dropped when the project paused: this one is new
        conversions = [p.conversion for p in items]
        try:
            while True:
                if pause.held and not probe:
                    lane.backlog.appendleft((items, route, started))
                    return
                token: str | None = None
                denied = False  # the token endpoint refused the credentials themselves
                try:
                    sent = await self._attempt(module, lane, route, conversions, probe)
                except CredentialsRefused as exc:
                    outcome, denied = exc.outcome, True
                else:
                    if sent is None:  # paused while it waited at the gate
                        lane.backlog.appendleft((items, route, started))
                        return
                    outcome, token = sent
                attempts += 1
                verdict = outcome.verdict
                if verdict is Verdict.DELIVERED and not probe:  # the usual answer first: no other test on it
                    lane.failing = 0
                    lane.delivered += len(items)
                    self._finish(lane, items, Result(Status.DELIVERED, outcome, attempts))
                    return
                if verdict is Verdict.REAUTH and route.token is not None and not reauthed:
                    # A token the provider refused is dropped and replaced once; a second 401 pauses the project.
                    if token is not None:
                        self.tokens.invalidate(route.token, token)
                    reauthed = True
                    attempts -= 1
                    continue
                if denied or refused(outcome):
                    if token is not None and route.token is not None:
                        self.tokens.invalidate(route.token, token)  # so the next request re-authenticates
                    lane.last_error = outcome.reason
                    if probe:
                        self._probe_answered(lane, False)
                    else:
                        self._refused(lane, outcome)
                    lane.backlog.appendleft((items, route, started))
                    return
                if verdict is Verdict.RETRY:
                    lane.last_error = outcome.reason
                    lane.failing += 1
                    if probe:  # the credentials are not known to work yet: stay paused, probe again later
                        self._probe_answered(lane, False)
                        lane.backlog.appendleft((items, route, started))
                        return
                    delay = backoff(attempts, route.retry, outcome.retry_after)
                    if not gives_up(self.clock() - started, delay, route.retry):
                        lane.retries += 1
                        self.metrics.retries.labels(provider.slug, outcome.reason.split(" ")[0]).inc()
                        await asyncio.sleep(delay)
                        continue
                    outcome = Outcome(Verdict.PERMANENT, f"gave up after {route.retry.give_up_after:g}s: "
                                                         f"{outcome.reason}", outcome.status)
                lane.failing = 0
                if probe:
                    probe = False
                    self._probe_answered(lane, True)  # answered, not refused: the credentials work again
                if verdict is Verdict.DELIVERED or verdict is Verdict.NOT_ACCEPTED:
                    if verdict is Verdict.DELIVERED:
                        lane.delivered += len(items)
                        self._finish(lane, items, Result(Status.DELIVERED, outcome, attempts))
                    else:
                        lane.not_accepted += len(items)
                        self._finish(lane, items, Result(Status.NOT_ACCEPTED, outcome, attempts))
                    return
                if verdict is Verdict.SPLIT and len(items) > 1:
                    half = len(items) // 2
                    self.metrics.retries.labels(provider.slug, "split").inc()
                    self._send(lane, items[:half], route, started)
                    self._send(lane, items[half:], route, started)
                    return
                lane.dead_lettered += len(items)
                lane.last_error = outcome.reason
                self._finish(lane, items, Result(Status.FAILED, outcome, attempts))
                return
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug in a provider module must dead-letter, not wedge the partition
            log.exception("delivery failed unexpectedly", extra={"provider": provider.slug})
            if probe:
                self._probe_answered(lane, False)
            lane.dead_lettered += len(items)
            internal = Outcome(Verdict.PERMANENT, f"internal: {type(exc).__name__}")
            self._finish(lane, items, Result(Status.FAILED, internal, attempts))

    async def _attempt(self, module: ProviderModule, lane: Lane, route: Route, conversions: list[Conversion],
                       probe: bool) -> tuple[Outcome, str | None] | None:
        """One request: its outcome and the token it carried, or None when the project was paused before
        it could be sent. Raises CredentialsRefused when no token can be granted for these credentials."""
        provider = module.provider
        gate = lane.gate
        token: str | None = None
        if route.token is not None:
            try:
                token = await self.tokens.get(route.token, route.flow.timeout)
            except TokenError as exc:
                if exc.permanent:
                    raise CredentialsRefused(Outcome(Verdict.PERMANENT, str(exc), exc.status)) from None
                return Outcome(Verdict.RETRY, str(exc), exc.status), None
        request = module.build(route, conversions, token)
        await gate.enter()
        if lane.pause.held and not probe:
            gate.cancel_entry()
            return None
        started = time.perf_counter()
        healthy: bool | None = None
        signal, rtt = Signal.IGNORE, None
        try:
            try:
                resp = await self.transport.send(request, route.flow.timeout, provider)
            except TransportError as exc:
                rtt = time.perf_counter() - started
                self.metrics.http_duration.labels(provider.slug, "error").observe(rtt)
                if exc.refused:  # the proxy's credentials or a certificate: a fix is needed, not patience
                    raise CredentialsRefused(Outcome(Verdict.PERMANENT, exc.kind)) from None
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

    # ------------------------------------------------------------------ pause on refused credentials

    def _refused(self, lane: Lane, outcome: Outcome) -> None:
        if lane.pause.refused(f"credentials refused: {outcome.reason}", self.clock(), lane.retry.auth_probe_interval):
            provider, project = lane.key
            log.warning("credentials refused: project paused, its conversions wait (%s)", outcome.reason,
                        extra={"provider": provider.slug, "project": project})
            self._schedule_probe(lane)
            self._pause_changed(lane.key)

    def _schedule_probe(self, lane: Lane) -> None:
        due = lane.pause.next_probe
        if lane.probe_timer is not None:
            lane.probe_timer.cancel()
            lane.probe_timer = None
        if due is not None:
            lane.probe_timer = asyncio.get_running_loop().call_later(max(0.0, due - self.clock()), self._probe, lane)

    def _probe(self, lane: Lane) -> None:
        """The probe timer: retry the project's oldest waiting batch, if the pause is still on credentials alone."""
        lane.probe_timer = None
        pause = lane.pause
        now = self.clock()
        if pause.credentials is None or pause.operator is not None:
            return  # lifted, or held by an operator: resume() starts sending
        if not pause.probe_due(now):
            if not pause.probing:
                self._schedule_probe(lane)
            return
        if not lane.backlog:  # nothing parked yet (the refused batches are still coming back): later
            pause.probe_answered(False, now, lane.retry.auth_probe_interval)
            self._schedule_probe(lane)
            return
        pause.start_probe()
        self._start(lane, *lane.backlog.popleft(), probe=True)

    def _probe_answered(self, lane: Lane, accepted: bool) -> None:
        pause = lane.pause
        if pause.probe_answered(accepted, self.clock(), lane.retry.auth_probe_interval):
            provider, project = lane.key
            log.warning("credentials accepted again: project resumed", extra={"provider": provider.slug,
                                                                               "project": project})
            self._pause_changed(lane.key)
            self._drain(lane)
        elif pause.credentials is not None:
            self._schedule_probe(lane)

    def _finish(self, lane: Lane, items: Sequence[Pending], result: Result) -> None:
        n = len(items)
        lane.in_flight -= n
        self.outstanding -= n
        try:
            self.on_result(items, result)
        except Exception:
            log.exception("result callback failed")
        if self.outstanding == 0:
            self._idle.set()

