"""On Apache Kafka: `offline-conversions rewind` plans the offsets Kafka's own `kafka-consumer-groups.sh
--reset-offsets --to-datetime` does (the command docs/operations.md gives), and a KIP-848 member blocks it too."""

from __future__ import annotations

import io
import shlex
import time
import uuid
from pathlib import Path

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from consumer.apache_kafka import ApacheKafka, run_java
from consumer.config import Config, parse
from consumer.model import Provider
from consumer.ops.rewind import GroupActive, RewindRefused, group_for, iso, rewind
from tests.conftest import committed, config_dict

DOCS = Path(__file__).resolve().parents[2] / "docs" / "operations.md"
GROUPS_TOOL = "org.apache.kafka.tools.consumer.group.ConsumerGroupCommand"  # what kafka-consumer-groups.sh runs
PARTITIONS = 3


def documented_rewind() -> list[str]:
    """The arguments of the kafka-consumer-groups.sh command after `<!-- rewind-command -->` in the docs."""
    text = DOCS.read_text()
    at = text.index("<!-- rewind-command -->")
    block = text[at:text.index("```", text.index("```", at) + 3)]
    line = next(ln for ln in block.splitlines() if ln.strip().startswith("kafka-consumer-groups.sh"))
    return shlex.split(line.strip())[1:]


@pytest.fixture
def setup(apache: ApacheKafka) -> tuple[Config, int]:
    """A topic with uneven timestamps per partition (so the partitions' answers differ), and its config."""
    suffix = uuid.uuid4().hex[:8]
    topics = {"topic": f"rw-{suffix}", "dlq": f"rw-{suffix}.dlq", "group": f"oc-{suffix}"}
    apache.create_topics([topics["topic"], topics["dlq"]], partitions=PARTITIONS)
    start = int(time.time() * 1000) - 3_600_000
    p = Producer({"bootstrap.servers": apache.bootstrap})
    for partition in range(PARTITIONS):
        for i in range(12):
            p.produce(topics["topic"], value=b"x", partition=partition,
                      timestamp=start + i * 1000 * (partition + 1))
    assert p.flush(20) == 0
    return parse(config_dict(apache.bootstrap, topics, "http://127.0.0.1:9"), env={}), start


def commit_end(cfg: Config, group: str) -> None:
    c = Consumer({"bootstrap.servers": cfg.kafka.bootstrap_servers, "group.id": group, "enable.auto.commit": False})
    try:
        c.commit(offsets=[TopicPartition(cfg.kafka.topic, p, 12) for p in range(PARTITIONS)], asynchronous=False)
    finally:
        c.close()


def test_rewind_plans_what_kafkas_reset_offsets_does(setup: tuple[Config, int]) -> None:
    cfg, start = setup
    group = group_for(cfg.kafka.group_id, Provider.CONVERT)
    commit_end(cfg, group)
    to = start + 5_500  # partition 0: offset 6, partition 1: 3 (ts 6000), partition 2: 2 (ts 6000)
    args = [a.replace("$BOOTSTRAP", cfg.kafka.bootstrap_servers).replace("$GROUP", cfg.kafka.group_id)
            .replace("$TOPIC", cfg.kafka.topic).replace("2026-12-01T09:00:00.000Z", iso(to))
            for a in documented_rewind()]
    assert f"{cfg.kafka.group_id}.convert" in args and "--to-datetime" in args
    args[args.index("--execute")] = "--dry-run"
    done = run_java(GROUPS_TOOL, args, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [ln.split() for ln in done.stdout.splitlines() if ln.startswith(group)]
    kafka_plan = {int(r[2]): int(r[3]) for r in rows}  # GROUP TOPIC PARTITION NEW-OFFSET

    ours = rewind(cfg, Provider.CONVERT, to, dry_run=True, out=io.StringIO())
    assert {m.partition: m.after for m in ours.moves} == kafka_plan == {0: 6, 1: 3, 2: 2}
    assert committed(cfg.kafka.bootstrap_servers, group, cfg.kafka.topic) == dict.fromkeys(range(PARTITIONS), 12)
    rewind(cfg, Provider.CONVERT, to, dry_run=False, out=io.StringIO())
    assert committed(cfg.kafka.bootstrap_servers, group, cfg.kafka.topic) == kafka_plan


def test_a_kip848_member_blocks_the_rewind_and_the_broker_refuses_it_under_force(setup: tuple[Config, int]) -> None:
    cfg, start = setup
    group = group_for(cfg.kafka.group_id, Provider.KAMELEOON)
    commit_end(cfg, group)
    member = Consumer({"bootstrap.servers": cfg.kafka.bootstrap_servers, "group.id": group,
                       "group.protocol": "consumer", "client.id": "kip848-member", "enable.auto.commit": False})
    member.subscribe([cfg.kafka.topic])
    try:
        deadline = time.monotonic() + 30
        while not member.assignment():
            assert time.monotonic() < deadline, "the member never got its partitions"
            member.poll(0.2)
        with pytest.raises(GroupActive, match="kip848-member@"):
            rewind(cfg, Provider.KAMELEOON, start, dry_run=False, out=io.StringIO())
        with pytest.raises(RewindRefused, match="UNKNOWN_MEMBER_ID"):
            rewind(cfg, Provider.KAMELEOON, start, dry_run=False, force=True, out=io.StringIO())
        assert committed(cfg.kafka.bootstrap_servers, group, cfg.kafka.topic) == dict.fromkeys(range(PARTITIONS), 12)
    finally:
        member.close()
