"""Which group protocol the service joins with: table-driven over the setting, [kafka.consumer] and the broker."""

from __future__ import annotations

import pytest

from consumer.group_protocol import (
    CONSUMER,
    COOPERATIVE,
    EAGER,
    GroupProtocolError,
    needs_broker,
    parse_broker_setting,
    resolve,
)

KAFKA_4 = parse_broker_setting("classic,consumer,streams")
KAFKA_3 = parse_broker_setting("classic")


@pytest.mark.parametrize(("setting", "consumer", "broker", "protocol", "props"), [
    # auto: KIP-848 where the broker offers it, else eager (what every earlier release joined with)
    ("auto", {}, KAFKA_4, CONSUMER, {"group.protocol": "consumer"}),
    ("auto", {}, KAFKA_3, EAGER, {"group.protocol": "classic", "partition.assignment.strategy": "range,roundrobin"}),
    ("auto", {}, None, EAGER, {"group.protocol": "classic", "partition.assignment.strategy": "range,roundrobin"}),
    # classic-only timing keys say the deployment is tuned for the classic protocol: kept there
    ("auto", {"session.timeout.ms": 6000}, KAFKA_4, EAGER,
     {"group.protocol": "classic", "partition.assignment.strategy": "range,roundrobin"}),
    ("consumer", {}, KAFKA_3, CONSUMER, {"group.protocol": "consumer"}),
    ("cooperative-sticky", {"session.timeout.ms": 6000}, KAFKA_4, COOPERATIVE,
     {"group.protocol": "classic", "partition.assignment.strategy": "cooperative-sticky"}),
    ("eager", {"partition.assignment.strategy": "roundrobin"}, KAFKA_4, EAGER,
     {"group.protocol": "classic", "partition.assignment.strategy": "roundrobin"}),
])
def test_resolution(setting: str, consumer: dict[str, object], broker: frozenset[str] | None, protocol: str,
                    props: dict[str, str]) -> None:
    got = resolve(setting, consumer, broker)
    assert (got.protocol, got.properties) == (protocol, props)
    assert got.reason


@pytest.mark.parametrize(("setting", "consumer", "key"), [
    ("consumer", {"session.timeout.ms": 6000}, "session.timeout.ms"),
    ("consumer", {"heartbeat.interval.ms": 500}, "heartbeat.interval.ms"),
    ("auto", {"group.protocol": "consumer"}, "group.protocol"),
    ("cooperative-sticky", {"partition.assignment.strategy": "cooperative-sticky"}, "partition.assignment.strategy"),
    ("eager", {"partition.assignment.strategy": "cooperative-sticky"}, "partition.assignment.strategy"),
])
def test_contradictions_name_the_property(setting: str, consumer: dict[str, object], key: str) -> None:
    with pytest.raises(GroupProtocolError) as info:
        resolve(setting, consumer, KAFKA_4)
    assert info.value.key == key


def test_only_auto_without_classic_keys_asks_the_broker() -> None:
    assert needs_broker("auto", {})
    assert not needs_broker("auto", {"heartbeat.interval.ms": 500})
    assert not needs_broker("consumer", {})
    assert parse_broker_setting(None) is None
    assert parse_broker_setting(" classic , consumer ") == frozenset({"classic", "consumer"})


def test_auto_stays_classic_on_a_broker_without_kip848() -> None:
    """The embedded Tansu broker has no group.coordinator.rebalance.protocols: auto must not pick KIP-848,
    under which a member would wait for ever without an error."""
    from consumer.config import KafkaConfig
    from consumer.embedded import EmbeddedBroker
    from consumer.source import broker_group_protocols, choose_group_protocol

    with EmbeddedBroker() as b:
        kafka = KafkaConfig(b.bootstrap, "t", "g", "t.dlq")
        assert broker_group_protocols(kafka) is None
        assert choose_group_protocol(kafka).protocol == EAGER

