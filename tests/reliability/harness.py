"""Helpers for the fault-injection suite: configs (dict and TOML), produced streams with their offsets,
the expected conversions, the accounting of what reached the sandbox and the DLQ, the service as a
subprocess, and bounded waits on conditions."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from confluent_kafka import KafkaError, Message, Producer

from consumer.app import Application
from consumer.config import Config, parse
from consumer.dlq import parse_headers
from consumer.matcher import MatchSettings, match
from consumer.metrics import Metrics
from consumer.model import Conversion, Purchase
from consumer.producer import encoded
from consumer.samples import malformed, purchases
from consumer.sandbox import Sandbox
from tests.conftest import committed, to_toml
from tests.conftest import config_dict as config_dict  # re-exported for the scenarios

REPO = Path(__file__).resolve().parents[2]
PROVIDERS = ("kameleoon", "convert", "conductrics")


# --------------------------------------------------------------------------- configs


def to_config(data: dict[str, Any]) -> Config:
    return parse(data, env={})


def new_topics(broker: Any, partitions: int = 3, create_dlq: bool = True) -> dict[str, str]:
    suffix = uuid.uuid4().hex[:8]
    names = {"topic": f"rel-{suffix}", "dlq": f"rel-{suffix}.dlq", "group": f"rel-{suffix}"}
    broker.create_topics([names["topic"], names["dlq"]] if create_dlq else [names["topic"]], partitions=partitions)
    return names


# --------------------------------------------------------------------------- the stream


@dataclass
class Stream:
    """What was produced: purchases, malformed values, and where each landed."""

    items: list[Purchase] = field(default_factory=list)
    bad: list[bytes] = field(default_factory=list)
    # (partition, offset) of each produced message, purchases then malformed, in production order
    positions: list[tuple[int, int]] = field(default_factory=list)
    kinds: list[str] = field(default_factory=list)  # "purchase" | "malformed", parallel to positions
    refs: list[Any] = field(default_factory=list)  # the Purchase or the bytes, parallel to positions

    @property
    def total(self) -> int:
        return len(self.positions)

    def ends(self) -> dict[int, int]:
        out: dict[int, int] = {}
        for p, o in self.positions:
            out[p] = max(out.get(p, 0), o + 1)
        return out

    def malformed_positions(self) -> set[tuple[int, int]]:
        return {pos for pos, k in zip(self.positions, self.kinds, strict=True) if k == "malformed"}

    def first_malformed(self) -> dict[int, int]:
        out: dict[int, int] = {}
        for (p, o) in self.malformed_positions():
            out[p] = min(out.get(p, o), o)
        return out

    def by_position(self) -> dict[tuple[int, int], Any]:
        return dict(zip(self.positions, self.refs, strict=True))


def produce(bootstrap: str, topic: str, n_purchases: int, n_malformed: int = 0, *, seed: int = 7,
            stream: Stream | None = None, malformed_first_at: float = 0.5, partitions: int = 3) -> Stream:
    """Produce purchases with malformed messages interleaved after `malformed_first_at` of the stream; the
    malformed ones go round-robin over the partitions. Appends to `stream` when given."""
    s = stream or Stream()
    items = list(purchases(n_purchases, now_ms=int(time.time() * 1000), seed=seed))
    good = list(encoded(items))
    bad = list(malformed(n_malformed, seed))
    plan: list[tuple[str, Any, bytes | None, bytes, int | None]] = [
        ("purchase", item, key, value, None) for item, (key, value) in zip(items, good, strict=True)]
    if bad:
        start = int(len(plan) * malformed_first_at)
        step = max(1, (len(plan) - start) // len(bad))
        for j in reversed(range(len(bad))):
            plan.insert(min(len(plan), start + j * step),
                        ("malformed", bad[j], f"bad-{seed}-{j}".encode(), bad[j], j % partitions))

    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True, "linger.ms": 10,
                         "queue.buffering.max.messages": 1_000_000})
    results: list[tuple[int, int] | None] = [None] * len(plan)
    errors: list[str] = []

    def report(i: int) -> Callable[[KafkaError | None, Message], None]:
        def cb(err: KafkaError | None, msg: Message) -> None:
            if err is not None:
                errors.append(err.str())
            else:
                results[i] = (msg.partition(), msg.offset())  # type: ignore[assignment]
        return cb

    for i, (_kind, _ref, key, value, partition) in enumerate(plan):
        kwargs: dict[str, Any] = {"value": value, "key": key, "on_delivery": report(i)}
        if partition is not None:
            kwargs["partition"] = partition
        while True:
            try:
                producer.produce(topic, **kwargs)
                break
            except BufferError:
                producer.poll(0.05)
    remaining = producer.flush(60)
    assert remaining == 0 and not errors, f"produce failed: {remaining} undelivered, {errors[:3]}"
    for (kind, ref, *_), pos in zip(plan, results, strict=True):
        assert pos is not None
        s.positions.append(pos)
        s.kinds.append(kind)
        s.refs.append(ref)
        if kind == "purchase":
            s.items.append(ref)
        else:
            s.bad.append(ref)
    return s


# --------------------------------------------------------------------------- accounting


def conversions_of(cfg: Config, items: Iterable[Purchase]) -> dict[str, list[Conversion]]:
    settings = MatchSettings.from_config(cfg)
    now = int(time.time() * 1000)
    out: dict[str, list[Conversion]] = {p: [] for p in PROVIDERS}
    for p in items:
        for c in match(p, settings, now).conversions:
            out[c.provider.slug].append(c)
    return out


def expected_view(conversions: dict[str, list[Conversion]]) -> dict[str, Counter[Any]]:
    """What the sandbox records for these conversions, in the sandbox's own terms (as tests/test_pipeline.py)."""
    return {
        "kameleoon": Counter(c.key for c in conversions["kameleoon"]),
        "convert": Counter((c.visitor_id, c.experiment_id, c.variation_id, c.order_id)
                           for c in conversions["convert"]),
        "conductrics": Counter((c.visitor_id, (g,)) for c in conversions["conductrics"] for g in c.goals),
    }


def record_view(provider: str, r: Any) -> Any:
    if provider == "kameleoon":
        return r.nonce
    if provider == "convert":
        return (r.visitor, r.experiment_id, r.variation_id, r.transaction_id)
    return (r.visitor, r.goals)


def sandbox_view(sandbox: Sandbox) -> dict[str, Counter[Any]]:
    return {p: Counter(record_view(p, r) for r in sandbox.records_for(p)) for p in PROVIDERS}


def expected_total(want: dict[str, Counter[Any]]) -> int:
    return sum(sum(c.values()) for c in want.values())


def all_present(sandbox: Sandbox, want: dict[str, Counter[Any]]) -> bool:
    """Cheap enough to be a sandbox.wait_until predicate."""
    if len(sandbox.records) < expected_total(want):
        return False
    got = sandbox_view(sandbox)
    return all(not (want[p] - got[p]) for p in PROVIDERS)


@dataclass
class Accounting:
    expected: int
    received: int
    lost: int
    unexpected: int
    duplicates: int  # extra copies of expected conversions
    duplicate_keys: int  # sandbox.duplicates() keys
    missing_sample: list[Any]


def account(sandbox: Sandbox, want: dict[str, Counter[Any]]) -> Accounting:
    got = sandbox_view(sandbox)
    lost = unexpected = dupes = 0
    missing: list[Any] = []
    for p in PROVIDERS:
        short = want[p] - got[p]
        extra = got[p] - want[p]
        lost += sum(short.values())
        missing += [(p, k) for k in list(short)[:3]]
        for k, n in extra.items():
            if k in want[p]:
                dupes += n
            else:
                unexpected += n
    # Every key the sandbox saw more than once must be a re-send of an expected conversion.
    for key in sandbox.duplicates():
        recs = [r for r in sandbox.records if r.key == key]
        for r in recs:
            if record_view(r.provider, r) not in want[r.provider]:
                unexpected += 1
    return Accounting(expected_total(want), len(sandbox.records), lost, unexpected, dupes,
                      len(sandbox.duplicates()), missing)


def dlq_sources(messages: list[Message]) -> Counter[tuple[int, int]]:
    """(original partition, original offset) of every dead letter, with repeats."""
    out: Counter[tuple[int, int]] = Counter()
    for m in messages:
        h = parse_headers(m.headers())
        out[(int(h["original.partition"]), int(h["original.offset"]))] += 1
    return out


async def wait_for(check: Callable[[], Awaitable[bool] | bool], timeout: float, what: str,
                   every: float = 0.2) -> None:
    """Poll a condition until it holds; AssertionError naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        await asyncio.sleep(every)  # a poll interval, bounded by the deadline above


async def committed_async(bootstrap: str, group: str, topic: str, partitions: int = 3) -> dict[int, int]:
    return await asyncio.get_running_loop().run_in_executor(None, committed, bootstrap, group, topic, partitions)


async def wait_committed(bootstrap: str, group: str, topic: str, ends: dict[int, int],
                         timeout: float = 30.0) -> dict[int, int]:
    last: dict[int, int] = {}

    async def reached() -> bool:
        nonlocal last
        last = await committed_async(bootstrap, group, topic, max(ends) + 1)
        return all(last.get(p, -1) >= end for p, end in ends.items())

    try:
        await wait_for(reached, timeout, f"committed offsets to reach {ends}", every=0.3)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; last seen {last}") from None
    return last


# --------------------------------------------------------------------------- the service as a process


class Service:
    """`python -m consumer run --config FILE` in a subprocess, its log in a file."""

    def __init__(self, config: dict[str, Any], workdir: Path, name: str = "svc") -> None:
        self.config = config
        self.workdir = workdir
        self.name = name
        self.path = workdir / f"{name}.toml"
        self.path.write_text(to_toml(config))
        self.proc: asyncio.subprocess.Process | None = None
        self.runs = 0
        self.logs: list[Path] = []

    async def start(self) -> None:
        assert self.proc is None or self.proc.returncode is not None
        self.runs += 1
        log = self.workdir / f"{self.name}-{self.runs}.log"
        self.logs.append(log)
        env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        with log.open("wb") as fh:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "consumer", "run", "--config", str(self.path),
                cwd=str(REPO), env=env, stdout=fh, stderr=fh,
            )

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)

    def terminate(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)

    async def wait(self, timeout: float) -> int:
        assert self.proc is not None
        try:
            return await asyncio.wait_for(self.proc.wait(), timeout)
        except TimeoutError:
            raise AssertionError(f"{self.name} did not exit within {timeout}s; log tail:\n{self.tail()}") from None

    def tail(self, n: int = 30) -> str:
        if not self.logs:
            return ""
        lines = self.logs[-1].read_text(errors="replace").splitlines()
        return "\n".join(lines[-n:])

    def log_lines(self) -> list[dict[str, Any]]:
        out = []
        for path in self.logs:
            for line in path.read_text(errors="replace").splitlines():
                try:
                    out.append(json.loads(line))
                except ValueError:
                    out.append({"raw": line})
        return out

    async def stop(self) -> None:
        """Cleanup: SIGKILL a process still running (only our own child)."""
        if self.running:
            assert self.proc is not None
            self.proc.send_signal(signal.SIGKILL)
            await self.proc.wait()


def result_line(name: str, **numbers: Any) -> str:
    line = f"RESULT {name}: " + ", ".join(f"{k}={v}" for k, v in numbers.items())
    print(line)
    return line


# --------------------------------------------------------------------------- group members and steady streams


class Member:
    """One in-process service instance (an Application) in a consumer group."""

    def __init__(self, cfg: Config, name: str) -> None:
        self.name = name
        self.app = Application(cfg, metrics=Metrics(), install_signals=False)
        self.task = asyncio.get_running_loop().create_task(self.app.run())

    async def leave(self) -> int:
        self.app.stop()
        return await asyncio.wait_for(self.task, 40)

    def owned(self, group: str | None = None) -> list[int]:
        """The partitions this member owns in `group` (None: in its first provider group)."""
        pipelines = self.app.pipelines
        if not pipelines:
            return []
        pipeline = next((p for p in pipelines if p.group == group), None) if group else pipelines[0]
        return sorted(p for _, p in pipeline.source.assigned) if pipeline else []

    def groups(self) -> list[str]:
        return [p.group for p in self.app.pipelines]

    async def assigned(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not (self.app.pipelines and all(p.source.assigned for p in self.app.pipelines)):
            assert time.monotonic() < deadline, f"{self.name} got no partitions within {timeout}s"
            assert not self.task.done(), f"{self.name} exited: {self.app.fatal}"
            await asyncio.sleep(0.05)  # poll interval under a deadline


async def settled(members: list[Member], partitions: int = 6, timeout: float = 45.0) -> float:
    """Wait (bounded) until the running members own every partition between them, each once, and each
    running member owns at least one when there are enough partitions; returns the time (epoch s) it did.

    Tansu's group coordinator (classic protocol) can leave a group with no owners when a join and a
    leave overlap; Kafka does not. So each membership change in the scenarios waits for the group to
    settle before the next, which still moves partitions mid-stream, under load, every time.
    """
    deadline = time.monotonic() + timeout
    while True:
        live = [m for m in members if not m.task.done()]
        groups = sorted({g for m in live for g in m.groups()})
        settled_groups = 0
        for group in groups:  # every provider group of the members, each settled on its own
            owned = [p for m in live for p in m.owned(group)]
            balanced = len(live) > partitions or all(m.owned(group) for m in live)
            settled_groups += sorted(owned) == list(range(partitions)) and balanced
        if groups and settled_groups == len(groups):
            return time.time()
        owners = [(m.name, {g: m.owned(g) for g in m.groups()}) for m in live]
        assert time.monotonic() < deadline, f"the group did not settle: {owners}"
        await asyncio.sleep(0.02)  # poll interval under a deadline


class SteadyStream:
    """Purchases produced at a fixed rate by a thread until stopped; `stream` holds where each landed."""

    def __init__(self, bootstrap: str, topic: str, rate: float, *, seed: int = 5, seconds: float = 120.0) -> None:
        self.bootstrap, self.topic, self.rate = bootstrap, topic, rate
        self.items = list(purchases(int(rate * seconds), now_ms=int(time.time() * 1000), seed=seed))
        self.stream = Stream()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="steady-stream", daemon=True)
        self.errors: list[str] = []
        self.produced = 0
        # (partition, offset) -> the purchase, as delivery reports arrive (read by monitors mid-run)
        self.landed: dict[tuple[int, int], Purchase] = {}
        self.sent_at: dict[str, float] = {}  # order id -> wall time it was handed to the producer

    def start(self) -> SteadyStream:
        self._thread.start()
        return self

    def _run(self) -> None:
        producer = Producer({"bootstrap.servers": self.bootstrap, "enable.idempotence": True, "linger.ms": 5,
                             "acks": "all"})
        results: list[tuple[int, int] | None] = [None] * len(self.items)

        def report(i: int) -> Callable[[KafkaError | None, Message], None]:
            def cb(err: KafkaError | None, msg: Message) -> None:
                if err is not None:
                    self.errors.append(err.str())
                else:
                    results[i] = (msg.partition(), msg.offset())  # type: ignore[assignment]
                    self.landed[(msg.partition(), msg.offset())] = self.items[i]  # type: ignore[index]
            return cb

        values = list(encoded(self.items))
        started = time.monotonic()
        n = 0
        while n < len(values) and not self._stop.is_set():
            key, value = values[n]
            self.sent_at[self.items[n].order_id] = time.time()
            producer.produce(self.topic, value=value, key=key, on_delivery=report(n))
            n += 1
            producer.poll(max(0.0, n / self.rate - (time.monotonic() - started)))
        self.produced = n
        producer.flush(60)
        for i in range(n):
            pos = results[i]
            if pos is None:
                self.errors.append(f"purchase {i} has no delivery report")
                continue
            self.stream.positions.append(pos)
            self.stream.kinds.append("purchase")
            self.stream.refs.append(self.items[i])
            self.stream.items.append(self.items[i])

    def stop(self) -> Stream:
        self._stop.set()
        self._thread.join(90)
        assert not self.errors, f"the steady stream failed: {self.errors[:3]}"
        return self.stream


def longest_gap(times: Iterable[float], start: float, end: float) -> float:
    """The longest stretch in [start, end] with no delivery, in seconds (the pause a change caused)."""
    inside = sorted(t for t in times if start <= t <= end)
    before = [t for t in times if t < start]
    marks = [max(before) if before else start, *inside, end]
    return max(b - a for a, b in itertools.pairwise(marks))
