"""PipelineLedger: the surface one provider pipeline calls: record results, recover on assignment, commit metadata.

The order a pipeline follows (docs/operations.md, "The ledger"):

1. Assigned partitions: pause them; read their committed offsets *with metadata*
   (`committed_with_metadata`); `await recover(...)`; resume. Until then nothing of them is consumed.
2. Per conversion to submit: `if ledger.already_done(partition, key)`: count it skipped, send nothing.
3. Per provider answer: `records = [ledger.conversion_record(...)]`, then `ledger.write(records, done)`;
   the events are finished in `done` only (error None). A LedgerWriteError is fatal, like a DLQ failure.
   An event with nothing to send: `ledger.unattributed_records(...)` written the same way.
4. Per commit of offset O of partition p: `TopicPartition(topic, p, O, metadata=ledger.commit_metadata(p, O))`.
5. Revoked or lost: `ledger.revoked(partitions)` after the final commit.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from confluent_kafka import Consumer, TopicPartition

from consumer.config import Config
from consumer.ledger.marks import LedgerMarks
from consumer.ledger.record import LedgerRecord, Origin, Outcome, for_conversion, for_unattributed
from consumer.ledger.recovery import Recovered, Recovery, RecoverySettings
from consumer.ledger.writer import Acks, LedgerWriteError, LedgerWriter
from consumer.metrics import Metrics
from consumer.model import Conversion, Decision, Provider, Purchase

log = logging.getLogger(__name__)


def committed_with_metadata(consumer: Consumer, topic: str, partitions: Iterable[int],
                            timeout: float = 10.0) -> dict[int, tuple[int, str | None]]:
    """Each partition's committed offset and its metadata (offset < 0: none committed). Blocking."""
    answered = consumer.committed([TopicPartition(topic, p) for p in partitions], timeout=timeout)
    return {tp.partition: (tp.offset, tp.metadata or None) for tp in answered}


class PipelineLedger:
    """One provider pipeline's ledger: its marks, its recovered keys, its writes through the shared writer."""

    def __init__(self, cfg: Config, writer: LedgerWriter, group: str, provider: Provider | None,
                 metrics: Metrics, kafka_settings: dict[str, Any] | None = None,
                 clock_ms: Callable[[], int] = lambda: int(time.time() * 1000)) -> None:
        led = cfg.ledger
        self.cfg = cfg
        self.writer = writer
        self.group = group
        self.provider = provider
        self.slug = provider.slug if provider is not None else ""
        self.metrics = metrics
        self.clock_ms = clock_ms
        self.marks = LedgerMarks()
        self.recovered: dict[int, set[str]] = {}
        self._currencies = {(p, proj): r.currency for (p, proj), r in cfg.rules().items()}
        settings = kafka_settings or {**cfg.kafka.common, "bootstrap.servers": cfg.kafka.bootstrap_servers}
        self.recovery = Recovery(settings, led.topic, cfg.kafka.topic, group, RecoverySettings(
            fallback=led.recovery_fallback, max_records=led.max_recovery_records, timeout=led.recovery_timeout))

    # ------------------------------------------------------------------ 1, 5: assignment

    async def recover(self, partition: int, committed: int, metadata: str | None) -> Recovered:
        """Step 1 for one partition: what was finished since `committed` is remembered, marks start."""
        started = time.monotonic()
        found = await self.recovery.recover(partition, max(committed, 0), metadata)
        self.recovered[partition] = found.keys
        self.marks.assign(partition, found.end, found.marks)
        labels = self.slug or "all"
        self.metrics.ledger_recovery_records.labels(labels).inc(found.read)
        self.metrics.ledger_recovered_keys.labels(labels).inc(len(found.keys))
        self.metrics.ledger_recovery_seconds.labels(labels).observe(time.monotonic() - started)
        if found.fallback is not None:
            self.metrics.ledger_recovery_fallbacks.labels(labels, found.fallback).inc()
        log.info("ledger recovered", extra={
            "group": self.group, "partition": partition, "committed": committed, "ledger_from": found.start,
            "ledger_to": found.end, "read": found.read, "keys": len(found.keys), "fallback": found.fallback})
        return found

    def revoked(self, partitions: Iterable[int]) -> None:
        """Step 5: forget their marks and recovered keys (the next owner recovers from the commit)."""
        for p in partitions:
            self.marks.drop(p)
            self.recovered.pop(p, None)

    # ------------------------------------------------------------------ 2

    def already_done(self, partition: int, key: str) -> bool:
        """Finished before the crash or rebalance (recovery found it): not to be sent again."""
        keys = self.recovered.get(partition)
        return keys is not None and key in keys

    # ------------------------------------------------------------------ 3

    def origin(self, topic: str, partition: int, offset: int) -> Origin:
        return Origin(self.group, topic, partition, offset)

    def conversion_record(self, conversion: Conversion, outcome: Outcome, origin: Origin, purchase: Purchase | None,
                          *, attempts: int = 0, http_status: int | None = None,
                          reason: str | None = None) -> LedgerRecord:
        currency = self._currencies.get((conversion.provider, conversion.project))
        if not currency:
            currency = purchase.currency if purchase is not None else None
        return for_conversion(conversion, outcome, origin, now_ms=self.clock_ms(), currency=currency,
                              customer=purchase.customer_id if purchase is not None else None,
                              attempts=attempts, http_status=http_status, reason=reason)

    def unattributed_records(self, purchase: Purchase, decision: Decision, origin: Origin) -> list[LedgerRecord]:
        """Empty unless `[ledger] unattributed`; `decision` must be a listing one (match without counts)."""
        if not self.cfg.ledger.unattributed:
            return []
        return for_unattributed(purchase, decision, origin, provider=self.slug, now_ms=self.clock_ms())

    def write(self, records: Sequence[LedgerRecord], done: Callable[[LedgerWriteError | None], None]) -> None:
        """Step 3: produce; marks learn each acknowledged offset; `done` runs when all are acknowledged."""
        marks, counted = self.marks, self.metrics.ledger_records

        def acked(err: LedgerWriteError | None, acks: Acks) -> None:
            if err is None:
                for rec, (_partition, offset) in zip(records, acks, strict=True):
                    marks.acked(rec.source_partition, rec.source_offset, offset)
                by: dict[tuple[str, str], int] = {}
                for rec in records:
                    k = (rec.provider or "none", rec.outcome.value)
                    by[k] = by.get(k, 0) + 1
                for (p, o), n in by.items():
                    counted.labels(p, o).inc(n)
            self.metrics.ledger_pending.set(self.writer.pending)
            done(err)

        self.writer.submit(records, acked)

    # ------------------------------------------------------------------ 4

    def commit_metadata(self, partition: int, offset: int) -> str | None:
        """Step 4: the metadata to commit `offset` of `partition` with (None: not ours, commit without)."""
        return self.marks.metadata(partition, offset)

    def close(self) -> None:
        self.recovery.close()
