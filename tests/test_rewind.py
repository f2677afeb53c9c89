"""`offline-conversions rewind` on a real broker: a provider's group moved to a time, refused while it has members
(with and without --force), a dry run that changes nothing; and its pure parts (times, the plan)."""

from __future__ import annotations

import io
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from consumer.cli import main
from consumer.config import Config, parse
from consumer.model import Provider
from consumer.ops.rewind import (
    GroupActive,
    Move,
    RewindError,
    RewindRefused,
    group_for,
    parse_time,
    plan,
    provider_named,
    render,
    rewind,
)
from consumer.ops.rewind import iso as iso_ms
from tests.conftest import Broker, committed, config_dict, to_toml

PARTITIONS = 3
PER_PARTITION = 10
STEP_MS = 1000


@pytest.fixture
def history(broker: Broker, topics: dict[str, str]) -> Iterator[tuple[Config, int]]:
    """A topic with 10 messages per partition, one a second from an hour ago; a config naming it."""
    start = int(time.time() * 1000) - 3_600_000
    p = Producer({"bootstrap.servers": broker.bootstrap})
    for partition in range(PARTITIONS):
        for i in range(PER_PARTITION):
            p.produce(topics["topic"], value=b"x", partition=partition, timestamp=start + i * STEP_MS)
    assert p.flush(20) == 0
    cfg = parse(config_dict(broker.bootstrap, topics, "http://127.0.0.1:9"), env={})
    yield cfg, start


def commit(bootstrap: str, group: str, topic: str, offsets: dict[int, int]) -> None:
    """Commit offsets for a group as an outside client does (no membership)."""
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False})
    try:
        c.commit(offsets=[TopicPartition(topic, p, o) for p, o in offsets.items()], asynchronous=False)
    finally:
        c.close()


def at_end(_cfg: Config) -> dict[int, int]:
    return dict.fromkeys(range(PARTITIONS), PER_PARTITION)


def test_the_group_moves_to_the_first_offset_at_or_after_the_time(history: tuple[Config, int]) -> None:
    cfg, start = history
    group = group_for(cfg.kafka.group_id, Provider.CONVERT)
    commit(cfg.kafka.bootstrap_servers, group, cfg.kafka.topic, at_end(cfg))
    other = group_for(cfg.kafka.group_id, Provider.KAMELEOON)
    commit(cfg.kafka.bootstrap_servers, other, cfg.kafka.topic, at_end(cfg))
    out = io.StringIO()

    # Between two messages' timestamps: the later one.
    result = rewind(cfg, Provider.CONVERT, start + 4 * STEP_MS + 500, dry_run=False, out=out)
    assert result.applied and result.group == f"{cfg.kafka.group_id}.convert"
    assert committed(cfg.kafka.bootstrap_servers, group, cfg.kafka.topic) == dict.fromkeys(range(PARTITIONS), 5)
    assert [(m.before, m.after) for m in result.moves] == [(10, 5)] * PARTITIONS
    text = out.getvalue()
    assert "COMMITTED" in text and "-5" in text and "done" in text
    # Only that provider's group moved.
    assert committed(cfg.kafka.bootstrap_servers, other, cfg.kafka.topic) == at_end(cfg)

    # Exactly a message's timestamp: that message.
    rewind(cfg, Provider.CONVERT, start + 2 * STEP_MS, dry_run=False, out=io.StringIO())
    assert committed(cfg.kafka.bootstrap_servers, group, cfg.kafka.topic) == dict.fromkeys(range(PARTITIONS), 2)
    # After the last message: the end of the log (forward), as Kafka's --to-datetime does.
    result = rewind(cfg, Provider.CONVERT, start + 60 * STEP_MS, dry_run=False, out=io.StringIO())
    assert [m.found for m in result.moves] == [False] * PARTITIONS
    assert committed(cfg.kafka.bootstrap_servers, group, cfg.kafka.topic) == at_end(cfg)


def test_a_dry_run_changes_nothing(history: tuple[Config, int]) -> None:
    cfg, start = history
    group = group_for(cfg.kafka.group_id, Provider.KAMELEOON)
    out = io.StringIO()
    # A group that has committed nothing yet (a new provider group): the plan shows '-'.
    result = rewind(cfg, Provider.KAMELEOON, start, dry_run=True, out=out)
    assert not result.applied and [m.after for m in result.moves] == [0] * PARTITIONS
    assert "dry run: nothing changed" in out.getvalue()
    assert committed(cfg.kafka.bootstrap_servers, group, cfg.kafka.topic) == dict.fromkeys(range(PARTITIONS), -1001)
    commit(cfg.kafka.bootstrap_servers, group, cfg.kafka.topic, at_end(cfg))
    rewind(cfg, Provider.KAMELEOON, start, dry_run=True, out=io.StringIO())
    assert committed(cfg.kafka.bootstrap_servers, group, cfg.kafka.topic) == at_end(cfg)


def test_refused_while_the_group_has_a_member_and_force_cannot_override_kafka(history: tuple[Config, int]) -> None:
    cfg, start = history
    group = group_for(cfg.kafka.group_id, Provider.CONDUCTRICS)
    commit(cfg.kafka.bootstrap_servers, group, cfg.kafka.topic, at_end(cfg))
    member = Consumer({"bootstrap.servers": cfg.kafka.bootstrap_servers, "group.id": group,
                       "enable.auto.commit": False, "client.id": "still-running", "auto.offset.reset": "latest"})
    member.subscribe([cfg.kafka.topic])
    try:
        deadline = time.monotonic() + 30
        while not member.assignment():
            assert time.monotonic() < deadline, "the member never got its partitions"
            member.poll(0.2)
        with pytest.raises(GroupActive) as err:
            rewind(cfg, Provider.CONDUCTRICS, start, dry_run=False, out=io.StringIO())
        assert err.value.members and err.value.members[0].startswith("still-running@")
        assert "stop the service" in str(err.value)
        # --force skips the check, and the broker refuses on its own: nothing moves either way.
        out = io.StringIO()
        with pytest.raises(RewindRefused, match=r"UNKNOWN_MEMBER_ID|not empty|member"):
            rewind(cfg, Provider.CONDUCTRICS, start, dry_run=False, force=True, out=out)
        assert "--force" in out.getvalue()
        assert committed(cfg.kafka.bootstrap_servers, group, cfg.kafka.topic) == at_end(cfg)
        # A dry run is allowed with --force, and says what would happen.
        rewind(cfg, Provider.CONDUCTRICS, start, dry_run=True, force=True, out=io.StringIO())
    finally:
        member.close()
    # Once the member has left, the same rewind goes through.
    rewind(cfg, Provider.CONDUCTRICS, start, dry_run=False, out=io.StringIO())
    assert committed(cfg.kafka.bootstrap_servers, group, cfg.kafka.topic) == dict.fromkeys(range(PARTITIONS), 0)


def test_the_command(history: tuple[Config, int], tmp_path: Path, broker: Broker, topics: dict[str, str],
                     capsys: pytest.CaptureFixture[str]) -> None:
    cfg, start = history
    path = tmp_path / "config.toml"
    path.write_text(to_toml(config_dict(broker.bootstrap, topics, "http://127.0.0.1:9")))
    group = group_for(cfg.kafka.group_id, Provider.CONVERT)
    commit(cfg.kafka.bootstrap_servers, group, cfg.kafka.topic, at_end(cfg))

    def run(*args: str) -> int:
        return main(["rewind", "--config", str(path), *args])

    iso = iso_ms(start + 3 * STEP_MS)
    assert run("--provider", "convert", "--to", iso, "--dry-run") == 0
    assert "dry run" in capsys.readouterr().out
    assert committed(cfg.kafka.bootstrap_servers, group, cfg.kafka.topic) == at_end(cfg)
    assert run("--provider", "CONVERT", "--to", iso) == 0
    assert committed(cfg.kafka.bootstrap_servers, group, cfg.kafka.topic) == dict.fromkeys(range(PARTITIONS), 3)
    assert run("--provider", "convert", "--to", "-2h") == 0  # before every message: the start
    assert committed(cfg.kafka.bootstrap_servers, group, cfg.kafka.topic) == dict.fromkeys(range(PARTITIONS), 0)
    capsys.readouterr()
    assert run("--provider", "optimizely", "--to", "-2h") == 2
    assert "expected one of kameleoon, convert, conductrics" in capsys.readouterr().err
    assert run("--provider", "convert", "--to", "yesterday") == 2
    assert run("--provider", "convert", "--to", "2026-12-01T09:00:00") == 2
    assert "no UTC offset" in capsys.readouterr().err


# --------------------------------------------------------------------------- pure parts


NOW = 1_764_662_400_000  # 2025-12-02T08:00:00Z


@pytest.mark.parametrize(("text", "expected"), [
    ("1764658800000", 1_764_658_800_000),
    ("-2h", NOW - 7_200_000),
    ("-90s", NOW - 90_000),
    ("-250ms", NOW - 250),
    ("-7d", NOW - 7 * 86_400_000),
    ("2025-12-02T07:00:00Z", NOW - 3_600_000),
    ("2025-12-02T08:00:00+01:00", NOW - 3_600_000),
    ("2025-12-02T06:30:00.250-00:30", NOW - 3_600_000 + 250),
])
def test_parse_time(text: str, expected: int) -> None:
    assert parse_time(text, NOW) == expected


@pytest.mark.parametrize(("text", "says"), [
    ("2025-12-02T07:00:00", "no UTC offset"),
    ("2025-12-02T09:00:00Z", "in the future"),
    ("+2h", "expected ISO-8601"),
    ("-2 weeks", "expected ISO-8601"),
    ("yesterday", "expected ISO-8601"),
    (str(NOW + 1), "in the future"),
])
def test_parse_time_refuses(text: str, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        parse_time(text, NOW)


def test_plan_and_render() -> None:
    moves = plan({0: 10, 1: None, 2: 7}, {0: 5, 1: 3, 2: -1}, {0: 10, 1: 8, 2: 9})
    assert moves == [Move(0, 10, 5, True), Move(1, None, 3, True), Move(2, 7, 9, False)]
    text = render(moves, "oc.convert", "purchases", NOW)
    assert "2025-12-02T08:00:00.000Z" in text and "-5" in text and "+2" in text and "end of the log" in text
    assert group_for("oc", provider_named(" Kameleoon ")) == "oc.kameleoon"



def test_refused_when_the_providers_share_one_group(broker: Broker, topics: dict[str, str]) -> None:
    data = config_dict(broker.bootstrap, topics, "http://127.0.0.1:9")
    data["kafka"]["isolation"] = "shared"
    cfg = parse(data, env={})
    with pytest.raises(RewindError, match=r"isolation is 'shared'.*re-sends to all of them"):
        rewind(cfg, Provider.CONVERT, 0, dry_run=True, out=io.StringIO())
