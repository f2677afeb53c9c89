"""Operator pauses kept in a compacted Kafka topic that every member reads, as Kafka Connect keeps its config.

The topic (`[control] topic`, by default `<kafka.group_id>.control`) holds one record per paused
provider project, keyed `pause/<provider>/<project>`, valued `{"paused": true, "reason": …, "at":
epoch_ms, "by": …}`; a resume is a tombstone, so compaction leaves only what is paused now. The service
creates the topic at start-up if it is missing (one partition, `cleanup.policy=compact`) and refuses
one whose cleanup policy is not `compact` alone: retention would delete a pause silently.

`ControlStore` protocol, in the order `start`, the follower and `pause`/`resume` run it:
  1. ensure the topic exists and is compacted (AdminClient, in an executor: the client blocks);
  2. read it from the beginning to the high watermarks taken at start (a bounded read, assigned
     partitions, no group membership, nothing committed), keeping the last record of each key;
  3. report every pause still standing through `on_change(provider, project, True, reason)`;
  4. keep following the topic on a thread; each record read is handed to the event loop and reported
     through `on_change` (a pause, or a resume with paused False), whichever member wrote it;
  5. `pause`/`resume` produce (acks=all, idempotent), wait for the broker's acknowledgement, then for
     the follower to have read the record back, so the caller sees its own write applied.
`on_change` always runs on the event loop's thread.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition
from confluent_kafka.admin import (  # type: ignore[attr-defined]
    AdminClient,
    ConfigResource,
    NewTopic,
    ResourceType,
)

from consumer.config import Config
from consumer.logs import KafkaLog

log = logging.getLogger(__name__)

PAUSE_PREFIX = "pause/"
REASON_MAX = 500  # characters of an operator's reason kept in a record
ClientConfig = Mapping[str, str | int | float | bool]
# on_change(provider slug, project, paused, reason): called on the event loop's thread for every change.
OnChange = Callable[[str, str, bool, str | None], None]


class ControlStoreError(RuntimeError):
    """The control plane's store failed; the message says how and what to check."""


class ControlTopicError(ControlStoreError):
    """The control topic cannot be created, described or read (ACLs, a wrong name, the broker unreachable)."""

    def __init__(self, topic: str, message: str) -> None:
        super().__init__(f"control topic {topic!r}: {message}")
        self.topic = topic


class ControlTopicNotCompacted(ControlTopicError):
    """The control topic exists with a cleanup policy that would delete pauses."""


class ControlWriteError(ControlStoreError):
    """A pause or resume was not acknowledged by the broker: it is not recorded."""


class ControlStoreClosed(ControlStoreError):
    """The store was used before `start` or after `close`."""


class BadControlRecord(ValueError):
    """A record in the control topic that this version cannot read; it is skipped and logged."""


@dataclass(frozen=True, slots=True)
class PauseRecord:
    """An operator's pause of one provider project, as the control topic holds it."""

    provider: str  # the provider's slug: kameleoon, convert, conductrics
    project: str
    reason: str | None
    at: int  # epoch milliseconds
    by: str  # who wrote it: "api" for the control API


# --------------------------------------------------------------------------- the record format (pure)


def pause_key(provider: str, project: str) -> bytes:
    if not provider or "/" in provider or not project:
        raise ValueError(f"a pause names a provider slug without '/' and a project, got {provider!r}, {project!r}")
    return f"{PAUSE_PREFIX}{provider}/{project}".encode()


def parse_key(key: bytes | None) -> tuple[str, str] | None:
    """(provider, project) of a pause key; None for any other key (room for other kinds of records)."""
    if key is None:
        return None
    try:
        text = key.decode()
    except UnicodeDecodeError:
        return None
    if not text.startswith(PAUSE_PREFIX):
        return None
    provider, sep, project = text[len(PAUSE_PREFIX):].partition("/")  # a project may contain '/'
    return (provider, project) if sep and provider and project else None


def encode_pause(record: PauseRecord) -> bytes:
    return json.dumps({"paused": True, "reason": record.reason, "at": record.at, "by": record.by},
                      separators=(",", ":")).encode()


def decode_pause(provider: str, project: str, value: bytes | None) -> PauseRecord | None:
    """The pause a record's value states, or None for a resume (a tombstone, or `"paused": false`)."""
    if value is None:
        return None
    try:
        doc = json.loads(value)
    except ValueError as exc:
        raise BadControlRecord(f"not JSON: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("paused"), bool):
        raise BadControlRecord("expected an object with a boolean 'paused'")
    if not doc["paused"]:
        return None
    reason, at, by = doc.get("reason"), doc.get("at"), doc.get("by")
    if reason is not None and not isinstance(reason, str):
        raise BadControlRecord("'reason' is not a string")
    if isinstance(at, bool) or not isinstance(at, int):
        raise BadControlRecord("'at' is not epoch milliseconds")
    return PauseRecord(provider, project, reason, at, by if isinstance(by, str) else "unknown")


def _credentials(section: ClientConfig) -> dict[str, str | int | float | bool]:
    """A client section's own security settings (where they differ from [kafka.common]), nothing else of it."""
    return {k: v for k, v in section.items()
            if k.startswith(("sasl.", "ssl.")) or k in ("security.protocol", "sasl.mechanism")}


# --------------------------------------------------------------------------- the store (I/O)


class ControlStore:
    """Durable, group-wide operator pauses: see the module's docstring for the protocol."""

    def __init__(self, topic: str, client_config: ClientConfig, on_change: OnChange, *,
                 replication_factor: int | None = None, timeout: float = 30.0,
                 clock: Callable[[], float] = time.time) -> None:
        self.topic = topic
        self._client: dict[str, Any] = {**client_config, "logger": KafkaLog()}
        self._on_change = on_change
        self._replication = replication_factor
        self._timeout = timeout
        self._clock = clock
        self._records: dict[tuple[str, str], PauseRecord] = {}
        self._read_to: dict[int, int] = {}  # partition -> next offset the store has applied
        self._waiters: list[tuple[int, int, asyncio.Future[None]]] = []  # (partition, offset, read back)
        self._consumer: Consumer | None = None
        self._producer: Producer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.skipped = 0  # records this version could not read
        self.last_error: str | None = None  # the follower's last error, for readiness detail

    @classmethod
    def for_config(cls, cfg: Config, on_change: OnChange) -> ControlStore:
        """A store on the service's broker with its [kafka.common] settings (TLS, SASL)."""
        client: dict[str, str | int | float | bool] = {**cfg.kafka.common,
                                                        "bootstrap.servers": cfg.kafka.bootstrap_servers}
        client.update(_credentials(cfg.kafka.consumer))
        return cls(cfg.control_topic(), client, on_change, replication_factor=cfg.control.replication_factor,
                   timeout=cfg.control.start_timeout)

    # ------------------------------------------------------------------ start (steps 1-4)

    async def start(self) -> None:
        """Steps 1-4; raises ControlTopicError when the topic cannot be created, is not compacted or unreadable."""
        if self._loop is not None:
            raise ControlStoreError("the control store is started already")
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self._ensure_topic)  # 1
        self._consumer = Consumer({**self._client, "group.id": f"{self.topic}.reader",
                                   "enable.auto.commit": False, "enable.auto.offset.store": False,
                                   "enable.partition.eof": False})
        self._producer = Producer({**self._client, "acks": "all", "enable.idempotence": True, "linger.ms": 0,
                                   "message.timeout.ms": int(self._timeout * 1000)})
        try:
            latest, read_to = await loop.run_in_executor(None, self._read_to_end)  # 2
        except BaseException:
            await loop.run_in_executor(None, self._close_clients)
            raise
        self._loop = loop
        self._read_to = read_to
        for (provider, project), value in latest.items():  # 3
            self._apply(provider, project, value, initial=True)
        self._thread = threading.Thread(target=self._follow, name="control-store", daemon=True)  # 4
        self._thread.start()
        log.info("control store ready", extra={"topic": self.topic, "paused": len(self._records)})

    def _ensure_topic(self) -> None:
        admin = AdminClient(dict(self._client))
        new = NewTopic(self.topic, num_partitions=1, replication_factor=self._replication or -1,
                       config={"cleanup.policy": "compact"})
        try:
            admin.create_topics([new], operation_timeout=self._timeout)[self.topic].result(self._timeout)
            log.info("control topic created", extra={"topic": self.topic})
        except KafkaException as exc:
            err = exc.args[0] if exc.args and isinstance(exc.args[0], KafkaError) else None
            code = err.code() if err is not None else None
            if code == KafkaError.TOPIC_ALREADY_EXISTS:
                pass
            elif code in (KafkaError.TOPIC_AUTHORIZATION_FAILED, KafkaError.CLUSTER_AUTHORIZATION_FAILED):
                # Not allowed to create topics: it may exist (created by the platform team); step 2 tells.
                log.warning("not allowed to create the control topic; using it if it exists",
                            extra={"topic": self.topic})
            else:
                raise ControlTopicError(self.topic, f"cannot create it ({exc}); create it with "
                                                    "cleanup.policy=compact or check the broker") from None
        except Exception as exc:  # a timeout of the future
            raise ControlTopicError(self.topic, f"cannot create it: {exc}") from None
        resource = ConfigResource(ResourceType.TOPIC, self.topic)
        try:
            described = admin.describe_configs([resource], request_timeout=self._timeout)[resource].result(
                self._timeout)
        except Exception as exc:  # DescribeConfigs refused: Kafka Connect goes on unverified too
            log.warning("cannot check the control topic's cleanup.policy: %s", exc, extra={"topic": self.topic})
            return
        entry = described.get("cleanup.policy")
        policy = entry.value if entry is not None else None
        # "compact,delete" is refused too: retention would still delete a pause older than retention.ms.
        if policy is not None and {p.strip() for p in policy.split(",")} != {"compact"}:
            raise ControlTopicNotCompacted(
                self.topic, f"cleanup.policy is {policy!r}: retention would delete pauses; set it to 'compact' "
                            f"(kafka-configs.sh --alter --entity-type topics --entity-name {self.topic} "
                            "--add-config cleanup.policy=compact)")

    def _read_to_end(self) -> tuple[dict[tuple[str, str], bytes | None], dict[int, int]]:
        """Step 2: every record from the beginning to the high watermarks; the last value of each key."""
        assert self._consumer is not None
        consumer = self._consumer
        try:
            md = consumer.list_topics(self.topic, timeout=self._timeout).topics.get(self.topic)
        except KafkaException as exc:
            raise ControlTopicError(self.topic, f"cannot read its metadata: {exc}") from None
        if md is None or md.error is not None or not md.partitions:
            why = md.error.str() if md is not None and md.error is not None else "it does not exist"
            raise ControlTopicError(self.topic, f"cannot read it: {why} (the service needs Describe and Read on "
                                                "it, and Create on the cluster to create it)")
        partitions = sorted(md.partitions)
        ends: dict[int, int] = {}
        for p in partitions:
            try:
                _low, high = consumer.get_watermark_offsets(TopicPartition(self.topic, p), timeout=self._timeout)
            except KafkaException as exc:
                raise ControlTopicError(self.topic, f"cannot read partition {p}'s end offset: {exc}") from None
            ends[p] = high
        read_to = dict.fromkeys(partitions, 0)
        consumer.assign([TopicPartition(self.topic, p, OFFSET_BEGINNING) for p in partitions])
        latest: dict[tuple[str, str], bytes | None] = {}
        deadline = time.monotonic() + self._timeout
        while any(read_to[p] < ends[p] for p in partitions):
            if time.monotonic() > deadline:
                behind = {p: ends[p] - read_to[p] for p in partitions if read_to[p] < ends[p]}
                raise ControlTopicError(self.topic, f"not read to its end within {self._timeout:g}s "
                                                    f"(records left per partition: {behind})")
            for msg in consumer.consume(500, 0.2):
                err = msg.error()
                if err is not None:
                    if err.fatal() or err.code() in (KafkaError.TOPIC_AUTHORIZATION_FAILED,
                                                     KafkaError.UNKNOWN_TOPIC_OR_PART,
                                                     KafkaError._UNKNOWN_PARTITION):
                        raise ControlTopicError(self.topic, f"cannot read it: {err.str()}")
                    continue
                p, offset = msg.partition() or 0, msg.offset() or 0
                read_to[p] = offset + 1
                named = parse_key(msg.key())
                if named is not None:
                    latest[named] = msg.value()
            # The consumer's position, not the last offset read: compaction can leave the offsets just below
            # the end without a record (a deleted tombstone), and the position moves past such a gap.
            for tp in consumer.position([TopicPartition(self.topic, p) for p in partitions]):
                if tp.offset > read_to[tp.partition]:
                    read_to[tp.partition] = tp.offset
        return latest, read_to

    # ------------------------------------------------------------------ following (step 4)

    def _follow(self) -> None:
        """The follower thread: every record read goes to the event loop; the producer's reports are served."""
        assert self._consumer is not None and self._producer is not None and self._loop is not None
        while not self._stop.is_set():
            try:
                batch = self._consumer.consume(100, 0.1)
                self._producer.poll(0)
            except (KafkaException, RuntimeError) as exc:
                if self._stop.is_set():
                    return
                if str(exc) != self.last_error:
                    log.warning("control store: reading the topic failed: %s", exc, extra={"topic": self.topic})
                self.last_error = str(exc)
                continue
            for msg in batch:
                err = msg.error()
                if err is not None:
                    if err.str() != self.last_error:  # a broker down repeats the same error: said once
                        log.warning("control store: %s", err.str(), extra={"topic": self.topic})
                    self.last_error = err.str()
                    continue
                self.last_error = None
                try:
                    self._loop.call_soon_threadsafe(self._record_read, msg.partition() or 0, msg.offset() or 0,
                                                    msg.key(), msg.value())
                except RuntimeError:  # the event loop is closed: nobody is left to tell
                    return

    def _record_read(self, partition: int, offset: int, key: bytes | None, value: bytes | None) -> None:
        """On the loop: one record read by the follower; applied, then any writer waiting for it is told."""
        self._read_to[partition] = offset + 1
        named = parse_key(key)
        if named is not None:
            self._apply(named[0], named[1], value, initial=False)
        still: list[tuple[int, int, asyncio.Future[None]]] = []
        for p, o, fut in self._waiters:
            if p == partition and o <= offset:
                if not fut.done():
                    fut.set_result(None)
            else:
                still.append((p, o, fut))
        self._waiters = still

    def _apply(self, provider: str, project: str, value: bytes | None, *, initial: bool) -> None:
        try:
            record = decode_pause(provider, project, value)
        except BadControlRecord as exc:
            self.skipped += 1
            log.warning("control store: skipped a record it cannot read: %s", exc,
                        extra={"topic": self.topic, "provider": provider, "project": project})
            return
        key = (provider, project)
        if record is None:
            self._records.pop(key, None)
            if initial:
                return  # a resume in the topic's history: nothing stands to be lifted at start
        else:
            self._records[key] = record
        # Every resume read after start is reported, even of a project this store had no pause for: an
        # operator's resume also lifts a pause the member took by itself (failed credentials).
        try:
            self._on_change(provider, project, record is not None, record.reason if record else None)
        except Exception:  # one failing callback must not stop the follower or hide later changes
            log.exception("control store: on_change failed", extra={"provider": provider, "project": project})

    # ------------------------------------------------------------------ writes (step 5)

    def paused(self) -> dict[tuple[str, str], PauseRecord]:
        """Every standing operator pause, by (provider slug, project)."""
        return dict(self._records)

    async def pause(self, provider: str, project: str, reason: str | None = None, *, by: str = "api") -> PauseRecord:
        """Record a pause group-wide; returns once the broker acknowledged it and this store applied it."""
        if reason is not None:
            reason = reason[:REASON_MAX]
        record = PauseRecord(provider, project, reason, int(self._clock() * 1000), by)
        await self._write(pause_key(provider, project), encode_pause(record))
        return record

    async def resume(self, provider: str, project: str) -> None:
        """Lift a pause group-wide (a tombstone); returns once acknowledged and applied here."""
        await self._write(pause_key(provider, project), None)

    async def _write(self, key: bytes, value: bytes | None) -> None:
        producer, loop = self._producer, self._loop
        if producer is None or loop is None or self._stop.is_set():
            raise ControlStoreClosed("the control store is not running")
        acked: asyncio.Future[tuple[int, int]] = loop.create_future()

        def report(err: KafkaError | None, msg: Message) -> None:
            def settle() -> None:
                if acked.done():
                    return
                if err is not None:
                    acked.set_exception(ControlWriteError(f"the control topic {self.topic!r} did not take the "
                                                          f"write: {err.str()}"))
                else:
                    acked.set_result((msg.partition() or 0, msg.offset() or 0))
            loop.call_soon_threadsafe(settle)

        try:
            producer.produce(self.topic, key=key, value=value, on_delivery=report)
        except (BufferError, KafkaException) as exc:
            raise ControlWriteError(f"the control topic {self.topic!r} did not take the write: {exc}") from None
        partition, offset = await acked
        if self._read_to.get(partition, 0) > offset:
            return
        read_back: asyncio.Future[None] = loop.create_future()
        self._waiters.append((partition, offset, read_back))
        try:
            await asyncio.wait_for(read_back, self._timeout)
        except TimeoutError:
            # Durable already (acknowledged): only this member's view lags; it applies it once read.
            log.warning("control store: a write is acknowledged but not read back yet",
                        extra={"topic": self.topic, "partition": partition, "offset": offset})

    # ------------------------------------------------------------------ close

    async def close(self) -> None:
        """Stop following and close the clients; writes in flight are flushed (bounded by the timeout)."""
        self._stop.set()
        thread, self._thread = self._thread, None
        loop = asyncio.get_running_loop()
        if thread is not None:
            await loop.run_in_executor(None, thread.join, 5.0)
        await loop.run_in_executor(None, self._close_clients)
        for _p, _o, fut in self._waiters:
            if not fut.done():
                fut.cancel()
        self._waiters = []

    def _close_clients(self) -> None:
        producer, self._producer = self._producer, None
        consumer, self._consumer = self._consumer, None
        if producer is not None:
            producer.flush(self._timeout)
        if consumer is not None:
            consumer.close()

    def __repr__(self) -> str:
        return f"ControlStore(topic={self.topic!r}, paused={len(self._records)})"

