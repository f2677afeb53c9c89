"""Produces sample purchases to a topic (the `produce` command, demo, tests, benchmarks)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable

from confluent_kafka import KafkaError, Message, Producer

from consumer.config import DEFAULT_SCHEMA
from consumer.decoding import encode_confluent, encode_raw, load_schema
from consumer.logs import KafkaLog
from consumer.model import Purchase
from consumer.samples import malformed as malformed_values
from consumer.samples import purchases
from consumer.schema_registry import SchemaRegistry

SUBJECT_SUFFIX = "-value"


class ProduceError(RuntimeError):
    pass


class Tally:
    """Delivery reports of a producer run: the last offset per partition (the end the consumer must reach)."""

    def __init__(self) -> None:
        self.delivered = 0
        self.errors: list[str] = []
        self.last_offset: dict[int, int] = {}

    def __call__(self, err: KafkaError | None, msg: Message) -> None:
        if err is not None:
            self.errors.append(err.str())
            return
        self.delivered += 1
        partition, offset = msg.partition(), msg.offset()
        if partition is not None and offset is not None:
            self.last_offset[partition] = max(offset, self.last_offset.get(partition, -1))


def produce_values(bootstrap: str, topic: str, values: Iterable[tuple[bytes | None, bytes]],
                   rate: float = 0.0) -> Tally:
    """Produce (key, value) pairs with an idempotent producer; fails if any delivery fails."""
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True, "linger.ms": 20,
                         "queue.buffering.max.messages": 1_000_000, "logger": KafkaLog()})
    tally = Tally()
    items = iter(values)
    if rate > 0:
        # A paced stream's timestamps are read downstream as event-to-delivery latency. A cold idempotent
        # producer holds its first records until it has a connection and a producer id (0.5 s when that
        # takes a retry on the embedded broker), and would release them in one burst counted as the
        # consumer's delay; a real upstream producer is warm. So the first record goes alone, and the
        # pacing starts once it is delivered (that record keeps its own, honest, delay).
        for first in items:
            producer.produce(topic, value=first[1], key=first[0], on_delivery=tally)
            producer.flush(30)
            break
    started = time.monotonic()
    for n, (key, value) in enumerate(items, 1):
        while True:
            try:
                producer.produce(topic, value=value, key=key, on_delivery=tally)
                break
            except BufferError:
                producer.poll(0.05)
        if rate > 0:
            ahead = n / rate - (time.monotonic() - started)
            if ahead > 0:
                producer.poll(ahead)
        elif n % 10_000 == 0:
            producer.poll(0)
    remaining = producer.flush(60)
    if remaining or tally.errors:
        raise ProduceError(f"{remaining} undelivered, errors: {tally.errors[:3]}")
    return tally


def register_schema(registry_url: str, subject: str, schema_str: str) -> int:
    """Register a schema from synchronous code (the `produce` command); returns its id."""

    async def register() -> int:
        registry = SchemaRegistry(registry_url)
        try:
            return await registry.register(subject, schema_str)
        finally:
            await registry.close()

    return asyncio.run(register())


def encoded(items: Iterable[Purchase], fmt: str = "avro", registry_url: str = "",
            topic: str = "") -> Iterable[tuple[bytes | None, bytes]]:
    schema = load_schema(DEFAULT_SCHEMA)
    if fmt == "confluent":
        schema_id = register_schema(registry_url, topic + SUBJECT_SUFFIX, DEFAULT_SCHEMA.read_text())
        for p in items:
            yield p.order_id.encode(), encode_confluent(p, schema_id, schema)
    else:
        for p in items:
            yield p.order_id.encode(), encode_raw(p, schema)


def produce_samples(bootstrap: str, topic: str, count: int, *, rate: float = 0.0, fmt: str = "avro",
                    registry_url: str = "", malformed: int = 0, seed: int = 7) -> int:
    now = int(time.time() * 1000)
    values = list(encoded(purchases(count, now_ms=now, seed=seed), fmt, registry_url, topic))
    values += [(b"malformed", v) for v in malformed_values(malformed, seed)]
    return produce_values(bootstrap, topic, values, rate).delivered
