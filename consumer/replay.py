"""`offline-conversions dlq replay`: re-drive dead-lettered events to the provider(s) that failed, only.

The replay reads the dead-letter topic in its own consumer group (so an interrupted replay resumes),
filters by provider, stage, error class and time, decodes the original value, matches it again and
sends only the conversions whose idempotency keys the dead letter names (a `dispatch` letter) or,
for a `decode`/`match` letter, every conversion of the event. Keys are derived from the order, so a
replayed conversion carries the same nonce / transaction id as the first attempt did.

A letter that fails again (still undecodable, or a conversion the provider still refuses) is
re-queued to the dead-letter topic, with `dlq.replay.attempts` one higher, before the replay's
offset moves past it: a replay never loses a letter. A letter this run re-queued is where the run
stops in that partition, so it is left for the next run instead of being retried in a loop.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TextIO

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition

from consumer.config import Config, ConfigError, load
from consumer.decoding import DecodeError, Decoder, make_decoder
from consumer.delivery import Dispatcher, Result, Status, each
from consumer.dlq import (
    HEADER_PREFIX,
    STAGES,
    DeadLetter,
    DeadLetterError,
    DeadLetterWriter,
    SourceRef,
    parse_headers,
    producer_config,
)
from consumer.matcher import MatchSettings, TooManyExposures, match
from consumer.metrics import Metrics
from consumer.model import Conversion
from consumer.providers import registry
from consumer.providers.registry import modules
from consumer.source import consumer_config
from consumer.transport import TokenCache, Transport

log = logging.getLogger(__name__)


EXIT_INCOMPLETE = 1  # something could not be replayed (it is re-queued or listed)
EXIT_USAGE = 2
EXIT_DLQ = 3  # a letter could not be re-queued: the replay stopped, committing nothing after it


class ReplayFilterError(ValueError):
    """A filter value the dead letters can never carry (a typo would otherwise select nothing, silently)."""


@dataclass(frozen=True)
class ReplayFilter:
    providers: frozenset[str] = frozenset()
    stages: frozenset[str] = frozenset()
    error_classes: frozenset[str] = frozenset()
    since_ms: int | None = None
    until_ms: int | None = None

    def __post_init__(self) -> None:
        # The registered providers: the built-in ones, and those of the config's [providers] modules once
        # it is loaded (run_replay loads it first).
        for what, given, valid in (("provider", self.providers, registry.slugs()), ("stage", self.stages, STAGES)):
            unknown = sorted(given - set(valid))
            if unknown:
                raise ReplayFilterError(f"unknown --{what} {', '.join(map(repr, unknown))} "
                                        f"(valid: {', '.join(valid)})")

    def accepts(self, headers: dict[str, str]) -> bool:
        if self.providers and headers.get("provider", "") not in self.providers:
            return False
        if self.stages and headers.get("stage", "") not in self.stages:
            return False
        if self.error_classes and headers.get("exception.class", "") not in self.error_classes:
            return False
        at = int(headers.get("time", "0") or 0)
        if self.since_ms is not None and at < self.since_ms:
            return False
        return not (self.until_ms is not None and at >= self.until_ms)


def select(conversions: Sequence[Conversion], headers: dict[str, str]) -> list[Conversion]:
    """The conversions a dead letter asks to re-send: the failed keys of its provider, or all of them."""
    keys = {k for k in headers.get("conversion.keys", "").split(",") if k}
    provider = headers.get("provider")
    if headers.get("stage") == "dispatch":
        return [c for c in conversions if c.provider.slug == provider and c.key in keys]
    return list(conversions)


@dataclass
class Letter:
    """One dead letter being replayed: where it is, what it says, and what failed again."""

    msg: Message
    headers: dict[str, str]
    failures: dict[str, list[tuple[Conversion, Result]]] = field(default_factory=dict)
    # Failed again before any delivery: (stage, exception class, message, event id).
    early: tuple[str, str, str, str | None] | None = None

    @property
    def where(self) -> str:
        """The letter's own place (for the messages) and the original's."""
        h = self.headers
        return (f"letter {self.msg.topic()}[{self.msg.partition()}] offset {self.msg.offset()} "
                f"(original {h.get('original.topic', '?')}[{h.get('original.partition', '?')}] "
                f"offset {h.get('original.offset', '?')})")

    def again(self, stage: str, error_class: str, error_message: str, *, provider: str | None = None,
              project: str | None = None, attempts: int = 0, http_status: int | None = None,
              keys: Sequence[str] = (), event_id: str | None = None, run_id: str) -> DeadLetter:
        """This letter as it goes back to the DLQ: the same original, the new failure, one more replay attempt."""
        h, msg = self.headers, self.msg
        raw = msg.headers() or []
        pairs = raw.items() if isinstance(raw, dict) else raw
        own = [(k, v) for k, v in pairs if not k.startswith(HEADER_PREFIX)]
        timestamp = h.get("original.timestamp")
        source = SourceRef(h.get("original.topic", ""), _int(h.get("original.partition"), -1),
                           _int(h.get("original.offset"), -1), msg.key(), msg.value(), own,
                           _int(timestamp, 0) if timestamp is not None else None)
        return DeadLetter(source, stage, error_class, error_message, provider=provider, project=project,
                          attempts=attempts, http_status=http_status, keys=keys,
                          event_id=event_id or h.get("event_id"), replays=_int(h.get("replay.attempts"), 0) + 1,
                          requeued_from=f"{msg.topic()}[{msg.partition()}]@{msg.offset()}", requeued_by=run_id,
                          reason=h.get("reason") if stage == h.get("stage") else None)


def _int(text: str | None, default: int) -> int:
    try:
        return int(text) if text is not None else default
    except ValueError:
        return default


@dataclass
class ReplayStats:
    read: int = 0
    selected: int = 0
    skipped: int = 0
    undecodable: int = 0
    unmatchable: int = 0
    without_value: int = 0
    requeued: int = 0
    over_cap: int = 0  # still more exposures than [matcher] max_exposures
    outcomes: Counter[str] = field(default_factory=Counter)

    @property
    def complete(self) -> bool:
        """Everything selected was replayed (nothing re-queued, failed, or impossible to replay)."""
        failed = any(k.endswith(Status.FAILED.value) for k, v in self.outcomes.items() if v)
        return not (failed or self.requeued or self.undecodable or self.unmatchable or self.without_value
                    or self.over_cap)

    def summary(self) -> str:
        parts = ", ".join(f"{k} {v}" for k, v in sorted(self.outcomes.items())) or "nothing sent"
        over = f", {self.over_cap} still over max_exposures" if self.over_cap else ""
        return (f"read {self.read} dead letters, {self.selected} selected, {self.skipped} filtered out, "
                f"{self.undecodable} still undecodable, {self.unmatchable} still unmatchable{over}, "
                f"{self.without_value} without their value; conversions: {parts}; "
                f"{self.requeued} letters re-queued")


async def replay(cfg: Config, flt: ReplayFilter, *, dry_run: bool, group_id: str | None = None,
                 idle_timeout: float = 5.0, out: TextIO | None = None) -> ReplayStats:
    """Replay the DLQ until it has been idle for `idle_timeout` seconds; commits as it goes.

    Raises DeadLetterError when a letter that failed again cannot be re-queued (nothing from that
    batch on is committed, so the next run sees those letters again).
    """
    stream = out or sys.stdout
    run_id = uuid.uuid4().hex
    conf = consumer_config(cfg.kafka)
    conf.pop("statistics.interval.ms", None)
    conf["group.id"] = group_id or f"{cfg.kafka.group_id}.replay"
    # consumer_config stores no offset by itself: each letter's offset is stored once it is settled
    # (delivered, or re-queued and confirmed), and committed after each batch.
    consumer = Consumer(conf)
    assigned: list[bool] = []
    # The idle clock starts once the group has given us the partitions: a join can take seconds.
    consumer.subscribe([cfg.kafka.dlq_topic], on_assign=lambda _c, _p: assigned.append(True))
    decoder = make_decoder(cfg.decoding)
    settings = MatchSettings.from_config(cfg)
    stats = ReplayStats()
    transport = Transport.for_config(cfg)
    results: asyncio.Queue[tuple[Letter, Conversion, Result]] = asyncio.Queue()
    dispatcher = Dispatcher(modules(cfg), transport, TokenCache(transport), Metrics(),
                            each(lambda t, c, r: results.put_nowait((t, c, r))),  # a pause waits: say why
                            on_pause=lambda s: print(f"  {s.provider} {s.project} {s.state}: {s.reason or ''}",
                                                     file=stream, flush=True))
    requeue: DeadLetterWriter | None = None
    if not dry_run:
        requeue = DeadLetterWriter(cfg.kafka.dlq_topic, producer_config(cfg), cfg.pipeline.dlq_timeout)
        requeue.start()
    ended: set[tuple[str, int]] = set()  # partitions where this run met a letter it re-queued
    last_message = time.monotonic()
    join_deadline = last_message + max(60.0, idle_timeout)
    try:
        while (not assigned and time.monotonic() < join_deadline) or time.monotonic() - last_message < idle_timeout:
            batch: list[Message] = consumer.consume(num_messages=200, timeout=0.2)
            if not assigned:
                last_message = time.monotonic()
            letters: list[Letter] = []
            for msg in batch:
                err = msg.error()
                if err is not None:
                    if err.code() != KafkaError._PARTITION_EOF:
                        log.warning("replay consumer error: %s", err.str())
                    continue
                tp = (msg.topic() or "", msg.partition() or 0)
                if tp in ended:
                    continue
                headers = parse_headers(msg.headers())
                if headers.get("requeued.by") == run_id:
                    # Re-queued by this run: it and what follows it stay for the next run (not committed).
                    ended.add(tp)
                    consumer.pause([TopicPartition(*tp)])
                    continue
                last_message = time.monotonic()
                stats.read += 1
                if stats.read % 1000 == 0:
                    print(f"  … {stats.summary()}", file=stream, flush=True)
                letter = Letter(msg, headers)
                letters.append(letter)
                await _replay_one(letter, flt, decoder, settings, dispatcher, stats, dry_run, stream)
            if dry_run or not letters:
                continue
            assert requeue is not None
            dispatcher.flush()
            if dispatcher.outstanding:
                await dispatcher.wait_idle()
            while not results.empty():
                letter, conversion, result = results.get_nowait()
                stats.outcomes[f"{conversion.provider.slug} {result.status.value}"] += 1
                if result.status is Status.FAILED:
                    letter.failures.setdefault(conversion.provider.slug, []).append((conversion, result))
                    print(f"  still failing: {letter.where}: {conversion.provider.slug} {conversion.project} "
                          f"key {conversion.key}: {result.outcome.reason}", file=stream)
            again = [dl for letter in letters for dl in _failed_again(letter, run_id)]
            if again:
                # Confirmed by the broker before any offset moves past the letters they replace.
                await asyncio.gather(*(requeue.write(dl) for dl in again))
                stats.requeued += len(again)
            for letter in letters:
                consumer.store_offsets(letter.msg)
            try:
                consumer.commit(asynchronous=False)
            except KafkaException as exc:
                if exc.args[0].code() != KafkaError._NO_OFFSET:
                    raise
    finally:
        await dispatcher.close()
        await transport.close()
        await decoder.close()
        if requeue is not None:
            requeue.close(5.0)
        consumer.close()
    return stats


async def _replay_one(letter: Letter, flt: ReplayFilter, decoder: Decoder, settings: MatchSettings,
                dispatcher: Dispatcher, stats: ReplayStats, dry_run: bool, stream: TextIO) -> None:
    headers = letter.headers
    if not flt.accepts(headers):
        stats.skipped += 1
        return
    if "value" in headers.get("omitted", "").split(","):
        stats.without_value += 1
        print(f"  {letter.where}: written without its value ({headers.get('omitted.reason', '?')}, "
              f"{headers.get('original.size', '?')} bytes, sha256 {headers.get('original.sha256', '?')}); "
              "replay cannot re-drive it: re-read the original from its topic", file=stream)
        return
    try:
        purchase = await decoder.decode_async(letter.msg.value())
    except DecodeError as exc:
        stats.undecodable += 1
        print(f"  {letter.where}: still undecodable ({exc.reason}: {exc})"
              + ("" if dry_run else "; re-queued"), file=stream)
        letter.early = ("decode", type(exc).__name__, f"{exc.reason}: {exc}", None)
        return
    try:
        decision = match(purchase, settings, int(time.time() * 1000))
    except TooManyExposures as exc:  # still over the cap: back to the DLQ; raise [matcher] max_exposures first
        stats.over_cap += 1
        print(f"  {letter.where}: still {exc.reason.value} ({exc})" + ("" if dry_run else "; re-queued"),
              file=stream)
        letter.early = ("match", type(exc).__name__, str(exc), purchase.event_id)
        return
    except Exception as exc:  # a matcher bug: the letter goes back, the replay goes on
        stats.unmatchable += 1
        print(f"  {letter.where}: matching failed ({type(exc).__name__}: {exc})"
              + ("" if dry_run else "; re-queued"), file=stream)
        letter.early = ("match", type(exc).__name__, str(exc), purchase.event_id)
        return
    chosen = select(decision.conversions, headers)
    stats.selected += 1
    if not chosen:
        print(f"  {letter.where}: nothing to send: the current configuration makes none of its conversions "
              f"(keys {headers.get('conversion.keys', '-')})", file=stream)
    for c in chosen:
        if dry_run:
            stats.outcomes[f"{c.provider.slug} would send"] += 1
            print(f"  would send {c.provider.slug} {c.project} goals {','.join(c.goals)} key {c.key} "
                  f"(event {purchase.event_id}, order {purchase.order_id}; {letter.where})", file=stream)
        else:
            dispatcher.submit(c, letter)


def _failed_again(letter: Letter, run_id: str) -> list[DeadLetter]:
    """What goes back to the DLQ for a letter: itself if it failed early, else one letter per failed provider."""
    if letter.early is not None:
        stage, error_class, message, event_id = letter.early
        return [letter.again(stage, error_class, message, event_id=event_id, run_id=run_id)]
    out = []
    for provider, failed in letter.failures.items():
        result = failed[0][1]
        out.append(letter.again(
            "dispatch", "DeliveryFailed", result.outcome.reason, provider=provider,
            project=",".join(sorted({c.project for c, _ in failed})), attempts=max(r.attempts for _, r in failed),
            http_status=result.outcome.status, keys=[c.key for c, _ in failed], run_id=run_id,
        ))
    return out


def run_replay(args: argparse.Namespace) -> int:
    from consumer import logs

    try:
        cfg = load(args.config)
    except ConfigError as exc:
        print(f"offline-conversions: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        flt = ReplayFilter(
            providers=frozenset(p.lower() for p in args.provider or ()),
            stages=frozenset(args.stage or ()),
            error_classes=frozenset(args.error_class or ()),
            since_ms=args.since,
            until_ms=args.until,
        )
    except ReplayFilterError as exc:
        print(f"offline-conversions: {exc}", file=sys.stderr)
        return EXIT_USAGE
    logs.setup(cfg.logging.level, cfg.logging.format, cfg.secrets())
    try:
        stats = asyncio.run(replay(cfg, flt, dry_run=args.dry_run, group_id=args.group_id))
    except DeadLetterError as exc:
        print(f"offline-conversions: a letter that failed again could not be re-queued, so the replay stopped "
              f"without committing past it: {exc}", file=sys.stderr)
        return EXIT_DLQ
    print(("dry run: " if args.dry_run else "") + stats.summary())
    return 0 if stats.complete else EXIT_INCOMPLETE
