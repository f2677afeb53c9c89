"""The ledger topic at start: created when missing, else checked: compacted, as many partitions as the source."""

from __future__ import annotations

import logging
from typing import Any

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, ConfigResource, NewTopic, ResourceType  # type: ignore[attr-defined]

from consumer.config import Config, ConfigError
from consumer.logs import KafkaLog

log = logging.getLogger(__name__)

# Settings the ledger is created with unless [ledger.topic_config] says otherwise (docs/operations.md).
DEFAULT_TOPIC_CONFIG: dict[str, str] = {
    "cleanup.policy": "compact",
    # Compacted within a day of writing; tombstones of `forget` stay a day so every reader sees them.
    "min.compaction.lag.ms": "0",
    "max.compaction.lag.ms": "86400000",
    "delete.retention.ms": "86400000",
    "segment.ms": "3600000",
    "min.cleanable.dirty.ratio": "0.1",
}


class LedgerTopicError(ConfigError):
    """The ledger topic is missing (and not to be created) or unlike what recovery relies on; names the key."""


def admin_settings(cfg: Config) -> dict[str, Any]:
    return {**cfg.kafka.common, "bootstrap.servers": cfg.kafka.bootstrap_servers, "logger": KafkaLog()}


def partitions_of(admin: AdminClient, topic: str, timeout: float) -> int | None:
    """The topic's partition count, None when it does not exist."""
    md = admin.list_topics(topic=topic, timeout=timeout)
    t = md.topics.get(topic)
    if t is None or (t.error is not None and t.error.code() == KafkaError.UNKNOWN_TOPIC_OR_PART):
        return None
    if t.error is not None:
        raise KafkaException(t.error)
    return len(t.partitions)


def ensure(cfg: Config, timeout: float = 15.0, admin: AdminClient | None = None) -> int:
    """Check (or create) the ledger topic; its partition count. Blocking: run it in an executor.

    Raises LedgerTopicError naming `ledger.topic` when the partition counts differ (a record of source
    partition p goes to ledger partition p: recovery reads only that one), when it is not compacted, or
    when it is missing and `[ledger] create = false`.
    """
    led = cfg.ledger
    admin = admin or AdminClient(admin_settings(cfg))
    source = partitions_of(admin, cfg.kafka.topic, timeout)
    if source is None:
        raise LedgerTopicError("kafka.topic", f"the source topic {cfg.kafka.topic!r} does not exist")
    have = partitions_of(admin, led.topic, timeout)
    if have is None:
        if not led.create:
            raise LedgerTopicError("ledger.topic", f"topic {led.topic!r} does not exist and [ledger] create = false; "
                                   f"create it compacted with {source} partitions (as {cfg.kafka.topic!r})")
        conf = {**DEFAULT_TOPIC_CONFIG, **{k: str(v) for k, v in led.topic_config.items()}}
        futures = admin.create_topics([NewTopic(led.topic, source, led.replication_factor, config=conf)],
                                      operation_timeout=timeout)
        try:
            futures[led.topic].result(timeout)
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise LedgerTopicError("ledger.topic", f"cannot create {led.topic!r}: {exc.args[0].str()}") from None
            return ensure(cfg, timeout, admin)  # another member was first: check what it made
        log.info("ledger topic created", extra={"topic": led.topic, "partitions": source})
        return source
    if have != source:
        raise LedgerTopicError("ledger.topic", (
            f"topic {led.topic!r} has {have} partitions and the source {cfg.kafka.topic!r} has {source}: they must "
            f"be equal (the record of source partition p is in ledger partition p); add partitions to the ledger "
            f"(kafka-topics --alter --partitions {source}) before consuming"))
    policy = _cleanup_policy(admin, led.topic, timeout)
    if policy is not None and "compact" not in policy:
        raise LedgerTopicError("ledger.topic", f"topic {led.topic!r} has cleanup.policy={policy}: it must include "
                                               "compact (the latest outcome per key is kept, tombstones forget)")
    return have


def _cleanup_policy(admin: AdminClient, topic: str, timeout: float) -> str | None:
    resource = ConfigResource(ResourceType.TOPIC, topic)
    try:
        described = admin.describe_configs([resource], request_timeout=timeout)[resource].result(timeout)
    except Exception as exc:  # not allowed to describe (ACLs): not judged
        log.info("cannot read the ledger topic's cleanup.policy: %s", exc)
        return None
    entry = described.get("cleanup.policy")
    return None if entry is None else str(entry.value)
