"""Three providers at once: an outage or a pause of one delays only its deliveries; a permanent failure only its own."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from dataclasses import replace

from consumer.app import Application
from consumer.config import Config, parse
from consumer.dlq import parse_headers
from consumer.embedded import EmbeddedBroker
from consumer.metrics import Metrics
from consumer.producer import encoded, produce_values
from consumer.samples import purchases
from consumer.sandbox import Sandbox
from tests.conftest import config_dict, read_all, run_until_done
from tests.test_pipeline import expected_conversions, sandbox_view, view_of

N = 400


async def test_an_outage_of_one_provider_delays_only_its_deliveries(
    broker: EmbeddedBroker, topics: dict[str, str], sandbox: Sandbox, make_config: Callable[..., Config],
) -> None:
    data = config_dict(broker.bootstrap, topics, sandbox.url)
    data["convert"]["retry"] = {"base_delay": "10ms", "max_delay": "100ms"}  # no give-up: it waits
    data["convert"]["flow"] = {"breaker_failures": 3, "breaker_cooldown": "100ms"}
    cfg = parse(data, env={})
    items = list(purchases(N, now_ms=int(time.time() * 1000), seed=5))
    expected = expected_conversions(cfg, items)
    sandbox.fail("convert", 503, times=None)  # down until cleared
    produce_values(broker.bootstrap, topics["topic"], encoded(items))

    metrics = Metrics()
    app = Application(cfg, metrics=metrics, install_signals=False,
                      stop_when=lambda a: a.consumed >= N and a.live == 0)
    run = asyncio.create_task(app.run())
    n_k, n_d = len(expected["kameleoon"]), sum(len(c.goals) for _, c in expected["conductrics"])
    # Kameleoon and Conductrics get everything while Convert is down…
    await sandbox.wait_until(lambda s: s.counts()["kameleoon"] == n_k and s.counts()["conductrics"] == n_d, 30)
    assert sandbox.counts()["convert"] == 0
    assert metrics.registry.get_sample_value(
        "offline_conversions_circuit_state", {"provider": "convert", "project": "1111_2222"}) in (1.0, 2.0)
    assert not run.done()
    # …and Convert catches up, losing nothing, once it recovers.
    sandbox.clear_faults()
    assert await asyncio.wait_for(run, 60) == 0
    got = sandbox_view(sandbox)
    for provider in ("kameleoon", "convert", "conductrics"):
        assert got[provider] == view_of([c for _, c in expected[provider]], provider), provider
    assert sandbox.duplicates() == {}
    assert metrics.registry.get_sample_value(
        "offline_conversions_circuit_state", {"provider": "convert", "project": "1111_2222"}) == 0.0


async def test_a_permanently_failing_provider_dead_letters_only_its_deliveries(
    broker: EmbeddedBroker, topics: dict[str, str], sandbox: Sandbox,
) -> None:
    data = config_dict(broker.bootstrap, topics, sandbox.url)
    cfg = parse(data, env={})
    items = list(purchases(N, now_ms=int(time.time() * 1000), seed=6))
    expected = expected_conversions(cfg, items)
    sandbox.reject("conductrics", goals=data["conductrics"]["projects"]["ac-xxx"]["goals"])  # 400 to every one
    produce_values(broker.bootstrap, topics["topic"], encoded(items))
    await run_until_done(cfg, N)

    got = sandbox_view(sandbox)
    assert got["conductrics"] == []
    for provider in ("kameleoon", "convert"):
        assert got[provider] == view_of([c for _, c in expected[provider]], provider), provider
    events = {p.event_id for p, _ in expected["conductrics"]}
    dlq = read_all(broker.bootstrap, topics["dlq"], len(events))
    headers = [parse_headers(m.headers()) for m in dlq]
    assert {h["event_id"] for h in headers} == events and len(headers) == len(events)
    assert {h["provider"] for h in headers} == {"conductrics"}
    assert {h["http.status"] for h in headers} == {"400"}


async def test_refused_credentials_pause_only_their_project_and_the_fix_resumes_it(
    broker: EmbeddedBroker, topics: dict[str, str], sandbox: Sandbox,
) -> None:
    data = config_dict(broker.bootstrap, topics, sandbox.url)
    data["conductrics"]["projects"]["ac-xxx"]["api_key"] = "not-the-key"  # the sandbox answers 401
    data["conductrics"]["retry"]["auth_probe_interval"] = "200ms"
    cfg = parse(data, env={})
    items = list(purchases(N, now_ms=int(time.time() * 1000), seed=6))
    expected = expected_conversions(cfg, items)
    produce_values(broker.bootstrap, topics["topic"], encoded(items))
    metrics = Metrics()
    app = Application(cfg, metrics=metrics, install_signals=False,
                      stop_when=lambda a: a.consumed >= N and a.live == 0)
    run = asyncio.create_task(app.run())
    paused = {"provider": "conductrics", "project": "ac-xxx", "reason": "credentials"}
    # The others get everything while Conductrics' project waits, paused…
    await sandbox.wait_until(lambda s: s.counts()["kameleoon"] == len(expected["kameleoon"]), 30)
    await sandbox.wait_until(
        lambda s: metrics.registry.get_sample_value("offline_conversions_project_paused", paused) == 1.0, 30)
    assert sandbox.counts()["conductrics"] == 0 and not run.done()
    # …and once the provider accepts the key, a probe resumes it and everything is delivered once.
    sandbox.set_credentials(conductrics_keys={"ac-xxx": "not-the-key"})
    assert await asyncio.wait_for(run, 60) == 0
    got = sandbox_view(sandbox)
    for provider in ("kameleoon", "convert", "conductrics"):
        assert got[provider] == view_of([c for _, c in expected[provider]], provider), provider
    assert sandbox.duplicates() == {}
    assert metrics.registry.get_sample_value("offline_conversions_project_paused", paused) == 0.0
    assert read_all(broker.bootstrap, topics["dlq"], 1, timeout=2) == []  # nothing was ever dead-lettered


async def test_the_same_orders_under_new_event_ids_count_once(
    broker: EmbeddedBroker, topics: dict[str, str], sandbox: Sandbox, make_config: Callable[..., Config],
) -> None:
    cfg = make_config(sandbox.url)
    items = list(purchases(N, now_ms=int(time.time() * 1000), seed=8))
    again = [replace(p, event_id=str(uuid.uuid4())) for p in items]  # an upstream replay: new ids, same orders
    expected = expected_conversions(cfg, items)
    produce_values(broker.bootstrap, topics["topic"], encoded(items + again))
    metrics = Metrics()
    await run_until_done(cfg, 2 * N, metrics=metrics)
    got = sandbox_view(sandbox)
    for provider in ("kameleoon", "convert", "conductrics"):
        assert got[provider] == view_of([c for _, c in expected[provider]], provider), provider
    assert sandbox.duplicates() == {}
    skipped = sum(metrics.registry.get_sample_value(
        "offline_conversions_conversions_total", {"provider": p, "outcome": "skipped"}) or 0
        for p in ("kameleoon", "convert", "conductrics"))
    assert skipped == sum(len(v) for v in expected.values())
