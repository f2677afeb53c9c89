"""The Prometheus metric catalogue (docs/metrics.md) and the /metrics, /healthz, /readyz server."""

from __future__ import annotations

import errno
import json
import socket
from bisect import bisect_right
from collections.abc import Callable
from typing import Any, TypeVar

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from consumer.config import ConfigError

NS = "offline_conversions"
C = TypeVar("C")
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_DELAY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 21600.0, 86400.0)


class Metrics:
    """Every metric the service exports, on its own registry so tests can run several services."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry or CollectorRegistry()
        self.events_consumed = Counter(
            f"{NS}_events_consumed_total", "Messages read from the source topic, per consumer group.", ["group"],
            registry=r
        )
        self.events_decoded = Counter(
            f"{NS}_events_decoded_total", "Messages decoded into purchases, per consumer group.", ["group"],
            registry=r,
        )
        self.decode_failures = Counter(
            f"{NS}_decode_failures_total", "Messages that could not be decoded, by reason.", ["reason"], registry=r
        )
        self.match_decisions = Counter(
            f"{NS}_match_decisions_total",
            "Matcher outcomes per exposure or purchase: matched, or the rejection reason.",
            ["provider", "reason"],
            registry=r,
        )
        self.purchases = Counter(
            f"{NS}_purchases_total",
            "Purchases by consumer group and attribution result (attributed, unattributed): with a group per "
            "provider, whether the purchase produced a conversion for that group's provider.", ["group", "result"],
            registry=r,
        )
        self.conversions = Counter(
            f"{NS}_conversions_total",
            "Conversions by provider and outcome (delivered, dead_lettered, not_accepted, skipped).",
            ["provider", "outcome"],
            registry=r,
        )
        self.adjustments = Counter(
            f"{NS}_adjustments_total",
            "Order adjustments (refunds, cancellations) per provider project by outcome (consumer/adjustments.py: "
            "retracted, restated, not_supported, skipped, already_retracted, no_change, unknown_project, "
            "not_delivered, orphan, invalid).",
            ["provider", "outcome"],
            registry=r,
        )
        self.http_duration = Histogram(
            f"{NS}_http_request_duration_seconds",
            "Provider HTTP request duration by status class (2xx, 4xx, 5xx, error).",
            ["provider", "status_class"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.retries = Counter(
            f"{NS}_http_retries_total", "Provider requests scheduled for retry, by reason.", ["provider", "reason"],
            registry=r,
        )
        self.batch_conversions = Histogram(
            f"{NS}_batch_conversions",
            "Conversions per provider request.",
            ["provider"],
            buckets=(1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000),
            registry=r,
        )
        self.batch_bytes = Histogram(
            f"{NS}_batch_bytes",
            "Body bytes per provider request.",
            ["provider"],
            buckets=(256, 1024, 4096, 16384, 65536, 262144, 1048576, 3145728),
            registry=r,
        )
        self.circuit_state = Gauge(
            f"{NS}_circuit_state", "Circuit breaker per provider project: 0 closed, 1 half-open, 2 open.",
            ["provider", "project"], registry=r,
        )
        self.concurrency_limit = Gauge(
            f"{NS}_concurrency_limit",
            "Requests allowed at once per provider project: the fixed concurrency, or the adaptive limit now.",
            ["provider", "project"], registry=r,
        )
        self.project_paused = Gauge(
            f"{NS}_project_paused",
            "1 while a provider project is paused, by reason: credentials (refused: probed until accepted) or "
            "operator (until resumed). Its conversions wait; nothing is dead-lettered.",
            ["provider", "project", "reason"], registry=r,
        )
        self.token_grants = Counter(
            f"{NS}_token_grants_total", "OAuth tokens obtained, by result.", ["provider", "result"], registry=r
        )
        self.in_flight = Gauge(
            f"{NS}_in_flight_events", "Events read but not yet delivered or dead-lettered, per consumer group.",
            ["group"], registry=r,
        )
        self.paused_partitions = Gauge(
            f"{NS}_paused_partitions", "Assigned partitions paused by backpressure, per consumer group.", ["group"],
            registry=r,
        )
        self.assigned_partitions = Gauge(
            f"{NS}_assigned_partitions", "Partitions assigned to this member, per consumer group.", ["group"],
            registry=r,
        )
        self.rebalances = Counter(
            f"{NS}_rebalance_callbacks_total",
            "Group rebalance callbacks this member ran, by group and event (assigned, revoked, lost).",
            ["group", "event"], registry=r,
        )
        self.dlq_produced = Counter(
            f"{NS}_dlq_messages_total", "Messages written to the dead-letter topic, by stage and provider.",
            ["stage", "provider"], registry=r,
        )
        self.dlq_failures = Counter(f"{NS}_dlq_failures_total", "Dead-letter writes that failed.", registry=r)
        self.dlq_values_omitted = Counter(
            f"{NS}_dlq_values_omitted_total",
            "Dead letters written without the original value because the topic refused them whole, by error.",
            ["reason"], registry=r,
        )
        self.commits = Counter(
            f"{NS}_commits_total", "Offset commits, by group and result (ok, failed).", ["group", "result"], registry=r
        )
        self.commit_failing_partitions = Gauge(
            f"{NS}_commit_failing_partitions",
            "Assigned partitions whose last offset commit failed and is not yet confirmed by a retry, per group.",
            ["group"], registry=r,
        )
        self.consumer_lag = Gauge(
            f"{NS}_consumer_lag_messages", "Consumer lag per group and partition, from librdkafka statistics.",
            ["group", "topic", "partition"], registry=r,
        )
        self.delivery_delay = Histogram(
            f"{NS}_delivery_delay_seconds",
            "Time from the purchase's occurred_at to its delivery at the provider.",
            ["provider"],
            buckets=_DELAY_BUCKETS,
            registry=r,
        )
        self.processing_delay = Histogram(
            f"{NS}_processing_delay_seconds",
            "Time from reading an event to it being done (delivered or dead-lettered).",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.ready = Gauge(
            f"{NS}_ready", "1 while the service is ready (assigned, broker and DLQ reachable).", registry=r
        )
        self.ledger_write_failures = Counter(
            f"{NS}_ledger_write_failures_total",
            "Ledger records the broker did not acknowledge, by librdkafka error (the service stops on the first).",
            ["reason"], registry=r,
        )
        self.ledger_records = Counter(
            f"{NS}_ledger_records_total", "Ledger records acknowledged by the broker, by provider and outcome.",
            ["provider", "outcome"], registry=r,
        )
        self.ledger_recovery_records = Counter(
            f"{NS}_ledger_recovery_records_total",
            "Ledger records read by recovery on assignment, by provider.", ["provider"], registry=r,
        )
        self.ledger_recovered_keys = Counter(
            f"{NS}_ledger_recovered_keys_total",
            "Conversion keys recovery found delivered since the committed offset (not sent again), by provider.",
            ["provider"], registry=r,
        )
        self.ledger_recovery_seconds = Histogram(
            f"{NS}_ledger_recovery_seconds", "Time one partition's recovery took, by provider.", ["provider"],
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.ledger_recovery_fallbacks = Counter(
            f"{NS}_ledger_recovery_fallbacks_total",
            "Recoveries without commit metadata (first start, upgrade) or cut at max_recovery_records, by kind.",
            ["provider", "kind"], registry=r,
        )
        self.ledger_pending = Gauge(
            f"{NS}_ledger_pending_records", "Ledger records produced and not yet acknowledged (the ledger lag).",
            registry=r,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)


class Count:
    """A counter's pending increments: the hot path adds to `n`, `Tally.flush` applies it."""

    __slots__ = ("child", "n")

    def __init__(self, child: Any) -> None:
        self.child = child
        self.n = 0.0


class Observed:
    """A histogram's pending observations: the hot path appends to `values`, `Tally.flush` applies them."""

    __slots__ = ("child", "values")

    def __init__(self, child: Any) -> None:
        self.child = child
        self.values: list[float] = []


class Tally:
    """Counts and observations gathered on the hot path and applied to the metrics in bulk.

    A `labels()` lookup and a lock per increment cost more than an event's own matching. The hot
    path holds a `Count` or `Observed` per metric child and only does arithmetic or an append; the
    service flushes once per poll loop (every few milliseconds), so scrapes lag by no more.
    Histogram observations are bucketed in one pass and applied under one lock per bucket.
    """

    def __init__(self) -> None:
        self._counts: dict[tuple[object, tuple[str, ...]], Count] = {}
        self._observed: dict[tuple[object, tuple[str, ...]], Observed] = {}

    def count(self, metric: Counter, *labels: str) -> Count:
        return _cell(self._counts, Count, metric, labels)

    def histogram(self, metric: Histogram, *labels: str) -> Observed:
        return _cell(self._observed, Observed, metric, labels)

    def inc(self, metric: Counter, *labels: str, n: float = 1.0) -> None:
        self.count(metric, *labels).n += n

    def observe(self, metric: Histogram, value: float, *labels: str) -> None:
        self.histogram(metric, *labels).values.append(value)

    def flush(self) -> None:
        for cell in self._counts.values():
            if cell.n:
                n, cell.n = cell.n, 0.0
                cell.child.inc(n)
        for obs in self._observed.values():
            if obs.values:
                values, obs.values = obs.values, []
                observe_many(obs.child, values)


def _cell(cells: dict[tuple[object, tuple[str, ...]], C], make: Callable[[Any], C], metric: Any,
          labels: tuple[str, ...]) -> C:
    """The one cell of a metric child, made on first use (a labels() lookup happens once per child)."""
    key = (metric, labels)
    cell = cells.get(key)
    if cell is None:
        cell = cells[key] = make(metric.labels(*labels) if labels else metric)
    return cell


def observe_many(child: Any, values: list[float]) -> None:
    """`child.observe(v) for v in values`, with one increment per bucket instead of one per value.

    Uses prometheus_client's Histogram internals (pinned version; tests/test_metrics.py compares the
    exposition with per-value observe); anything else is observed one value at a time.
    """
    bounds = getattr(child, "_upper_bounds", None)
    buckets = getattr(child, "_buckets", None)
    total = getattr(child, "_sum", None)
    if bounds is None or buckets is None or total is None or len(bounds) != len(buckets):
        for v in values:
            child.observe(v)
        return
    acc = sum(values)
    total.inc(acc)
    # Sorted once, each bucket's count is a difference of two binary searches: no Python loop per value.
    # A NaN is in the sum and in no bucket, as Histogram.observe does (a NaN makes the sum NaN).
    ordered = sorted(values) if acc == acc else sorted(v for v in values if v == v)
    below = 0
    for bound, bucket in zip(bounds, buckets, strict=True):
        upto = bisect_right(ordered, bound)  # values <= bound: observe() puts v in the first bucket with v <= le
        if upto > below:
            bucket.inc(upto - below)
            below = upto


def status_class(status: int | None) -> str:
    if status is None:
        return "error"
    return f"{status // 100}xx"


class MetricsListenError(ConfigError):
    """The metrics server cannot listen where `[metrics]` says: the port is taken, or the host is not local."""

    def __init__(self, host: str, port: int, exc: OSError) -> None:
        if isinstance(exc, socket.gaierror) or exc.errno == errno.EADDRNOTAVAIL:
            key, why = "metrics.host", f"{host!r} is not an address of this machine"
        elif exc.errno == errno.EADDRINUSE:
            key, why = "metrics.port", f"port {port} is in use by another process"
        elif exc.errno == errno.EACCES:
            key, why = "metrics.port", f"port {port} needs privileges this process does not have"
        else:
            key, why = "metrics.port", exc.strerror or str(exc)
        super().__init__(key, f"cannot listen on {host}:{port}: {why}")


class HealthServer:
    """Serves /metrics, /healthz and /readyz; readiness is asked of the application each time."""

    def __init__(self, metrics: Metrics, readiness: Callable[[], tuple[bool, dict[str, object]]]) -> None:
        self.metrics = metrics
        self.readiness = readiness
        self._runner: web.AppRunner | None = None
        self.port = 0

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        return app

    async def start(self, host: str, port: int) -> int:
        self._runner = web.AppRunner(self.app(), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        try:
            await site.start()
        except OSError as exc:
            await self._runner.cleanup()
            self._runner = None
            raise MetricsListenError(host, port, exc) from None
        server = site._server
        sockets = getattr(server, "sockets", None) or []
        self.port = sockets[0].getsockname()[1] if sockets else port
        return self.port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _metrics(self, _: web.Request) -> web.Response:
        return web.Response(body=self.metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _healthz(self, _: web.Request) -> web.Response:
        return web.json_response({"status": "alive"})

    async def _readyz(self, _: web.Request) -> web.Response:
        ok, detail = self.readiness()
        return web.Response(
            status=200 if ok else 503,
            text=json.dumps({"ready": ok, **detail}),
            content_type="application/json",
        )
