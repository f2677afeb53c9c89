"""`offline-conversions dlq replay`: re-drive dead-lettered events to the provider(s) that failed, only.

The replay reads the dead-letter topic in its own consumer group (so an interrupted replay resumes),
filters by provider, stage, error class and time, decodes the original value, matches it again and
sends only the conversions whose idempotency keys the dead letter names (a `dispatch` letter) or,
for a `decode`/`match` letter, every conversion of the event. Keys are derived from the order, so a
replayed conversion carries the same nonce / transaction id as the first attempt did.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TextIO

from confluent_kafka import Consumer, KafkaError, Message

from consumer.config import Config, ConfigError, load
from consumer.decoding import DecodeError, Decoder, make_decoder
from consumer.delivery import Dispatcher, Result, Status, each
from consumer.dlq import parse_headers
from consumer.matcher import MatchSettings, TooManyExposures, match
from consumer.metrics import Metrics
from consumer.model import Conversion
from consumer.providers.registry import modules
from consumer.source import consumer_config
from consumer.transport import TokenCache, Transport

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReplayFilter:
    providers: frozenset[str] = frozenset()
    stages: frozenset[str] = frozenset()
    error_classes: frozenset[str] = frozenset()
    since_ms: int | None = None
    until_ms: int | None = None

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
class ReplayStats:
    read: int = 0
    selected: int = 0
    skipped: int = 0
    undecodable: int = 0
    over_cap: int = 0  # still more exposures than [matcher] max_exposures
    outcomes: Counter[str] = field(default_factory=Counter)

    def summary(self) -> str:
        parts = ", ".join(f"{k} {v}" for k, v in sorted(self.outcomes.items())) or "nothing sent"
        over = f", {self.over_cap} still over max_exposures" if self.over_cap else ""
        return (f"read {self.read} dead letters, {self.selected} selected, {self.skipped} filtered out, "
                f"{self.undecodable} still undecodable{over}; conversions: {parts}")


async def replay(cfg: Config, flt: ReplayFilter, *, dry_run: bool, group_id: str | None = None,
                 idle_timeout: float = 5.0, out: TextIO | None = None) -> ReplayStats:
    """Replay the DLQ until it has been idle for `idle_timeout` seconds; commits as it goes."""
    stream = out or sys.stdout
    conf = consumer_config(cfg.kafka)
    conf.pop("statistics.interval.ms", None)
    conf["group.id"] = group_id or f"{cfg.kafka.group_id}.replay"
    # Stored as read, committed only after the batch's deliveries have their results (below).
    conf["enable.auto.offset.store"] = True
    consumer = Consumer(conf)
    assigned: list[bool] = []
    # The idle clock starts once the group has given us the partitions: a join can take seconds.
    consumer.subscribe([cfg.kafka.dlq_topic], on_assign=lambda _c, _p: assigned.append(True))
    decoder = make_decoder(cfg.decoding)
    settings = MatchSettings.from_config(cfg)
    stats = ReplayStats()
    transport = Transport.for_config(cfg)
    results: asyncio.Queue[tuple[Conversion, Result]] = asyncio.Queue()
    dispatcher = Dispatcher(modules(cfg), transport, TokenCache(transport, cfg.kameleoon.user_agent), Metrics(),
                            each(lambda _t, c, r: results.put_nowait((c, r))))
    last_message = time.monotonic()
    join_deadline = last_message + max(60.0, idle_timeout)
    try:
        while (not assigned and time.monotonic() < join_deadline) or time.monotonic() - last_message < idle_timeout:
            batch: list[Message] = consumer.consume(num_messages=200, timeout=0.2)
            if not assigned:
                last_message = time.monotonic()
            for msg in batch:
                err = msg.error()
                if err is not None:
                    if err.code() != KafkaError._PARTITION_EOF:
                        log.warning("replay consumer error: %s", err.str())
                    continue
                last_message = time.monotonic()
                stats.read += 1
                if stats.read % 1000 == 0:
                    print(f"  … {stats.summary()}", file=stream, flush=True)
                await _replay_one(msg, flt, decoder, settings, dispatcher, stats, dry_run, stream)
            if not dry_run and dispatcher.outstanding:
                await dispatcher.wait_idle()
            while not results.empty():
                conversion, result = results.get_nowait()
                stats.outcomes[f"{conversion.provider.slug} {result.status.value}"] += 1
                if result.status is Status.FAILED:
                    print(f"  still failing: {conversion.provider.slug} {conversion.project} key {conversion.key}: "
                          f"{result.outcome.reason}", file=stream)
            if batch and not dry_run:
                # Everything read so far is delivered (or failed again and reported): safe to resume after it.
                consumer.commit(asynchronous=False)
    finally:
        await dispatcher.close()
        await transport.close()
        await decoder.close()
        consumer.close()
    return stats


async def _replay_one(msg: Message, flt: ReplayFilter, decoder: Decoder, settings: MatchSettings,
                      dispatcher: Dispatcher, stats: ReplayStats, dry_run: bool, stream: TextIO) -> None:
    headers = parse_headers(msg.headers())
    if not flt.accepts(headers):
        stats.skipped += 1
        return
    try:
        purchase = await decoder.decode_async(msg.value())
    except DecodeError as exc:
        stats.undecodable += 1
        print(f"  offset {msg.offset()}: still undecodable ({exc.reason})", file=stream)
        return
    try:
        decision = match(purchase, settings, int(time.time() * 1000))
    except TooManyExposures as exc:  # still over the cap: raise [matcher] max_exposures to replay it
        stats.over_cap += 1
        print(f"  offset {msg.offset()}: still {exc.reason.value} ({exc})", file=stream)
        return
    chosen = select(decision.conversions, headers)
    stats.selected += 1
    for c in chosen:
        if dry_run:
            stats.outcomes[f"{c.provider.slug} would send"] += 1
            print(f"  would send {c.provider.slug} {c.project} goals {','.join(c.goals)} key {c.key} "
                  f"(event {purchase.event_id}, order {purchase.order_id})", file=stream)
        else:
            dispatcher.submit(c, None)


def run_replay(args: argparse.Namespace) -> int:
    from consumer import logs

    try:
        cfg = load(args.config)
    except ConfigError as exc:
        print(f"offline-conversions: {exc}", file=sys.stderr)
        return 2
    logs.setup(cfg.logging.level, cfg.logging.format, cfg.secrets())
    flt = ReplayFilter(
        providers=frozenset(p.lower() for p in args.provider or ()),
        stages=frozenset(args.stage or ()),
        error_classes=frozenset(args.error_class or ()),
        since_ms=args.since,
        until_ms=args.until,
    )
    stats = asyncio.run(replay(cfg, flt, dry_run=args.dry_run, group_id=args.group_id))
    print(("dry run: " if args.dry_run else "") + stats.summary())
    failed = sum(v for k, v in stats.outcomes.items() if k.endswith(Status.FAILED.value))
    return 1 if failed else 0

