"""Kameleoon refunds on the wire: negative events and restatements built by the module, as the sandbox counts them."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence
from decimal import Decimal

import aiohttp
import pytest

from consumer.adjustments import AdjustmentPlan, Delivered, plan
from consumer.config import Rules
from consumer.model import AdjustmentKind, Conversion, Identity, OrderAdjusted, Provider, RefundPolicy, RevenueShare
from consumer.providers.kameleoon.config import KameleoonConfig, KameleoonProject
from consumer.providers.kameleoon.emulator import ReportLine
from consumer.providers.kameleoon.keys import adjustment_nonce, nonce
from consumer.providers.kameleoon.request import KameleoonModule, event_json
from consumer.sandbox import Sandbox

SITE = "f17c21u1ag"
GOAL = "36151"
UA = {"User-Agent": "CustomUserAgent/1.0", "Content-Type": "application/json"}
RULES = Rules(goals=(GOAL,), attribution_window=7 * 86400.0, revenue_share=RevenueShare.SPLIT,
              refunds=RefundPolicy.RETRACT)
D = Decimal


def module(base_url: str) -> KameleoonModule:
    p = KameleoonProject(site_code=SITE, rules=RULES, base_url=base_url)
    return KameleoonModule(KameleoonConfig(user_agent="CustomUserAgent/1.0", projects={SITE: p}))


def original(visitor: str, revenue: str, identity: Identity = Identity.VISITOR) -> Conversion:
    key = nonce(SITE, "ord-1", GOAL, visitor, identity)
    return Conversion(Provider.KAMELEOON, SITE, visitor, (GOAL,), D(revenue), key, "evt-1", "ord-1", 1_740_447_713_028,
                      2, identity)


def delivered(c: Conversion) -> Delivered:
    """The ledger's record of a delivered conversion, as the planner reads it."""
    assert c.revenue is not None
    return Delivered(c.provider, c.project, c.key, c.goals, c.identity, c.visitor_id, c.revenue, "EUR",
                     D("100.00"), "EUR")


def refund(event_id: str, kind: AdjustmentKind, amount: str) -> OrderAdjusted:
    return OrderAdjusted(event_id, "ord-1", 1_740_500_000_000, kind, D(amount), "EUR")


@pytest.fixture
async def sandbox() -> AsyncIterator[Sandbox]:
    async with Sandbox() as sb:
        yield sb


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


async def send(http: aiohttp.ClientSession, m: KameleoonModule, conversions: Sequence[Conversion]) -> None:
    """One request as the dispatcher sends it: item_bytes for each (the batch limit), then build."""
    for c in conversions:
        m.item_bytes(c)
    request = m.build(m.route(conversions[0]), conversions)
    async with http.request(request.method, request.url, data=request.body, headers=dict(request.headers)) as r:
        assert r.status == 204, await r.text()


async def send_plan(http: aiohttp.ClientSession, m: KameleoonModule, p: AdjustmentPlan) -> None:
    await send(http, m, [a.conversion for a in p.actions])


def report(sb: Sandbox) -> dict[str, tuple[int, str, int]]:
    return {visitor: (line.conversions, str(line.revenue), line.cancellations)
            for (_, visitor, _), line in sb.kameleoon_report(SITE).items()}


# --------------------------------------------------------------------------- the events


def test_a_cancellation_is_the_documented_conversion_with_negative_true() -> None:
    c = original("245fc", "23.50")
    c.key, c.negative = "a2bb4d22083348ef", True
    assert json.loads(event_json(c)) == {"nonce": "a2bb4d22083348ef", "eventType": "CONVERSION", "goalId": 36151,
                                         "revenue": 23.50, "negative": True, "visitorCode": "245fc"}
    c.negative = False
    assert "negative" not in event_json(c)  # a purchase's event stays exactly as before


def test_adjustment_nonces_are_hex_and_distinct_from_every_other() -> None:
    orig = nonce(SITE, "ord-1", GOAL, "245fc")
    made = {adjustment_nonce(SITE, e, k, role) for e in ("adj-1", "adj-2") for k in (orig, "other")
            for role in ("cancel", "restate")}
    assert len(made) == 8 and orig not in made
    assert all(len(n) == 16 and int(n, 16) >= 0 for n in made)
    assert adjustment_nonce(SITE, "adj-1", orig, "cancel") == adjustment_nonce(SITE, "adj-1", orig, "cancel")


# --------------------------------------------------------------------------- against the sandbox


async def test_refunds_leave_the_right_revenue_in_a_kameleoon_report(sandbox: Sandbox,
                                                                    http: aiohttp.ClientSession) -> None:
    m = module(sandbox.url)
    originals = [original("a", "60.00"), original("b", "40.00")]
    await send(http, m, originals)
    assert report(sandbox) == {"a": (1, "60.00", 0), "b": (1, "40.00", 0)}
    ledger = [delivered(c) for c in originals]
    rules = {(Provider.KAMELEOON, SITE): RULES}

    p1 = refund("adj-1", AdjustmentKind.PARTIAL_REFUND, "25.00")
    first = plan(p1, ledger, [], rules)
    await send_plan(http, m, first)
    assert report(sandbox) == {"a": (1, "45.00", 1), "b": (1, "30.00", 1)}

    # Read again (a redelivery, a restart after a crash): the same nonces, which Kameleoon counts once.
    await send_plan(http, m, plan(p1, ledger, [p1], rules))
    assert report(sandbox) == {"a": (1, "45.00", 1), "b": (1, "30.00", 1)}
    assert len(sandbox.duplicates()) == 4  # received twice, counted once

    p2 = refund("adj-2", AdjustmentKind.PARTIAL_REFUND, "15.00")
    await send_plan(http, m, plan(p2, ledger, [p1], rules))
    assert report(sandbox) == {"a": (1, "36.00", 2), "b": (1, "24.00", 2)}

    full = refund("adj-3", AdjustmentKind.FULL_REFUND, "100.00")
    await send_plan(http, m, plan(full, ledger, [p1, p2], rules))
    assert report(sandbox) == {"a": (0, "0.00", 3), "b": (0, "0.00", 3)}


async def test_a_cancellation_takes_back_every_identity_kind(sandbox: Sandbox, http: aiohttp.ClientSession) -> None:
    m = module(sandbox.url)
    originals = [original("a", "50.00"), original("cust-9", "50.00", Identity.MAPPING)]
    await send(http, m, originals)
    cancel = refund("adj-1", AdjustmentKind.CANCELLATION, "100.00")
    await send_plan(http, m, plan(cancel, [delivered(c) for c in originals], [], {(Provider.KAMELEOON, SITE): RULES}))
    assert sandbox.kameleoon_report(SITE) == {
        ("mapping", "cust-9", GOAL): ReportLine(0, D("0.00"), 1),
        ("visitor", "a", GOAL): ReportLine(0, D("0.00"), 1),
    }


async def test_the_visitor_endpoint_shows_the_cancellation(sandbox: Sandbox, http: aiohttp.ClientSession) -> None:
    m = module(sandbox.url)
    await send(http, m, [original("245fc", "23.50")])
    full = refund("adj-1", AdjustmentKind.FULL_REFUND, "23.50")
    await send_plan(http, m, plan(full, [delivered(original("245fc", "23.50"))], [],
                                  {(Provider.KAMELEOON, SITE): RULES}))
    url = (f"{sandbox.url}/visit/visitor?siteCode={SITE}&visitorCode=245fc&maxNumberPreviousVisits=5"
           "&currentVisit=true&conversion=true")
    async with http.get(url, headers=UA) as r:
        body = await r.json()
    events = sorted((e["data"] for v in body["previousVisits"] for e in v["conversionEvents"]),
                    key=lambda d: d["negative"])
    assert events == [{"goalId": 36151, "revenue": 23.5, "negative": False, "metadata": {}},
                      {"goalId": 36151, "revenue": 23.5, "negative": True, "metadata": {}}]


async def test_the_report_counts_each_nonce_once_per_site(sandbox: Sandbox, http: aiohttp.ClientSession) -> None:
    def ev(n: int, visitor: str, revenue: float | None, **extra: object) -> dict[str, object]:
        out: dict[str, object] = {"nonce": f"{n:016x}", "eventType": "CONVERSION", "goalId": 7, "visitorCode": visitor}
        return {**out, **({"revenue": revenue} if revenue is not None else {}), **extra}

    bodies = {
        SITE: [ev(1, "a", 10.1), ev(1, "a", 10.1), ev(2, "a", 0.2), ev(3, "a", 10.1, negative=True),
               ev(4, "b", None), ev(5, "b", None, negative=False)],
        "othersite": [ev(1, "a", 99.0)],
    }
    for site, body in bodies.items():
        async with http.post(f"{sandbox.url}/visit/events?siteCode={site}&json=true", data=json.dumps(body),
                             headers=UA) as r:
            assert r.status == 204
    assert sandbox.kameleoon_report(SITE) == {
        ("visitor", "a", "7"): ReportLine(1, D("0.20"), 1),  # 10.1 + 0.2 - 10.1, exactly; the repeat counted once
        ("visitor", "b", "7"): ReportLine(2, D("0.00"), 0),
    }
    assert sandbox.kameleoon_report("othersite") == {("visitor", "a", "7"): ReportLine(1, D("99.00"), 0)}
    assert sandbox.kameleoon_report("nosuchsite") == {}
