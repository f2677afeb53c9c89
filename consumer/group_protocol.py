"""Which consumer-group protocol the service joins with: the configured one, or with "auto" the best the broker offers.

Measured on Apache Kafka 4.1 (tests/apache/test_group_protocols.py, docs/operations.md "Group protocol"):
KIP-848's consumer protocol settles a membership change fastest and re-sends few events. A broker without
it (Kafka before 4.0, the embedded Tansu broker) leaves a consumer-protocol member waiting for ever
without an error, so "auto" asks the broker first. Without KIP-848, "auto" keeps eager, the protocol of
every earlier release: a rolling upgrade cannot mix eager and cooperative members in one group (the new
pods would never join, and never become ready), while Kafka 4 migrates a classic group to KIP-848 online.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

AUTO = "auto"
CONSUMER = "consumer"  # KIP-848: the broker assigns, heartbeats at its own pace
COOPERATIVE = "cooperative-sticky"  # classic, incremental: only moving partitions are revoked
EAGER = "eager"  # classic, stop-the-world: every rebalance revokes everything
CHOICES = (AUTO, CONSUMER, COOPERATIVE, EAGER)

# Client-side settings of the classic protocol; under KIP-848 the broker owns them and librdkafka refuses them.
CLASSIC_ONLY = ("session.timeout.ms", "heartbeat.interval.ms", "partition.assignment.strategy")
EAGER_STRATEGIES = frozenset({"range", "roundrobin"})
BROKER_SETTING = "group.coordinator.rebalance.protocols"  # Kafka 4.x: "classic,consumer,streams"


class GroupProtocolError(ValueError):
    """A [kafka.consumer] property contradicts [kafka] group_protocol; `key` is the property's name."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key


@dataclass(frozen=True)
class Resolved:
    protocol: str  # consumer | cooperative-sticky | eager
    properties: dict[str, str]  # what the consumer's configuration gets
    reason: str  # for the start-up log line


def check(setting: str, consumer: Mapping[str, object]) -> None:
    """Raise GroupProtocolError for [kafka.consumer] properties the setting cannot take (a config check: no I/O)."""
    if "group.protocol" in consumer:
        raise GroupProtocolError("group.protocol", "is set by [kafka] group_protocol (auto, consumer, "
                                                   "cooperative-sticky, eager)")
    if setting == CONSUMER:
        for key in CLASSIC_ONLY:
            if key in consumer:
                raise GroupProtocolError(key, "is a classic-protocol setting, refused with group_protocol = "
                                              "\"consumer\" (the broker sets it: group.consumer.*); remove it")
    strategy = consumer.get("partition.assignment.strategy")
    if strategy is not None:
        names = {s.strip() for s in str(strategy).split(",") if s.strip()}
        if setting != EAGER or not names or not names <= EAGER_STRATEGIES:
            raise GroupProtocolError("partition.assignment.strategy", "is set by [kafka] group_protocol; only "
                                     "group_protocol = \"eager\" takes it (range, roundrobin)")


def needs_broker(setting: str, consumer: Mapping[str, object]) -> bool:
    """Whether resolving `setting` needs to know what the broker supports."""
    return setting == AUTO and not any(k in consumer for k in CLASSIC_ONLY)


def resolve(setting: str, consumer: Mapping[str, object], broker_protocols: frozenset[str] | None) -> Resolved:
    """The protocol to join with. `broker_protocols`: the broker's BROKER_SETTING, None when unknown."""
    check(setting, consumer)
    if setting == AUTO:
        if any(k in consumer for k in CLASSIC_ONLY):
            setting, why = EAGER, ("auto: [kafka.consumer] sets classic-protocol properties "
                                   f"({', '.join(k for k in CLASSIC_ONLY if k in consumer)})")
        elif broker_protocols is not None and CONSUMER in broker_protocols:
            setting, why = CONSUMER, f"auto: the broker offers KIP-848 ({BROKER_SETTING})"
        elif broker_protocols is None:
            setting, why = EAGER, f"auto: the broker does not say it offers KIP-848 ({BROKER_SETTING} unknown)"
        else:
            setting, why = EAGER, f"auto: the broker offers only {', '.join(sorted(broker_protocols))}"
    else:
        why = "[kafka] group_protocol"
    if setting == CONSUMER:
        return Resolved(CONSUMER, {"group.protocol": "consumer"}, why)
    if setting == COOPERATIVE:
        return Resolved(COOPERATIVE, {"group.protocol": "classic",
                                      "partition.assignment.strategy": "cooperative-sticky"}, why)
    strategy = str(consumer.get("partition.assignment.strategy", "range,roundrobin"))
    return Resolved(EAGER, {"group.protocol": "classic", "partition.assignment.strategy": strategy}, why)


def parse_broker_setting(value: str | None) -> frozenset[str] | None:
    if value is None:
        return None
    return frozenset(p.strip() for p in value.split(",") if p.strip())
