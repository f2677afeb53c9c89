"""One provider's pipeline: its consumer-group member, matching, delivery and checkpointing.

Per message: decode → match (this pipeline's providers only) → dispatch each conversion → when every
delivery of the event is done (delivered, not accepted, or dead-lettered and confirmed by the broker), its
offset is finished. The offset tracker turns finished offsets into committable ones; the checkpoint
(consumer/checkpoint.py) commits them on an interval, before partitions are revoked, and before close, and
counts an offset as committed only when the broker confirmed it. Nothing is committed that is not done.

The Application (consumer/app.py) runs one Pipeline per provider, each in a consumer group of its own
(consumer/groups.py), so each has its own position, in-flight budget and pause. Every pipeline reads every
message; what concerns the event as a whole (a message that does not decode, an event over max_exposures,
the event-level matcher decisions) is dead-lettered and counted by one of them only, the `designated` one,
so that nothing is written or counted once per provider.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from confluent_kafka import KafkaError, Message

from consumer.adjustments import AdjustmentPlan
from consumer.checkpoint import Checkpoint, CommitFailed
from consumer.config import Config
from consumer.decoding import DecodeError, EventDecoder, SchemaNotLoaded
from consumer.dedup import RecentKeys
from consumer.delivery import Dispatcher, Pending, Result, Status
from consumer.digest import FailureDigest
from consumer.dlq import DeadLetter, DeadLetterError, DeadLetterWriter, Headers, SourceRef
from consumer.group_protocol import Resolved
from consumer.matcher import Counts, MatchSettings, TooManyExposures, count, count_one, match
from consumer.metrics import Count, Metrics, Observed, Tally
from consumer.model import Conversion, Decision, OrderAdjusted, Provider
from consumer.offsets import OffsetOrderError, OffsetTracker
from consumer.providers.base import ProviderModule
from consumer.refunds import OrderLedger, Refunds
from consumer.source import TP, Source
from consumer.transport import TokenCache, Transport

log = logging.getLogger(__name__)

EXIT_DLQ = 3
EXIT_KAFKA_AUTH = 4

# How long to keep retrying a registry that is down before the event is dead-lettered instead.
_REGISTRY_RETRY_SECONDS = 60.0
# Decode failures are logged as one summary per this many seconds (with every reason), not one line each.
_DECODE_LOG_INTERVAL = 10.0


def kafka_refused(detail: str) -> str:
    """The fatal error of a Kafka login refused (exit EXIT_KAFKA_AUTH), naming the keys to check."""
    return (f"Kafka refused the credentials ({detail}): check [kafka.common] sasl.mechanisms, sasl.username "
            "and sasl.password")


class InFlight:
    """One event between being read and being done."""

    __slots__ = ("event_id", "failures", "message", "offset", "pending", "read_at", "tp")

    def __init__(self, message: Message, tp: TP, offset: int, read_at: float, event_id: str | None = None) -> None:
        self.message = message
        self.tp = tp
        self.offset = offset
        self.read_at = read_at
        self.event_id = event_id
        self.pending = 0
        # Made only for an event with a failed delivery: most never need one.
        self.failures: dict[str, list[tuple[Conversion, Result]]] | None = None

    @property
    def source(self) -> SourceRef:
        """Where the event came from, for its dead letter; built only when one is written."""
        msg = self.message
        ts_type, ts = msg.timestamp()
        raw = msg.headers() or []
        pairs = raw.items() if isinstance(raw, dict) else raw
        headers: Headers = [(k, v if isinstance(v, bytes) else (v or "").encode()) for k, v in pairs]
        return SourceRef(self.tp[0], self.tp[1], self.offset, msg.key(), msg.value(), headers,
                         ts if ts_type else None)

    @property
    def correlation_id(self) -> str:
        return self.event_id or f"{self.tp[0]}/{self.tp[1]}/{self.offset}"


class Hooks:
    """Where a caller (the benchmark, a test) watches a pipeline work without reaching into it.

    Each method is called on the event loop's thread, on the hot path: keep it cheap.
    """

    def read(self, pipeline: Pipeline, messages: list[Message]) -> None:
        """A poll's worth of messages, before they are processed."""

    def results(self, pipeline: Pipeline, items: Sequence[Pending], result: Result) -> None:
        """One request's result for its conversions, before the pipeline acts on it."""


@dataclass
class Shared:
    """What the pipelines of one process share: one of each, owned (opened and closed) by the Application."""

    config: Config
    metrics: Metrics
    tally: Tally
    decoder: EventDecoder  # purchases, and order adjustments when [adjustments] shares the topic
    dlq: DeadLetterWriter
    transport: Transport
    tokens: TokenCache
    clock_ms: Callable[[], int]
    halt: asyncio.Event  # set on a stop or a fatal error: every pipeline's loop ends
    fail: Callable[[str, int], None]  # a fatal error: the reason, and the exit code it means
    hooks: Hooks | None = None
    ledger: OrderLedger | None = None  # what order adjustments are planned from (consumer/refunds.py)


class Pipeline:
    """One consumer-group member for `providers`, from poll to commit."""

    def __init__(
        self,
        shared: Shared,
        *,
        name: str,
        group: str,
        modules: dict[Provider, ProviderModule],
        designated: bool,
        protocol: Resolved,
        should_stop: Callable[[], bool] | None = None,
    ) -> None:
        self.shared = shared
        self.config = config = shared.config
        self.name = name  # the provider's slug, or "all" for the shared pipeline
        self.group = group
        self.modules = modules
        self.providers = frozenset(modules)
        self.designated = designated
        self.protocol = protocol
        self.should_stop = should_stop
        self.metrics = m = shared.metrics
        self.tally = tally = shared.tally
        self.decoder = shared.decoder
        self.dlq = shared.dlq
        self.clock_ms = shared.clock_ms
        self.hooks = shared.hooks
        # Hot-path counter cells (see Tally): one attribute increment per event instead of a labels() lookup.
        self._c_consumed = tally.count(m.events_consumed, group)
        self._c_decoded = tally.count(m.events_decoded, group)
        self._c_attributed = tally.count(m.purchases, group, "attributed")
        self._c_unattributed = tally.count(m.purchases, group, "unattributed")
        self._c_decisions: dict[tuple[Provider | None, str], Count] = {}
        self._decisions: Counts = {}  # filled by match() in counting mode, flushed to _c_decisions
        self._c_outcomes: dict[tuple[Provider, Status], tuple[Count, Observed]] = {}
        self._h_processing = tally.histogram(m.processing_delay)
        self._g_in_flight = m.in_flight.labels(group)
        self._g_commit_failing = m.commit_failing_partitions.labels(group)
        self.settings = MatchSettings.from_config(config).only(self.providers)
        self.recent = RecentKeys(config.pipeline.dedup_cache_size)
        self.tracker = OffsetTracker()
        self.checkpoint = Checkpoint(self.tracker)
        self.live = 0  # events read and not yet done: the one count of this pipeline's work in flight
        self.consumed = 0
        self._decode_log = FailureDigest(_DECODE_LOG_INTERVAL)
        self._drained = asyncio.Event()
        self._drained.set()
        # Key being delivered -> later events waiting on it (None while there are none).
        self._in_flight_keys: dict[str, list[InFlight] | None] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.refunds: Refunds | None = None
        if config.adjustments.enabled and shared.ledger is not None:
            self.refunds = Refunds(shared.ledger, config.rules(), self.providers, designated=designated,
                                   clock_ms=shared.clock_ms, orphan_wait=config.adjustments.orphan_wait,
                                   halt=shared.halt)
        # Every configured project of this pipeline's providers is known to the dispatcher from the start, so
        # the control plane can show and pause a project before its first conversion.
        self.dispatcher = Dispatcher(modules, shared.transport, shared.tokens, m, self._on_results,
                                     projects=[k for k in config.rules() if k[0] in self.providers])
        self.source = Source(config.kafka, m, self._on_assign, self._on_revoke, self._on_lost, protocol,
                             on_commit=self._on_commit, group=group)

    # ------------------------------------------------------------------ lifecycle

    def ready(self) -> bool:
        """Assigned partitions and a reachable broker: cheap enough for every turn of the poll loop."""
        src = self.source
        return bool(src.assigned) and src.broker_up

    def detail(self) -> dict[str, object]:
        src = self.source
        return {"assigned": len(src.assigned), "broker": src.broker_up, "paused": src.paused,
                "in_flight": self.live, "paused_projects": self.dispatcher.paused()}

    async def run(self) -> None:
        """The poll loop, until the Application halts (a stop, or a fatal error anywhere)."""
        src, pipe, halt = self.source, self.config.pipeline, self.shared.halt
        src.subscribe()
        next_commit = time.monotonic() + pipe.commit_interval
        idle = 0.0
        while not halt.is_set():
            if self.live >= pipe.max_in_flight:
                src.pause()
            elif src.paused and self.live <= pipe.max_in_flight * 3 // 4:
                src.resume()
            room = pipe.max_in_flight - self.live
            messages = src.poll(max(1, min(pipe.poll_batch, room)))
            if src.auth_failed is not None:
                self.shared.fail(kafka_refused(src.auth_failed), EXIT_KAFKA_AUTH)
                break
            if messages:
                self._process(messages)
            self._g_in_flight.set(self.live)
            self._flush_decisions()
            self.tally.flush()
            now = time.monotonic()
            if self._decode_log.count:
                self._log_decode_failures(now)
            if now >= next_commit:
                self._commit(asynchronous=True)
                next_commit = now + pipe.commit_interval
            if self.should_stop is not None and self.should_stop():
                break
            if messages:
                idle = 0.0
                await asyncio.sleep(0)
            else:
                # Nothing fetched: back off a little (up to 20 ms) so an idle service does not spin.
                idle = min(0.02, idle * 2 or 0.001)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(halt.wait(), idle)

    async def drain(self, deadline: float) -> bool:
        """Wait for in-flight work while still serving the group (heartbeats, rebalances), fetching nothing.

        A member that stopped polling while it drains would hold a rebalance of the whole group up
        for as long as the drain takes; paused, it answers at once and commits what it finished.
        """
        self.dispatcher.flush()
        src = self.source
        src.pause()
        end = time.monotonic() + deadline
        while self.live > 0 and (remaining := end - time.monotonic()) > 0:
            # Paused: at most a message of a partition assigned a moment ago, left unread and uncommitted.
            src.poll(1)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._drained.wait(), min(0.05, remaining))
        if self.live:
            log.warning("shutdown deadline reached with events in flight; their offsets stay uncommitted",
                        extra={"group": self.group, "in_flight": self.live})
        return self.live == 0

    def leave(self) -> None:
        """The final commit of what is done, then out of the group."""
        self._commit(asynchronous=False)
        if unconfirmed := self.checkpoint.due(final=True):
            log.warning("the final commit failed; these partitions will be re-read from their last committed "
                        "offsets", extra={"group": self.group,
                                          "partitions": {f"{t}[{p}]": o for (t, p), o in unconfirmed.items()}})
        self.source.close()

    async def close(self) -> None:
        """After leave(): the dispatcher's connections and this pipeline's background tasks."""
        await self.dispatcher.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        self._flush_decisions()
        self.tally.flush()
        self._log_decode_failures(time.monotonic(), force=True)

    # ------------------------------------------------------------------ offsets

    # The commit protocol's steps are numbered in consumer/checkpoint.py; the numbers below are those.

    def _on_assign(self, tps: list[TP]) -> None:
        # 1. A partition newly ours starts from its committed offset: whatever we knew of it is stale.
        self.checkpoint.assign(tps)

    def _on_lost(self, tps: list[TP]) -> None:
        # 5. Lost (the group or the broker is gone): another member may own them, so nothing is committed.
        self.checkpoint.drop(tps)
        self._g_commit_failing.set(self.checkpoint.failing)

    def _on_revoke(self, tps: list[TP]) -> None:
        # 2-4 as a final commit of what is done, then 5: unfinished events will be re-read by the next owner.
        self._commit(asynchronous=False, only=tps)
        self.checkpoint.drop(tps)
        self._g_commit_failing.set(self.checkpoint.failing)

    def _commit(self, *, asynchronous: bool, only: list[TP] | None = None) -> None:
        if self.source is None:
            return
        # 2. Due: done, and not confirmed by the broker (a failed commit is due again).
        offsets = self.checkpoint.due(only, final=not asynchronous)
        if not offsets:
            return
        # 3. Requested, then sent; 4 comes to _on_commit (before commit returns when synchronous).
        self.checkpoint.requested(offsets)
        self.source.commit(offsets, asynchronous=asynchronous)

    def _on_commit(self, offsets: dict[TP, int], failures: dict[TP, CommitFailed]) -> None:
        # 4. Answered: confirmed offsets count as committed; failed ones are due at the next commit.
        self.checkpoint.answered(offsets, failures)
        self._g_commit_failing.set(self.checkpoint.failing)

    # ------------------------------------------------------------------ events

    def _process(self, messages: list[Message]) -> None:
        """A poll's worth of messages; one clock reading and one debug check serve the whole batch.

        This loop runs for every event, so what it calls is looked up once per batch. An event with
        nothing to deliver is done as it is read: no InFlight, no second visit to the tracker.
        """
        if self.hooks is not None:
            self.hooks.read(self, messages)
        read_at = time.monotonic()
        now_ms = self.clock_ms()
        debug = log.isEnabledFor(logging.DEBUG)
        tracker, decode, settings, counts = self.tracker, self.decoder.decode, self.settings, self._decisions
        track, track_done, submit = tracker.track, tracker.track_done, self._submit
        needs_headers = self.decoder.needs_headers
        consumed = decoded = unattributed = 0
        for msg in messages:
            err = msg.error()
            if err is not None:
                if err.code() != KafkaError._PARTITION_EOF:
                    log.warning("consumer error: %s", err.str())
                continue
            topic, partition, offset = msg.topic(), msg.partition(), msg.offset()
            assert topic is not None and partition is not None and offset is not None
            tp = (topic, partition)
            consumed += 1
            try:
                purchase = decode(msg.value(), msg.headers() if needs_headers else None)
            except Exception as exc:
                self._undecodable(self._read(msg, tp, offset, read_at), exc, read_at)
                continue
            decoded += 1
            if isinstance(purchase, OrderAdjusted):
                self._adjusted(self._read(msg, tp, offset, read_at, purchase.event_id), purchase, now_ms)
                continue
            try:
                if debug:  # listed, with every rejection's reason, for the log
                    decision = match(purchase, settings, now_ms)
                    count(decision, counts)
                    self._log_decision(purchase.event_id or f"{topic}/{partition}/{offset}", decision)
                else:
                    decision = match(purchase, settings, now_ms, counts)
            except Exception as exc:
                self._unmatchable(self._read(msg, tp, offset, read_at, purchase.event_id), exc)
                continue
            if not decision.conversions:
                unattributed += 1
                try:
                    track_done(tp, offset)
                except OffsetOrderError:
                    self._rewound(tp, offset)
                    track_done(tp, offset)
                continue
            # _read, inlined.
            try:
                track(tp, offset)
            except OffsetOrderError:
                self._rewound(tp, offset)
                track(tp, offset)
            self.live += 1
            submit(InFlight(msg, tp, offset, read_at, purchase.event_id), decision.conversions)
        self.consumed += consumed
        self._c_consumed.n += consumed
        self._c_decoded.n += decoded
        if unattributed:
            self._c_unattributed.n += unattributed
            self._h_processing.values.extend([time.monotonic() - read_at] * unattributed)
        if self.live:
            self._drained.clear()
        else:
            self._drained.set()

    def _read(self, msg: Message, tp: TP, offset: int, read_at: float, event_id: str | None = None) -> InFlight:
        """Track an event that is not done yet; it is finished by `_done` (or `_dead_letter`)."""
        try:
            self.tracker.track(tp, offset)
        except OffsetOrderError:
            self._rewound(tp, offset)
            self.tracker.track(tp, offset)
        self.live += 1
        self._drained.clear()
        return InFlight(msg, tp, offset, read_at, event_id)

    def _rewound(self, tp: TP, offset: int) -> None:
        """Forget a partition that went back; the caller tracks `offset` afresh."""
        # A reset to an earlier offset, a recreated topic, a broker that lost its data: events still in
        # flight from before finish untracked, so nothing is committed on their account, and every
        # message is read again, never skipped.
        log.warning("partition rewound; tracking it afresh", extra={"partition": f"{tp[0]}[{tp[1]}]",
                                                                     "offset": offset})
        self.checkpoint.restart([tp])

    def _undecodable(self, ev: InFlight, exc: Exception, first_try: float) -> None:
        """Fetch a missing writer schema, retry a registry outage for a while; dead-letter anything else.

        Both wait in a task of their own: the poll loop goes on with the next message meanwhile.
        """
        if isinstance(exc, SchemaNotLoaded):
            self._spawn(self._decode_later(ev, first_try))
            return
        if isinstance(exc, DecodeError) and exc.transient and time.monotonic() - first_try < _REGISTRY_RETRY_SECONDS:
            self._spawn(self._decode_later(ev, first_try))
            return
        if not self.designated:
            self._done(ev)  # bad input is the designated pipeline's to dead-letter and count, once
            return
        if isinstance(exc, DecodeError):
            self.tally.inc(self.metrics.decode_failures, exc.reason)
            self._decode_log.add(exc.reason, f"{ev.tp[0]}[{ev.tp[1]}]@{ev.offset}: {exc}", time.monotonic())
            self._dead_letter(ev, [DeadLetter(ev.source, "decode", type(exc).__name__, f"{exc.reason}: {exc}")])
            return
        # A decoder bug must not lose the event or kill the service.
        self.tally.inc(self.metrics.decode_failures, "internal")
        self._decode_log.add("internal", f"{ev.tp[0]}[{ev.tp[1]}]@{ev.offset}: {type(exc).__name__}: {exc}",
                             time.monotonic())
        self._dead_letter(ev, [DeadLetter(ev.source, "decode", type(exc).__name__, str(exc))])

    def _log_decode_failures(self, now: float, *, force: bool = False) -> None:
        """The decode failures since the last summary, as one warning (at most one per _DECODE_LOG_INTERVAL)."""
        summary = self._decode_log.take(now, force=force)
        if summary is not None:
            log.warning("%d message(s) could not be decoded in the last %.0f s and were sent to the dead-letter "
                        "topic: %s", summary.count, summary.seconds, summary.text(), extra={
                            "decode_failures": summary.count, "reasons": summary.reasons,
                            "examples": summary.examples})

    def _unmatchable(self, ev: InFlight, exc: Exception) -> None:
        if isinstance(exc, TooManyExposures):
            if not self.designated:
                self._done(ev)  # the event as a whole is the designated pipeline's to dead-letter
                return
            # Bad input, not a matcher bug: the whole event goes to the DLQ before anything of it is sent.
            count_one(self._decisions, None, exc.reason)
            log.warning("event over max_exposures dead-lettered", extra={
                "correlation_id": ev.correlation_id, "exposures": exc.exposures, "max_exposures": exc.limit})
            self._dead_letter(ev, [DeadLetter(ev.source, "match", type(exc).__name__, str(exc),
                                              event_id=ev.event_id, reason=exc.reason.value)])
            return
        log.error("matcher failed", exc_info=exc, extra={"correlation_id": ev.correlation_id})
        self._dead_letter(ev, [DeadLetter(ev.source, "match", type(exc).__name__, str(exc), event_id=ev.event_id)])

    async def _decode_later(self, ev: InFlight, first_try: float) -> None:
        """The event again once its writer schema is fetched (it is tracked already).

        After a failure the registry client waits out its backoff before the next request, so a
        retry here never spins.
        """
        try:
            purchase = await self.decoder.decode_async(ev.message.value(), ev.message.headers())
        except Exception as exc:
            self._undecodable(ev, exc, first_try)
            return
        self._c_decoded.n += 1
        ev.event_id = purchase.event_id
        if isinstance(purchase, OrderAdjusted):
            self._adjusted(ev, purchase, self.clock_ms())
            return
        try:
            decision = match(purchase, self.settings, self.clock_ms())
        except Exception as exc:
            self._unmatchable(ev, exc)
            return
        count(decision, self._decisions)
        if log.isEnabledFor(logging.DEBUG):
            self._log_decision(ev.correlation_id, decision)
        if decision.conversions:
            self._submit(ev, decision.conversions)
        else:
            self._c_unattributed.n += 1
            self._done(ev)

    # ------------------------------------------------------------------ order adjustments

    def _adjusted(self, ev: InFlight, adjustment: OrderAdjusted, first_seen_ms: int) -> None:
        """An order adjustment: planned in a task of its own, since it may wait for its purchase."""
        if self.refunds is None:
            # Decoded only when [adjustments] is enabled, which the Application refuses without a ledger; a
            # pipeline built otherwise keeps the adjustment in the DLQ rather than lose it or stop.
            if self.designated:
                self._dead_letter(ev, [DeadLetter(ev.source, "adjust", "NoLedger", "no ledger to plan the order "
                                                  "adjustment from", event_id=ev.event_id)])
            else:
                self._done(ev)
            return
        self._spawn(self._adjust(ev, adjustment, first_seen_ms))

    async def _adjust(self, ev: InFlight, adjustment: OrderAdjusted, first_seen_ms: int) -> None:
        """Plan, count, then send the plan's conversions (or dead-letter what cannot be applied).

        While an adjustment waits for its purchase its offset stays uncommitted (at most
        [adjustments] orphan_wait): a restart reads it again and it waits again.
        """
        assert self.refunds is not None
        try:
            planned = await self.refunds.resolve(adjustment, first_seen_ms)
        except Exception as exc:  # the ledger could not be read: the adjustment is kept, in the DLQ
            log.error("order adjustment not planned", exc_info=exc, extra={"correlation_id": ev.correlation_id})
            if self.designated:
                self._dead_letter(ev, [DeadLetter(ev.source, "adjust", type(exc).__name__, str(exc),
                                                  event_id=ev.event_id)])
            else:
                self._done(ev)
            return
        if planned is None:
            return  # stopping while it waited: left unfinished, so read again after the restart
        self._count_adjustment(planned)
        if planned.dead_letter is not None:
            detail = "; ".join(r.detail for r in planned.results if r.detail)
            self._dead_letter(ev, [DeadLetter(ev.source, "adjust", "AdjustmentRefused", detail,
                                              event_id=ev.event_id, reason=planned.dead_letter.value)])
        elif planned.actions:
            self._submit(ev, tuple(a.conversion for a in planned.actions), purchase=False)
        else:
            self._done(ev)

    def _count_adjustment(self, planned: AdjustmentPlan) -> None:
        for (provider, outcome), n in planned.counts().items():
            self.tally.inc(self.metrics.adjustments, provider, outcome, n=n)

    def _decision_count(self, provider: Provider | None, reason: str) -> Count:
        """The counter cell of one (provider, matched-or-reason) pair, made on first use."""
        cell = self._c_decisions[(provider, reason)] = self.tally.count(
            self.metrics.match_decisions, provider.slug if provider is not None else "none", reason)
        return cell

    def _flush_decisions(self) -> None:
        """Matcher decisions counted since the last flush, onto their metric cells (once per poll loop)."""
        cells = self._c_decisions
        designated = self.designated
        for key, n in self._decisions.items():
            if key[0] is None and not designated:
                continue  # a decision about the event as a whole: the designated pipeline counts it
            cell = cells.get(key) or self._decision_count(*key)
            cell.n += n
        self._decisions.clear()

    @staticmethod
    def _log_decision(correlation_id: str, decision: Decision) -> None:
        log.debug("decision", extra={
            "correlation_id": correlation_id,
            "conversions": len(decision.conversions),
            "rejections": [f"{r.reason.value}: {r.detail}" for r in decision.rejections],
        })

    def _submit(self, ev: InFlight, conversions: tuple[Conversion, ...], *, purchase: bool = True) -> None:
        """Hand an attributed event's conversions to the dispatcher (or to deliveries already under way).

        `purchase` false: an order adjustment's cancellations and restatements (not an attributed purchase).
        """
        if purchase:
            self._c_attributed.n += 1
        dispatcher = self.dispatcher
        assert dispatcher is not None
        ev.pending = len(conversions)
        in_flight = self._in_flight_keys
        seen = self.recent.seen
        for conversion in conversions:
            key = conversion.key
            if seen(key):
                # Delivered moments ago in this process (a redelivery after a rebalance): do not count twice.
                self.tally.inc(self.metrics.conversions, conversion.provider.slug, "skipped")
                ev.pending -= 1
                continue
            if key in in_flight:
                # The same conversion is on its way for an earlier event (the same order published twice):
                # this event waits for that delivery instead of sending it again.
                waiting = in_flight[key]
                if waiting is None:
                    in_flight[key] = [ev]
                else:
                    waiting.append(ev)
                continue
            in_flight[key] = None  # on its way, nobody waiting (yet): no list until someone is
            dispatcher.submit(conversion, ev)
        if ev.pending == 0:
            self._done(ev)

    def _on_results(self, items: Sequence[Pending], result: Result) -> None:
        """One request's result for each of its conversions (a batch holds one provider's conversions)."""
        if self.hooks is not None:
            self.hooks.results(self, items, result)
        if result.status is Status.FAILED:
            for p in items:
                self._on_failure(p.ticket, p.conversion, result)
            return
        provider = items[0].conversion.provider
        cells = self._c_outcomes.get((provider, result.status))
        if cells is None:
            cells = self._c_outcomes[(provider, result.status)] = (
                self.tally.count(self.metrics.conversions, provider.slug, result.status.value),
                self.tally.histogram(self.metrics.delivery_delay, provider.slug),
            )
        count, delays = cells
        count.n += len(items)
        # One pass over the batch: every item is touched once (they are cold in the cache by now).
        delivered_at = self.clock_ms() / 1000 if result.status is Status.DELIVERED else None
        observe = delays.values.append
        keys: list[str] = []
        remember = keys.append
        in_flight = self._in_flight_keys
        finish = self.tracker.finish
        processing = self._h_processing.values
        now = time.monotonic()
        finished = 0
        for p in items:
            conversion = p.conversion
            key = conversion.key
            remember(key)
            if delivered_at is not None:
                delay = delivered_at - conversion.occurred_at / 1000
                observe(delay if delay > 0.0 else 0.0)
            waiters = in_flight.pop(key, None)
            if waiters:
                self._release(waiters, provider)
            ev = p.ticket
            ev.pending -= 1
            if ev.pending == 0:
                if ev.failures:
                    self._dead_letter_failures(ev)
                else:
                    # _done, inlined: this is the last step of most events.
                    finish(ev.tp, ev.offset)
                    processing.append(now - ev.read_at)
                    finished += 1
        self.recent.add_many(keys)
        if finished:
            self.live -= finished
            if self.live == 0:
                self._drained.set()

    def _on_failure(self, ev: InFlight, conversion: Conversion, result: Result) -> None:
        """A conversion that could not be delivered: its event is dead-lettered when its last result is in."""
        provider = conversion.provider.slug
        if ev.failures is None:
            ev.failures = {}
        ev.failures.setdefault(provider, []).append((conversion, result))
        log.warning("delivery failed", extra={
            "correlation_id": ev.correlation_id, "provider": provider, "project": conversion.project,
            "reason": result.outcome.reason, "status": result.outcome.status, "attempts": result.attempts,
        })
        waiters = self._in_flight_keys.pop(conversion.key, None)
        if waiters:
            self._release(waiters, conversion.provider)
        self._settle(ev)

    def _release(self, waiters: list[InFlight], provider: Provider) -> None:
        """Events that waited for an earlier event's delivery of the same conversion are settled with it."""
        for waiter in waiters:
            # A failure is dead-lettered once, with the event that sent it; the waiter carries no second copy.
            self.tally.inc(self.metrics.conversions, provider.slug, "skipped")
            self._settle(waiter)

    def _settle(self, ev: InFlight) -> None:
        """One of the event's conversions has its result; the last one finishes the event."""
        ev.pending -= 1
        if ev.pending == 0:
            if ev.failures:
                self._dead_letter_failures(ev)
            else:
                self._done(ev)

    def _dead_letter_failures(self, ev: InFlight) -> None:
        """An event whose last result is in, with failed deliveries: one dead letter per failed provider."""
        assert ev.failures is not None
        self._dead_letter(ev, [self._dispatch_dead_letter(ev, p, f) for p, f in ev.failures.items()])

    @staticmethod
    def _dispatch_dead_letter(ev: InFlight, provider: str, failed: list[tuple[Conversion, Result]]) -> DeadLetter:
        result = failed[0][1]
        projects = sorted({c.project for c, _ in failed})
        return DeadLetter(
            ev.source, "dispatch", "DeliveryFailed", result.outcome.reason,
            provider=provider, project=",".join(projects), attempts=max(r.attempts for _, r in failed),
            http_status=result.outcome.status, keys=[c.key for c, _ in failed], event_id=ev.event_id,
        )

    def _dead_letter(self, ev: InFlight, letters: list[DeadLetter]) -> None:
        self._spawn(self._write_dead_letters(ev, letters))

    async def _write_dead_letters(self, ev: InFlight, letters: list[DeadLetter]) -> None:
        assert self.dlq is not None
        try:
            omissions = await asyncio.gather(*(self.dlq.write(dl) for dl in letters))
        except DeadLetterError as exc:
            self.metrics.dlq_failures.inc()
            self.shared.fail(f"dead-letter topic '{self.config.kafka.dlq_topic}' is not writable ({exc}); "
                             "stopped consuming, offsets committed only up to the last finished event", EXIT_DLQ)
            return  # never finished: its offset stays uncommitted
        for omission in omissions:
            if omission is not None:
                self.tally.inc(self.metrics.dlq_values_omitted, omission.code)
        for dl in letters:
            self.tally.inc(self.metrics.dlq_produced, dl.stage, dl.provider or "none")
            if dl.provider:
                self.tally.inc(self.metrics.conversions, dl.provider, "dead_lettered", n=len(dl.keys))
        self._done(ev)

    def _done(self, ev: InFlight) -> None:
        self.tracker.finish(ev.tp, ev.offset)
        self.live -= 1
        self._h_processing.values.append(time.monotonic() - ev.read_at)
        if self.live == 0:
            self._drained.set()

    def _spawn(self, coro: object) -> None:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
