"""The adjustment planner: cancellations and restatements per case, exact cents, nonces, the orphan decision."""

from __future__ import annotations

import random
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from consumer.adjustments import (
    AdjustmentOutcome,
    AdjustmentPlan,
    DeadLetterReason,
    Delivered,
    LedgerRecordError,
    Readiness,
    Role,
    Verdict,
    for_providers,
    orphan_plan,
    plan,
    readiness,
)
from consumer.config import Rules
from consumer.model import AdjustmentKind, Identity, OrderAdjusted, Provider, RefundPolicy, RevenueShare
from consumer.providers.kameleoon.keys import adjustment_nonce

SITE = "site1"
K, CV, CD = Provider.KAMELEOON, Provider.CONVERT, Provider.CONDUCTRICS
D = Decimal
MIN = 60_000


def rules(refunds: RefundPolicy = RefundPolicy.RETRACT, share: RevenueShare = RevenueShare.SPLIT) -> Rules:
    return Rules(goals=("100",), attribution_window=7 * 86400.0, revenue_share=share, refunds=refunds)


RULES = {(K, SITE): rules(), (CV, "1_2"): rules(RefundPolicy.SKIP), (CD, "shop"): rules(RefundPolicy.SKIP)}


def adj(kind: AdjustmentKind = AdjustmentKind.PARTIAL_REFUND, amount: str = "10.00", event_id: str = "adj-1",
        currency: str = "EUR", order_id: str = "ord-1") -> OrderAdjusted:
    return OrderAdjusted(event_id, order_id, 1_700_000_100_000, kind, D(amount), currency)


def conv(visitor: str, revenue: str | None, goal: str = "100", *, provider: Provider = K, project: str = SITE,
         identity: Identity = Identity.VISITOR, total: str | None = "100.00", currency: str = "EUR",
         order_currency: str = "EUR") -> Delivered:
    return Delivered(provider, project, f"n-{visitor}-{goal}", (goal,), identity, visitor,
                     None if revenue is None else D(revenue), currency, None if total is None else D(total),
                     order_currency)


FULL = adj(AdjustmentKind.FULL_REFUND, "100.00")
CANCEL = adj(AdjustmentKind.CANCELLATION, "100.00")


def sent(p: AdjustmentPlan) -> list[tuple[str, str, str, str | None, bool]]:
    """(role, visitor, goal, revenue, negative) of every action, in plan order."""
    return [(a.role.value, a.conversion.visitor_id, a.conversion.goals[0],
             None if a.conversion.revenue is None else str(a.conversion.revenue), a.conversion.negative)
            for a in p.actions]


def outcomes(p: AdjustmentPlan) -> list[tuple[str, str]]:
    return [(r.provider.slug if r.provider else "none", r.outcome.value) for r in p.results]


# --------------------------------------------------------------------------- the cases, table-driven

CASES: list[tuple[str, OrderAdjusted, list[Delivered], list[OrderAdjusted], list[Any], list[tuple[str, str]]]] = [
    ("full refund cancels the conversion with its revenue",
     FULL, [conv("a", "100.00")], [],
     [("cancel", "a", "100", "100.00", True)], [("kameleoon", "retracted")]),
    ("cancellation cancels every goal of every identity",
     CANCEL, [conv("a", "50.00"), conv("b", "50.00"), conv("a", "50.00", "200"), conv("b", "50.00", "200")], [],
     [("cancel", "a", "100", "50.00", True), ("cancel", "a", "200", "50.00", True),
      ("cancel", "b", "100", "50.00", True), ("cancel", "b", "200", "50.00", True)], [("kameleoon", "retracted")]),
    ("partial refund: cancel and restate the rest, split shares kept in exact cents",
     adj(amount="10.00"), [conv("a", "33.34"), conv("b", "33.33"), conv("c", "33.33")], [],
     [("cancel", "a", "100", "33.34", True), ("restate", "a", "100", "30.00", False),
      ("cancel", "b", "100", "33.33", True), ("restate", "b", "100", "30.00", False),
      ("cancel", "c", "100", "33.33", True), ("restate", "c", "100", "30.00", False)], [("kameleoon", "restated")]),
    ("the spare cent goes to the largest remainder",
     adj(amount="9.99"), [conv("a", "33.34"), conv("b", "33.33"), conv("c", "33.33")], [],
     [("cancel", "a", "100", "33.34", True), ("restate", "a", "100", "30.01", False),
      ("cancel", "b", "100", "33.33", True), ("restate", "b", "100", "30.00", False),
      ("cancel", "c", "100", "33.33", True), ("restate", "c", "100", "30.00", False)], [("kameleoon", "restated")]),
    ("full revenue share: each identity keeps the whole remainder",
     adj(amount="25.00"), [conv("a", "100.00"), conv("b", "100.00")], [],
     [("cancel", "a", "100", "100.00", True), ("restate", "a", "100", "75.00", False),
      ("cancel", "b", "100", "100.00", True), ("restate", "b", "100", "75.00", False)], [("kameleoon", "restated")]),
    ("a second partial refund cancels the first's restatement and counts both refunds",
     adj(amount="20.00", event_id="adj-2"), [conv("a", "100.00")], [adj(amount="10.00")],
     [("cancel", "a", "100", "90.00", True), ("restate", "a", "100", "70.00", False)], [("kameleoon", "restated")]),
    ("partial refunds reaching the total take everything back",
     adj(amount="40.00", event_id="adj-2"), [conv("a", "100.00")], [adj(amount="60.00")],
     [("cancel", "a", "100", "40.00", True)], [("kameleoon", "retracted")]),
    ("a refund beyond the total takes everything back",
     adj(amount="150.00"), [conv("a", "100.00")], [],
     [("cancel", "a", "100", "100.00", True)], [("kameleoon", "retracted")]),
    ("a full refund after a partial cancels the restatement",
     adj(AdjustmentKind.FULL_REFUND, "100.00", "adj-2"), [conv("a", "100.00")], [adj(amount="10.00")],
     [("cancel", "a", "100", "90.00", True)], [("kameleoon", "retracted")]),
    ("after a full refund there is nothing left",
     adj(amount="10.00", event_id="adj-2"), [conv("a", "100.00")], [FULL],
     [], [("kameleoon", "already_retracted")]),
    ("a refund of 0 changes nothing",
     adj(amount="0.00"), [conv("a", "100.00")], [],
     [], [("kameleoon", "no_change")]),
    ("conversions sent without revenue: a partial refund changes nothing",
     adj(amount="10.00"), [conv("a", None)], [],
     [], [("kameleoon", "no_change")]),
    ("conversions sent without revenue: a full refund cancels them",
     FULL, [conv("a", None)], [],
     [("cancel", "a", "100", None, True)], [("kameleoon", "retracted")]),
    ("a converted currency: the fraction of the order total, in the currency sent",
     adj(amount="10.00", currency="USD"), [conv("a", "92.00", currency="EUR", order_currency="USD")], [],
     [("cancel", "a", "100", "92.00", True), ("restate", "a", "100", "82.80", False)], [("kameleoon", "restated")]),
    ("without the order total in the ledger: recovered from a split (the sum)",
     adj(amount="10.00"), [conv("a", "50.00", total=None), conv("b", "50.00", total=None)], [],
     [("cancel", "a", "100", "50.00", True), ("restate", "a", "100", "45.00", False),
      ("cancel", "b", "100", "50.00", True), ("restate", "b", "100", "45.00", False)], [("kameleoon", "restated")]),
    ("Convert and Conductrics document no retraction",
     FULL, [conv("v", "100.00", provider=CV, project="1_2"), conv("w", "100.00", provider=CD, project="shop")], [],
     [], [("conductrics", "not_supported"), ("convert", "not_supported")]),
    ("each project on its own: Kameleoon retracts while Convert is counted",
     FULL, [conv("a", "100.00"), conv("v", "100.00", provider=CV, project="1_2")], [],
     [("cancel", "a", "100", "100.00", True)], [("convert", "not_supported"), ("kameleoon", "retracted")]),
    ("a project no longer configured",
     FULL, [conv("a", "100.00", project="gone")], [],
     [], [("kameleoon", "unknown_project")]),
    ("never delivered",
     FULL, [], [],
     [], [("none", "not_delivered")]),
    ("an earlier adjustment that was dead-lettered (currency) replaced nothing",
     adj(amount="10.00", event_id="adj-2"), [conv("a", "100.00")], [adj(amount="50.00", currency="USD")],
     [("cancel", "a", "100", "100.00", True), ("restate", "a", "100", "90.00", False)], [("kameleoon", "restated")]),
    ("the same adjustment read again is not counted twice",
     adj(amount="10.00"), [conv("a", "100.00")], [adj(amount="10.00")],
     [("cancel", "a", "100", "100.00", True), ("restate", "a", "100", "90.00", False)], [("kameleoon", "restated")]),
    ("a mapping identity keeps its kind",
     FULL, [conv("cust-1", "100.00", identity=Identity.MAPPING)], [],
     [("cancel", "cust-1", "100", "100.00", True)], [("kameleoon", "retracted")]),
]


@pytest.mark.parametrize(("adjustment", "delivered", "previous", "expected", "results"),
                         [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_plan(adjustment: OrderAdjusted, delivered: list[Delivered], previous: list[OrderAdjusted],
              expected: list[Any], results: list[tuple[str, str]]) -> None:
    p = plan(adjustment, delivered, previous, RULES)
    assert sent(p) == expected
    assert outcomes(p) == results
    assert p.dead_letter is None


def test_without_the_order_total_a_full_share_recovers_it_from_the_largest() -> None:
    r = {(K, SITE): rules(share=RevenueShare.FULL)}
    p = plan(adj(amount="10.00"), [conv("a", "100.00", total=None), conv("b", "100.00", total=None)], [], r)
    assert [x[3] for x in sent(p) if x[0] == "restate"] == ["90.00", "90.00"]


def test_kameleoon_skip_policy_is_counted_as_skipped() -> None:
    p = plan(FULL, [conv("a", "100.00")], [], {(K, SITE): rules(RefundPolicy.SKIP)})
    assert p.actions == () and outcomes(p) == [("kameleoon", "skipped")]


@pytest.mark.parametrize(("adjustment", "reason"), [
    (adj(AdjustmentKind.UNKNOWN), DeadLetterReason.UNKNOWN_KIND),
    (adj(amount="-1.00"), DeadLetterReason.NEGATIVE_AMOUNT),
    (adj(currency="USD"), DeadLetterReason.CURRENCY),
])
def test_what_cannot_be_applied_is_dead_lettered(adjustment: OrderAdjusted, reason: DeadLetterReason) -> None:
    p = plan(adjustment, [conv("a", "100.00")], [], RULES)
    assert p.dead_letter is reason and p.actions == ()
    assert [r.outcome for r in p.results] == [AdjustmentOutcome.INVALID]


def test_a_record_with_two_goals_is_a_ledger_error() -> None:
    bad = Delivered(K, SITE, "n", ("1", "2"), Identity.VISITOR, "a", D("1.00"), "EUR", D("1.00"), "EUR")
    with pytest.raises(LedgerRecordError):
        plan(FULL, [bad], [], RULES)


# --------------------------------------------------------------------------- nonces and determinism


def test_nonces_come_from_the_adjustment_the_original_and_the_role() -> None:
    p = plan(adj(amount="10.00"), [conv("a", "100.00")], [], RULES)
    cancel, restate = p.actions
    assert cancel.conversion.key == adjustment_nonce(SITE, "adj-1", "n-a-100", "cancel")
    assert restate.conversion.key == adjustment_nonce(SITE, "adj-1", "n-a-100", "restate")
    assert cancel.replaces == "n-a-100" and restate.replaces == "n-a-100"
    assert len({cancel.conversion.key, restate.conversion.key, "n-a-100"}) == 3
    assert all(len(a.conversion.key) == 16 and int(a.conversion.key, 16) >= 0 for a in p.actions)


def test_the_second_refund_cancels_the_first_restatement_by_its_nonce() -> None:
    second = plan(adj(amount="20.00", event_id="adj-2"), [conv("a", "100.00")], [adj(amount="10.00")], RULES)
    assert second.actions[0].replaces == adjustment_nonce(SITE, "adj-1", "n-a-100", "restate")
    assert second.actions[0].conversion.key == adjustment_nonce(SITE, "adj-2", "n-a-100", "cancel")


def test_the_plan_is_the_same_whatever_the_order_of_the_ledger_records() -> None:
    delivered = [conv(v, "25.00", g) for v in "abcd" for g in ("100", "200")]
    first = plan(adj(amount="7.77"), delivered, [], RULES)
    for seed in range(5):
        shuffled = delivered[:]
        random.Random(seed).shuffle(shuffled)
        again = plan(adj(amount="7.77"), shuffled + shuffled[:3], [], RULES)  # repeats too
        assert again == first


def test_a_second_refund_of_the_same_order_differs_only_by_its_own_event() -> None:
    a1 = plan(adj(amount="10.00"), [conv("a", "100.00")], [], RULES)
    a1_again = plan(adj(amount="10.00"), [conv("a", "100.00")], [adj(amount="10.00")], RULES)
    assert a1 == a1_again  # read again after a crash: the same nonces, which Kameleoon de-duplicates


def test_read_again_after_later_ones_it_is_planned_as_the_first_time() -> None:
    delivered = [conv("a", "100.00")]
    first, second = adj(amount="10.00"), adj(amount="20.00", event_id="adj-2")
    assert plan(first, delivered, [first, second], RULES) == plan(first, delivered, [], RULES)
    assert plan(second, delivered, [first, second], RULES) == plan(second, delivered, [first], RULES)


def test_counts_label_the_metric() -> None:
    p = plan(FULL, [conv("a", "100.00"), conv("v", "100.00", provider=CV, project="1_2")], [], RULES)
    assert p.counts() == {("kameleoon", "retracted"): 1, ("convert", "not_supported"): 1}
    assert plan(FULL, [], [], RULES).counts() == {("none", "not_delivered"): 1}
    assert orphan_plan(FULL).counts() == {("none", "orphan"): 1}


cents = st.integers(min_value=1, max_value=10_000_00)


@given(st.lists(cents, min_size=1, max_size=6), st.lists(st.integers(min_value=1, max_value=5_000_00), max_size=4))
def test_restatements_share_what_is_left_exactly(shares: list[int], refunds: list[int]) -> None:
    total = sum(shares)
    delivered = [conv(f"v{i}", str(D(c).scaleb(-2)), total=str(D(total).scaleb(-2))) for i, c in enumerate(shares)]
    previous: list[OrderAdjusted] = []
    refunded = 0
    for n, r in enumerate(refunds):
        a = adj(amount=str(D(r).scaleb(-2)), event_id=f"adj-{n}")
        p = plan(a, delivered, previous, RULES)
        refunded += r
        restated = [int(x.conversion.revenue.scaleb(2)) for x in p.actions  # type: ignore[union-attr]
                    if x.role is Role.RESTATE]
        if refunded >= total:
            assert restated == [] and p.results[0].outcome in (AdjustmentOutcome.RETRACTED,
                                                                AdjustmentOutcome.ALREADY_RETRACTED)
        else:
            assert sum(restated) == total - refunded  # a split: the goal's shares sum to what is left
            assert all(0 <= x <= s for x, s in zip(restated, shares, strict=True))
        previous.append(a)


# --------------------------------------------------------------------------- waiting for the purchase

READINESS: list[tuple[str, OrderAdjusted, int, int, bool, Verdict]] = [
    ("the ledger knows the order: plan", FULL, 5_000, 0, True, Verdict(Readiness.PLAN)),
    ("unknown order: wait until first seen + orphan_wait", FULL, 5_000, 1_000, False,
     Verdict(Readiness.WAIT, until_ms=1_000 + 10 * MIN)),
    ("still waiting 1 ms before the deadline", FULL, 1_000 + 10 * MIN - 1, 1_000, False,
     Verdict(Readiness.WAIT, until_ms=1_000 + 10 * MIN)),
    ("at the deadline: dead-lettered as an orphan", FULL, 1_000 + 10 * MIN, 1_000, False,
     Verdict(Readiness.DEAD_LETTER, reason=DeadLetterReason.ORPHAN)),
    ("a clock before first seen still waits", FULL, 0, 1_000, False,
     Verdict(Readiness.WAIT, until_ms=1_000 + 10 * MIN)),
    ("an unknown kind is dead-lettered at once", adj(AdjustmentKind.UNKNOWN), 0, 0, True,
     Verdict(Readiness.DEAD_LETTER, reason=DeadLetterReason.UNKNOWN_KIND)),
]


@pytest.mark.parametrize(("adjustment", "now", "first_seen", "known", "expected"), [c[1:] for c in READINESS],
                         ids=[c[0] for c in READINESS])
def test_readiness(adjustment: OrderAdjusted, now: int, first_seen: int, known: bool, expected: Verdict) -> None:
    assert readiness(adjustment, now, first_seen, known, 10 * MIN) == expected


def test_an_orphan_plan_sends_nothing_and_names_its_reason() -> None:
    p = orphan_plan(FULL)
    assert p.actions == () and p.dead_letter is DeadLetterReason.ORPHAN
    assert p.dead_letter.value == "orphan_adjustment"


def test_a_refusal_for_one_project_applies_the_adjustment_to_none() -> None:
    two = {**RULES, (K, "site2"): rules()}
    p = plan(adj(currency="USD"), [conv("a", "100.00"), conv("b", "100.00", project="site2", order_currency="USD")],
             [], two)
    assert p.actions == () and p.dead_letter is DeadLetterReason.CURRENCY
    assert outcomes(p) == [("none", "invalid")]


def test_each_pipeline_carries_out_its_own_part() -> None:
    whole = plan(FULL, [conv("a", "100.00"), conv("v", "100.00", provider=CV, project="1_2")], [], RULES)
    mine = for_providers(whole, frozenset({K}), designated=False)
    assert sent(mine) == sent(whole) and outcomes(mine) == [("kameleoon", "retracted")]
    theirs = for_providers(whole, frozenset({CV}), designated=True)
    assert theirs.actions == () and outcomes(theirs) == [("convert", "not_supported")]
    orphan = orphan_plan(FULL)
    assert for_providers(orphan, frozenset({K}), designated=False) == AdjustmentPlan(FULL, (), ())
    assert for_providers(orphan, frozenset({CV}), designated=True) == orphan  # counted and dead-lettered once
    nothing = plan(FULL, [], [], RULES)
    assert outcomes(for_providers(nothing, frozenset({K}), designated=True)) == [("none", "not_delivered")]
