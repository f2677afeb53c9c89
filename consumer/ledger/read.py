"""Reading the whole ledger topic once (the command-line tools): every partition from its start to its end now.

There is no index by order id: `ledger show` scans. At the ~50,000 records/s one consumer decodes, a
million records take about 20 s; upstream keying by order id does not help (the ledger is partitioned
like the source, not by order).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

from confluent_kafka import Consumer, TopicPartition

from consumer.ledger.record import LedgerDecodeError, LedgerRecord, decode
from consumer.logs import KafkaLog


def scan(settings: dict[str, Any], topic: str, timeout: float = 60.0) -> Iterator[tuple[str, LedgerRecord | None]]:
    """(key, record or None for a tombstone) of every record, partition by partition; undecodable ones skipped."""
    c = Consumer({**settings, "group.id": f"ledger-read-{uuid.uuid4().hex[:8]}", "enable.auto.commit": False,
                  "auto.offset.reset": "earliest", "logger": KafkaLog()})
    try:
        md = c.list_topics(topic=topic, timeout=timeout).topics.get(topic)
        if md is None or md.error is not None:
            raise LookupError(f"ledger topic {topic!r} not found")
        for p in sorted(md.partitions):
            low, high = c.get_watermark_offsets(TopicPartition(topic, p), timeout=timeout)
            if high <= low:
                continue
            c.assign([TopicPartition(topic, p, low)])
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                for m in c.consume(1000, 0.2):
                    if m.error() is not None or (m.offset() or 0) >= high:
                        continue
                    key = (m.key() or b"").decode("utf-8", "replace")
                    value = m.value()
                    if value is None:
                        yield key, None
                        continue
                    try:
                        yield key, decode(value)
                    except LedgerDecodeError:
                        continue
                if c.position([TopicPartition(topic, p)])[0].offset >= high:
                    break
            c.unassign()
    finally:
        c.close()
