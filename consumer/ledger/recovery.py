"""What a provider pipeline delivered since a partition's committed offset: a bounded read of its ledger partition.

On assignment of source partition p, committed at offset O with metadata L (consumer/ledger/marks.py),
recovery reads ledger partition p from L to its end as of now, and collects the keys of this pipeline's
final records (delivered, not accepted, dead-lettered) for events of p at offsets >= O: those are not
sent again. The read is bounded: from L, or without metadata (a first start, an upgrade from a version
without the ledger) from `fallback` seconds ago (offsets_for_times), and never more than `max_records`.

The Kafka reads block; `recover` runs them in a thread, so the event loop goes on meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import Consumer, KafkaException, TopicPartition

from consumer.ledger.marks import decode_metadata
from consumer.ledger.record import LedgerDecodeError, decode
from consumer.logs import KafkaLog

log = logging.getLogger(__name__)


class RecoveryError(RuntimeError):
    """Recovery could not read the ledger partition to its end in time: the partition must not be consumed yet."""


@dataclass(slots=True)
class Recovered:
    """What one partition's recovery found."""

    partition: int
    keys: set[str] = field(default_factory=set)
    # (source offset, ledger offset) of each final record found, in ledger order: LedgerMarks.assign takes them.
    marks: list[tuple[int, int]] = field(default_factory=list)
    start: int = 0  # the first ledger offset read
    end: int = 0  # the ledger's end offset when recovery began (exclusive)
    read: int = 0  # records read
    undecodable: int = 0
    fallback: str | None = None  # "no_metadata" or "cut" (max_records reached), else None


@dataclass(frozen=True, slots=True)
class RecoverySettings:
    fallback: float = 3600.0  # seconds read back when a commit carries no ledger offset
    max_records: int = 1_000_000
    timeout: float = 60.0


def recover_blocking(consumer: Consumer, ledger_topic: str, source_topic: str, group: str, partition: int,
                     committed: int, metadata: str | None, settings: RecoverySettings,
                     now_ms: Callable[[], int] = lambda: int(time.time() * 1000)) -> Recovered:
    """`Recovery.recover`'s work, on the calling thread (a `Consumer` that is not a group member)."""
    out = Recovered(partition)
    low, high = consumer.get_watermark_offsets(TopicPartition(ledger_topic, partition), timeout=settings.timeout)
    out.end = high
    start = decode_metadata(metadata)
    if start is None:
        out.fallback = "no_metadata"
        found = consumer.offsets_for_times(
            [TopicPartition(ledger_topic, partition, now_ms() - int(settings.fallback * 1000))],
            timeout=settings.timeout)
        start = found[0].offset if found and found[0].offset >= 0 else high
    start = max(start, low)
    if high - start > settings.max_records:
        start, out.fallback = high - settings.max_records, "cut"
    out.start = start
    if start >= high:
        return out
    tp = TopicPartition(ledger_topic, partition, start)
    consumer.assign([tp])
    deadline = time.monotonic() + settings.timeout
    keys, marks = out.keys, out.marks
    try:
        while True:
            for msg in consumer.consume(1000, 0.2):
                if msg.error() is not None:
                    continue
                offset = msg.offset()
                if offset is None or offset >= high:
                    continue
                out.read += 1
                value = msg.value()
                if value is None:  # a tombstone (`forget`): the key is no longer known
                    raw = msg.key()
                    if raw is not None:
                        keys.discard(raw.decode("utf-8", "replace"))
                    continue
                try:
                    rec = decode(value)
                except LedgerDecodeError:
                    out.undecodable += 1
                    continue
                if (rec.group == group and rec.source_partition == partition and rec.source_offset >= committed
                        and rec.outcome.final and rec.source_topic == source_topic):
                    keys.add(rec.key)
                    marks.append((rec.source_offset, offset))
            position = consumer.position([TopicPartition(ledger_topic, partition)])[0].offset
            if position >= high:
                return out
            if time.monotonic() > deadline:
                raise RecoveryError(f"{ledger_topic}[{partition}]: read {out.read} records from {start} in "
                                    f"{settings.timeout:.0f}s without reaching {high}")
    finally:
        consumer.unassign()


class Recovery:
    """One pipeline's recovery reader (a consumer outside any group); `recover` is safe to call per partition."""

    def __init__(self, kafka_settings: dict[str, Any], ledger_topic: str, source_topic: str, group: str,
                 settings: RecoverySettings) -> None:
        conf: dict[str, Any] = {
            **kafka_settings,
            # Never joins the group nor commits: assign() only. librdkafka wants a group.id all the same.
            "group.id": f"{group}.ledger-recovery-{uuid.uuid4().hex[:8]}",
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "enable.partition.eof": False,
            "auto.offset.reset": "earliest",
            "logger": KafkaLog(),
        }
        self.ledger_topic = ledger_topic
        self.source_topic = source_topic
        self.group = group
        self.settings = settings
        self._conf = conf
        self._lock = asyncio.Lock()  # one consumer: one partition at a time
        self._consumer: Consumer | None = None

    async def recover(self, partition: int, committed_offset: int, metadata: str | None) -> Recovered:
        """The keys this pipeline finished for events of `partition` at offsets >= `committed_offset`."""
        loop = asyncio.get_running_loop()
        async with self._lock:
            if self._consumer is None:
                self._consumer = Consumer(self._conf)
            consumer = self._consumer
            try:
                return await loop.run_in_executor(
                    None, recover_blocking, consumer, self.ledger_topic, self.source_topic, self.group, partition,
                    committed_offset, metadata, self.settings)
            except KafkaException as exc:
                raise RecoveryError(f"{self.ledger_topic}[{partition}]: {exc}") from None

    def close(self) -> None:
        if self._consumer is not None:
            self._consumer.close()
            self._consumer = None


def end_offsets(consumer: Consumer, topic: str, partitions: list[int], timeout: float = 10.0) -> dict[int, int]:
    """Each partition's end offset (high watermark); blocking."""
    out: dict[int, int] = {}
    for p in partitions:
        _, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=timeout)
        out[p] = high
    return out

