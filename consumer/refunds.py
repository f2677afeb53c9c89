"""Order adjustments in a pipeline: find the order in the ledger, wait (bounded) for its purchase, then plan.

The I/O edge around the pure planner (consumer/adjustments.py). The ledger plugs in as an `OrderLedger`;
the pipeline hands each decoded OrderAdjusted to `Refunds.resolve` and carries out the plan it returns
(its actions are conversions, sent by the pipeline's dispatcher like a purchase's).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from consumer.adjustments import (
    AdjustmentPlan,
    DeadLetterReason,
    DeliveredConversion,
    Readiness,
    for_providers,
    orphan_plan,
    plan,
    readiness,
)
from consumer.config import Rules
from consumer.model import OrderAdjusted, Provider

log = logging.getLogger(__name__)

# How often a waiting adjustment asks the ledger again whether its purchase arrived.
RECHECK_SECONDS = 5.0


@dataclass(frozen=True, slots=True)
class OrderHistory:
    """What the ledger knows of one order."""

    # The purchase's conversions with outcome delivered (not those an adjustment sent: the planner derives
    # those itself). Empty: the order is known (processed) but delivered nothing.
    delivered: Sequence[DeliveredConversion]
    # The order's adjustments planned before (not dead-lettered), in the order they were applied.
    adjustments: Sequence[OrderAdjusted] = ()


class OrderLedger(Protocol):
    """What the service needs of the ledger (consumer/ledger/) for an adjustment."""

    async def order(self, order_id: str) -> OrderHistory | None:
        """The order's history; None while its purchase is not settled in the ledger: not read yet, or some
        of its conversions still without a final outcome (a plan from part of them would leave the rest)."""
        ...


class Refunds:
    """One pipeline's adjustments: its providers' share of each plan (and the order's, when designated)."""

    def __init__(self, ledger: OrderLedger, rules: Mapping[tuple[Provider, str], Rules],
                 providers: frozenset[Provider], *, designated: bool, clock_ms: Callable[[], int],
                 orphan_wait: float, halt: asyncio.Event, recheck: float = RECHECK_SECONDS) -> None:
        self.ledger = ledger
        self.rules = rules
        self.providers = providers
        self.designated = designated
        self.clock_ms = clock_ms
        self.orphan_wait_ms = int(orphan_wait * 1000)
        self.halt = halt
        self.recheck = recheck

    async def resolve(self, adjustment: OrderAdjusted, first_seen_ms: int) -> AdjustmentPlan | None:
        """This pipeline's plan for `adjustment`, once its order is known or its wait is over.

        None: the service is stopping while it waits; the event stays unfinished (its offset
        uncommitted), so it is read again, and waits again, after the restart.
        """
        while True:
            failed = False
            try:
                history = await self.ledger.order(adjustment.order_id)
            except Exception as exc:  # unreadable for now: asked again, as a purchase not yet known is
                log.warning("the ledger could not be read for an order adjustment; asking again",
                            extra={"event_id": adjustment.event_id, "error": f"{type(exc).__name__}: {exc}"})
                history, failed = None, True
            now = self.clock_ms()
            verdict = readiness(adjustment, now, first_seen_ms, history is not None, self.orphan_wait_ms)
            if verdict.readiness is Readiness.PLAN and history is not None:
                whole = plan(adjustment, history.delivered, history.adjustments, self.rules)
                return for_providers(whole, self.providers, self.designated)
            if verdict.readiness is Readiness.DEAD_LETTER:
                reason = verdict.reason or DeadLetterReason.ORPHAN
                if failed and reason is DeadLetterReason.ORPHAN:
                    reason = DeadLetterReason.LEDGER_UNAVAILABLE  # not known to be an orphan: say what happened
                return for_providers(orphan_plan(adjustment, reason), self.providers, self.designated)
            assert verdict.until_ms is not None
            pause = min(self.recheck, max(0.0, (verdict.until_ms - now) / 1000))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.halt.wait(), pause)
            if self.halt.is_set():
                return None
