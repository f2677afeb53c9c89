"""Refunds.resolve, the pipeline's side of an adjustment: the ledger asked, a bounded wait, this pipeline's part."""

from __future__ import annotations

import asyncio
import time
from decimal import Decimal

from consumer.adjustments import AdjustmentOutcome, DeadLetterReason, Delivered
from consumer.config import Rules
from consumer.model import AdjustmentKind, Identity, OrderAdjusted, Provider, RefundPolicy
from consumer.refunds import OrderHistory, Refunds

K, CV = Provider.KAMELEOON, Provider.CONVERT
RULES = {(K, "site1"): Rules(goals=("1",), attribution_window=1.0, refunds=RefundPolicy.RETRACT),
         (CV, "1_2"): Rules(goals=("1",), attribution_window=1.0)}
REFUND = OrderAdjusted("adj-1", "ord-1", 0, AdjustmentKind.FULL_REFUND, Decimal("10.00"), "EUR")
DELIVERED = [Delivered(K, "site1", "n1", ("1",), Identity.VISITOR, "v", Decimal("10.00"), "EUR", Decimal("10.00"),
                       "EUR"),
             Delivered(CV, "1_2", "t1", ("1",), Identity.VISITOR, "c", Decimal("10.00"), "EUR")]


class Ledger:
    """An OrderLedger that knows the order after `known_after` lookups, and fails the first `failures`."""

    def __init__(self, known_after: int | None = 0, failures: int = 0) -> None:
        self.known_after, self.failures, self.asked = known_after, failures, 0

    async def order(self, order_id: str) -> OrderHistory | None:
        self.asked += 1
        if self.asked <= self.failures:
            raise ConnectionError("ledger down")
        if self.known_after is None or self.asked <= self.known_after:
            return None
        return OrderHistory(DELIVERED)


def refunds(ledger: Ledger, providers: frozenset[Provider], *, designated: bool = False, wait: float = 5.0,
            halt: asyncio.Event | None = None) -> Refunds:
    return Refunds(ledger, RULES, providers, designated=designated, clock_ms=lambda: int(time.time() * 1000),
                   orphan_wait=wait, halt=halt or asyncio.Event(), recheck=0.01)


async def test_a_known_order_is_planned_for_this_pipeline_only() -> None:
    p = await refunds(Ledger(), frozenset({K})).resolve(REFUND, int(time.time() * 1000))
    assert p is not None and [a.conversion.negative for a in p.actions] == [True]
    assert [r.outcome for r in p.results] == [AdjustmentOutcome.RETRACTED]
    c = await refunds(Ledger(), frozenset({CV})).resolve(REFUND, int(time.time() * 1000))
    assert c is not None and c.actions == () and [r.outcome for r in c.results] == [AdjustmentOutcome.NOT_SUPPORTED]


async def test_it_waits_for_the_purchase_and_asks_again() -> None:
    ledger = Ledger(known_after=3)
    p = await refunds(ledger, frozenset({K})).resolve(REFUND, int(time.time() * 1000))
    assert ledger.asked == 4 and p is not None and len(p.actions) == 1


async def test_an_orphan_is_dead_lettered_by_the_designated_pipeline_after_its_wait() -> None:
    start = time.monotonic()
    p = await refunds(Ledger(known_after=None), frozenset({CV}), designated=True, wait=0.1).resolve(
        REFUND, int(time.time() * 1000))
    assert time.monotonic() - start >= 0.09
    assert p is not None and p.dead_letter is DeadLetterReason.ORPHAN
    other = await refunds(Ledger(known_after=None), frozenset({K}), wait=0.05).resolve(REFUND, int(time.time() * 1000))
    assert other is not None and other.dead_letter is None and other.results == ()  # counted once, elsewhere


async def test_a_ledger_that_fails_is_asked_again_then_named() -> None:
    ledger = Ledger(failures=2)
    p = await refunds(ledger, frozenset({K})).resolve(REFUND, int(time.time() * 1000))
    assert ledger.asked == 3 and p is not None and len(p.actions) == 1
    down = await refunds(Ledger(failures=10**6), frozenset({CV}), designated=True, wait=0.05).resolve(
        REFUND, int(time.time() * 1000))
    assert down is not None and down.dead_letter is DeadLetterReason.LEDGER_UNAVAILABLE


async def test_stopping_while_it_waits_leaves_it_unfinished() -> None:
    halt = asyncio.Event()
    waiting = asyncio.create_task(refunds(Ledger(known_after=None), frozenset({K}), halt=halt).resolve(
        REFUND, int(time.time() * 1000)))
    halt.set()
    assert await asyncio.wait_for(waiting, 5) is None
