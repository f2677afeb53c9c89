"""The dead-letter topic: what failed, why, and enough context to replay it to the right provider."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from confluent_kafka import KafkaError, KafkaException, Message, Producer

from consumer.config import Config
from consumer.logs import KafkaLog

log = logging.getLogger(__name__)

HEADER_PREFIX = "dlq."
MAX_MESSAGE_CHARS = 512
# Where processing stopped; `dlq replay --stage` accepts exactly these.
STAGES = ("decode", "match", "dispatch", "adjust")  # adjust: an order adjustment that was not applied
# librdkafka's own default for message.max.bytes: the DLQ producer never goes below it.
LIBRDKAFKA_MESSAGE_MAX_BYTES = 1_000_000
# A letter is the original value plus its key, its headers and ~1 KiB of ours: room for those above
# [decoding] max_message_bytes, so every record the service decodes fits in its dead letter whole.
LETTER_OVERHEAD_BYTES = 65_536
# The DLQ producer's batch.size: a batch of letters stays below any DLQ topic's max.message.bytes of
# 64 KiB or more, so a topic that refuses one oversized letter refuses it alone, never its neighbours
# (librdkafka's default, 1,000,000, would have small letters refused with a big one and cut as well).
BATCH_BYTES = 65_536
# A key longer than this is left out of a letter written without its value (it may be the cause).
MAX_REDUCED_KEY_BYTES = 1024
# Errors that refuse one record for what it is (its size, its content), not the topic for what it is:
# the letter is written again without the value. Anything else (a timeout, authorisation, an unknown
# topic) would refuse every letter, so it stops the service.
PER_RECORD_REFUSALS = frozenset({
    KafkaError.MSG_SIZE_TOO_LARGE,      # the producer's message.max.bytes (locally) or the topic's max.message.bytes
    KafkaError.RECORD_LIST_TOO_LARGE,   # a batch of one record above the broker's limit
    KafkaError.INVALID_MSG_SIZE,
    KafkaError.INVALID_MSG,             # CORRUPT_MESSAGE: the broker could not read the record
    KafkaError.INVALID_RECORD,          # refused by the broker's record validation
})

Headers = list[tuple[str, str | bytes | None]]


class DeadLetterError(RuntimeError):
    """The dead-letter topic could not be written; consuming must stop."""


@dataclass(frozen=True, slots=True)
class SourceRef:
    """Where an event came from, carried with it so the DLQ can point back at it."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: Headers = field(default_factory=list)
    timestamp: int | None = None


@dataclass(frozen=True, slots=True)
class Omission:
    """Why a letter was written without the original value, and what else it left out."""

    code: str  # the librdkafka error name (MSG_SIZE_TOO_LARGE, ...): a metric label
    reason: str  # the producer's or the broker's words
    parts: tuple[str, ...] = ("value", "headers")


@dataclass(frozen=True, slots=True)
class DeadLetter:
    source: SourceRef
    stage: str  # one of STAGES
    error_class: str
    error_message: str
    provider: str | None = None
    project: str | None = None
    attempts: int = 0
    http_status: int | None = None
    keys: Sequence[str] = ()  # idempotency keys of the conversions that failed (replay sends these only)
    event_id: str | None = None
    replays: int = 0  # replays that failed this letter again (it was re-queued each time)
    requeued_from: str | None = None  # the letter this one replaces: "<dlq topic>[<partition>]@<offset>"
    requeued_by: str | None = None  # the replay run that re-queued it (that run stops when it reads it back)
    reason: str | None = None  # a short code where the stage has one (match: too_many_exposures)


def dead_letter_headers(dl: DeadLetter, now_ms: int, omission: Omission | None = None) -> Headers:
    """The original headers, then ours (Kafka Connect's error headers are the model).

    With an `omission` the letter carries no value and no original headers (either may be what the
    topic refused), and says why, with the original value's size and digest to find it by.
    """
    src = dl.source
    ours: dict[str, str] = {
        "original.topic": src.topic,
        "original.partition": str(src.partition),
        "original.offset": str(src.offset),
        "stage": dl.stage,
        "exception.class": dl.error_class,
        "exception.message": dl.error_message[:MAX_MESSAGE_CHARS],
        "attempts": str(dl.attempts),
        "time": str(now_ms),
    }
    if src.timestamp is not None:
        ours["original.timestamp"] = str(src.timestamp)
    if dl.provider:
        ours["provider"] = dl.provider
    if dl.project:
        ours["project"] = dl.project
    if dl.http_status is not None:
        ours["http.status"] = str(dl.http_status)
    if dl.keys:
        ours["conversion.keys"] = ",".join(dl.keys)
    if dl.event_id:
        ours["event_id"] = dl.event_id
    if dl.reason:
        ours["reason"] = dl.reason
    if dl.replays:
        ours["replay.attempts"] = str(dl.replays)
    if dl.requeued_from:
        ours["requeued.from"] = dl.requeued_from
    if dl.requeued_by:
        ours["requeued.by"] = dl.requeued_by
    if omission is not None:
        value = src.value or b""
        ours["omitted"] = ",".join(omission.parts)
        ours["omitted.reason"] = f"{omission.code}: {omission.reason}"[:MAX_MESSAGE_CHARS]
        ours["original.size"] = str(len(value))
        ours["original.sha256"] = hashlib.sha256(value).hexdigest()
        if src.key is not None:
            ours["original.key.size"] = str(len(src.key))
        ours["original.headers"] = str(len(src.headers))
        own: Headers = []
    else:
        own = [(k, v) for k, v in src.headers if not k.startswith(HEADER_PREFIX)]
    return own + [(HEADER_PREFIX + k, v.encode()) for k, v in ours.items()]


def reduced(dl: DeadLetter, code: str, reason: str) -> tuple[bytes | None, Omission]:
    """The key and omission of the letter written in place of one the topic refused: no value, no headers."""
    key = dl.source.key
    parts: tuple[str, ...] = ("value", "headers")
    if key is not None and len(key) > MAX_REDUCED_KEY_BYTES:
        key, parts = None, (*parts, "key")
    return key, Omission(code, reason, parts)


def parse_headers(headers: Sequence[tuple[str, str | bytes | None]] | dict[str, str | bytes | None] | None,
                  ) -> dict[str, str]:
    """Our dlq.* headers back as a dict (the replay tool's view)."""
    out: dict[str, str] = {}
    pairs = headers.items() if isinstance(headers, dict) else headers or ()
    for k, v in pairs:
        if k.startswith(HEADER_PREFIX) and v is not None:
            out[k[len(HEADER_PREFIX):]] = v.decode("utf-8", "replace") if isinstance(v, bytes) else v
    return out


def message_max_bytes(max_message_bytes: int) -> int:
    """The DLQ producer's message.max.bytes: a letter of the largest record the service decodes fits whole."""
    return max(LIBRDKAFKA_MESSAGE_MAX_BYTES, max_message_bytes + LETTER_OVERHEAD_BYTES)


def producer_config(cfg: Config) -> dict[str, str | int | float | bool]:
    """The DLQ producer's librdkafka settings: the shared ones (TLS, SASL), the size limits, then its own."""
    return {**cfg.kafka.common, "bootstrap.servers": cfg.kafka.bootstrap_servers,
            "message.max.bytes": message_max_bytes(cfg.decoding.max_message_bytes), "batch.size": BATCH_BYTES,
            **cfg.kafka.producer}


class _Refused(Exception):
    """One record refused for what it is (a PER_RECORD_REFUSALS error)."""

    def __init__(self, err: KafkaError) -> None:
        super().__init__(err.str())
        self.code = err.name()
        self.reason = err.str()


class DeadLetterWriter:
    """An idempotent, acks=all producer; `write` resolves only when the broker confirmed the record."""

    def __init__(self, topic: str, config: dict[str, str | int | float | bool], timeout: float) -> None:
        conf: dict[str, object] = {
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": 5,
            "message.timeout.ms": int(timeout * 1000),
        }
        conf.update(config)
        # Idempotence and acks=all are the guarantee the offsets rely on: not overridable.
        conf["enable.idempotence"] = True
        conf["acks"] = "all"
        conf["logger"] = KafkaLog()  # librdkafka's own lines through the JSON logger, not raw to stderr
        self.topic = topic
        self.producer = Producer(conf)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.failed: str | None = None
        self.pending = 0

    def start(self) -> None:
        # Delivery reports arrive on whichever thread polls; a dedicated thread keeps latency low
        # and hands each result back to the event loop.
        self._thread = threading.Thread(target=self._poll, name="dlq-producer", daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.producer.poll(0.05)

    async def write(self, dl: DeadLetter) -> Omission | None:
        """Write `dl` whole, or, if the topic refuses that record, without its value (the Omission says why).

        One record can never stop the service: only an error that would refuse any letter raises
        DeadLetterError.
        """
        self.pending += 1
        try:
            try:
                await self._produce(dl.source.key, dl.source.value, dead_letter_headers(dl, _now_ms()))
                return None
            except _Refused as whole:
                key, omission = reduced(dl, whole.code, whole.reason)
            src = dl.source
            log.warning("dead letter written without its value: the topic refused it whole", extra={
                "partition": f"{src.topic}[{src.partition}]", "offset": src.offset, "stage": dl.stage,
                "bytes": len(src.value or b""), "reason": f"{omission.code}: {omission.reason}",
            })
            try:
                await self._produce(key, None, dead_letter_headers(dl, _now_ms(), omission))
            except _Refused as again:
                raise DeadLetterError(f"dead-letter write failed even without the value: {again.reason}") from None
            return omission
        except DeadLetterError as exc:
            self.failed = str(exc)
            raise
        finally:
            self.pending -= 1

    async def _produce(self, key: bytes | None, value: bytes | None, headers: Headers) -> None:
        """One record, confirmed by the broker; _Refused for a per-record refusal, DeadLetterError otherwise."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()

        def report(err: KafkaError | None, _msg: Message) -> None:
            def settle() -> None:
                if future.done():
                    return
                if err is None:
                    future.set_result(None)
                elif err.code() in PER_RECORD_REFUSALS:
                    future.set_exception(_Refused(err))
                else:
                    future.set_exception(DeadLetterError(f"dead-letter write failed: {err.str()}"))
            loop.call_soon_threadsafe(settle)

        while True:
            try:
                self.producer.produce(self.topic, value=value, key=key, headers=headers, on_delivery=report)
                break
            except BufferError:
                await asyncio.sleep(0.01)  # the local queue is full: let the poll thread drain it
            except KafkaException as exc:
                err = exc.args[0] if exc.args and isinstance(exc.args[0], KafkaError) else None
                if err is not None and err.code() in PER_RECORD_REFUSALS:
                    raise _Refused(err) from None  # refused before it left: larger than message.max.bytes
                raise DeadLetterError(f"dead-letter write failed: {exc}") from None
            except Exception as exc:
                raise DeadLetterError(f"dead-letter write failed: {exc}") from None
        await future

    def close(self, timeout: float = 10.0) -> int:
        remaining = self.producer.flush(timeout)
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=1.0)
        return remaining


def _now_ms() -> int:
    return int(time.time() * 1000)
