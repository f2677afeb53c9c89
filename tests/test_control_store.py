"""The control store on a real broker: a pause written by one member reaches another, survives a restart, and a
resume lifts it everywhere; the record format and the topic checks."""

from __future__ import annotations

import uuid

import pytest
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, ConfigResource, ResourceType  # type: ignore[attr-defined]

from consumer.ops.control_store import (
    BadControlRecord,
    ControlStore,
    ControlStoreClosed,
    ControlTopicError,
    ControlTopicNotCompacted,
    PauseRecord,
    decode_pause,
    encode_pause,
    parse_key,
    pause_key,
)
from tests.conftest import Broker
from tests.reliability.harness import wait_for

Change = tuple[str, str, bool, str | None]


class Recorder:
    """An on_change that remembers every call."""

    def __init__(self) -> None:
        self.changes: list[Change] = []

    def __call__(self, provider: str, project: str, paused: bool, reason: str | None) -> None:
        self.changes.append((provider, project, paused, reason))


def store(broker: Broker, topic: str, on_change: Recorder, **kwargs: object) -> ControlStore:
    return ControlStore(topic, {"bootstrap.servers": broker.bootstrap}, on_change, timeout=20.0,
                        **kwargs)  # type: ignore[arg-type]


def topic_config(broker: Broker, topic: str) -> dict[str, str]:
    resource = ConfigResource(ResourceType.TOPIC, topic)
    admin = AdminClient({"bootstrap.servers": broker.bootstrap})  # kept alive until the answer is in
    described = admin.describe_configs([resource])[resource].result(20)
    return {k: v.value for k, v in described.items()}


# --------------------------------------------------------------------------- the format, no broker


def test_keys_name_the_provider_and_the_project() -> None:
    assert pause_key("conductrics", "ac/xxx") == b"pause/conductrics/ac/xxx"
    assert parse_key(b"pause/conductrics/ac/xxx") == ("conductrics", "ac/xxx")
    for other in (None, b"rewind/convert", b"pause/convert", b"pause//p", b"\xff\xfe"):
        assert parse_key(other) is None
    with pytest.raises(ValueError):
        pause_key("a/b", "p")


def test_records_round_trip_and_a_resume_is_none() -> None:
    rec = PauseRecord("kameleoon", "site1", "maintenance", 1_764_000_000_000, "api")
    assert decode_pause("kameleoon", "site1", encode_pause(rec)) == rec
    assert decode_pause("kameleoon", "site1", None) is None
    assert decode_pause("kameleoon", "site1", b'{"paused": false}') is None
    for bad in (b"nope", b"[]", b'{"paused": "yes"}', b'{"paused": true, "at": "noon"}',
                b'{"paused": true, "at": 1, "reason": 3}'):
        with pytest.raises(BadControlRecord):
            decode_pause("kameleoon", "site1", bad)


# --------------------------------------------------------------------------- on the broker


async def test_a_pause_reaches_every_member_survives_restarts_and_a_resume_lifts_it(broker: Broker) -> None:
    topic = f"oc-{uuid.uuid4().hex[:8]}.control"
    seen_a, seen_b = Recorder(), Recorder()
    a, b = store(broker, topic, seen_a), store(broker, topic, seen_b)
    await a.start()  # creates the topic
    await b.start()
    try:
        assert topic_config(broker, topic)["cleanup.policy"] == "compact"
        assert a.paused() == {} and seen_a.changes == [] and seen_b.changes == []

        record = await a.pause("convert", "1111_2222", "provider maintenance until 14:00")
        # Acknowledged and read back by the writer before pause() returns.
        assert a.paused() == {("convert", "1111_2222"): record}
        assert seen_a.changes == [("convert", "1111_2222", True, "provider maintenance until 14:00")]
        await wait_for(lambda: bool(seen_b.changes), 20, "the other member to see the pause")
        assert seen_b.changes == seen_a.changes
        assert b.paused() == a.paused()
        assert record.by == "api" and record.at > 0

        await b.pause("kameleoon", "site1", None)
        await wait_for(lambda: len(seen_a.changes) == 2, 20, "the first member to see the second pause")
        assert seen_a.changes[1] == ("kameleoon", "site1", True, None)
    finally:
        await a.close()
        await b.close()

    # A new member (a restart) reads the topic from the start and reports what still stands.
    seen_c = Recorder()
    c = store(broker, topic, seen_c)
    await c.start()
    try:
        assert sorted(seen_c.changes) == [("convert", "1111_2222", True, "provider maintenance until 14:00"),
                                          ("kameleoon", "site1", True, None)]
        assert set(c.paused()) == {("convert", "1111_2222"), ("kameleoon", "site1")}
        await c.resume("convert", "1111_2222")
        assert set(c.paused()) == {("kameleoon", "site1")}
        assert seen_c.changes[-1] == ("convert", "1111_2222", False, None)
        # A resume of a project the store has no pause for is still reported: it lifts a member's own pause.
        await c.resume("conductrics", "ac-xxx")
        assert seen_c.changes[-1] == ("conductrics", "ac-xxx", False, None)
    finally:
        await c.close()

    # The resume is a tombstone: after another restart only the Kameleoon pause stands, and nothing is
    # reported for the resumed ones.
    seen_d = Recorder()
    d = store(broker, topic, seen_d)
    await d.start()
    try:
        assert seen_d.changes == [("kameleoon", "site1", True, None)]
    finally:
        await d.close()
    with pytest.raises(ControlStoreClosed):
        await d.pause("kameleoon", "site1")


async def test_records_it_cannot_read_are_skipped_not_fatal(broker: Broker) -> None:
    topic = f"oc-{uuid.uuid4().hex[:8]}.control"
    broker.create_topics([topic], partitions=1)
    p = Producer({"bootstrap.servers": broker.bootstrap})
    p.produce(topic, key=b"pause/convert/1111_2222", value=b"{broken")
    p.produce(topic, key=b"something/else", value=b"{}")
    p.produce(topic, key=b"pause/kameleoon/site1", value=b'{"paused":true,"reason":"r","at":5,"by":"api"}')
    assert p.flush(20) == 0
    seen = Recorder()
    s = store(broker, topic, seen)
    with pytest.raises(ControlTopicNotCompacted, match=r"cleanup\.policy is 'delete'"):
        await s.start()
    await set_policy(broker, topic, "compact,delete")
    with pytest.raises(ControlTopicNotCompacted, match=r"cleanup\.policy is 'compact,delete'"):
        await store(broker, topic, seen).start()
    await set_policy(broker, topic, "compact")
    s = store(broker, topic, seen)
    await s.start()
    try:
        assert seen.changes == [("kameleoon", "site1", True, "r")]
        assert s.skipped == 1
    finally:
        await s.close()


async def set_policy(broker: Broker, topic: str, policy: str) -> None:
    from confluent_kafka.admin import AlterConfigOpType, ConfigEntry  # type: ignore[attr-defined]

    entry = ConfigEntry("cleanup.policy", policy, incremental_operation=AlterConfigOpType.SET)
    admin = AdminClient({"bootstrap.servers": broker.bootstrap})
    for f in admin.incremental_alter_configs([ConfigResource(ResourceType.TOPIC, topic,
                                                             incremental_configs=[entry])]).values():
        f.result(20)
    await wait_for(lambda: topic_config(broker, topic)["cleanup.policy"] == policy, 20, f"cleanup.policy {policy}")


async def test_an_unreachable_topic_is_a_clear_error(broker: Broker) -> None:
    # A name the broker refuses to create: the error names the topic and says what to do.
    s = store(broker, "bad name with spaces", Recorder())
    with pytest.raises(ControlTopicError, match="control topic 'bad name with spaces'"):
        await s.start()


async def test_offsets_without_a_record_at_the_end_do_not_hold_up_the_start(broker: Broker) -> None:
    # A transaction's commit marker takes the last offset and is never returned to a reader, as the offset
    # of a tombstone the cleaner deleted is not: the bounded read must end at the position, not at a record.
    topic = f"oc-{uuid.uuid4().hex[:8]}.control"
    broker.create_topics([topic], partitions=1, config={"cleanup.policy": "compact"})
    p = Producer({"bootstrap.servers": broker.bootstrap, "transactional.id": f"tx-{topic}"})
    p.init_transactions(20)
    p.begin_transaction()
    p.produce(topic, key=b"pause/convert/1111_2222", value=b'{"paused":true,"reason":"r","at":5,"by":"api"}')
    p.commit_transaction(20)
    seen = Recorder()
    s = ControlStore(topic, {"bootstrap.servers": broker.bootstrap}, seen, timeout=5.0)
    await s.start()  # with the last offset read as the end, this would time out after 5 s
    try:
        assert seen.changes == [("convert", "1111_2222", True, "r")]
    finally:
        await s.close()
