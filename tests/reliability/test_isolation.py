"""Issue 15's outage, reproduced: one provider answering 503 holds up no other provider.

A steady stream at 100 purchases/s, each seen by all three providers, a small in-flight budget, and
Convert answering 503 to everything for a while. With one consumer group for all providers, Kameleoon's
and Conductrics' conversions waited behind Convert's in the shared budget (p99 37.8 s measured before
isolation). With a group per provider they are delivered as if nothing happened, Convert's backlog
drains by itself when it answers again, nothing is dead-lettered, nothing is sent twice, and every
group's committed offsets reach the end of the topic.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from typing import Any

import pytest

from consumer.app import Application
from consumer.metrics import Metrics
from consumer.sandbox import Sandbox
from tests.conftest import Broker, read_all

from .harness import (
    PROVIDERS,
    SteadyStream,
    account,
    all_present,
    config_dict,
    conversions_of,
    expected_view,
    new_topics,
    record_view,
    result_line,
    to_config,
    wait_committed,
    wait_for,
)

RATE = 100.0


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


def order_of_view(cfg: Any, items: list[Any]) -> dict[str, dict[Any, str]]:
    """Per provider, the sandbox's view of a conversion -> the order it belongs to (ambiguous views left out)."""
    out: dict[str, dict[Any, str]] = {p: {} for p in PROVIDERS}
    seen: dict[str, defaultdict[Any, set[str]]] = {p: defaultdict(set) for p in PROVIDERS}
    for purchase in items:
        view = expected_view(conversions_of(cfg, [purchase]))
        for p in PROVIDERS:
            for v in view[p]:
                seen[p][v].add(purchase.order_id)
    for p in PROVIDERS:
        out[p] = {v: next(iter(orders)) for v, orders in seen[p].items() if len(orders) == 1}
    return out


@pytest.mark.parametrize(("outage", "retry"), [
    # The outage: 40 s, well inside retry.max_elapsed's default.
    pytest.param(40.0, {}, id="40s-outage"),
    # An outage longer than retry.max_elapsed (5 s here): before, every Convert conversion was then dead-lettered.
    pytest.param(15.0, {"max_elapsed": "5s"}, id="outage-longer-than-max-elapsed"),
])
async def test_one_providers_outage_holds_up_no_other(broker: Broker, sandbox: Sandbox, outage: float,
                                                       retry: dict[str, str]) -> None:
    topics = new_topics(broker)
    data = config_dict(broker.bootstrap, topics, sandbox.url)
    data["logging"] = {"level": "WARNING"}
    data["pipeline"]["max_in_flight"] = 600
    for p in PROVIDERS:
        data[p]["retry"] = {"base_delay": "50ms", "max_delay": "1s", **retry}
        data[p]["flow"] = {"breaker_failures": 5, "breaker_cooldown": "500ms"}
    cfg = to_config(data)
    metrics = Metrics()
    app = Application(cfg, metrics=metrics, install_signals=False)
    loop = asyncio.get_running_loop()
    task = loop.create_task(app.run())
    lead = 8.0  # seconds of normal traffic before the outage, and after it
    stream = SteadyStream(broker.bootstrap, topics["topic"], RATE, seed=15, seconds=lead + outage + lead)
    try:
        await wait_for(lambda: app.readiness()[0], 30, "the service to be ready")
        stream.start()
        await wait_for(lambda: len(sandbox.records) > 0, 30, "the first delivery")
        await asyncio.sleep(lead)  # the test's own timeline: normal traffic before the outage
        down_from = time.time()
        sandbox.fail("convert", 503, times=None)
        await asyncio.sleep(outage)  # the outage's length is the scenario, not a synchronisation
        sandbox.clear_faults()
        down_until = time.time()
        produced = await loop.run_in_executor(None, stream.stop)
        want = expected_view(conversions_of(cfg, produced.items))
        await sandbox.wait_until(lambda s: all_present(s, want), timeout=120)
        await wait_committed(broker.bootstrap, topics["group"], topics["topic"], produced.ends(), timeout=60)
    finally:
        app.stop()
        code = await asyncio.wait_for(task, 60)
        sandbox.clear_faults()
    assert code == 0, app.fatal

    # The others' delay from purchase to delivery while Convert was down.
    orders = order_of_view(cfg, produced.items)
    delays: dict[str, list[float]] = {p: [] for p in PROVIDERS}
    for p in PROVIDERS:
        for r in sandbox.records_for(p):
            order = orders[p].get(record_view(p, r))
            sent = stream.sent_at.get(order) if order is not None else None
            if sent is not None and down_from <= sent <= down_until:
                delays[p].append(r.time - sent)
    acc = account(sandbox, want)
    dead = read_all(broker.bootstrap, topics["dlq"], 0, timeout=3)
    print(result_line("isolation", outage=outage, kameleoon_p99=round(p99(delays["kameleoon"]), 3),
                      conductrics_p99=round(p99(delays["conductrics"]), 3),
                      convert_p99=round(p99(delays["convert"]), 3), expected=acc.expected, lost=acc.lost,
                      duplicates=acc.duplicates, dead_letters=len(dead)))
    for p in ("kameleoon", "conductrics"):
        assert len(delays[p]) > RATE * outage / 4, f"too few {p} deliveries measured during the outage"
        assert p99(delays[p]) < 3.0, f"{p}'s p99 delay during Convert's outage: {p99(delays[p]):.2f} s"
    # Convert waited for the outage and caught up by itself: its delay is the outage, not a person's replay.
    assert max(delays["convert"]) >= outage / 2
    assert acc.lost == 0 and acc.unexpected == 0, acc
    assert acc.duplicates == 0 and acc.duplicate_keys == 0, acc
    assert dead == [], f"{len(dead)} dead letters during a transient outage"
