"""Production edges on the real broker: oversized dead letters, the ready gauge without probes, decode-failure logs."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import signal
import socket
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import KafkaError, Message, Producer
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

from consumer.app import Application
from consumer.config import Config, parse
from consumer.decoding import REASONS
from consumer.digest import FailureDigest
from consumer.dlq import BATCH_BYTES, LETTER_OVERHEAD_BYTES, parse_headers, producer_config
from consumer.embedded import EmbeddedBroker, free_port
from consumer.metrics import Metrics
from consumer.producer import encoded, produce_values
from consumer.samples import malformed, purchases
from consumer.sandbox import Sandbox
from tests.conftest import committed, config_dict, read_all, run_until_done, to_toml
from tests.test_pipeline import expected_conversions, sandbox_view, view_of

REPO = Path(__file__).resolve().parents[1]
BIG_LIMIT = 8 * 1024 * 1024  # the source topic's max.message.bytes: large enough for the 2 MB purchase


def new_names() -> dict[str, str]:
    suffix = uuid.uuid4().hex[:8]
    return {"topic": f"edges-{suffix}", "dlq": f"edges-{suffix}.dlq", "group": f"edges-{suffix}"}


def create_topic(bootstrap: str, name: str, config: dict[str, str], partitions: int = 3) -> None:
    """A topic with its own settings (the broker fixture creates topics with the broker's defaults)."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    for future in admin.create_topics([NewTopic(name, partitions, 1, config=config)], operation_timeout=10).values():
        future.result(15)


def produce_big(bootstrap: str, topic: str, records: Iterable[tuple[bytes | None, bytes]]) -> list[tuple[int, int]]:
    """(partition, offset) of each record, produced with a producer allowed to send BIG_LIMIT."""
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True, "linger.ms": 5,
                         "message.max.bytes": BIG_LIMIT})
    records = list(records)
    positions: list[tuple[int, int] | None] = [None] * len(records)
    errors: list[str] = []

    def report(i: int) -> Any:
        def cb(err: KafkaError | None, msg: Message) -> None:
            if err is not None:
                errors.append(err.str())
            else:
                positions[i] = (msg.partition(), msg.offset())
        return cb

    for i, (key, value) in enumerate(records):
        producer.produce(topic, key=key, value=value, on_delivery=report(i))
    assert producer.flush(60) == 0 and not errors, errors
    assert all(p is not None for p in positions)
    return [p for p in positions if p is not None]


def ends_of(positions: Iterable[tuple[int, int]]) -> dict[int, int]:
    out: dict[int, int] = {}
    for p, o in positions:
        out[p] = max(out.get(p, 0), o + 1)
    return out


def cfg_for(broker: EmbeddedBroker, names: dict[str, str], sandbox: Sandbox, **sections: Any) -> Config:
    return parse(config_dict(broker.bootstrap, names, sandbox.url, **sections), env={})


# --------------------------------------------------------------------------- item 1: oversized dead letters


def test_the_dlq_producer_takes_every_record_the_service_decodes() -> None:
    data = config_dict("127.0.0.1:9", new_names(), "http://127.0.0.1:9")
    data["decoding"] = {"max_message_bytes": 3_000_000}
    conf = producer_config(parse(data, env={}))
    assert conf["message.max.bytes"] == 3_000_000 + LETTER_OVERHEAD_BYTES
    assert conf["batch.size"] == BATCH_BYTES
    # The default limit (1 MiB) is above librdkafka's own default of 1,000,000.
    data["decoding"] = {}
    assert producer_config(parse(data, env={}))["message.max.bytes"] == 1_048_576 + LETTER_OVERHEAD_BYTES
    data["kafka"]["producer"] = {"message.max.bytes": 5_000_000, "batch.size": 16384}  # the operator's own wins
    conf = producer_config(parse(data, env={}))
    assert conf["message.max.bytes"] == 5_000_000 and conf["batch.size"] == 16384
    assert Application.producer_config(parse(data, env={})) == conf


async def test_a_2mb_purchase_is_dead_lettered_without_its_value_and_the_service_goes_on(
    broker: EmbeddedBroker, sandbox: Sandbox,
) -> None:
    names = new_names()
    create_topic(broker.bootstrap, names["topic"], {"max.message.bytes": str(BIG_LIMIT)})
    broker.create_topics([names["dlq"]], partitions=3)  # the broker's default max.message.bytes
    cfg = cfg_for(broker, names, sandbox)
    items = list(purchases(60, now_ms=int(time.time() * 1000), seed=21))
    big = replace(items[30], attributes={"note": "x" * 2_000_000})
    big_key, big_value = next(iter(encoded([big])))
    # Below max_message_bytes (1 MiB) but above librdkafka's default message.max.bytes: decoded, not valid
    # Avro, so dead-lettered, and its letter must be written whole.
    near_limit = b"\xff" * 1_000_500
    records = [*encoded(items[:30]), (big_key, big_value), (b"near", near_limit), *encoded(items[31:])]
    positions = produce_big(broker.bootstrap, names["topic"], records)
    big_at, near_at = positions[30], positions[31]

    metrics = Metrics()
    await run_until_done(cfg, len(records), metrics=metrics)  # exit 0: the oversized record stopped nothing

    letters = read_all(broker.bootstrap, names["dlq"], 2)
    assert len(letters) == 2
    by_origin = {(int(h["original.partition"]), int(h["original.offset"])): (m, h)
                 for m in letters for h in [parse_headers(m.headers())]}
    msg, h = by_origin[big_at]
    assert msg.value() is None and msg.key() == big_key
    assert h["stage"] == "decode" and h["exception.message"].startswith("too_large")
    assert h["omitted"] == "value,headers" and h["omitted.reason"].startswith("MSG_SIZE_TOO_LARGE")
    assert int(h["original.size"]) == len(big_value) > 2_000_000
    assert h["original.sha256"] == hashlib.sha256(big_value).hexdigest()
    msg, h = by_origin[near_at]
    assert msg.value() == near_limit and "omitted" not in h  # aligned: the producer takes it whole

    # Every other event was delivered, and the offsets went past the oversized one.
    expected = expected_conversions(cfg, items[:30] + items[31:])
    got = sandbox_view(sandbox)
    for provider, pairs in expected.items():
        assert got[provider] == view_of([c for _, c in pairs], provider), provider
    ends = ends_of(positions)
    assert committed(broker.bootstrap, names["group"], names["topic"]) == ends
    value = metrics.registry.get_sample_value
    assert value("offline_conversions_dlq_values_omitted_total", {"reason": "MSG_SIZE_TOO_LARGE"}) == 1
    assert value("offline_conversions_dlq_failures_total") == 0

    # A restart reads only what is new: the oversized record is behind it, not read (or dead-lettered) again.
    later = list(purchases(3, now_ms=int(time.time() * 1000), seed=22))
    tally = produce_values(broker.bootstrap, names["topic"], list(encoded(later)))
    metrics = Metrics()
    again = await run_until_done(cfg, 3, metrics=metrics)
    assert again.consumed == 3
    assert metrics.registry.get_sample_value("offline_conversions_decode_failures_total", {"reason": "too_large"}) \
        is None
    assert len(read_all(broker.bootstrap, names["dlq"], 2)) == 2
    ends.update({p: o + 1 for p, o in tally.last_offset.items()})
    assert committed(broker.bootstrap, names["group"], names["topic"]) == ends


def broker_enforces_topic_limits(bootstrap: str) -> bool:
    """Whether the broker refuses a record above a topic's max.message.bytes (Apache Kafka does; Tansu does not)."""
    probe = f"probe-{uuid.uuid4().hex[:8]}"
    create_topic(bootstrap, probe, {"max.message.bytes": "100000"}, partitions=1)
    producer = Producer({"bootstrap.servers": bootstrap, "message.max.bytes": 1_000_000})
    errors: list[KafkaError | None] = []
    producer.produce(probe, value=b"p" * 200_000, on_delivery=lambda err, _m: errors.append(err))
    assert producer.flush(30) == 0
    return errors[0] is not None


async def test_a_letter_the_dlq_topic_refuses_is_cut_alone_and_its_neighbours_stay_whole(
    broker: EmbeddedBroker, sandbox: Sandbox,
) -> None:
    names = new_names()
    broker.create_topics([names["topic"]], partitions=3)
    create_topic(broker.bootstrap, names["dlq"], {"max.message.bytes": "100000"})  # an operator's small DLQ limit
    enforced = broker_enforces_topic_limits(broker.bootstrap)
    cfg = cfg_for(broker, names, sandbox)
    small = list(malformed(6, seed=5))
    records = [(b"small", v) for v in small[:3]] + [(b"large", b"\xff" * 300_000)] + [(b"small", v) for v in small[3:]]
    produce_values(broker.bootstrap, names["topic"], records)
    await run_until_done(cfg, len(records))

    letters = read_all(broker.bootstrap, names["dlq"], len(records))
    assert len(letters) == len(records)
    whole = sorted(m.value() or b"" for m in letters if "omitted" not in parse_headers(m.headers()))
    cut = [m for m in letters if "omitted" in parse_headers(m.headers())]
    if enforced:  # Apache Kafka: the broker refuses the 300 kB letter, and only that one
        assert len(cut) == 1 and cut[0].key() == b"large" and cut[0].value() is None
        assert parse_headers(cut[0].headers())["original.size"] == "300000"
        assert whole == sorted(small)
    else:  # a broker that does not enforce the topic's limit (Tansu) takes every letter whole
        assert not cut and len(whole) == len(records)


# --------------------------------------------------------------------------- item 3: the ready gauge


def ready_value(metrics: Metrics) -> float | None:
    return metrics.registry.get_sample_value("offline_conversions_ready")


async def wait_until(check: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.05)  # a poll interval, bounded by the deadline


async def test_the_ready_gauge_follows_assignment_without_any_readyz_probe(
    broker: EmbeddedBroker, sandbox: Sandbox,
) -> None:
    names = new_names()
    broker.create_topics([names["topic"], names["dlq"]], partitions=1)
    # One provider, so one consumer group: its one partition makes exactly one member ready.
    cfg = cfg_for(broker, names, sandbox, convert=None, conductrics=None)
    first, second = Metrics(), Metrics()
    a = Application(cfg, metrics=first, install_signals=False)
    b = Application(cfg, metrics=second, install_signals=False)

    def b_answered() -> bool:  # the group's answer to B's join, even an empty assignment
        return (second.registry.get_sample_value("offline_conversions_rebalance_callbacks_total",
                                                 {"group": f"{names['group']}.kameleoon", "event": "assigned"})
                or 0) >= 1

    runs = {a: asyncio.create_task(a.run())}
    try:
        await wait_until(lambda: ready_value(first) == 1, 30, "the first member to report ready")
        runs[b] = asyncio.create_task(b.run())
        # B joins; the group settles with the one partition at one member: that one is ready, the other not.
        await wait_until(lambda: b_answered() and sorted([ready_value(first), ready_value(second)]) == [0, 1]
                         and sum(len(p.source.assigned) for p in (*a.pipelines, *b.pipelines)) == 1, 30,
                         "the group to settle with exactly one member ready")
        holder, other = (a, b) if ready_value(first) == 1 else (b, a)
        # The holder leaves: the partition is revoked there and assigned to the other member, whose
        # gauge turns 1 by itself (nothing calls /readyz in this test).
        holder.stop()
        assert await asyncio.wait_for(runs[holder], 30) == 0
        assert ready_value(holder.metrics) == 0
        await wait_until(lambda: ready_value(other.metrics) == 1, 30, "the other member to take over, ready")
        other.stop()
        assert await asyncio.wait_for(runs[other], 30) == 0
        assert ready_value(other.metrics) == 0
    finally:
        for app, task in runs.items():
            app.stop()
            await asyncio.wait_for(task, 30)


async def scrape_ready(port: int) -> float | None:
    def get() -> float | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as resp:
                text = resp.read().decode()
        except OSError:
            return None
        for line in text.splitlines():
            if line.startswith("offline_conversions_ready "):
                return float(line.split()[1])
        return None
    return await asyncio.get_running_loop().run_in_executor(None, get)


def two_free_ports() -> int:
    """A port P with P+1 free too (the workers serve metrics on P + index)."""
    for _ in range(50):
        port = free_port()
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.1", port + 1))
            return port
        except OSError:
            continue
    raise AssertionError("no two consecutive free ports")


async def test_every_worker_process_reports_ready_by_itself(
    broker: EmbeddedBroker, sandbox: Sandbox, tmp_path: Path,
) -> None:
    names = new_names()
    broker.create_topics([names["topic"], names["dlq"]], partitions=3)
    port = two_free_ports()
    data = config_dict(broker.bootstrap, names, sandbox.url)
    data["metrics"] = {"host": "127.0.0.1", "port": port}
    path = tmp_path / "workers.toml"
    path.write_text(to_toml(data))
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    log = (tmp_path / "workers.log").open("wb")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "consumer", "run", "--config", str(path), "--workers", "2",
        cwd=str(REPO), env=env, stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 60
        seen: list[float | None] = [None, None]
        while time.monotonic() < deadline and seen != [1.0, 1.0]:
            seen = [await scrape_ready(port), await scrape_ready(port + 1)]  # /metrics only, never /readyz
            await asyncio.sleep(0.2)  # a poll interval, bounded by the deadline
        assert seen == [1.0, 1.0], f"ready per worker: {seen}\n{(tmp_path / 'workers.log').read_text()[-3000:]}"
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 40) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        log.close()


# --------------------------------------------------------------------------- item 8: decode failures in the log


def test_the_digest_reports_at_once_then_once_per_interval() -> None:
    d = FailureDigest(interval=10.0, max_examples=2)
    assert d.take(0.0) is None
    d.add("invalid_avro", "t[0]@1: x", 100.0)
    first = d.take(100.0)
    assert first is not None and first.count == 1 and first.examples == ["t[0]@1: x"]
    for i in range(500):
        d.add("invalid_avro" if i % 5 else "truncated", f"t[1]@{i}: y", 100.0 + i / 100)
    d.add("too_large", "t[2]@9: z", 105.0)
    assert d.take(105.0) is None and d.take(109.9) is None  # within the interval: still one line so far
    summary = d.take(110.0)
    assert summary is not None and summary.count == 501
    assert summary.reasons == {"invalid_avro": 400, "truncated": 100, "too_large": 1}
    assert summary.examples == ["t[1]@0: y", "t[1]@1: y"]  # the first of each reason, up to max_examples
    assert summary.text() == "invalid_avro 400, truncated 100, too_large 1"
    assert summary.seconds == pytest.approx(10.0)
    d.add("truncated", "t[0]@7", 111.0)
    assert d.take(111.0) is None
    forced = d.take(111.0, force=True)  # shutdown: what is pending is logged
    assert forced is not None and forced.count == 1


async def test_decode_failures_are_logged_as_a_summary_with_reasons(
    broker: EmbeddedBroker, topics: dict[str, str], sandbox: Sandbox, caplog: pytest.LogCaptureFixture,
) -> None:
    cfg = parse(config_dict(broker.bootstrap, topics, sandbox.url), env={})
    bad = list(malformed(200, seed=8))
    values = list(encoded(purchases(40, now_ms=int(time.time() * 1000), seed=8))) + [(b"bad", v) for v in bad]
    produce_values(broker.bootstrap, topics["topic"], values)
    with caplog.at_level(logging.WARNING, logger="consumer.pipeline"):
        await run_until_done(cfg, len(values))
    lines = [r for r in caplog.records if r.name == "consumer.pipeline" and "could not be decoded" in r.getMessage()]
    assert 1 <= len(lines) <= 3, [r.getMessage() for r in lines]  # a summary, not a line per record
    assert sum(r.decode_failures for r in lines) == len(bad)  # type: ignore[attr-defined]
    reasons: dict[str, int] = {}
    for r in lines:
        for reason, n in r.reasons.items():  # type: ignore[attr-defined]
            reasons[reason] = reasons.get(reason, 0) + n
        assert all(reason in r.getMessage() for reason in r.reasons)  # type: ignore[attr-defined]
        assert all(f"{topics['topic']}[" in e and "]@" in e for e in r.examples)  # type: ignore[attr-defined]
    assert set(reasons) <= REASONS and sum(reasons.values()) == len(bad) and len(reasons) > 1
