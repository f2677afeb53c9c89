"""The ledger on Apache Kafka: writes land in the source's partition, recovery is bounded by commit metadata."""

from __future__ import annotations

import uuid
from decimal import Decimal

import pytest
from confluent_kafka import Consumer, TopicPartition

from consumer.config import parse
from consumer.demo import sample_config
from consumer.ledger import topic as ledger_topic
from consumer.ledger.marks import encode_metadata
from consumer.ledger.pipeline import PipelineLedger, committed_with_metadata
from consumer.ledger.record import LedgerRecord, Outcome, decode
from consumer.ledger.recovery import Recovery, RecoverySettings
from consumer.ledger.writer import LedgerWriter
from consumer.metrics import Metrics
from tests.conftest import Broker

GROUP = "oc.convert"


def record(key: str, partition: int, offset: int, outcome: Outcome = Outcome.DELIVERED, group: str = GROUP,
           source: str = "purchases") -> LedgerRecord:
    return LedgerRecord(key=key, outcome=outcome, provider="convert", order_id=f"ORD-{offset}", project="1111_2222",
                        group=group, goals=("g1",), revenue=Decimal("10.00"), currency="EUR", visitor_id="v",
                        source_topic=source, source_partition=partition, source_offset=offset, time=1)


def names(broker: Broker) -> tuple[str, str]:
    suffix = uuid.uuid4().hex[:8]
    src, led = f"purchases-{suffix}", f"purchases-{suffix}.ledger"
    broker.create_topics([src, led], partitions=3)
    return src, led


def reader(broker: Broker) -> Consumer:
    return Consumer({"bootstrap.servers": broker.bootstrap, "group.id": f"r-{uuid.uuid4().hex[:6]}",
                     "enable.auto.commit": False})


async def test_records_go_to_their_source_partition_and_resolve_when_acked(broker: Broker) -> None:
    _src, led = names(broker)
    metrics = Metrics()
    writer = LedgerWriter(led, {"bootstrap.servers": broker.bootstrap}, 10.0, metrics)
    writer.start()
    try:
        acks = await writer.write([record("k0", 0, 5), record("k2a", 2, 7), record("k2b", 2, 8)])
    finally:
        writer.close()
    assert [p for p, _ in acks] == [0, 2, 2]
    assert acks[2][1] == acks[1][1] + 1
    c = reader(broker)
    try:
        c.assign([TopicPartition(led, 2, acks[1][1])])
        msgs = [m for m in c.consume(2, 10) if m.error() is None]
    finally:
        c.close()
    assert [(m.key(), decode(m.value()).source_offset) for m in msgs] == [(b"k2a", 7), (b"k2b", 8)]
    assert writer.pending == 0 and writer.failed is None


async def test_a_write_to_a_partition_the_ledger_lacks_fails_typed_and_counted(broker: Broker) -> None:
    from consumer.ledger.writer import LedgerWriteError

    _src, led = names(broker)
    metrics = Metrics()
    writer = LedgerWriter(led, {"bootstrap.servers": broker.bootstrap}, 3.0, metrics)
    writer.start()
    try:
        with pytest.raises(LedgerWriteError) as caught:
            await writer.write([record("k", 7, 1)])  # the ledger has 3 partitions
    finally:
        writer.close()
    assert writer.failed is caught.value
    assert metrics.ledger_write_failures.labels(caught.value.code)._value.get() == 1


async def test_recovery_reads_from_the_metadata_and_keeps_only_this_pipelines_final_records(broker: Broker) -> None:
    _src, led = names(broker)
    writer = LedgerWriter(led, {"bootstrap.servers": broker.bootstrap}, 10.0)
    writer.start()
    try:
        before = await writer.write([record("old", 1, 3)])  # below the metadata's offset: not read
        acks = await writer.write([
            record("below", 1, 9),  # source offset below the committed one: committed, never re-read
            record("mine", 1, 10),
            record("skip", 1, 11, Outcome.SKIPPED_DUPLICATE),  # not final
            record("other-group", 1, 12, group="oc.kameleoon"),
            record("other-topic", 1, 12, source="elsewhere"),
            record("refused", 1, 13, Outcome.NOT_ACCEPTED),
            record("dead", 1, 14, Outcome.DEAD_LETTERED),
        ])
    finally:
        writer.close()
    recovery = Recovery({"bootstrap.servers": broker.bootstrap}, led, "purchases", GROUP, RecoverySettings(timeout=20))
    try:
        found = await recovery.recover(1, 10, encode_metadata(acks[0][1]))
        assert found.keys == {"mine", "refused", "dead"}
        assert found.start == acks[0][1] == before[0][1] + 1
        assert found.read == 7 and found.fallback is None
        assert found.marks == [(10, acks[1][1]), (13, acks[5][1]), (14, acks[6][1])]
        nothing = await recovery.recover(0, 0, encode_metadata(0))  # an empty partition
        assert nothing.keys == set() and nothing.read == 0
    finally:
        recovery.close()


async def test_without_metadata_recovery_reads_the_fallback_window_and_says_so(broker: Broker) -> None:
    _src, led = names(broker)
    writer = LedgerWriter(led, {"bootstrap.servers": broker.bootstrap}, 10.0)
    writer.start()
    try:
        await writer.write([record(f"k{i}", 2, i) for i in range(5)])
    finally:
        writer.close()
    window = Recovery({"bootstrap.servers": broker.bootstrap}, led, "purchases", GROUP, RecoverySettings(fallback=3600))
    cut = Recovery({"bootstrap.servers": broker.bootstrap}, led, "purchases", GROUP, RecoverySettings(max_records=2))
    try:
        found = await window.recover(2, 0, None)
        assert found.keys == {f"k{i}" for i in range(5)} and found.fallback == "no_metadata"
        capped = await cut.recover(2, 0, encode_metadata(0))
        assert capped.keys == {"k3", "k4"} and capped.fallback == "cut" and capped.read == 2
    finally:
        window.close()
        cut.close()


async def test_a_tombstone_forgets_a_key(broker: Broker) -> None:
    from confluent_kafka import Producer

    _src, led = names(broker)
    writer = LedgerWriter(led, {"bootstrap.servers": broker.bootstrap}, 10.0)
    writer.start()
    try:
        await writer.write([record("gone", 0, 1), record("kept", 0, 2)])
    finally:
        writer.close()
    p = Producer({"bootstrap.servers": broker.bootstrap})
    p.produce(led, key=b"gone", value=None, partition=0)
    assert p.flush(10) == 0
    recovery = Recovery({"bootstrap.servers": broker.bootstrap}, led, "purchases", GROUP, RecoverySettings())
    try:
        assert (await recovery.recover(0, 0, encode_metadata(0))).keys == {"kept"}
    finally:
        recovery.close()


async def test_the_pipeline_surface_commits_metadata_and_recovers_after_a_crash(broker: Broker) -> None:
    """Write, commit with metadata, 'crash' (a new PipelineLedger), recover: exactly the uncommitted keys."""
    src, led = names(broker)
    cfg = parse({**sample_config(broker.bootstrap, src, src + ".dlq", GROUP, "http://127.0.0.1:1"),
                 "ledger": {"topic": led}}, env={})
    metrics = Metrics()
    writer = LedgerWriter(led, {"bootstrap.servers": broker.bootstrap}, 10.0, metrics)
    writer.start()
    first = PipelineLedger(cfg, writer, GROUP, None, metrics)
    try:
        await first.recover(0, -1001, None)
        import asyncio

        async def write(recs: list[LedgerRecord]) -> None:
            done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            first.write(recs, lambda err: done.set_exception(err) if err else done.set_result(None))
            await done

        # Event 1 finishes after event 2; then 0..1 are committed: the metadata must still cover event 2.
        await write([record("e2", 0, 2, source=src)])
        await write([record("e0", 0, 0, source=src)])
        await write([record("e1", 0, 1, source=src)])
        meta = first.commit_metadata(0, 2)
        c = Consumer({"bootstrap.servers": broker.bootstrap, "group.id": GROUP + uuid.uuid4().hex[:4],
                      "enable.auto.commit": False})
        try:
            c.commit(offsets=[TopicPartition(src, 0, 2, metadata=meta)], asynchronous=False)
            committed = committed_with_metadata(c, src, [0])
        finally:
            c.close()
        assert committed[0] == (2, meta)
        second = PipelineLedger(cfg, writer, GROUP, None, metrics)
        found = await second.recover(0, *committed[0])
        assert found.keys == {"e2"}
        assert second.already_done(0, "e2") and not second.already_done(0, "e1") and not second.already_done(1, "e2")
        assert metrics.ledger_recovered_keys.labels("all")._value.get() == 1
        assert metrics.ledger_records.labels("convert", "delivered")._value.get() == 3
        second.revoked([0])
        assert not second.already_done(0, "e2")
        second.close()
    finally:
        first.close()
        writer.close()


def test_the_topic_is_created_like_the_source_and_a_mismatch_fails_naming_the_key(broker: Broker) -> None:
    suffix = uuid.uuid4().hex[:8]
    src = f"purchases-{suffix}"
    broker.create_topics([src], partitions=3)
    cfg = parse(sample_config(broker.bootstrap, src, src + ".dlq", GROUP, "http://127.0.0.1:1"), env={})
    assert cfg.ledger.topic == src + ".ledger"
    assert ledger_topic.ensure(cfg) == 3
    assert ledger_topic.ensure(cfg) == 3  # the second start finds it
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": broker.bootstrap})
    assert ledger_topic._cleanup_policy(admin, src + ".ledger", 10) == "compact"
    broker.create_topics([f"{src}.other"], partitions=2)
    bad = parse({**sample_config(broker.bootstrap, src, src + ".dlq", GROUP, "http://127.0.0.1:1"),
                 "ledger": {"topic": f"{src}.other"}}, env={})
    with pytest.raises(ledger_topic.LedgerTopicError) as caught:
        ledger_topic.ensure(bad)
    assert caught.value.key == "ledger.topic" and "2 partitions" in str(caught.value)
    missing = parse({**sample_config(broker.bootstrap, src, src + ".dlq", GROUP, "http://127.0.0.1:1"),
                     "ledger": {"topic": f"{src}.none", "create": False}}, env={})
    with pytest.raises(ledger_topic.LedgerTopicError, match="create = false"):
        ledger_topic.ensure(missing)


async def test_a_scan_reads_every_partition_with_tombstones(broker: Broker) -> None:
    from confluent_kafka import Producer

    from consumer.ledger.read import scan

    _src, led = names(broker)
    writer = LedgerWriter(led, {"bootstrap.servers": broker.bootstrap}, 10.0)
    writer.start()
    try:
        await writer.write([record("a", 0, 1), record("b", 1, 1), record("c", 2, 1)])
    finally:
        writer.close()
    p = Producer({"bootstrap.servers": broker.bootstrap})
    p.produce(led, key=b"b", value=None, partition=1)
    assert p.flush(10) == 0
    seen = [(k, r.order_id if r else None) for k, r in scan({"bootstrap.servers": broker.bootstrap}, led, 20)]
    assert seen == [("a", "ORD-1"), ("b", "ORD-1"), ("b", None), ("c", "ORD-1")]


async def test_forget_tombstones_a_persons_records_only(broker: Broker) -> None:
    from consumer.ledger.forget import matching, tombstones
    from consumer.ledger.read import scan
    from consumer.ledger.record import customer_hash

    _src, led = names(broker)
    writer = LedgerWriter(led, {"bootstrap.servers": broker.bootstrap}, 10.0)
    writer.start()
    mine = record("m1", 1, 1)
    mine.customer_hash = customer_hash("cust-1")
    theirs = record("t1", 2, 1)
    theirs.customer_hash = customer_hash("cust-2")
    try:
        await writer.write([mine, theirs])
    finally:
        writer.close()
    settings = {"bootstrap.servers": broker.bootstrap}
    keys = matching(scan(settings, led, 20), customer_id="cust-1")
    assert keys == {"m1": 1}
    assert tombstones(settings, led, keys) == 1
    assert matching(scan(settings, led, 20), customer_id="cust-1") == {}
    assert matching(scan(settings, led, 20), customer_id="cust-2") == {"t1": 2}
