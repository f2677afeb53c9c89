"""Scenario 2: provider faults (5xx bursts, 429 + Retry-After, hangs past the timeout, connection resets,
latency) are retried through — everything delivered exactly once; and a slow provider with a small
max_in_flight keeps the in-flight count bounded by pausing the partitions."""

from __future__ import annotations

import asyncio
from typing import Any

from consumer.app import Application
from consumer.embedded import EmbeddedBroker
from consumer.metrics import Metrics
from consumer.sandbox import Sandbox
from tests.conftest import read_all

from .harness import (
    PROVIDERS,
    account,
    all_present,
    config_dict,
    conversions_of,
    expected_view,
    new_topics,
    produce,
    result_line,
    to_config,
    wait_committed,
)


def _fault_tolerant(data: dict[str, Any], timeout: str) -> None:
    """Enough retries for the injected bursts, a short breaker cool-down, a short request timeout."""
    for p in PROVIDERS:
        data[p]["retry"] = {"base_delay": "10ms", "max_delay": "200ms", "max_attempts": 12, "max_elapsed": "60s"}
        data[p]["flow"] = {"timeout": timeout, "breaker_failures": 5, "breaker_cooldown": "300ms"}



async def run_until_delivered(app: Application, sandbox: Sandbox, want: Any, broker: EmbeddedBroker,
                              topics: dict[str, str], ends: dict[int, int], timeout: float) -> Application:
    """Run the service until the sandbox holds every wanted conversion and the group committed every
    offset, then stop it (faults cleared); it must have exited cleanly."""
    task = asyncio.get_running_loop().create_task(app.run())
    try:
        await sandbox.wait_until(lambda s: all_present(s, want), timeout=timeout)
        await wait_committed(broker.bootstrap, topics["group"], topics["topic"], ends, timeout=30)
    finally:
        app.stop()
        code = await asyncio.wait_for(task, 30)
        sandbox.clear_faults()
    assert code == 0, app.fatal
    return app

async def test_provider_faults_are_retried_until_delivered(broker: EmbeddedBroker, sandbox: Sandbox) -> None:
    topics = new_topics(broker)
    data = config_dict(broker.bootstrap, topics, sandbox.url)
    data["logging"] = {"level": "WARNING"}
    _fault_tolerant(data, "400ms")
    cfg = to_config(data)
    stream = produce(broker.bootstrap, topics["topic"], 800, 0, seed=21)
    want = expected_view(conversions_of(cfg, stream.items))

    faults = 0
    sandbox.set_latency("*", 0.01)  # slow responses, well under the timeout
    sandbox.fail("kameleoon", 503, times=6); faults += 6  # a 5xx burst (opens the breaker)  # noqa: E702
    sandbox.fail("conductrics", 502, times=4); faults += 4  # noqa: E702
    sandbox.fail("convert", 429, times=4, retry_after=1); faults += 4  # noqa: E702
    sandbox.fail("kameleoon", 429, times=2, retry_after=1); faults += 2  # noqa: E702
    sandbox.hang("conductrics", times=3, seconds=1.5); faults += 3  # noqa: E702  # longer than the 400ms timeout
    sandbox.hang("convert", times=2, seconds=1.5); faults += 2  # noqa: E702
    sandbox.reset_connections("convert", times=5); faults += 5  # noqa: E702
    sandbox.reset_connections("kameleoon", times=3); faults += 3  # noqa: E702
    sandbox.reset_connections("conductrics", times=None, probability=0.03, seed=5)  # scattered resets
    sandbox.json_status(500, times=3); faults += 3  # noqa: E702

    app = await run_until_delivered(Application(cfg, metrics=Metrics(), install_signals=False),
                                    sandbox, want, broker, topics, stream.ends(), timeout=60)
    metrics = app.metrics
    injected = sum(n for (p, st), n in sandbox._statuses.items() if st in (0, 429, 502, 503) and p in PROVIDERS)
    scattered = sum(1 for r in sandbox.requests if r.outcome.startswith("fault:"))
    acc = account(sandbox, want)
    assert acc.lost == 0 and acc.unexpected == 0, acc
    assert sandbox.duplicates() == {}, f"{len(sandbox.duplicates())} keys delivered twice"
    assert read_all(broker.bootstrap, topics["dlq"], 1, timeout=5) == [], "nothing should be dead-lettered"
    statuses = {p: sandbox.status_counts(p) for p in ("kameleoon", "convert", "conductrics")}
    assert statuses["convert"].get(429, 0) == 4 and statuses["kameleoon"].get(503, 0) == 6
    assert statuses["convert"].get(0, 0) >= 7 and statuses["conductrics"].get(0, 0) >= 3  # hangs + resets
    retries = sum(s.value for m in metrics.retries.collect() for s in m.samples if s.name.endswith("_total"))
    assert retries >= faults
    result_line("provider-faults", events=stream.total, conversions=acc.expected,
                faults=f"{scattered} injected ({injected} 5xx/429/no-answer)", retries=int(retries),
                lost=acc.lost, duplicates=acc.duplicates)


async def test_slow_provider_pauses_partitions_and_bounds_in_flight(broker: EmbeddedBroker, sandbox: Sandbox) -> None:
    topics = new_topics(broker)
    data = config_dict(broker.bootstrap, topics, sandbox.url)
    data["logging"] = {"level": "WARNING"}
    max_in_flight, poll_batch = 40, 10
    data["pipeline"].update({"max_in_flight": max_in_flight, "poll_batch": poll_batch})
    cfg = to_config(data)
    stream = produce(broker.bootstrap, topics["topic"], 400, 0, seed=22)
    want = expected_view(conversions_of(cfg, stream.items))
    sandbox.set_latency("*", 0.06)  # a slow provider everywhere

    seen: dict[str, Any] = {"max_live": 0, "max_outstanding": 0, "paused_iterations": 0, "max_paused_metric": 0.0,
                            "iterations": 0}

    def observe(a: Application) -> bool:
        # Called by the service on every loop iteration, right after it polled and handled a batch.
        seen["iterations"] += 1
        # max_in_flight is each provider group's own budget (a pipeline per provider).
        seen["max_live"] = max(seen["max_live"], *(p.live for p in a.pipelines))
        seen["max_outstanding"] = max(seen["max_outstanding"], *(p.dispatcher.outstanding for p in a.pipelines))
        if any(p.source.paused for p in a.pipelines):
            seen["paused_iterations"] += 1
        gauge = max((a.metrics.registry.get_sample_value("offline_conversions_paused_partitions",
                                                         {"group": p.group}) or 0.0 for p in a.pipelines),
                    default=0.0)
        seen["max_paused_metric"] = max(seen["max_paused_metric"], gauge)
        return False

    await run_until_delivered(Application(cfg, metrics=Metrics(), install_signals=False, stop_when=observe),
                              sandbox, want, broker, topics, stream.ends(), timeout=90)
    acc = account(sandbox, want)
    assert acc.lost == 0 and acc.unexpected == 0 and sandbox.duplicates() == {}, acc
    assert seen["max_live"] <= max_in_flight + poll_batch, seen
    assert seen["paused_iterations"] > 0, f"the partitions were never paused: {seen}"
    assert seen["max_paused_metric"] >= 1, f"offline_conversions_paused_partitions never rose: {seen}"
    result_line("backpressure", events=stream.total, conversions=acc.expected,
                faults="latency 60ms on every provider", max_in_flight=max_in_flight,
                max_live=seen["max_live"], max_outstanding_conversions=seen["max_outstanding"],
                paused_iterations=seen["paused_iterations"], lost=acc.lost, duplicates=acc.duplicates)
