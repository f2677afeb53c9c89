"""The dead-letter topic: what failed, why, and enough context to replay it to the right provider."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from confluent_kafka import KafkaError, Message, Producer

from consumer.logs import KafkaLog

log = logging.getLogger(__name__)

HEADER_PREFIX = "dlq."
MAX_MESSAGE_CHARS = 512

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
class DeadLetter:
    source: SourceRef
    stage: str  # decode, match, dispatch
    error_class: str
    error_message: str
    provider: str | None = None
    project: str | None = None
    attempts: int = 0
    http_status: int | None = None
    keys: Sequence[str] = ()  # idempotency keys of the conversions that failed (replay sends these only)
    event_id: str | None = None
    reason: str | None = None  # a short code where the stage has one (match: too_many_exposures)


def dead_letter_headers(dl: DeadLetter, now_ms: int) -> Headers:
    """The original headers, then ours (Kafka Connect's error headers are the model)."""
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
    own = [(k, v) for k, v in src.headers if not k.startswith(HEADER_PREFIX)]
    return own + [(HEADER_PREFIX + k, v.encode()) for k, v in ours.items()]


def parse_headers(headers: Sequence[tuple[str, str | bytes | None]] | dict[str, str | bytes | None] | None,
                  ) -> dict[str, str]:
    """Our dlq.* headers back as a dict (the replay tool's view)."""
    out: dict[str, str] = {}
    pairs = headers.items() if isinstance(headers, dict) else headers or ()
    for k, v in pairs:
        if k.startswith(HEADER_PREFIX) and v is not None:
            out[k[len(HEADER_PREFIX):]] = v.decode("utf-8", "replace") if isinstance(v, bytes) else v
    return out


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

    async def write(self, dl: DeadLetter) -> None:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()

        def report(err: KafkaError | None, _msg: Message) -> None:
            def settle() -> None:
                if future.done():
                    return
                if err is None:
                    future.set_result(None)
                else:
                    future.set_exception(DeadLetterError(f"dead-letter write failed: {err.str()}"))
            loop.call_soon_threadsafe(settle)

        self.pending += 1
        try:
            while True:
                try:
                    self.producer.produce(
                        self.topic, value=dl.source.value, key=dl.source.key,
                        headers=dead_letter_headers(dl, int(time.time() * 1000)), on_delivery=report,
                    )
                    break
                except BufferError:
                    await asyncio.sleep(0.01)  # the local queue is full: let the poll thread drain it
                except Exception as exc:
                    raise DeadLetterError(f"dead-letter write failed: {exc}") from None
            await future
        except DeadLetterError as exc:
            self.failed = str(exc)
            raise
        finally:
            self.pending -= 1

    def close(self, timeout: float = 10.0) -> int:
        remaining = self.producer.flush(timeout)
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=1.0)
        return remaining
