"""Refunds end to end on the broker: a purchase delivered, then adjusted; what the sandbox's report holds.

The ledger (issue 16) is not merged yet: `DeliveredLedger` stands in for it behind the OrderLedger
protocol, filled from what the service itself reported delivered (Hooks.results), as the ledger's
records would be. Everything else is the real service, broker and provider sandbox.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable, Sequence
from decimal import Decimal
from typing import Any

from confluent_kafka import Producer

from consumer.adjustments import Delivered
from consumer.app import Application
from consumer.config import Config, parse
from consumer.decoding import encode_adjustment_raw, encode_raw, load_schema
from consumer.delivery import Pending, Result, Status
from consumer.metrics import Metrics
from consumer.model import AdjustmentKind, Channel, Exposure, OrderAdjusted, Provider, Purchase
from consumer.pipeline import Hooks, Pipeline
from consumer.providers.conductrics import SAMPLE_PROJECT as CONDUCTRICS_PROJECT
from consumer.providers.convert import SAMPLE_PROJECT as CONVERT_PROJECT
from consumer.providers.kameleoon import SAMPLE_SITE as KAMELEOON_SITE
from consumer.refunds import OrderHistory
from consumer.sandbox import Sandbox
from tests.conftest import Broker, config_dict, read_all

K, C, D = Provider.KAMELEOON, Provider.CONVERT, Provider.CONDUCTRICS
PROJECT = {K: KAMELEOON_SITE, C: CONVERT_PROJECT, D: CONDUCTRICS_PROJECT}
PURCHASE_SCHEMA = load_schema("schemas/purchase_completed.avsc")
ADJUSTMENT_SCHEMA = load_schema("schemas/order_adjusted.avsc")


class DeliveredLedger(Hooks):
    """A stand-in for the ledger: every purchase conversion the service reported delivered, per order."""

    def __init__(self, purchases: Sequence[Purchase]) -> None:
        self.purchases = {p.event_id: p for p in purchases}
        self.delivered: dict[str, dict[str, Delivered]] = {}
        self.applied: dict[str, list[OrderAdjusted]] = {}  # what the ledger would record of each adjustment

    def results(self, pipeline: Pipeline, items: Sequence[Pending], result: Result) -> None:
        if result.status is not Status.DELIVERED:
            return
        for p in items:
            c = p.conversion
            purchase = self.purchases.get(c.event_id)
            if purchase is None:
                continue  # an adjustment's cancellation or restatement: not the purchase's own
            self.delivered.setdefault(c.order_id, {})[c.key] = Delivered(
                c.provider, c.project, c.key, c.goals, c.identity, c.visitor_id, c.revenue, purchase.currency,
                purchase.revenue, purchase.currency)

    async def order(self, order_id: str) -> OrderHistory | None:
        delivered = self.delivered.get(order_id)
        if delivered is None:
            return None
        return OrderHistory(list(delivered.values()), list(self.applied.get(order_id, [])))


def purchase(order: str, now: int, exposures: list[tuple[Provider, str]]) -> Purchase:
    return Purchase(f"evt-{order}", order, now - 60_000, Channel.STORE, "EUR", Decimal("100.00"), 2, None,
                    tuple(Exposure(p, PROJECT[p], "100001", "1", visitor, now - 120_000 - i)
                          for i, (p, visitor) in enumerate(exposures)))


def adjustment(event_id: str, order: str, kind: AdjustmentKind, amount: str) -> OrderAdjusted:
    return OrderAdjusted(event_id, order, int(time.time() * 1000), kind, Decimal(amount), "EUR", 1, "returned")


def produce(bootstrap: str, topic: str, events: Sequence[Purchase | OrderAdjusted]) -> None:
    """Keyed by order id (one partition per order); an adjustment carries the event_type header."""
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True})
    for e in events:
        if isinstance(e, OrderAdjusted):
            producer.produce(topic, encode_adjustment_raw(e, ADJUSTMENT_SCHEMA), e.order_id.encode(),
                             headers=[("event_type", b"OrderAdjusted")])
        else:
            producer.produce(topic, encode_raw(e, PURCHASE_SCHEMA), e.order_id.encode())
    assert producer.flush(10) == 0


def config(broker: Broker, topics: dict[str, str], sandbox: Sandbox, group: str | None = None,
           **adjustments: Any) -> Config:
    data = config_dict(broker.bootstrap, topics, sandbox.url)
    data["adjustments"] = {"enabled": True, **adjustments}
    if group is not None:
        data["kafka"]["group_id"] = group
    return parse(data, env={})


async def until(predicate: Callable[[], bool], timeout: float = 30.0) -> None:
    """Poll a condition with a deadline (the sandbox and the metrics are read, never slept on blindly)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


def report(sandbox: Sandbox) -> dict[str, tuple[int, str]]:
    return {visitor: (line.conversions, str(line.revenue))
            for (_, visitor, _), line in sandbox.kameleoon_report(KAMELEOON_SITE).items()}


def adjustments(metrics: Metrics, provider: str, outcome: str) -> float:
    return metrics.registry.get_sample_value("offline_conversions_adjustments_total",
                                             {"provider": provider, "outcome": outcome}) or 0.0


async def test_partial_refunds_restate_once_even_when_everything_is_read_again(
    broker: Broker, topics: dict[str, str], sandbox: Sandbox,
) -> None:
    now = int(time.time() * 1000)
    order = purchase("o-1", now, [(K, "phone"), (K, "laptop"), (K, "tablet"), (C, "c-1"), (D, "d-1")])
    ledger = DeliveredLedger([order])
    metrics = Metrics()
    app = Application(config(broker, topics, sandbox), metrics=metrics, install_signals=False, hooks=ledger,
                      ledger=ledger)
    running = asyncio.create_task(app.run())
    try:
        produce(broker.bootstrap, topics["topic"], [order])
        await until(lambda: len(ledger.delivered.get("o-1", {})) == 5)
        assert report(sandbox) == {"laptop": (1, "33.34"), "phone": (1, "33.33"), "tablet": (1, "33.33")}

        first = adjustment("adj-1", "o-1", AdjustmentKind.PARTIAL_REFUND, "10.00")
        produce(broker.bootstrap, topics["topic"], [first])
        await until(lambda: report(sandbox) == {"laptop": (1, "30.00"), "phone": (1, "30.00"),
                                                "tablet": (1, "30.00")})
        ledger.applied["o-1"] = [first]  # what the ledger records of an adjustment once it is done

        second = adjustment("adj-2", "o-1", AdjustmentKind.PARTIAL_REFUND, "20.00")
        produce(broker.bootstrap, topics["topic"], [second])
        await until(lambda: report(sandbox) == {"laptop": (1, "23.34"), "phone": (1, "23.33"),
                                                "tablet": (1, "23.33")})
        ledger.applied["o-1"] = [first, second]
        await until(lambda: adjustments(metrics, "conductrics", "not_supported") == 2)
        assert adjustments(metrics, "kameleoon", "restated") == 2
        assert adjustments(metrics, "convert", "not_supported") == 2
        await until(lambda: app.live == 0)
    finally:
        app.stop()
        assert await asyncio.wait_for(running, 30) == 0, app.fatal
    # Convert and Conductrics were sent the purchase once, and nothing was taken back there.
    assert [(r.visitor, r.revenue) for r in sandbox.records_for("convert")] == [("c-1", 100.0)]
    assert [(r.visitor, r.revenue) for r in sandbox.records_for("conductrics")] == [("d-1", 100.0)]

    # A new member reads everything again (a lost position, a crash before any commit): the same nonces,
    # which Kameleoon counts once, so the report holds the restated revenue once.
    before = sandbox.kameleoon_nonces()
    again = Application(config(broker, topics, sandbox, group=topics["group"] + "-again"), install_signals=False,
                        hooks=ledger, ledger=ledger, stop_when=lambda a: a.consumed >= 3 and a.live == 0)
    assert await asyncio.wait_for(again.run(), 60) == 0, again.fatal
    assert sorted(sandbox.kameleoon_nonces()[len(before):]) == sorted(before)  # every event sent again, the same
    assert report(sandbox) == {"laptop": (1, "23.34"), "phone": (1, "23.33"), "tablet": (1, "23.33")}  # ... once


async def test_full_refund_cancellation_and_an_orphan(broker: Broker, topics: dict[str, str], sandbox: Sandbox) -> None:
    now = int(time.time() * 1000)
    refunded, cancelled = purchase("o-r", now, [(K, "r-1")]), purchase("o-c", now, [(K, "c-1"), (K, "c-2")])
    ledger = DeliveredLedger([refunded, cancelled])
    metrics = Metrics()
    cfg = config(broker, topics, sandbox, orphan_wait="300ms")
    app = Application(cfg, metrics=metrics, install_signals=False, hooks=ledger, ledger=ledger)
    running = asyncio.create_task(app.run())
    try:
        produce(broker.bootstrap, topics["topic"], [refunded, cancelled])
        await until(lambda: len(report(sandbox)) == 3)
        orphan = adjustment("adj-orphan", "o-never", AdjustmentKind.FULL_REFUND, "5.00")
        produce(broker.bootstrap, topics["topic"], [
            adjustment("adj-r", "o-r", AdjustmentKind.FULL_REFUND, "100.00"),
            adjustment("adj-c", "o-c", AdjustmentKind.CANCELLATION, "100.00"),
            orphan,
        ])
        await until(lambda: report(sandbox) == {"r-1": (0, "0.00"), "c-1": (0, "0.00"), "c-2": (0, "0.00")})
        await until(lambda: adjustments(metrics, "none", "orphan") == 1)
        assert adjustments(metrics, "kameleoon", "retracted") == 2
        await until(lambda: app.live == 0)
    finally:
        app.stop()
        assert await asyncio.wait_for(running, 30) == 0, app.fatal
    [letter] = read_all(broker.bootstrap, topics["dlq"], 1)
    headers = {k: v for k, v in letter.headers() or []}
    assert headers["dlq.stage"] == b"adjust" and headers["dlq.reason"] == b"orphan_adjustment"
    assert headers["dlq.event_id"] == b"adj-orphan" and headers["event_type"] == b"OrderAdjusted"
    assert letter.value() == encode_adjustment_raw(orphan, ADJUSTMENT_SCHEMA)  # kept whole, for a replay


async def test_adjustments_enabled_without_a_ledger_refuse_to_start(
    broker: Broker, topics: dict[str, str], sandbox: Sandbox,
) -> None:
    app = Application(config(broker, topics, sandbox), install_signals=False)
    assert await asyncio.wait_for(app.run(), 30) != 0
    assert app.fatal is not None and "needs the ledger" in app.fatal
    assert dataclasses.replace(config(broker, topics, sandbox), adjustments=dataclasses.replace(
        config(broker, topics, sandbox).adjustments, enabled=False)).adjustments.enabled is False
