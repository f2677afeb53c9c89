"""The consumer groups of a deployment: one per provider (`<group_id>.<provider>`), and their upgrade from one.

With `[kafka] isolation = "provider"` (the default) each provider reads the topic in a group of its own,
as Kafka Connect runs one connector per sink: its own committed offsets, lag, in-flight budget and pause,
so a provider that is down holds up no other. A deployment that ran before isolation has its offsets in
`group_id` alone; `seed` copies them into every provider group that has none of its own, once, before
the group's first member joins, so the upgrade neither re-sends nor skips anything.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

from consumer.config import KafkaConfig
from consumer.source import AUTH_ERRORS, client_config

log = logging.getLogger(__name__)

# The coordinator is moving or loading: asked again (librdkafka does not call these retriable here).
_COORDINATOR_MOVING = frozenset({KafkaError.NOT_COORDINATOR, KafkaError.COORDINATOR_LOAD_IN_PROGRESS,
                                 KafkaError.COORDINATOR_NOT_AVAILABLE, KafkaError._TIMED_OUT})
Offsets = dict[int, int]  # partition -> committed offset (the next offset to read)


def group_of(kafka: KafkaConfig, provider: str | None) -> str:
    """The consumer group a provider's pipeline joins (None: the shared pipeline of every provider)."""
    if provider is None or kafka.isolation == "shared":
        return kafka.group_id
    return f"{kafka.group_id}.{provider}"


def to_seed(old: Offsets, new: Offsets) -> Offsets:
    """The offsets to give a provider group: the old group's, when the new group has committed nothing.

    A group with a committed offset of its own has started already: its position is its own, and
    copying the old group's over it would re-send or skip. Partitions the old group never committed
    are left to auto.offset.reset, as they were before.
    """
    if new:
        return {}
    return {p: o for p, o in old.items() if o >= 0}


class SeedError(RuntimeError):
    """The provider groups could not be checked or seeded (the broker did not answer or refused)."""


class SeedAuthError(SeedError):
    """The broker refused the credentials while the provider groups were checked."""


class _OffsetsClient(Consumer):
    """A consumer that never joins its group: it only reads and writes the group's committed offsets, and
    keeps the authentication failures librdkafka reports (through error_cb only).

    Not an AdminClient: librdkafka 2.x crashes (SIGSEGV in rd_kafka_cgrp_op) handling an AdminClient's
    OffsetFetch answer with a retriable error such as COORDINATOR_LOAD_IN_PROGRESS, which a group's
    first request after a broker start gets; found on Apache Kafka 4.1 by this module's first version.
    """

    def __init__(self, kafka: KafkaConfig, group: str) -> None:
        self.refused: list[str] = []
        super().__init__({**client_config(kafka), "group.id": group, "enable.auto.commit": False,
                          "error_cb": self._on_error})

    def _on_error(self, err: KafkaError) -> None:
        if err.code() in AUTH_ERRORS:
            self.refused.append(err.str())


def _raise_if_refused(client: Consumer) -> None:
    if isinstance(client, _OffsetsClient):
        client.poll(0)  # serves the error callbacks waiting in the queue (the client subscribes to nothing)
        if client.refused:
            raise SeedAuthError(client.refused[0])


def _partitions(client: Consumer, topic: str, timeout: float) -> list[int]:
    try:
        meta = client.list_topics(topic, timeout=timeout).topics.get(topic)
    except KafkaException as exc:
        _raise_if_refused(client)
        raise SeedError(f"reading the partitions of {topic!r}: {exc}") from None
    if meta is None or meta.error is not None or not meta.partitions:
        raise SeedError(f"topic {topic!r} has no partitions the broker will describe"
                        f"{f' ({meta.error})' if meta is not None and meta.error else ''}")
    return sorted(meta.partitions)


def committed(client: Consumer, topic: str, partitions: list[int], timeout: float = 10.0) -> Offsets:
    """The client's group's committed offsets on `topic` (an empty dict for a group that never committed).

    A group coordinator moving or still loading (NOT_COORDINATOR, COORDINATOR_LOAD_IN_PROGRESS: every
    group's first request after a broker start) is asked again, with a short backoff, until `timeout`.
    """
    deadline = time.monotonic() + timeout
    pause = 0.05
    while True:
        try:
            answer = client.committed([TopicPartition(topic, p) for p in partitions],
                                      timeout=max(0.5, min(5.0, deadline - time.monotonic())))
        except KafkaException as exc:
            err = exc.args[0]
            _raise_if_refused(client)
            if not (isinstance(err, KafkaError) and (err.retriable() or err.code() in _COORDINATOR_MOVING)) \
                    or time.monotonic() + pause > deadline:
                raise SeedError(f"reading committed offsets: {exc}") from None
            time.sleep(pause)  # a blocking helper in an executor thread: the event loop is not held up
            pause = min(pause * 2, 1.0)
            continue
        return {tp.partition: tp.offset for tp in answer if tp.error is None and tp.offset >= 0}


def seed(kafka: KafkaConfig, groups: Iterable[str], timeout: float = 10.0) -> dict[str, Offsets]:
    """Copy `group_id`'s committed offsets into each of `groups` that has none; returns what was copied.

    Blocking: run it in an executor. The copy is idempotent, so members starting at once may all do it;
    a group that another member joined meanwhile refuses the commit of an outsider, and that member
    seeded it already.
    """
    old_client = _OffsetsClient(kafka, kafka.group_id)
    try:
        partitions = _partitions(old_client, kafka.topic, timeout)
        old = committed(old_client, kafka.topic, partitions, timeout)
    finally:
        old_client.close()
    seeded: dict[str, Offsets] = {}
    if not old:
        return seeded
    for group in groups:
        if group == kafka.group_id:
            continue
        client = _OffsetsClient(kafka, group)
        try:
            offsets = to_seed(old, committed(client, kafka.topic, partitions, timeout))
            if not offsets:
                continue
            parts = [TopicPartition(kafka.topic, p, o) for p, o in sorted(offsets.items())]
            try:
                client.commit(offsets=parts, asynchronous=False)
            except KafkaException as exc:
                # Most likely a member joined it between the read and the write, having seeded it itself.
                log.warning("could not seed a provider group from the old group", extra={
                    "group": group, "from": kafka.group_id, "error": str(exc)})
                continue
        finally:
            client.close()
        log.info("provider group seeded from the shared group's committed offsets", extra={
            "group": group, "from": kafka.group_id, "offsets": {str(p): o for p, o in offsets.items()}})
        seeded[group] = offsets
    return seeded


def describe(seeded: Mapping[str, Offsets]) -> str:
    """One line for the log of what `seed` did."""
    return ", ".join(f"{g}: {len(o)} partition(s)" for g, o in sorted(seeded.items())) or "nothing to seed"
