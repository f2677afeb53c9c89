"""Observability end to end: a real Prometheus scrapes the running service, and the tests ask Prometheus.

The service runs on the embedded broker against the sandbox; a Prometheus server on loopback scrapes its
/metrics every second. The counters (events consumed, conversions delivered per provider, dead letters) and
the consumer lag are read back through Prometheus' query API, so the exposition format, the metric names
and the label sets are checked the way an operator's dashboard would see them. Each provider reads in a consumer
group of its own: consumption, lag, assignment and in-flight are checked per group, bad input once for all.

Consumer lag on the embedded broker (Tansu): its high watermark is wrong after a multi-record batch
(/work/shared/toolcheck.md), so the events are produced one per batch (linger.ms=0, a flush after each)
and the test checks that the broker's watermarks equal the ends the producer's delivery reports give.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import subprocess
import time
import urllib.error
import urllib.parse
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import pytest
import yaml
from confluent_kafka import Consumer, Producer, TopicPartition

from consumer import logs
from consumer.app import Application
from consumer.config import Config, parse
from consumer.dlq import parse_headers
from consumer.embedded import EmbeddedBroker
from consumer.groups import group_of
from consumer.metrics import Metrics
from consumer.producer import Tally, encoded
from consumer.samples import malformed, purchases
from consumer.sandbox import Sandbox
from tests.conftest import config_dict, read_all
from tests.test_deploy import free_port, get_json, tool

N_PURCHASES = 240
N_MALFORMED = 12
PROVIDERS = ("kameleoon", "convert", "conductrics")
LAG = "offline_conversions_consumer_lag_messages"

T = TypeVar("T")


# --------------------------------------------------------------------------- helpers (also used by test_secrets)


@pytest.fixture
def log_stream() -> Iterator[io.StringIO]:
    """A stream for consumer.logs.setup(...); the root logger is put back as it was afterwards."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    stream = io.StringIO()
    try:
        yield stream
    finally:
        for h in list(root.handlers):
            root.removeHandler(h)
        for h in handlers:
            root.addHandler(h)
        root.setLevel(level)


def json_log_lines(text: str) -> list[dict[str, Any]]:
    """Every line of a log capture, each of which must be one JSON object with ts, level, logger and msg."""
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        try:
            doc = json.loads(line)
        except ValueError:
            pytest.fail(f"log line {n} is not JSON: {line[:300]!r}")
        assert isinstance(doc, dict), f"log line {n} is not a JSON object: {line[:300]!r}"
        for key in ("ts", "level", "logger", "msg"):
            assert key in doc, f"log line {n} has no {key!r}: {line[:300]!r}"
        assert doc["level"] in {"debug", "info", "warning", "error", "critical"}, line[:300]
        assert isinstance(doc["ts"], str) and doc["ts"].endswith("Z"), line[:300]
        out.append(doc)
    return out


def produce_one_per_batch(bootstrap: str, topic: str, values: list[tuple[bytes | None, bytes]],
                          partitions: int = 3) -> dict[int, int]:
    """Produce each message as its own record batch (round-robin over partitions); returns the end offsets.

    One record per batch keeps Tansu's high watermark right, so librdkafka's consumer lag is right too.
    """
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 0, "enable.idempotence": True})
    tally = Tally()
    for n, (key, value) in enumerate(values):
        producer.produce(topic, key=key, value=value, partition=n % partitions, on_delivery=tally)
        assert producer.flush(10) == 0, "a produce was not confirmed within 10 s"
    assert tally.delivered == len(values) and not tally.errors, tally.errors
    ends = {p: off + 1 for p, off in tally.last_offset.items()}
    # The broker's high watermark agrees with the delivery reports (it would not after multi-record batches).
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": "watermarks"})
    try:
        for p, end in ends.items():
            _, high = c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
            assert high == end, f"partition {p}: broker high watermark {high}, delivery reports say {end}"
    finally:
        c.close()
    return ends


async def poll_until(probe: Callable[[], Awaitable[T]], done: Callable[[T], bool], timeout: float,
                     what: str, every: float = 0.25) -> T:
    """Call `probe` until `done(result)`; fail with the last result after `timeout` (a bounded polling loop)."""
    deadline = time.monotonic() + timeout
    last: T = await probe()
    while not done(last):
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}; last seen: {last!r}")
        await asyncio.sleep(every)  # polling interval, bounded by the deadline above
        last = await probe()
    return last


class PrometheusServer:
    """A real Prometheus on loopback scraping one target every second; queried over its HTTP API."""

    def __init__(self, tmp: Path, target: str) -> None:
        self.tmp = tmp
        self.target = target
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> PrometheusServer:
        config = {
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
            "scrape_configs": [{"job_name": "offline-conversions", "static_configs": [{"targets": [self.target]}]}],
        }
        (self.tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
        self._log = (self.tmp / "prometheus.log").open("w")
        self.proc = subprocess.Popen(
            [
                tool("prometheus"),
                f"--config.file={self.tmp / 'prometheus.yml'}",
                f"--storage.tsdb.path={self.tmp / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=self._log,
        )
        return self

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
            self.proc = None
            self._log.close()

    def log(self) -> str:
        return (self.tmp / "prometheus.log").read_text()

    async def api(self, path: str) -> dict[str, Any]:
        assert self.proc is not None and self.proc.poll() is None, f"prometheus exited:\n{self.log()}"
        try:
            return await asyncio.to_thread(get_json, f"{self.base}{path}")
        except (urllib.error.URLError, ConnectionError) as exc:
            return {"status": "unreachable", "error": str(exc)}

    async def query(self, promql: str) -> list[dict[str, Any]] | None:
        """The instant vector of a query, or None while Prometheus is not answering yet."""
        body = await self.api("/api/v1/query?query=" + urllib.parse.quote(promql))
        if body.get("status") == "unreachable":
            return None
        assert body.get("status") == "success", f"{promql}: {body}"
        return list(body["data"]["result"])

    async def value(self, promql: str) -> float | None:
        """The single value of a query (None when it has no series)."""
        res = await self.query(promql)
        if not res:
            return None
        assert len(res) == 1, f"{promql}: expected one series, got {res}"
        return float(res[0]["value"][1])

    async def by_label(self, promql: str, label: str) -> dict[str, float]:
        return {r["metric"].get(label, ""): float(r["value"][1]) for r in await self.query(promql) or []}

    async def wait_scraping(self, timeout: float = 30.0) -> None:
        await poll_until(lambda: self.query('up{job="offline-conversions"}'),
                         lambda r: r is not None and len(r) > 0 and r[0]["value"][1] == "1",
                         timeout, "the first successful scrape")


@contextlib.contextmanager
def prometheus_scraping(tmp: Path, target: str) -> Iterator[PrometheusServer]:
    server = PrometheusServer(tmp, target).start()
    try:
        yield server
    finally:
        server.stop()


async def http_get(url: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as s, s.get(url, timeout=aiohttp.ClientTimeout(total=5)) as r:
        return r.status, await r.text()


async def wait_for_port(app: Application, task: asyncio.Task[int], timeout: float = 10.0) -> int:
    """The health server's port, once run() has started it."""
    deadline = time.monotonic() + timeout
    while app.health is None or not app.health.port:
        assert not task.done(), f"the service exited early: {task.result() if not task.cancelled() else 'cancelled'}"
        assert time.monotonic() < deadline, "the health server did not start within 10 s"
        await asyncio.sleep(0.005)  # polling interval, bounded by the deadline above
    return app.health.port


async def stop_app(app: Application, task: asyncio.Task[int], timeout: float = 30.0) -> int:
    app.stop()
    code = await asyncio.wait_for(task, timeout)
    assert code == 0, f"the service exited with {code}: {app.fatal}"
    return code


# --------------------------------------------------------------------------- the test


def slow_config(broker: EmbeddedBroker, topics: dict[str, str], sandbox_url: str) -> Config:
    """The test config, with statistics every 500 ms and a small in-flight window so a backlog builds up."""
    data = config_dict(broker.bootstrap, topics, sandbox_url)
    data["kafka"]["consumer"]["statistics.interval.ms"] = 500
    # With fetch.wait.max.ms=5 every pause/resume cycle of the small in-flight window costs ~1 s on Tansu
    # (240 events took ~27 s); 100 ms makes the catch-up take ~3 s.
    data["kafka"]["consumer"]["fetch.wait.max.ms"] = 100
    data["pipeline"].update({"max_in_flight": 8, "poll_batch": 8})
    return parse(data, env={})


async def test_prometheus_scrapes_counters_lag_and_health_of_a_running_service(
    broker: EmbeddedBroker, topics: dict[str, str], sandbox: Sandbox, tmp_path: Path, log_stream: io.StringIO,
) -> None:
    cfg = slow_config(broker, topics, sandbox.url)
    assert cfg.kafka.isolation == "provider"
    groups = {group_of(cfg.kafka, p) for p in PROVIDERS}  # each provider reads the topic in a group of its own
    logs.setup("INFO", "json", cfg.secrets(), stream=log_stream)
    items = list(purchases(N_PURCHASES, now_ms=int(time.time() * 1000), seed=21))
    bad = list(malformed(N_MALFORMED, seed=5))
    values = list(encoded(items)) + [(b"bad", v) for v in bad]
    total = len(values)
    ends = produce_one_per_batch(broker.bootstrap, topics["topic"], values)
    assert sum(ends.values()) == total and len(ends) == 3

    # Every provider answers slowly at first: with 8 events in flight the service falls behind.
    sandbox.set_latency("*", 0.25)
    metrics = Metrics()
    app = Application(cfg, metrics=metrics, install_signals=False, stop_when=None)
    task = asyncio.get_running_loop().create_task(app.run())
    try:
        port = await wait_for_port(app, task)
        base = f"http://127.0.0.1:{port}"

        # Right after start: /readyz says why it answers what it answers. Before the group join has assigned
        # partitions it is 503 with assigned 0 (Apache Kafka may have assigned them already: then 200).
        status, body = await http_get(f"{base}/readyz")
        detail = json.loads(body)
        assert set(detail) >= {"ready", "assigned", "broker", "dlq", "stopping"}, detail
        assert detail["ready"] is (status == 200), (status, detail)
        assert detail["ready"] is (detail["assigned"] > 0 and detail["broker"] and detail["dlq"]), detail
        status, body = await http_get(f"{base}/healthz")
        assert status == 200, body

        with prometheus_scraping(tmp_path, f"127.0.0.1:{port}") as prom:
            async def readyz() -> tuple[int, str]:
                return await http_get(f"{base}/readyz")

            status, body = await poll_until(readyz, lambda r: r[0] == 200, 30, "/readyz to answer 200")
            detail = json.loads(body)
            per_group = detail.pop("groups")
            assert detail == {"ready": True, "assigned": 3 * len(groups), "broker": True, "dlq": True,
                              "stopping": False}, detail
            assert set(per_group) == groups, per_group
            assert all(g["assigned"] == 3 and g["broker"] is True for g in per_group.values()), per_group
            assert (await http_get(f"{base}/healthz"))[0] == 200

            await prom.wait_scraping()
            # A backlog: Prometheus sees a positive lag on some partition while the providers are slow.
            lag = await poll_until(lambda: prom.value(f"max({LAG})"), lambda v: v is not None and v > 0, 20,
                                   f"a positive consumer lag in Prometheus (None: the service exports no {LAG})")
            assert lag is not None and 0 < lag <= total
            assert app.consumed < total, "the backlog was gone before Prometheus saw the lag"
            assert await prom.value("offline_conversions_ready") == 1
            # Every group has its own partitions and its own in-flight budget (max_in_flight = 8 each).
            assigned = await prom.by_label("sum by (group) (offline_conversions_assigned_partitions)", "group")
            assert assigned == dict.fromkeys(groups, 3.0), assigned
            in_flight = await prom.by_label("max by (group) (offline_conversions_in_flight_events)", "group")
            assert set(in_flight) == groups and all(v <= 8 for v in in_flight.values()), in_flight

            # The providers recover; the service catches up.
            sandbox.set_latency("*", 0.0)

            async def drained() -> tuple[int, int]:
                return app.consumed, app.live

            await poll_until(drained, lambda r: r == (total, 0), 30, "the service to read and finish every event")
            delivered = sandbox.counts()
            assert all(delivered[p] > 0 for p in PROVIDERS), delivered

            async def final() -> dict[str, Any]:
                lag_series = await prom.query(LAG) or []
                return {
                    # Each group reads every message: every group's count is the whole topic.
                    "consumed": await prom.by_label(
                        "sum by (group) (offline_conversions_events_consumed_total)", "group"),
                    "delivered": await prom.by_label(
                        'sum by (provider) (offline_conversions_conversions_total{outcome="delivered"})', "provider"),
                    # Bad input is dead-lettered once, not once per group.
                    "dlq": await prom.by_label("sum by (stage) (offline_conversions_dlq_messages_total)", "stage"),
                    "lag": {(r["metric"]["group"], r["metric"]["partition"]): float(r["value"][1])
                            for r in lag_series},
                }

            want = {
                "consumed": dict.fromkeys(groups, float(total)),
                "delivered": {p: float(delivered[p]) for p in PROVIDERS},
                "dlq": {"decode": float(N_MALFORMED)},
                "lag": {(g, p): 0.0 for g in groups for p in ("0", "1", "2")},
            }
            seen = await poll_until(final, lambda v: v == want, 20, "Prometheus to scrape the final values")
            assert seen == want
            # The same, by the service's own registry (Prometheus did not invent or drop anything).
            value = metrics.registry.get_sample_value
            for g in groups:
                assert value("offline_conversions_events_consumed_total", {"group": g}) == total
            failures = sum(s.value for f in metrics.decode_failures.collect() for s in f.samples
                           if s.name.endswith("_total"))
            assert failures == N_MALFORMED, "an undecodable message is counted once, not once per group"
            for p in PROVIDERS:
                assert value("offline_conversions_conversions_total",
                             {"provider": p, "outcome": "delivered"}) == delivered[p]

            # Bounded label sets: no visitor, order or event id is a label value, neither in the service's
            # exposition nor in any label Prometheus stored.
            status, exposition = await http_get(f"{base}/metrics")
            assert status == 200 and "offline_conversions_events_consumed_total" in exposition
            ids = {p.event_id for p in items} | {p.order_id for p in items} | {
                e.visitor_id for p in items for e in p.exposures}
            assert len(ids) > 3 * N_PURCHASES
            leaked = {i for i in ids if i in exposition}
            assert not leaked, f"ids in /metrics: {sorted(leaked)[:5]}"
            names = (await prom.api("/api/v1/labels"))["data"]
            assert {"provider", "partition", "outcome", "group"} <= set(names), names
            label_values: dict[str, list[str]] = {}
            for name in names:
                if name != "__name__":
                    label_values[name] = (await prom.api(f"/api/v1/label/{name}/values"))["data"]
            stored = [v for vals in label_values.values() for v in vals]
            assert not {v for v in stored if v in ids or any(i in v for i in ids)}, label_values
            assert set(label_values["provider"]) <= {*PROVIDERS, "none"}, label_values["provider"]
            assert set(label_values["group"]) == groups, label_values["group"]
            assert len(stored) < 100, f"unbounded label values? {label_values}"

            await stop_app(app, task)
    finally:
        if not task.done():
            app.stop()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(task, 30)

    # Every event reached the end: the dead-letter topic holds exactly the malformed ones.
    dlq = read_all(broker.bootstrap, topics["dlq"], N_MALFORMED)
    assert sorted(m.value() or b"" for m in dlq) == sorted(bad)
    assert all(parse_headers(m.headers())["stage"] == "decode" for m in dlq)

    # Structured logs: every line one JSON object, with the lifecycle in it.
    lines = json_log_lines(log_stream.getvalue())
    messages = [d["msg"] for d in lines]
    assert "started" in messages and "stopped" in messages and "partitions assigned" in messages, messages[:20]
    started = next(d for d in lines if d["msg"] == "started")
    assert started["logger"] == "consumer.app" and started["level"] == "info" and started["metrics_port"] == port
