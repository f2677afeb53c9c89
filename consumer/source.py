"""The Kafka side: a consumer-group member whose offsets are stored only when events are done."""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable, Mapping
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition
from confluent_kafka.admin import AdminClient, ConfigResource, ResourceType  # type: ignore[attr-defined]

from consumer import group_protocol
from consumer.checkpoint import CommitFailed
from consumer.config import KafkaConfig
from consumer.logs import KafkaLog
from consumer.metrics import Metrics

log = logging.getLogger(__name__)

TP = tuple[str, int]
# The answer to a commit: the offsets it carried, and the partitions the broker did not commit.
CommitAnswer = Callable[[dict[TP, int], dict[TP, CommitFailed]], None]

# The broker refused the credentials: retrying with the same ones cannot succeed, so the service stops
# and says so rather than running unready for ever.
AUTH_ERRORS = frozenset({KafkaError._AUTHENTICATION, KafkaError.SASL_AUTHENTICATION_FAILED})


def consumer_config(kafka: KafkaConfig, protocol: group_protocol.Resolved | None = None,
                    group: str | None = None) -> dict[str, Any]:
    """The consumer's librdkafka settings; `protocol` as chosen at start-up (None: resolved without the broker),
    `group` the pipeline's consumer group (None: [kafka] group_id)."""
    conf: dict[str, Any] = {
        "bootstrap.servers": kafka.bootstrap_servers,
        "group.id": group or kafka.group_id,
        "auto.offset.reset": "earliest",
        "statistics.interval.ms": 5000,
        # librdkafka prefetches up to 64 MB per consumer by default; the in-flight bound already keeps
        # the pipeline fed, so a smaller read-ahead keeps memory flat under any backlog.
        "queued.max.messages.kbytes": 16384,
    }
    conf.update(kafka.common)
    conf.update(kafka.consumer)
    chosen = protocol or group_protocol.resolve(kafka.group_protocol, kafka.consumer, None)
    conf.update(chosen.properties)
    # The at-least-once promise rests on these two: offsets move only when events are done.
    conf["enable.auto.offset.store"] = False
    conf["enable.auto.commit"] = False
    conf["logger"] = KafkaLog()  # librdkafka's own lines through the JSON logger, not raw to stderr
    return conf


def client_config(kafka: KafkaConfig) -> dict[str, Any]:
    """The settings of a helper client (an admin client, an offsets reader) that must log in as the consumer."""
    conf: dict[str, Any] = {**kafka.common, "bootstrap.servers": kafka.bootstrap_servers, "logger": KafkaLog()}
    for key in ("sasl.mechanisms", "sasl.mechanism", "sasl.username", "sasl.password", "security.protocol"):
        if key in kafka.consumer:  # the consumer's own credentials, where they differ from [kafka.common]
            conf[key] = kafka.consumer[key]
    return conf


class BrokerUnreachable(RuntimeError):
    """The broker did not answer the group-protocol question."""


def broker_group_protocols(kafka: KafkaConfig, timeout: float = 5.0) -> frozenset[str] | None:
    """The group protocols the broker offers (its group.coordinator.rebalance.protocols), None when it has no
    such setting (Kafka before 3.7, Tansu) or does not let us read it. Blocking: run it in an executor."""
    admin = AdminClient(client_config(kafka))
    try:
        brokers = admin.list_topics(timeout=timeout).brokers
    except KafkaException as exc:
        raise BrokerUnreachable(str(exc)) from None
    if not brokers:
        raise BrokerUnreachable("no broker in the cluster's metadata")
    resource = ConfigResource(ResourceType.BROKER, str(next(iter(brokers))))
    try:
        described = admin.describe_configs([resource], request_timeout=timeout)[resource].result(timeout * 2)
    except Exception as exc:  # DescribeConfigs refused (ACLs) or unsupported: the answer is "unknown"
        log.info("cannot read the broker's group protocols: %s", exc)
        return None
    entry = described.get(group_protocol.BROKER_SETTING)
    return group_protocol.parse_broker_setting(entry.value if entry is not None else None)


def choose_group_protocol(kafka: KafkaConfig, attempts: int = 6, timeout: float = 5.0) -> group_protocol.Resolved:
    """[kafka] group_protocol resolved, asking the broker only when "auto" needs it. Blocking."""
    offered: frozenset[str] | None = None
    if group_protocol.needs_broker(kafka.group_protocol, kafka.consumer):
        for attempt in range(attempts):
            try:
                offered = broker_group_protocols(kafka, timeout)
                break
            except BrokerUnreachable as exc:
                # A broker down at start-up is not a broker without KIP-848: ask again before falling back.
                log.warning("broker unreachable while choosing the group protocol (attempt %d of %d): %s",
                            attempt + 1, attempts, exc)
    return group_protocol.resolve(kafka.group_protocol, kafka.consumer, offered)


class Source:
    """Wraps confluent_kafka.Consumer; every call happens on the event loop's thread."""

    def __init__(
        self,
        kafka: KafkaConfig,
        metrics: Metrics,
        on_assign: Callable[[list[TP]], None],
        on_revoke: Callable[[list[TP]], None],
        on_lost: Callable[[list[TP]], None] | None = None,
        protocol: group_protocol.Resolved | None = None,
        on_commit: CommitAnswer | None = None,
        group: str | None = None,
    ) -> None:
        self.kafka = kafka
        self.metrics = metrics
        self.group = group = group or kafka.group_id
        # This member's gauges of its group, bound once.
        self._assigned_gauge = metrics.assigned_partitions.labels(group)
        self._paused_gauge = metrics.paused_partitions.labels(group)
        self._on_assign = on_assign
        self._on_revoke = on_revoke
        self._on_lost = on_lost
        self._on_commit = on_commit
        chosen = protocol or group_protocol.resolve(kafka.group_protocol, kafka.consumer, None)
        self.consumer_protocol = chosen.protocol
        conf = consumer_config(kafka, chosen, group)
        conf["stats_cb"] = self._stats
        conf["error_cb"] = self._error
        conf["on_commit"] = self._committed
        self._kafka_log: KafkaLog = conf["logger"]
        self.consumer = Consumer(conf)
        self.assigned: set[TP] = set()
        self.lag: dict[TP, int] = {}  # this member's lag per assigned partition, from the last statistics
        self._fresh: list[TopicPartition] = []
        self.paused = False
        self.broker_up = True
        self.last_error: str | None = None
        self.auth_failed: str | None = None

    def subscribe(self) -> None:
        self.consumer.subscribe([self.kafka.topic], on_assign=self._assign, on_revoke=self._revoke,
                                on_lost=self._lost)

    # ------------------------------------------------------------------ rebalance

    def _assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        tps = [(p.topic, p.partition) for p in partitions]
        self.assigned.update(tps)
        self.metrics.rebalances.labels(self.group, "assigned").inc()
        self._assigned_gauge.set(len(self.assigned))
        log.info("partitions assigned", extra={"partitions": [f"{t}[{p}]" for t, p in tps]})
        # The assignment takes effect after this callback returns; pausing is done on the next poll.
        self._fresh.extend(partitions)
        self._on_assign(tps)

    def _revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        tps = [(p.topic, p.partition) for p in partitions]
        log.info("partitions revoked", extra={"partitions": [f"{t}[{p}]" for t, p in tps]})
        self.metrics.rebalances.labels(self.group, "revoked").inc()
        self._on_revoke(tps)
        self.assigned.difference_update(tps)
        self._assigned_gauge.set(len(self.assigned))
        for t, p in tps:
            self.lag.pop((t, p), None)
            with contextlib.suppress(KeyError):
                self.metrics.consumer_lag.remove(self.group, t, str(p))

    def _lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Lost, not revoked: another member may own them already, so committing would be wrong.
        tps = [(p.topic, p.partition) for p in partitions]
        log.warning("partitions lost", extra={"partitions": [f"{t}[{p}]" for t, p in tps]})
        self.metrics.rebalances.labels(self.group, "lost").inc()
        if self._on_lost is not None:
            self._on_lost(tps)
        self.assigned.difference_update(tps)
        self._assigned_gauge.set(len(self.assigned))

    # ------------------------------------------------------------------ callbacks

    def _stats(self, raw: str) -> None:
        try:
            stats = json.loads(raw)
        except ValueError:
            return
        # A broker back after an outage: the statistics say so even when no message arrives (an idle topic),
        # so readiness recovers without waiting for traffic.
        if not self.broker_up and any(b.get("state") == "UP" and b.get("nodeid", -1) >= 0
                                      for b in stats.get("brokers", {}).values()):
            self.broker_up = True
        for topic, t in stats.get("topics", {}).items():
            for pid, p in t.get("partitions", {}).items():
                if pid == "-1" or (topic, int(pid)) not in self.assigned:
                    continue
                # Offsets are committed explicitly, never "stored": consumer_lag_stored stays -1 here, and
                # consumer_lag (from the committed offset) is the lag this service really has.
                lag = p.get("consumer_lag", -1)
                if isinstance(lag, int) and lag >= 0:
                    self.metrics.consumer_lag.labels(self.group, topic, pid).set(lag)
                    self.lag[(topic, int(pid))] = lag

    def _error(self, err: KafkaError) -> None:
        self.last_error = err.str()
        if err.code() in (KafkaError._ALL_BROKERS_DOWN, KafkaError._TRANSPORT):
            self.broker_up = False
        if err.code() in AUTH_ERRORS and self.auth_failed is None:
            self.auth_failed = err.str()
        # A broker's connection failure arrives twice: as librdkafka's own log line and here. Log it once.
        if not self._kafka_log.logged(err.str()):
            log.warning("kafka: %s", err.str())

    def _committed(self, err: KafkaError | None, partitions: list[TopicPartition]) -> None:
        """librdkafka's on_commit: the broker's answer to an asynchronous commit (step 4, consumer/checkpoint.py)."""
        self._answer({(p.topic, p.partition): p.offset for p in partitions},
                     {(p.topic, p.partition): e for p in partitions if (e := p.error or err) is not None})

    def _answer(self, offsets: dict[TP, int], errors: Mapping[TP, KafkaError]) -> None:
        failures = {tp: CommitFailed(e.name(), e.str(), retriable=e.retriable()) for tp, e in errors.items()}
        self.metrics.commits.labels(self.group, "failed" if failures else "ok").inc()
        if failures:
            first = next(iter(failures.values()))
            log.warning("offset commit failed: %s", first.reason, extra={
                "code": first.code,
                "partitions": {f"{t}[{p}]": offsets[(t, p)] for t, p in sorted(failures)},
                "retry": "at the next commit"})
        if self._on_commit is not None:
            self._on_commit(offsets, failures)

    # ------------------------------------------------------------------ I/O

    def poll(self, max_messages: int) -> list[Message]:
        messages = self.consumer.consume(num_messages=max_messages, timeout=0)
        if self._fresh:
            fresh, self._fresh = self._fresh, []
            if self.paused:
                self.consumer.pause(fresh)
                self._paused_gauge.set(len(self.assigned))
        if messages:
            self.broker_up = True
        return messages

    def pause(self) -> None:
        if not self.paused:
            self.paused = True
            parts = [TopicPartition(t, p) for t, p in self.assigned]
            if parts:
                self.consumer.pause(parts)
            self._paused_gauge.set(len(parts))

    def resume(self) -> None:
        if self.paused:
            self.paused = False
            parts = [TopicPartition(t, p) for t, p in self.assigned]
            if parts:
                self.consumer.resume(parts)
            self._paused_gauge.set(0)

    def commit(self, offsets: Mapping[TP, int], *, asynchronous: bool) -> None:
        """Send a commit of `offsets`. Its answer goes to `on_commit`: from librdkafka's on_commit callback when
        asynchronous, before this returns when synchronous or when the client refuses to send it at all."""
        if not offsets:
            return
        parts = [TopicPartition(t, p, o) for (t, p), o in offsets.items()]
        try:
            if asynchronous:
                self.consumer.commit(offsets=parts, asynchronous=True)
                return
            answered = self.consumer.commit(offsets=parts, asynchronous=False)
        except KafkaException as exc:
            err: KafkaError = exc.args[0]
            self._answer(dict(offsets), dict.fromkeys(offsets, err))
            return
        # A synchronous commit's per-partition errors are in its result (librdkafka does not call on_commit).
        self._answer({(p.topic, p.partition): p.offset for p in answered or parts},
                     {(p.topic, p.partition): p.error for p in answered or [] if p.error is not None})

    def close(self) -> None:
        self.consumer.close()
