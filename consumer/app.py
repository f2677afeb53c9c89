"""The service: owns the consumer, the pipeline, checkpointing and shutdown (a small quix-style Application).

Per message: decode → match → dispatch each conversion → when every delivery of the event is done
(delivered, not accepted, or dead-lettered and confirmed by the broker), its offset is finished.
The offset tracker turns finished offsets into committable ones; the checkpoint (consumer/checkpoint.py)
commits them on an interval, before partitions are revoked, and before close, and counts an offset as
committed only when the broker confirmed it. Nothing is committed that is not done.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import threading
import time
from collections.abc import Callable, Sequence

from confluent_kafka import KafkaError, Message

from consumer.checkpoint import Checkpoint, CommitFailed
from consumer.config import Config
from consumer.decoding import DecodeError, SchemaNotLoaded, make_decoder
from consumer.dedup import RecentKeys
from consumer.delivery import Dispatcher, Pending, Result, Status
from consumer.digest import FailureDigest
from consumer.dlq import DeadLetter, DeadLetterError, DeadLetterWriter, Headers, SourceRef, producer_config
from consumer.matcher import Counts, MatchSettings, TooManyExposures, count, count_one, match
from consumer.metrics import Count, HealthServer, Metrics, Observed, Tally
from consumer.model import Conversion, Decision, Provider
from consumer.offsets import OffsetOrderError, OffsetTracker
from consumer.providers.registry import modules
from consumer.source import TP, Source, choose_group_protocol
from consumer.transport import TokenCache, Transport

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_FATAL = 1
EXIT_DLQ = 3
EXIT_KAFKA_AUTH = 4

# How long to keep retrying a registry that is down before the event is dead-lettered instead.
_REGISTRY_RETRY_SECONDS = 60.0
# Decode failures are logged as one summary per this many seconds (with every reason), not one line each.
_DECODE_LOG_INTERVAL = 10.0


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


def tune_gc(threshold: int) -> tuple[int, int, int] | None:
    """Collect less often from now on; returns the settings to restore (None: `threshold` 0, left alone).

    Events in flight live for a linger plus a round trip, long enough to survive Python's young
    collections (every 700 allocations by default) and be scanned again and again in the older
    generations: measured 10% of the service's CPU. The hot path makes almost no reference cycles,
    so a larger threshold costs little memory. Objects that exist already (modules, config, clients)
    are frozen out of every collection.
    """
    if threshold == 0:
        return None
    previous = gc.get_threshold()
    gc.collect()
    gc.freeze()
    gc.set_threshold(threshold, 20, 100)
    return previous


class Application:
    def __init__(
        self,
        config: Config,
        *,
        metrics: Metrics | None = None,
        clock_ms: Callable[[], int] = lambda: int(time.time() * 1000),
        stop_when: Callable[[Application], bool] | None = None,
        install_signals: bool = True,
    ) -> None:
        self.config = config
        self.metrics = metrics or Metrics()
        self.tally = tally = Tally()
        m = self.metrics
        # Hot-path counter cells (see Tally): one attribute increment per event instead of a labels() lookup.
        self._c_consumed = tally.count(m.events_consumed)
        self._c_decoded = tally.count(m.events_decoded)
        self._c_attributed = tally.count(m.purchases, "attributed")
        self._c_unattributed = tally.count(m.purchases, "unattributed")
        self._c_decisions: dict[tuple[Provider | None, str], Count] = {}
        self._decisions: Counts = {}  # filled by match() in counting mode, flushed to _c_decisions
        self._c_outcomes: dict[tuple[Provider, Status], tuple[Count, Observed]] = {}
        self._h_processing = tally.histogram(m.processing_delay)
        self.clock_ms = clock_ms
        self.stop_when = stop_when
        self.install_signals = install_signals
        self.decoder = make_decoder(config.decoding)
        self.settings = MatchSettings.from_config(config)
        self.recent = RecentKeys(config.pipeline.dedup_cache_size)
        self.tracker = OffsetTracker()
        self.checkpoint = Checkpoint(self.tracker)
        self.live = 0
        self.consumed = 0
        self.fatal: str | None = None
        self.fatal_exit = EXIT_DLQ  # the exit code when `fatal` is set
        self._ready = False  # what offline_conversions_ready says, kept by the service itself
        self._decode_log = FailureDigest(_DECODE_LOG_INTERVAL)
        self._stopping = asyncio.Event()
        self._drained = asyncio.Event()
        self._drained.set()
        # Key being delivered -> later events waiting on it (None while there are none).
        self._in_flight_keys: dict[str, list[InFlight] | None] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.source: Source | None = None
        self.dlq: DeadLetterWriter | None = None
        self.dispatcher: Dispatcher | None = None
        self.health: HealthServer | None = None

    # ------------------------------------------------------------------ lifecycle

    def stop(self) -> None:
        """Ask for a graceful stop (SIGTERM, SIGINT, or a test)."""
        self._stopping.set()
        self._set_ready(False)

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def readiness(self) -> tuple[bool, dict[str, object]]:
        src = self.source
        detail: dict[str, object] = {
            "assigned": len(src.assigned) if src else 0,
            "broker": bool(src and src.broker_up),
            "dlq": bool(self.dlq and self.dlq.failed is None),
            "stopping": self.stopping,
        }
        ok = self._is_ready()
        self._set_ready(ok)
        return ok, detail

    def _is_ready(self) -> bool:
        """`readiness()` without the detail: cheap enough for every turn of the poll loop."""
        src, dlq = self.source, self.dlq
        return bool(src and src.assigned and src.broker_up and dlq and dlq.failed is None) and not self.stopping

    def _set_ready(self, ok: bool) -> None:
        # The gauge follows assignment, revocation, broker and DLQ state as the loop sees them change;
        # nobody has to call /readyz for it to be right (extra --workers processes are never probed).
        if ok is not self._ready:
            self._ready = ok
            self.metrics.ready.set(1 if ok else 0)

    @staticmethod
    def producer_config(cfg: Config) -> dict[str, str | int | float | bool]:
        """The DLQ producer's librdkafka settings (consumer.dlq.producer_config)."""
        return producer_config(cfg)

    async def run(self) -> int:
        cfg = self.config
        loop = asyncio.get_running_loop()
        if self.install_signals and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.stop)
        transport = Transport.for_config(cfg)
        # Each token request carries its provider's user agent (TokenSpec.user_agent), and counts under its slug.
        tokens = TokenCache(transport, on_grant=lambda p, r: self.metrics.token_grants.labels(p, r).inc())
        self.dispatcher = Dispatcher(modules(cfg), transport, tokens, self.metrics, self._on_results)
        self.dlq = DeadLetterWriter(cfg.kafka.dlq_topic, self.producer_config(cfg), cfg.pipeline.dlq_timeout)
        self.dlq.start()
        self.health = HealthServer(self.metrics, self.readiness)
        await self.health.start(cfg.metrics.host, cfg.metrics.port)
        protocol = await loop.run_in_executor(None, choose_group_protocol, cfg.kafka)
        log.info("group protocol", extra={"protocol": protocol.protocol, "reason": protocol.reason})
        self.source = Source(cfg.kafka, self.metrics, self._on_assign, self._on_revoke, self._on_lost, protocol,
                             on_commit=self._on_commit)
        self.source.subscribe()
        log.info("started", extra={"topic": cfg.kafka.topic, "group": cfg.kafka.group_id,
                                   "metrics_port": self.health.port})
        gc_settings = tune_gc(cfg.pipeline.gc_threshold)
        try:
            await self._consume()
        finally:
            code = await self._shutdown(transport)
            if gc_settings is not None:
                gc.set_threshold(*gc_settings)
                gc.unfreeze()
        return code

    async def _consume(self) -> None:
        assert self.source is not None
        src, pipe = self.source, self.config.pipeline
        next_commit = time.monotonic() + pipe.commit_interval
        idle = 0.0
        while not self.stopping and self.fatal is None:
            if self.live >= pipe.max_in_flight:
                src.pause()
            elif src.paused and self.live <= pipe.max_in_flight * 3 // 4:
                src.resume()
            room = pipe.max_in_flight - self.live
            messages = src.poll(max(1, min(pipe.poll_batch, room)))
            if src.auth_failed is not None:
                self.fatal = (f"Kafka refused the credentials ({src.auth_failed}): check [kafka.common] "
                              "sasl.mechanisms, sasl.username and sasl.password")
                self.fatal_exit = EXIT_KAFKA_AUTH
                break
            if messages:
                self._process(messages)
            self.metrics.in_flight.set(self.live)
            self._flush_decisions()
            self.tally.flush()
            self._set_ready(self._is_ready())
            now = time.monotonic()
            if self._decode_log.count:
                self._log_decode_failures(now)
            if now >= next_commit:
                self._commit(asynchronous=True)
                next_commit = now + pipe.commit_interval
            if self.stop_when is not None and self.stop_when(self):
                break
            if messages:
                idle = 0.0
                await asyncio.sleep(0)
            else:
                # Nothing fetched: back off a little (up to 20 ms) so an idle service does not spin.
                idle = min(0.02, idle * 2 or 0.001)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), idle)

    async def _shutdown(self, transport: Transport) -> int:
        pipe = self.config.pipeline
        deadline = pipe.shutdown_deadline if self.fatal is None else min(pipe.shutdown_deadline, pipe.dlq_timeout)
        if self.dispatcher is not None:
            self.dispatcher.flush()
        if not await self._drain(deadline):
            log.warning("shutdown deadline reached with events in flight; their offsets stay uncommitted",
                        extra={"in_flight": self.live})
        if self.source is not None:
            self._commit(asynchronous=False)
            if unconfirmed := self.checkpoint.due(final=True):
                log.warning("the final commit failed; these partitions will be re-read from their last committed "
                            "offsets", extra={"partitions": {f"{t}[{p}]": o for (t, p), o in unconfirmed.items()}})
            self.source.close()
        if self.dispatcher is not None:
            await self.dispatcher.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await transport.close()
        await self.decoder.close()
        if self.dlq is not None:
            self.dlq.close(5.0)
        self._flush_decisions()
        self.tally.flush()
        self._log_decode_failures(time.monotonic(), force=True)
        self._set_ready(False)
        if self.health is not None:
            await self.health.stop()
        if self.fatal is not None:
            log.error("stopped: %s", self.fatal)
            return self.fatal_exit
        log.info("stopped", extra={"consumed": self.consumed})
        return EXIT_OK

    async def _drain(self, deadline: float) -> bool:
        """Wait for in-flight work while still serving the group (heartbeats, rebalances), fetching nothing.

        A member that stopped polling while it drains would hold a rebalance of the whole group up
        for as long as the drain takes; paused, it answers at once and commits what it finished.
        """
        src = self.source
        if src is not None:
            src.pause()
        end = time.monotonic() + deadline
        while self.live > 0 and (remaining := end - time.monotonic()) > 0:
            if src is not None:
                # Paused: at most a message of a partition assigned a moment ago, left unread and uncommitted.
                src.poll(1)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._drained.wait(), min(0.05, remaining))
        return self.live == 0

    # ------------------------------------------------------------------ offsets

    # The commit protocol's steps are numbered in consumer/checkpoint.py; the numbers below are those.

    def _on_assign(self, tps: list[TP]) -> None:
        # 1. A partition newly ours starts from its committed offset: whatever we knew of it is stale.
        self.checkpoint.assign(tps)

    def _on_lost(self, tps: list[TP]) -> None:
        # 5. Lost (the group or the broker is gone): another member may own them, so nothing is committed.
        self.checkpoint.drop(tps)
        self.metrics.commit_failing_partitions.set(self.checkpoint.failing)

    def _on_revoke(self, tps: list[TP]) -> None:
        # 2-4 as a final commit of what is done, then 5: unfinished events will be re-read by the next owner.
        self._commit(asynchronous=False, only=tps)
        self.checkpoint.drop(tps)
        self.metrics.commit_failing_partitions.set(self.checkpoint.failing)

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
        self.metrics.commit_failing_partitions.set(self.checkpoint.failing)

    # ------------------------------------------------------------------ events

    def _process(self, messages: list[Message]) -> None:
        """A poll's worth of messages; one clock reading and one debug check serve the whole batch.

        This loop runs for every event, so what it calls is looked up once per batch. An event with
        nothing to deliver is done as it is read: no InFlight, no second visit to the tracker.
        """
        read_at = time.monotonic()
        now_ms = self.clock_ms()
        debug = log.isEnabledFor(logging.DEBUG)
        tracker, decode, settings, counts = self.tracker, self.decoder.decode, self.settings, self._decisions
        track, track_done, submit = tracker.track, tracker.track_done, self._submit
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
                purchase = decode(msg.value())
            except Exception as exc:
                self._undecodable(self._read(msg, tp, offset, read_at), exc, read_at)
                continue
            decoded += 1
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
        if isinstance(exc, DecodeError):
            if exc.transient and time.monotonic() - first_try < _REGISTRY_RETRY_SECONDS:
                self._spawn(self._decode_later(ev, first_try))
                return
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
            purchase = await self.decoder.decode_async(ev.message.value())
        except Exception as exc:
            self._undecodable(ev, exc, first_try)
            return
        self._c_decoded.n += 1
        ev.event_id = purchase.event_id
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

    def _decision_count(self, provider: Provider | None, reason: str) -> Count:
        """The counter cell of one (provider, matched-or-reason) pair, made on first use."""
        cell = self._c_decisions[(provider, reason)] = self.tally.count(
            self.metrics.match_decisions, provider.slug if provider is not None else "none", reason)
        return cell

    def _flush_decisions(self) -> None:
        """Matcher decisions counted since the last flush, onto their metric cells (once per poll loop)."""
        cells = self._c_decisions
        for key, n in self._decisions.items():
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

    def _submit(self, ev: InFlight, conversions: tuple[Conversion, ...]) -> None:
        """Hand an attributed event's conversions to the dispatcher (or to deliveries already under way)."""
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
            if self.fatal is None:
                self.fatal = f"dead-letter topic '{self.config.kafka.dlq_topic}' is not writable ({exc}); " \
                             "stopped consuming, offsets committed only up to the last finished event"
                log.error(self.fatal)
                self._set_ready(False)
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
