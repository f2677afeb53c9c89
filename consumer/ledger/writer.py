"""LedgerWriter: an idempotent, acks=all producer of ledger records; a write is done when the broker acked all.

A record goes to the ledger partition of its event's source partition (explicit partition), keyed by
its conversion key. The pipeline finishes an event only when its records are acknowledged, so an
offset is never committed ahead of the ledger that recovery reads.

Delivery reports arrive on a poll thread; they are handed to the event loop in one call per poll, not
one per record (a record per conversion is on the hot path).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Sequence

from confluent_kafka import KafkaError, KafkaException, Message, Producer

from consumer.ledger.record import LedgerRecord, encode
from consumer.logs import KafkaLog
from consumer.metrics import Metrics

log = logging.getLogger(__name__)

# (ledger partition, ledger offset) of each record of a write, in the order given.
Acks = list[tuple[int, int]]
Done = Callable[["LedgerWriteError | None", Acks], None]


class LedgerWriteError(RuntimeError):
    """The broker did not acknowledge a ledger record (after librdkafka's own retries): the events stay unfinished."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(f"ledger write failed: {code}: {reason}")
        self.code = code  # librdkafka's error name, a metric label
        self.reason = reason


class _Write:
    __slots__ = ("acks", "done", "error", "remaining")

    def __init__(self, n: int, done: Done) -> None:
        self.remaining = n
        self.acks: Acks = [(-1, -1)] * n
        self.error: LedgerWriteError | None = None
        self.done = done


class _Report:
    """One record's delivery report, on the poll thread: queued for the event loop."""

    __slots__ = ("index", "write", "writer")

    def __init__(self, write: _Write, index: int, writer: LedgerWriter) -> None:
        self.write = write
        self.index = index
        self.writer = writer  # not its list: the poll thread swaps that list for a new one after each poll

    def __call__(self, err: KafkaError | None, msg: Message) -> None:
        partition, offset = msg.partition(), msg.offset()
        self.writer._reports.append((self.write, self.index, err, -1 if partition is None else partition,
                          -1 if offset is None else offset))


def producer_settings(config: dict[str, str | int | float | bool], timeout: float) -> dict[str, object]:
    """The ledger producer's librdkafka settings: the shared ones, then ours that nothing may override."""
    conf: dict[str, object] = {"linger.ms": 5, "message.timeout.ms": int(timeout * 1000), "compression.type": "lz4"}
    conf.update(config)
    # The recovery guarantee rests on these: a record acknowledged is on every in-sync replica, once, and
    # one producer's records of a partition are appended in the order produced (LedgerMarks relies on it).
    conf["enable.idempotence"] = True
    conf["acks"] = "all"
    conf["logger"] = KafkaLog()
    return conf


class LedgerWriter:
    """Writes ledger records; `submit` calls back on the event loop, `write` awaits the same."""

    def __init__(self, topic: str, config: dict[str, str | int | float | bool], timeout: float,
                 metrics: Metrics | None = None) -> None:
        self.topic = topic
        self.metrics = metrics
        self.producer = Producer(producer_settings(config, timeout))
        self._reports: list[tuple[_Write, int, KafkaError | None, int, int]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.pending = 0  # records produced and not yet acknowledged
        self.failed: LedgerWriteError | None = None  # the first failure: the service stops on it

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._poll, name="ledger-producer", daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        loop = self._loop
        assert loop is not None
        while not self._stop.is_set():
            self.producer.poll(0.05)
            if self._reports:
                # Only this thread appends (callbacks run inside poll), so swapping here is safe.
                batch, self._reports = self._reports, []
                try:
                    loop.call_soon_threadsafe(self._settle, batch)
                except RuntimeError:  # the loop closed under us (a test torn down): nobody is waiting
                    return

    def submit(self, records: Sequence[LedgerRecord], done: Done) -> None:
        """Produce `records`; `done(error, acks)` is called once on the event loop when all are acknowledged
        (error None) or one failed for good (its LedgerWriteError). An empty write is done at once."""
        if not records:
            done(None, [])
            return
        write = _Write(len(records), done)
        self._produce(write, records, 0)

    async def write(self, records: Sequence[LedgerRecord]) -> Acks:
        """`submit`, awaited: the records' (partition, offset), or LedgerWriteError."""
        future: asyncio.Future[Acks] = asyncio.get_running_loop().create_future()

        def done(err: LedgerWriteError | None, acks: Acks) -> None:
            if future.done():
                return
            if err is None:
                future.set_result(acks)
            else:
                future.set_exception(err)

        self.submit(records, done)
        return await future

    def _produce(self, write: _Write, records: Sequence[LedgerRecord], start: int) -> None:
        produce, topic = self.producer.produce, self.topic
        for i in range(start, len(records)):
            rec = records[i]
            try:
                produce(topic, value=encode(rec), key=rec.key.encode(), partition=rec.source_partition,
                        on_delivery=_Report(write, i, self))
            except BufferError:
                # The local queue is full: the poll thread drains it; the rest follows in a moment.
                assert self._loop is not None
                self._loop.call_later(0.01, self._produce, write, records, i)
                return
            except KafkaException as exc:
                err = exc.args[0] if exc.args and isinstance(exc.args[0], KafkaError) else None
                self._fail_rest(write, len(records) - i, LedgerWriteError(
                    err.name() if err is not None else "PRODUCE", err.str() if err is not None else str(exc)))
                return
            self.pending += 1

    def _fail_rest(self, write: _Write, n: int, error: LedgerWriteError) -> None:
        self._failure(error)
        if write.error is None:
            write.error = error
        write.remaining -= n
        if write.remaining == 0:
            write.done(write.error, write.acks)

    def _failure(self, error: LedgerWriteError) -> None:
        if self.metrics is not None:
            self.metrics.ledger_write_failures.labels(error.code).inc()
        if self.failed is None:
            self.failed = error
            log.error(str(error))

    def _settle(self, batch: list[tuple[_Write, int, KafkaError | None, int, int]]) -> None:
        for write, index, err, partition, offset in batch:
            self.pending -= 1
            if err is not None:
                error = LedgerWriteError(err.name(), err.str())
                self._failure(error)
                if write.error is None:
                    write.error = error
            else:
                write.acks[index] = (partition, offset)
            write.remaining -= 1
            if write.remaining == 0:
                write.done(write.error, write.acks)

    def close(self, timeout: float = 10.0) -> int:
        """Flush what is queued (its reports settle here, on the caller's thread); the records left unacknowledged."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=1.0)
        remaining = self.producer.flush(timeout)
        if self._reports:
            batch, self._reports = self._reports, []
            self._settle(batch)
        return int(remaining)
