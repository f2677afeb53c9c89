"""The attribution matcher: every rule and boundary, through the real config path, plus properties."""

from __future__ import annotations

import dataclasses
import hashlib
import re
from collections import Counter
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from consumer.config import Config, parse
from consumer.matcher import MatchSettings, TooManyExposures, count, match, shares
from consumer.model import Channel, Conversion, Decision, Exposure, Identity, Provider, Purchase, RejectReason

K, C, D = Provider.KAMELEOON, Provider.CONVERT, Provider.CONDUCTRICS
T0 = 1_700_000_000_000  # the purchase's occurred_at in most tests
SEC, MIN, HOUR, DAY = 1000, 60_000, 3_600_000, 86_400_000
SKEW = 5 * MIN  # the default clock skew
KAFKA = {"bootstrap_servers": "localhost:9092", "topic": "purchases", "group_id": "g", "dlq_topic": "purchases-dlq"}
CDX_URL = "https://api-x.conductrics.com/ac-x/v3/agent-api"


def config(
    kameleoon: dict[str, Any] | None = None,
    convert: dict[str, Any] | None = None,
    conductrics: dict[str, Any] | None = None,
    matcher: dict[str, Any] | None = None,
) -> Config:
    data: dict[str, Any] = {"kafka": dict(KAFKA)}
    if kameleoon:
        data["kameleoon"] = {"projects": kameleoon}
    if convert:
        data["convert"] = {"projects": convert}
    if conductrics:
        data["conductrics"] = {
            "projects": {k: {"agent_api_url": CDX_URL, "api_key": "secret", **v} for k, v in conductrics.items()}
        }
    if matcher:
        data["matcher"] = matcher
    return parse(data, env={})


def standard(**matcher: Any) -> MatchSettings:
    """One project per provider with default windows, plus a mapping-identifier Kameleoon site."""
    return MatchSettings.from_config(
        config(
            kameleoon={"site1": {"goals": ["11"]}, "site2": {"goals": ["21", "22"], "use_mapping_identifier": True}},
            convert={"1111_2222": {"goals": ["31", "32"], "transaction_goals": ["32"]}},
            conductrics={"cdx": {"goals": ["g-purchase", "g-revenue"]}},
            matcher=matcher or None,
        )
    )


def only(provider: Provider, project: str, **rules: Any) -> MatchSettings:
    """A single project of one provider, with the given rules (goals default to one)."""
    rules.setdefault("goals", ["g1"] if provider is D else ["1"])
    matcher = rules.pop("matcher", None)
    section = {project: rules}
    return MatchSettings.from_config(
        config(
            kameleoon=section if provider is K else None,
            convert=section if provider is C else None,
            conductrics=section if provider is D else None,
            matcher=matcher,
        )
    )


def purchase(*exposures: Exposure, **kw: Any) -> Purchase:
    values: dict[str, Any] = {
        "event_id": "evt-1",
        "order_id": "ord-1",
        "occurred_at": T0,
        "channel": Channel.WEB,
        "currency": "EUR",
        "revenue": Decimal("23.50"),
        "item_count": 2,
        "customer_id": "cust-9",
    }
    values.update(kw)
    return Purchase(exposures=exposures, **values)


def exp(
    provider: Provider = K,
    project: str = "site1",
    experiment: str = "100",
    variation: str = "1",
    visitor: str = "v1",
    at: int = T0 - MIN,
) -> Exposure:
    return Exposure(provider, project, experiment, variation, visitor, at)


def reasons(decision: Decision) -> list[RejectReason]:
    return [r.reason for r in decision.rejections]


# --------------------------------------------------------------------------- time


WINDOWS = [(K, "site1", 7 * DAY), (C, "1111_2222", 30 * DAY), (D, "cdx", 72 * HOUR)]


@pytest.mark.parametrize(("provider", "project", "window"), WINDOWS, ids=["kameleoon", "convert", "conductrics"])
@pytest.mark.parametrize(
    ("offset", "expected"),
    [
        # offset = exposed_at - occurred_at, as a function of the window w
        (lambda w: -w, None),  # exactly at the window's start: inclusive
        (lambda w: -w - 1, RejectReason.OUTSIDE_WINDOW),  # one millisecond earlier
        (lambda w: -w + 1, None),
        (lambda w: 0, None),  # exposed at the very moment of the purchase
        (lambda w: SKEW, None),  # after the purchase by exactly the skew: inclusive
        (lambda w: SKEW + 1, RejectReason.AFTER_PURCHASE),  # one millisecond beyond the skew
        (lambda w: SKEW - 1, None),
    ],
    ids=["start", "start-1ms", "start+1ms", "at-purchase", "skew", "skew+1ms", "skew-1ms"],
)
def test_default_window_and_skew_edges(
    provider: Provider, project: str, window: int, offset: Any, expected: Any
) -> None:
    e = exp(provider, project, at=T0 + offset(window))
    d = match(purchase(e), standard(), now_ms=T0)
    if expected is None:
        assert d.matched == (e,)
        assert d.rejections == ()
        assert d.conversions and all(c.provider is provider for c in d.conversions)
    else:
        assert d.conversions == ()
        assert d.matched == ()
        assert reasons(d) == [expected]
        assert d.rejections[0].exposure == e


@pytest.mark.parametrize(
    ("window", "skew", "offset", "ok"),
    [
        ("1h", "0s", -HOUR, True),
        ("1h", "0s", -HOUR - 1, False),
        ("1h", "0s", 0, True),
        ("1h", "0s", 1, False),  # no skew: one millisecond after the purchase is too late
        ("90m", "10s", -90 * MIN, True),
        ("90m", "10s", -90 * MIN - 1, False),
        ("90m", "10s", 10 * SEC, True),
        ("90m", "10s", 10 * SEC + 1, False),
        ("250ms", "0s", -250, True),
        ("250ms", "0s", -251, False),
    ],
)
def test_configured_window_and_skew(window: str, skew: str, offset: int, ok: bool) -> None:
    s = only(C, "1_2", attribution_window=window, matcher={"clock_skew": skew})
    d = match(purchase(exp(C, "1_2", at=T0 + offset)), s, now_ms=T0)
    assert d.attributed is ok
    if not ok:
        assert reasons(d) == [RejectReason.AFTER_PURCHASE if offset > 0 else RejectReason.OUTSIDE_WINDOW]


@pytest.mark.parametrize(
    ("max_age", "age", "too_old"),
    [(None, 90 * DAY, False), (None, 90 * DAY + 1, True), ("2h", 2 * HOUR, False), ("2h", 2 * HOUR + 1, True)],
)
def test_max_age_is_inclusive_and_rejects_the_whole_purchase(max_age: str | None, age: int, too_old: bool) -> None:
    s = standard(**({"max_age": max_age} if max_age else {}))
    # Two exposures: a too-old purchase reports one rejection, not one per exposure.
    p = purchase(exp(at=T0 - MIN), exp(D, "cdx", at=T0 - MIN))
    d = match(p, s, now_ms=T0 + age)
    if too_old:
        assert d.conversions == () and d.matched == ()
        assert reasons(d) == [RejectReason.TOO_OLD]
        assert d.rejections[0].exposure is None
        assert "ord-1" in d.rejections[0].detail
    else:
        assert d.attributed and len(d.matched) == 2


def test_purchase_in_the_future_of_now_is_not_too_old() -> None:
    d = match(purchase(exp()), standard(), now_ms=T0 - DAY)
    assert d.attributed


def test_no_exposures() -> None:
    d = match(purchase(), standard(), now_ms=T0)
    assert d.conversions == () and d.matched == ()
    assert reasons(d) == [RejectReason.NO_EXPOSURES]


@pytest.mark.parametrize(
    "e",
    [exp(K, "nosuchsite"), exp(C, "site1"), exp(D, "1111_2222"), exp(C, "9_9")],
    ids=["unknown-site", "kameleoon-project-under-convert", "convert-project-under-conductrics", "unknown-convert"],
)
def test_unknown_project(e: Exposure) -> None:
    d = match(purchase(e, exp()), standard(), now_ms=T0)
    assert d.matched == (exp(),)
    assert [(r.reason, r.exposure) for r in d.rejections] == [(RejectReason.UNKNOWN_PROJECT, e)]
    assert e.project in d.rejections[0].detail


# --------------------------------------------------------------------------- collapsing and identity


def test_one_purchase_many_providers_and_projects() -> None:
    p = purchase(
        exp(K, "site1", "100", "1", "kv1"),
        exp(K, "site2", "200", "2", "kv2"),
        exp(C, "1111_2222", "300", "3", "cv1"),
        exp(D, "cdx", "a-400", "b", "dv1"),
    )
    d = match(p, standard(), now_ms=T0)
    got = [
        (c.provider, c.project, c.identity, c.visitor_id, c.goals, c.experiment_id, c.variation_id)
        for c in d.conversions
    ]
    assert got == [
        (D, "cdx", Identity.VISITOR, "dv1", ("g-purchase", "g-revenue"), None, None),
        (C, "1111_2222", Identity.VISITOR, "cv1", ("31", "32"), "300", "3"),
        (K, "site1", Identity.VISITOR, "kv1", ("11",), None, None),
        (K, "site2", Identity.MAPPING, "cust-9", ("21",), None, None),
        (K, "site2", Identity.MAPPING, "cust-9", ("22",), None, None),
    ]
    assert d.conversions[1].transaction_goals == ("32",)
    assert all(c.transaction_goals == () for c in d.conversions if c.provider is not C)
    for c in d.conversions:
        assert (c.event_id, c.order_id, c.occurred_at, c.item_count, c.revenue) == (
            "evt-1",
            "ord-1",
            T0,
            2,
            Decimal("23.50"),
        )
    assert sorted(d.matched, key=repr) == sorted(p.exposures, key=repr)
    assert d.rejections == ()


def test_kameleoon_collapses_per_goal_and_visitor() -> None:
    s = only(K, "site", goals=["1", "2"])
    p = purchase(
        exp(K, "site", "100", "1", "v1", at=T0 - HOUR),
        exp(K, "site", "200", "3", "v1", at=T0 - DAY),  # another experiment, same visitor
        exp(K, "site", "100", "1", "v1", at=T0 - 2 * DAY),  # the same experiment again
        exp(K, "site", "100", "2", "v2", at=T0 - HOUR),  # another visitor (another device)
    )
    d = match(p, s, now_ms=T0)
    assert [(c.visitor_id, c.goals) for c in d.conversions] == [
        ("v1", ("1",)),
        ("v1", ("2",)),
        ("v2", ("1",)),
        ("v2", ("2",)),
    ]
    assert len(d.matched) == 4  # collapsed exposures are matched, not rejected
    assert d.rejections == ()
    assert len({c.key for c in d.conversions}) == 4


def test_convert_collapses_per_visitor_and_experiment_variation() -> None:
    # `all`: this is about collapsing; Convert's default (last_touch) would credit one visitor per experiment.
    s = only(C, "1_2", goals=["5", "6", "7"], transaction_goals=["7", "5"], attribution="all")
    p = purchase(
        exp(C, "1_2", "100", "1", "v1", at=T0 - HOUR),
        exp(C, "1_2", "100", "1", "v1", at=T0 - DAY),  # same visitor, same experiment-variation: collapsed
        exp(C, "1_2", "200", "9", "v1"),  # same visitor, another experiment: its own conversion
        exp(C, "1_2", "100", "1", "v2"),  # another visitor
    )
    d = match(p, s, now_ms=T0)
    assert [(c.visitor_id, c.experiment_id, c.variation_id) for c in d.conversions] == [
        ("v1", "100", "1"),
        ("v1", "200", "9"),
        ("v2", "100", "1"),
    ]
    assert all(c.goals == ("5", "6", "7") and c.transaction_goals == ("7", "5") for c in d.conversions)
    assert len(d.matched) == 4


def test_conductrics_collapses_per_vid_with_all_goals() -> None:
    s = only(D, "p", goals=["g-a", "g-b"])
    p = purchase(exp(D, "p", "a1", "x", "vid1"), exp(D, "p", "a2", "y", "vid1"), exp(D, "p", "a1", "x", "vid2"))
    d = match(p, s, now_ms=T0)
    assert [(c.visitor_id, c.goals) for c in d.conversions] == [("vid1", ("g-a", "g-b")), ("vid2", ("g-a", "g-b"))]
    assert all(c.experiment_id is None for c in d.conversions)
    assert len(d.matched) == 3


def test_mapping_identifier_collapses_devices_into_the_customer() -> None:
    s = only(K, "site", goals=["1"], use_mapping_identifier=True)
    p = purchase(exp(K, "site", visitor="phone"), exp(K, "site", visitor="laptop"), customer_id="cust-42")
    d = match(p, s, now_ms=T0)
    assert [(c.identity, c.visitor_id, c.goals) for c in d.conversions] == [(Identity.MAPPING, "cust-42", ("1",))]
    assert len(d.matched) == 2


@pytest.mark.parametrize("customer", [None, "", "  "])
def test_mapping_identifier_without_customer_is_no_identity(customer: str | None) -> None:
    s = only(K, "site", use_mapping_identifier=True)
    p = purchase(exp(K, "site", visitor="v1"), exp(K, "site", visitor="v2"), customer_id=customer)
    d = match(p, s, now_ms=T0)
    assert d.conversions == () and d.matched == ()
    assert reasons(d) == [RejectReason.NO_IDENTITY, RejectReason.NO_IDENTITY]


def test_without_mapping_identifier_the_visitor_code_is_used_even_with_a_customer() -> None:
    d = match(purchase(exp(K, "site", visitor="v1"), customer_id="cust"), only(K, "site"), now_ms=T0)
    assert [(c.identity, c.visitor_id) for c in d.conversions] == [(Identity.VISITOR, "v1")]


@pytest.mark.parametrize(
    ("provider", "visitor", "customer", "expected"),
    [
        (D, "vid1", "cust", "vid1"),  # a visitor id wins over the customer id
        (D, "", "cust", "cust"),  # Conductrics falls back to the customer id
        (D, "", None, None),
        (D, " ", None, None),
        (K, "", "cust", None),  # Kameleoon without mapping does not fall back
        (C, "", "cust", None),  # nor does Convert
    ],
)
def test_visitor_identity_and_fallback(
    provider: Provider, visitor: str, customer: str | None, expected: str | None
) -> None:
    d = match(purchase(exp(provider, "1_2", visitor=visitor), customer_id=customer), only(provider, "1_2"), now_ms=T0)
    if expected is None:
        assert d.conversions == ()
        assert reasons(d) == [RejectReason.NO_IDENTITY]
    else:
        assert [(c.identity, c.visitor_id) for c in d.conversions] == [(Identity.VISITOR, expected)]


def test_conductrics_fallback_and_real_vid_equal_to_customer_collapse() -> None:
    p = purchase(exp(D, "p1", "a", "x", ""), exp(D, "p1", "b", "y", "cust"), customer_id="cust")
    d = match(p, only(D, "p1"), now_ms=T0)
    assert [c.visitor_id for c in d.conversions] == ["cust"]
    assert len(d.matched) == 2


# --------------------------------------------------------------------------- filters


@pytest.mark.parametrize(
    ("channels", "channel", "ok"),
    [
        (["store"], Channel.STORE, True),  # config is case-insensitive
        (["STORE"], Channel.WEB, False),
        (["STORE", "phone"], Channel.PHONE, True),
        (None, Channel.OTHER, True),  # default: every channel
        (["WEB", "APP"], Channel.OTHER, False),
    ],
)
def test_channel_filter(channels: list[str] | None, channel: Channel, ok: bool) -> None:
    s = only(K, "site", **({"channels": channels} if channels is not None else {}))
    d = match(purchase(exp(K, "site"), channel=channel), s, now_ms=T0)
    assert d.attributed is ok
    if not ok:
        assert reasons(d) == [RejectReason.FILTERED_CHANNEL]
        assert channel.value in d.rejections[0].detail


@pytest.mark.parametrize(
    ("rule", "experiment", "ok"),
    [
        ({"experiments_allow": ["100", 200]}, "100", True),
        ({"experiments_allow": ["100", 200]}, "200", True),  # integers in TOML are ids too
        ({"experiments_allow": ["100"]}, "1000", False),
        ({"experiments_deny": ["100"]}, "100", False),
        ({"experiments_deny": ["100"]}, "101", True),
        ({}, "anything", True),
    ],
)
def test_experiment_allow_and_deny(rule: dict[str, Any], experiment: str, ok: bool) -> None:
    s = only(C, "1_2", **rule)
    other = exp(C, "1_2", "100" if experiment != "100" else "101", visitor="other")
    d = match(purchase(exp(C, "1_2", experiment), other), s, now_ms=T0)
    assert (exp(C, "1_2", experiment) in d.matched) is ok
    filtered = [r for r in d.rejections if r.exposure == exp(C, "1_2", experiment)]
    assert [r.reason for r in filtered] == ([] if ok else [RejectReason.FILTERED_EXPERIMENT])


@pytest.mark.parametrize(
    ("min_revenue", "revenue", "ok"),
    [("23.50", "23.50", True), ("23.51", "23.50", False), (10, "9.99", False), ("0", "0.00", True), (None, "0", True)],
)
def test_min_revenue_is_inclusive(min_revenue: Any, revenue: str, ok: bool) -> None:
    s = only(D, "p", **({"min_revenue": min_revenue} if min_revenue is not None else {}))
    d = match(purchase(exp(D, "p"), revenue=Decimal(revenue)), s, now_ms=T0)
    assert d.attributed is ok
    if not ok:
        assert reasons(d) == [RejectReason.BELOW_MIN_REVENUE]


def test_send_revenue_false_sends_no_revenue_but_still_converts() -> None:
    for provider in (K, C, D):
        d = match(purchase(exp(provider, "1_2")), only(provider, "1_2", send_revenue=False), now_ms=T0)
        assert d.attributed
        assert all(c.revenue is None for c in d.conversions)


def test_first_failing_check_is_reported() -> None:
    # Both outside the window and a denied experiment in a filtered channel: the window is reported.
    s = only(K, "site", experiments_deny=["100"], channels=["STORE"])
    d = match(purchase(exp(K, "site", "100", at=T0 - 8 * DAY)), s, now_ms=T0)
    assert reasons(d) == [RejectReason.OUTSIDE_WINDOW]
    d = match(purchase(exp(K, "site", "100")), s, now_ms=T0)
    assert reasons(d) == [RejectReason.FILTERED_CHANNEL]


def test_rules_are_per_project() -> None:
    s = MatchSettings.from_config(
        config(
            kameleoon={"a": {"goals": ["1"], "channels": ["STORE"]}, "b": {"goals": ["2"], "send_revenue": False}},
            conductrics={"a": {"goals": ["g"], "min_revenue": "100"}},
        )
    )
    d = match(purchase(exp(K, "a"), exp(K, "b"), exp(D, "a")), s, now_ms=T0)
    assert [(c.provider, c.project, c.revenue) for c in d.conversions] == [(K, "b", None)]
    assert [(r.exposure.provider if r.exposure else None, r.reason) for r in d.rejections] == [
        (D, RejectReason.BELOW_MIN_REVENUE),
        (K, RejectReason.FILTERED_CHANNEL),
    ]


# --------------------------------------------------------------------------- currency

RATES = {"USD/EUR": "0.9", "EUR/GBP": 0.85, "CHF_EUR": "1.04", "JPY/EUR": "0.125", "EUR/SEK": "8"}


@pytest.mark.parametrize(
    ("project_currency", "purchase_currency", "revenue", "expected"),
    [
        (None, "USD", "23.505", "23.505"),  # no project currency: as is, not even rounded
        ("EUR", "EUR", "23.505", "23.505"),  # same currency: as is
        ("EUR", "eur", "10.00", "10.00"),  # the purchase's code is compared upper-cased
        ("EUR", "USD", "10.00", "9.00"),  # direct rate USD/EUR
        ("GBP", "EUR", "10.00", "8.50"),  # direct rate with a float in TOML
        ("EUR", "CHF", "19.99", "20.79"),  # 20.7896 -> 20.79; the pair may be written with '_'
        ("USD", "EUR", "9.00", "10.00"),  # only USD/EUR configured: inverse, divided
        ("USD", "EUR", "1.00", "1.11"),  # 1.1111.. -> 1.11
        ("EUR", "GBP", "8.50", "10.00"),  # inverse of EUR/GBP
        ("EUR", "JPY", "1", "0.13"),  # 0.125 -> half up (half even would give 0.12)
        ("EUR", "JPY", "3", "0.38"),  # 0.375 -> 0.38
        ("EUR", "JPY", "0.02", "0.00"),  # 0.0025 -> 0.00
        ("JPY", "EUR", "1.00", "8.00"),  # inverse of JPY/EUR: 1 / 0.125
        ("SEK", "EUR", "1.00", "8.00"),
        ("EUR", "SEK", "1.00", "0.13"),  # inverse of EUR/SEK: 1 / 8 = 0.125 -> 0.13 half up
        ("EUR", "SEK", "-1.00", "-0.13"),  # half up is away from zero for refunds too
    ],
)
def test_currency_conversion(project_currency: str | None, purchase_currency: str, revenue: str, expected: str) -> None:
    rules = {"currency": project_currency} if project_currency else {}
    s = only(D, "p", matcher={"rates": RATES}, **rules)
    d = match(purchase(exp(D, "p"), currency=purchase_currency, revenue=Decimal(revenue)), s, now_ms=T0)
    (c,) = d.conversions
    assert c.revenue is not None
    assert str(c.revenue) == expected


def test_direct_rate_wins_over_inverse() -> None:
    s = only(D, "p", currency="EUR", matcher={"rates": {"USD/EUR": "0.5", "EUR/USD": "4"}})
    d = match(purchase(exp(D, "p"), currency="USD", revenue=Decimal("10")), s, now_ms=T0)
    assert [c.revenue for c in d.conversions] == [Decimal("5.00")]


def test_no_rate_rejects_the_project_and_never_sends_the_wrong_currency() -> None:
    s = MatchSettings.from_config(
        config(
            kameleoon={"eur": {"goals": ["1"], "currency": "EUR"}, "any": {"goals": ["1"]}},
            matcher={"rates": {"USD/GBP": "0.8"}},
        )
    )
    d = match(purchase(exp(K, "eur"), exp(K, "any"), currency="USD", revenue=Decimal("10.00")), s, now_ms=T0)
    assert [(c.project, c.revenue) for c in d.conversions] == [("any", Decimal("10.00"))]
    assert [(r.reason, r.exposure) for r in d.rejections] == [(RejectReason.CURRENCY, exp(K, "eur"))]
    assert "USD/EUR" in d.rejections[0].detail


def test_no_rate_is_fine_when_no_revenue_is_sent_or_compared() -> None:
    s = only(K, "site", currency="EUR", send_revenue=False)
    d = match(purchase(exp(K, "site"), currency="USD"), s, now_ms=T0)
    assert d.attributed and d.conversions[0].revenue is None
    s = only(K, "site", currency="EUR", send_revenue=False, min_revenue="1")
    d = match(purchase(exp(K, "site"), currency="USD"), s, now_ms=T0)
    assert reasons(d) == [RejectReason.CURRENCY]


@pytest.mark.parametrize(("min_revenue", "ok"), [("9.00", True), ("9.01", False)])
def test_min_revenue_compares_in_the_project_currency(min_revenue: str, ok: bool) -> None:
    # 10.00 USD is 9.00 EUR: above 9.01 in USD, below it in EUR.
    s = only(D, "p", currency="EUR", min_revenue=min_revenue, send_revenue=False, matcher={"rates": {"USD/EUR": "0.9"}})
    d = match(purchase(exp(D, "p"), currency="USD", revenue=Decimal("10.00")), s, now_ms=T0)
    assert d.attributed is ok
    assert reasons(d) == ([] if ok else [RejectReason.BELOW_MIN_REVENUE])


# --------------------------------------------------------------------------- keys


def test_keys_have_the_provider_formats_and_are_pinned() -> None:
    # Pinned values: a change here changes every idempotency key in production, so a deploy
    # would re-send conversions that were already delivered. Change only on purpose.
    d = match(
        purchase(exp(K, "site1", visitor="v1"), exp(C, "1111_2222", "300", "3", "v1"), exp(D, "cdx", visitor="v1")),
        standard(),
        now_ms=T0,
    )
    keys = {c.provider: c.key for c in d.conversions}
    assert re.fullmatch(r"[0-9a-f]{16}", keys[K])
    assert re.fullmatch(r"[0-9a-f]{32}", keys[C])
    assert re.fullmatch(r"[0-9a-f]{32}", keys[D])
    assert keys == PINNED_KEYS


PINNED_KEYS = {K: "d61365ec5600285d", C: "c3e9c126825614d90e8e32faafd75b0f", D: "e035cc3ab883d1562b1a5ffd5f8c1531"}


def test_key_encoding_is_length_prefixed_sha256() -> None:
    # The documented encoding: sha256 over "<len>:<utf-8 bytes>" per part, provider first.
    assert hashlib.sha256(b"9:kameleoon5:site15:ord-12:117:visitor2:v1").hexdigest()[:16] == PINNED_KEYS[K]
    assert hashlib.sha256(b"7:convert9:1111_22222:v13:3001:35:ord-1").hexdigest()[:32] == PINNED_KEYS[C]
    assert hashlib.sha256(b"11:conductrics3:cdx2:v15:ord-1").hexdigest()[:32] == PINNED_KEYS[D]


def test_keys_come_from_the_order_not_the_event() -> None:
    p = purchase(exp(K, "site2"), exp(C, "1111_2222"), exp(D, "cdx"), exp(K, "site1"))
    first = match(p, standard(), now_ms=T0)
    republished = match(dataclasses.replace(p, event_id="evt-2", occurred_at=T0 + 1), standard(), now_ms=T0)
    other_order = match(dataclasses.replace(p, order_id="ord-2"), standard(), now_ms=T0)
    assert [c.key for c in republished.conversions] == [c.key for c in first.conversions]
    assert not {c.key for c in other_order.conversions} & {c.key for c in first.conversions}


def _one_key(provider: Provider, project: str, e: Exposure, **kw: Any) -> str:
    d = match(purchase(e, **kw), only(provider, project), now_ms=T0)
    (c,) = d.conversions
    return c.key


@pytest.mark.parametrize(
    ("a", "b"),
    [
        # Convert: every part of (project, visitor, experiment, variation, order) matters, unambiguously.
        ((C, "1_2", exp(C, "1_2", "1", "23"), {}), (C, "1_2", exp(C, "1_2", "12", "3"), {})),
        ((C, "1_2", exp(C, "1_2", "1", "2", "v"), {}), (C, "1_2", exp(C, "1_2", "1", "2", "w"), {})),
        ((C, "1_2", exp(C, "1_2"), {}), (C, "1_22", exp(C, "1_22"), {})),
        ((C, "1_2", exp(C, "1_2"), {"order_id": "a"}), (C, "1_2", exp(C, "1_2"), {"order_id": "b"})),
        # Conductrics: (project, vid, order).
        (
            (D, "p", exp(D, "p", visitor="ab"), {"order_id": "c"}),
            (D, "p", exp(D, "p", visitor="a"), {"order_id": "bc"}),
        ),
        ((D, "p", exp(D, "p"), {}), (D, "q", exp(D, "q"), {})),
        # Kameleoon: (siteCode, order, goal, identity).
        ((K, "s", exp(K, "s", visitor="v1"), {}), (K, "s", exp(K, "s", visitor="v2"), {})),
        ((K, "s", exp(K, "s"), {}), (K, "t", exp(K, "t"), {})),
    ],
)
def test_keys_distinguish_every_part(a: tuple[Any, ...], b: tuple[Any, ...]) -> None:
    assert _one_key(a[0], a[1], a[2], **a[3]) != _one_key(b[0], b[1], b[2], **b[3])


def test_keys_ignore_what_is_not_a_part() -> None:
    # Kameleoon's nonce does not depend on the experiment; Conductrics' key does not either.
    assert _one_key(K, "s", exp(K, "s", "1")) == _one_key(K, "s", exp(K, "s", "2"))
    assert _one_key(D, "p", exp(D, "p", "1")) == _one_key(D, "p", exp(D, "p", "2"))
    assert _one_key(C, "1_2", exp(C, "1_2"), revenue=Decimal("1")) == _one_key(C, "1_2", exp(C, "1_2"))


def test_kameleoon_mapping_and_visitor_identities_do_not_share_nonces() -> None:
    s_map = only(K, "s", use_mapping_identifier=True)
    s_vis = only(K, "s")
    via_mapping = match(purchase(exp(K, "s", visitor="x"), customer_id="same"), s_map, now_ms=T0)
    via_visitor = match(purchase(exp(K, "s", visitor="same")), s_vis, now_ms=T0)
    assert via_mapping.conversions[0].key != via_visitor.conversions[0].key


# --------------------------------------------------------------------------- determinism and details


def test_rejection_details_name_the_numbers() -> None:
    # Durations as a person reads them, and exact: one millisecond outside the window shows.
    d = match(purchase(exp(at=T0 - 7 * DAY - 1), exp(at=T0 + SKEW + 7)), standard(), now_ms=T0)
    details = {r.reason: r.detail for r in d.rejections}
    assert details == {
        RejectReason.OUTSIDE_WINDOW: "exposed 7 days 0.001 s before the purchase (attribution window 7 days)",
        RejectReason.AFTER_PURCHASE: "exposed 5 min 0.007 s after the purchase (clock skew tolerance 5 min)",
    }


def test_output_is_sorted_whatever_the_input_order() -> None:
    es = [
        exp(D, "cdx", visitor="z"),
        exp(K, "site1", visitor="b"),
        exp(K, "nope"),
        exp(K, "site1", visitor="a"),
        exp(C, "1111_2222"),
    ]
    forward = match(purchase(*es), standard(), now_ms=T0)
    backward = match(purchase(*reversed(es)), standard(), now_ms=T0)
    assert forward == backward
    assert [c.provider for c in forward.conversions] == [D, C, K, K]
    assert [c.visitor_id for c in forward.conversions if c.provider is K] == ["a", "b"]


# --------------------------------------------------------------------------- properties

PROP_SETTINGS = MatchSettings.from_config(
    config(
        kameleoon={
            "s1": {"goals": ["1", "2"], "attribution_window": "1h", "attribution": "all", "revenue_share": "full"},
            "s2": {"goals": ["3"], "use_mapping_identifier": True, "currency": "EUR", "experiments_deny": ["e2"]},
        },
        convert={"1_2": {"goals": ["5", "6"], "transaction_goals": ["6"], "currency": "USD", "min_revenue": "5"}},
        conductrics={"c1": {"goals": ["g1", "g2"], "attribution_window": "90m", "channels": ["WEB", "STORE"]}},
        matcher={"clock_skew": "1m", "max_age": "30d", "rates": {"USD/EUR": "0.9"}},
    )
)
# The same projects under the other models, and consent required where it is not above.
PROP_MODELS = MatchSettings.from_config(
    config(
        kameleoon={
            "s1": {"goals": ["1", "2"], "attribution_window": "1h", "attribution": "first_touch",
                   "revenue_share": "split", "require_consent": True},
            "s2": {"goals": ["3"], "use_mapping_identifier": True, "currency": "EUR", "experiments_deny": ["e2"],
                   "attribution": "last_touch"},
        },
        convert={"1_2": {"goals": ["5", "6"], "transaction_goals": ["6"], "currency": "USD", "min_revenue": "5",
                         "attribution": "all", "revenue_share": "split"}},
        conductrics={"c1": {"goals": ["g1", "g2"], "attribution_window": "90m", "channels": ["WEB", "STORE"],
                            "attribution": "last_touch", "require_consent": True}},
        matcher={"clock_skew": "1m", "max_age": "30d", "rates": {"USD/EUR": "0.9"}},
    )
)
SETTINGS = st.sampled_from([PROP_SETTINGS, PROP_MODELS])
PROJECTS = [(K, "s1"), (K, "s2"), (C, "1_2"), (D, "c1"), (D, "unknown")]
# Offsets of exposed_at from occurred_at, crowded around every window's and the skew's edges.
EDGES = [-HOUR, -90 * MIN, -7 * DAY, -30 * DAY, 0, MIN]
offsets = st.one_of(
    st.sampled_from(EDGES).flatmap(lambda e: st.integers(e - 2, e + 2)),
    st.integers(-31 * DAY, 2 * HOUR),
)
exposures = st.builds(
    lambda pp, x, v, vis, off: Exposure(pp[0], pp[1], x, v, vis, T0 + off),
    st.sampled_from(PROJECTS),
    st.sampled_from(["e1", "e2", "e3"]),
    st.sampled_from(["a", "b"]),
    st.sampled_from(["", "v1", "v2", "v3"]),
    offsets,
)
purchases = st.builds(
    purchase,
    channel=st.sampled_from(list(Channel)),
    currency=st.sampled_from(["EUR", "USD", "GBP"]),
    revenue=st.decimals(min_value=0, max_value=1000, places=2),
    customer_id=st.sampled_from([None, "c1", "c2"]),
    order_id=st.sampled_from(["o1", "o2"]),
    consent=st.dictionaries(st.sampled_from([K, C, D]), st.booleans(), max_size=3),
    unknown_provider_exposures=st.sampled_from([0, 0, 0, 1, 2]),
).flatmap(lambda p: st.lists(exposures, max_size=12).map(lambda es: dataclasses.replace(p, exposures=tuple(es))))
nows = st.integers(T0 - DAY, T0 + 31 * DAY)


def _window_ms(s: MatchSettings, c: Conversion | Exposure) -> int:
    return s.projects[(c.provider, c.project)].window_ms


@settings(max_examples=400, deadline=None)
@given(purchases, nows, SETTINGS)
def test_property_nothing_outside_its_window(p: Purchase, now: int, s: MatchSettings) -> None:
    d = match(p, s, now)
    for e in d.matched:
        assert p.occurred_at - _window_ms(s, e) <= e.exposed_at <= p.occurred_at + s.clock_skew_ms
    for c in d.conversions:
        # Each conversion stands for at least one matched exposure of its project within the window.
        assert any((e.provider, e.project) == (c.provider, c.project) for e in d.matched)
    for r in d.rejections:
        if r.reason is RejectReason.OUTSIDE_WINDOW:
            assert r.exposure is not None and p.occurred_at - r.exposure.exposed_at > _window_ms(s, r.exposure)
        if r.reason is RejectReason.AFTER_PURCHASE:
            assert r.exposure is not None and r.exposure.exposed_at - p.occurred_at > s.clock_skew_ms


@settings(max_examples=400, deadline=None)
@given(purchases, nows, SETTINGS)
def test_property_keys_are_unique_and_every_exposure_is_accounted_for(p: Purchase, now: int, s: MatchSettings) -> None:
    d = match(p, s, now)
    keys = [c.key for c in d.conversions]
    assert len(keys) == len(set(keys))
    assert all(len(c.goals) == 1 for c in d.conversions if c.provider is K)
    if d.rejections and d.rejections[0].reason in (RejectReason.TOO_OLD, RejectReason.NO_EXPOSURES):
        assert d.conversions == () and d.matched == () and len(d.rejections) == 1
    else:
        unknown = [r for r in d.rejections if r.reason is RejectReason.UNKNOWN_PROVIDER]
        assert len(unknown) == p.unknown_provider_exposures and all(r.exposure is None for r in unknown)
        accounted = list(d.matched) + [r.exposure for r in d.rejections if r.exposure is not None]
        assert sorted(accounted, key=repr) == sorted(p.exposures, key=repr)
        assert bool(d.conversions) == bool(d.matched)


@settings(max_examples=300, deadline=None)
@given(purchases, nows, st.randoms(use_true_random=False), SETTINGS)
def test_property_deterministic_and_insensitive_to_exposure_order(p: Purchase, now: int, rnd: Any,
                                                                  s: MatchSettings) -> None:
    d = match(p, s, now)
    assert match(p, s, now) == d
    shuffled = list(p.exposures)
    rnd.shuffle(shuffled)
    assert match(dataclasses.replace(p, exposures=tuple(shuffled)), s, now) == d
    # A republished order (new event id) gives the same keys.
    again = match(dataclasses.replace(p, event_id="republished"), s, now)
    assert [c.key for c in again.conversions] == [c.key for c in d.conversions]


@settings(max_examples=400, deadline=None)
@given(purchases, nows, st.randoms(use_true_random=False), SETTINGS)
def test_property_counting_mode_counts_what_listing_lists(p: Purchase, now: int, rnd: Any, s: MatchSettings) -> None:
    listed = match(p, s, now)
    expected: Counter[tuple[Provider | None, str]] = Counter((e.provider, "matched") for e in listed.matched)
    expected.update((r.exposure.provider if r.exposure else None, r.reason) for r in listed.rejections)
    shuffled = list(p.exposures)
    rnd.shuffle(shuffled)
    counts: dict[tuple[Provider | None, str], int] = {(None, "left from earlier"): 1}  # counts accumulate
    counted = match(dataclasses.replace(p, exposures=tuple(shuffled)), s, now, counts)
    assert counted.conversions == listed.conversions  # the same conversions, in the same order
    assert counted.matched == () and counted.rejections == () and counted.credits == ()
    assert counts.pop((None, "left from earlier")) == 1
    assert counts == dict(expected)
    recounted: dict[tuple[Provider | None, str], int] = {}
    count(listed, recounted)  # what the service does with a listed decision (debug logging on)
    assert recounted == counts


@settings(max_examples=400, deadline=None)
@given(purchases, nows, SETTINGS)
def test_property_the_models_hold(p: Purchase, now: int, s: MatchSettings) -> None:
    d = match(p, s, now)
    for credit in d.credits:
        project = s.projects[(credit.provider, credit.project)]
        won = [t for t in credit.touches if t.credited]
        assert won, "a credit decision is made only where something is credited"
        if project.touch:
            assert len(won) == 1  # one identity per project (Convert: per experiment)
            when = [(t.last_exposed_at if project.touch > 0 else t.first_exposed_at) for t in credit.touches]
            best = max(when) if project.touch > 0 else min(when)
            assert (won[0].last_exposed_at if project.touch > 0 else won[0].first_exposed_at) == best
        else:
            assert all(t.credited for t in credit.touches)
        revenues = [t.revenue for t in won]
        if project.split and revenues[0] is not None:
            # The unsplit revenue: what one matched exposure of the group alone gets.
            alone = next(e for e in d.matched if (e.provider, e.project) == (credit.provider, credit.project))
            whole = match(dataclasses.replace(p, exposures=(alone,)), s, now).conversions[0].revenue
            assert sum(r for r in revenues if r is not None) == whole  # the shares sum to it exactly
    # No conversion goes to a provider the buyer declined, or unconsented to a project requiring consent.
    for c in d.conversions:
        granted = p.consent.get(c.provider)
        assert granted is not False
        assert granted is True or not s.projects[(c.provider, c.project)].require_consent


# --------------------------------------------------------------------------- attribution models

A_AT, B_AT, C_AT = T0 - 3 * HOUR, T0 - HOUR, T0 - 2 * HOUR  # b is exposed last, a first


def _three_identities(provider: Provider, project: str) -> Purchase:
    """One buyer, three identities (devices) in one project; for Convert one experiment, a variation each."""
    return purchase(
        exp(provider, project, "100", "1", "a", A_AT),
        exp(provider, project, "100", "2", "b", B_AT),
        exp(provider, project, "100", "3", "c", C_AT),
        exp(provider, project, "100", "1", "a", T0 - 5 * HOUR),  # a again, earlier: collapses into a
        revenue=Decimal("10.00"),
    )


def _sent(d: Decision) -> list[tuple[str, tuple[str, ...], Decimal | None]]:
    return [(c.visitor_id, c.goals, c.revenue) for c in d.conversions]


G2 = {K: ["1", "2"], C: ["5"], D: ["g1", "g2"]}  # Kameleoon: a conversion per goal, each with the share


def _by_goal(provider: Provider, credited: list[tuple[str, str]]) -> list[tuple[str, tuple[str, ...], Decimal]]:
    if provider is K:
        return [(v, (g,), Decimal(r)) for v, r in credited for g in G2[K]]
    return [(v, tuple(G2[provider]), Decimal(r)) for v, r in credited]


MODEL_TABLE = [
    # (attribution, revenue_share, credited (visitor, revenue) in sent order)
    ("all", "full", [("a", "10.00"), ("b", "10.00"), ("c", "10.00")]),
    # 1000 cents / 3 = 333 r 1: the remainder cent goes to the first in code-point order (a).
    ("all", "split", [("a", "3.34"), ("b", "3.33"), ("c", "3.33")]),
    ("last_touch", "full", [("b", "10.00")]),
    ("last_touch", "split", [("b", "10.00")]),  # one credited identity: its share is the whole
    ("first_touch", "full", [("a", "10.00")]),
    ("first_touch", "split", [("a", "10.00")]),
]


@pytest.mark.parametrize("provider", [K, C, D], ids=["kameleoon", "convert", "conductrics"])
@pytest.mark.parametrize(("attribution", "share", "credited"), MODEL_TABLE,
                         ids=[f"{a}-{s}" for a, s, _ in MODEL_TABLE])
def test_every_attribution_model_and_revenue_share(provider: Provider, attribution: str, share: str,
                                                   credited: list[tuple[str, str]]) -> None:
    s = only(provider, "1_2", goals=G2[provider], attribution=attribution, revenue_share=share)
    p = _three_identities(provider, "1_2")
    listed = match(p, s, now_ms=T0)
    assert _sent(listed) == _by_goal(provider, credited)
    winners = {v for v, _ in credited}
    assert sorted(e.visitor_id for e in listed.matched) == sorted(e.visitor_id for e in p.exposures
                                                                  if e.visitor_id in winners)
    losers = [r for r in listed.rejections if r.reason is RejectReason.NOT_CREDITED]
    assert sorted(r.exposure.visitor_id for r in losers if r.exposure) == sorted(
        e.visitor_id for e in p.exposures if e.visitor_id not in winners)
    assert all(f"{attribution} credits visitor {credited[0][0]}" in r.detail for r in losers)
    counts: dict[tuple[Provider | None, str], int] = {}
    assert match(p, s, T0, counts).conversions == listed.conversions
    assert counts == {k: v for k, v in {(provider, "matched"): len(listed.matched),
                                        (provider, RejectReason.NOT_CREDITED): len(losers)}.items() if v}
    (credit,) = listed.credits
    assert (credit.attribution.value, credit.revenue_share.value) == (attribution, share)
    assert [(t.visitor_id, t.credited) for t in credit.touches] == (
        [(v, True) for v, _ in credited] + [(v, False) for v in "abc" if v not in winners])
    assert [t.revenue for t in credit.touches if t.credited] == [Decimal(r) for _, r in credited]
    assert credit.experiment_id == ("100" if provider is C else None)


def test_the_default_model_of_each_provider() -> None:
    cfg = config(kameleoon={"s": {"goals": ["1"]}}, convert={"1_2": {"goals": ["5"]}},
                 conductrics={"d": {"goals": ["g"]}})
    models = {(p, k): (r.attribution.value, r.revenue_share.value, r.require_consent)
              for (p, k), r in cfg.rules().items()}
    assert models == {(K, "s"): ("all", "split", False), (C, "1_2"): ("last_touch", "full", False),
                      (D, "d"): ("all", "split", False)}
    d = match(_three_identities(K, "s"), MatchSettings.from_config(cfg), T0)
    assert _sent(d) == [("a", ("1",), Decimal("3.34")), ("b", ("1",), Decimal("3.33")), ("c", ("1",), Decimal("3.33"))]
    d = match(_three_identities(C, "1_2"), MatchSettings.from_config(cfg), T0)
    assert [(c.visitor_id, c.variation_id, c.revenue) for c in d.conversions] == [("b", "2", Decimal("10.00"))]


def test_convert_credits_per_experiment() -> None:
    s = only(C, "1_2", attribution="last_touch")
    p = purchase(
        exp(C, "1_2", "100", "1", "phone", T0 - 2 * HOUR),
        exp(C, "1_2", "100", "2", "laptop", T0 - HOUR),  # exposed last in experiment 100
        exp(C, "1_2", "200", "7", "phone", T0 - 3 * HOUR),  # the only identity in experiment 200
    )
    d = match(p, s, T0)
    assert [(c.visitor_id, c.experiment_id, c.variation_id) for c in d.conversions] == [
        ("laptop", "100", "2"), ("phone", "200", "7")]
    [loser] = d.rejections
    assert (loser.reason, loser.exposure) == (RejectReason.NOT_CREDITED, p.exposures[0])
    assert loser.detail == ("last_touch credits visitor laptop in variation 2 in experiment 100, exposed 1 h later "
                            "than visitor phone in variation 1")
    assert [(c.experiment_id, [t.visitor_id for t in c.touches if t.credited]) for c in d.credits] == [
        ("100", ["laptop"]), ("200", ["phone"])]


def test_kameleoon_and_conductrics_credit_per_project_whatever_the_experiment() -> None:
    for provider in (K, D):
        s = only(provider, "p", attribution="first_touch")
        p = purchase(exp(provider, "p", "100", "1", "phone", T0 - 2 * HOUR),
                     exp(provider, "p", "200", "1", "laptop", T0 - HOUR))
        assert [c.visitor_id for c in match(p, s, T0).conversions] == ["phone"]


@pytest.mark.parametrize("attribution", ["last_touch", "first_touch"])
def test_a_tie_goes_to_the_first_identity_in_code_point_order(attribution: str) -> None:
    s = only(K, "s", attribution=attribution)
    p = purchase(exp(K, "s", visitor="zed", at=T0 - HOUR), exp(K, "s", visitor="Bob", at=T0 - HOUR),
                 exp(K, "s", visitor="amy", at=T0 - HOUR))
    d = match(p, s, T0)
    assert [c.visitor_id for c in d.conversions] == ["Bob"]  # "B" < "a" < "z"
    assert {r.detail for r in d.rejections} == {
        f"{attribution} credits visitor Bob, exposed at the same time as visitor amy and first in code-point order",
        f"{attribution} credits visitor Bob, exposed at the same time as visitor zed and first in code-point order"}


def test_last_touch_looks_at_each_identitys_latest_exposure_and_first_touch_at_its_earliest() -> None:
    # a: exposed 5 h and 1 min before; b: 2 h before. a is both the latest and the earliest toucher.
    p = purchase(exp(K, "s", visitor="a", at=T0 - 5 * HOUR), exp(K, "s", visitor="a", at=T0 - MIN),
                 exp(K, "s", visitor="b", at=T0 - 2 * HOUR))
    for attribution in ("last_touch", "first_touch"):
        assert [c.visitor_id for c in match(p, only(K, "s", attribution=attribution), T0).conversions] == ["a"]


def test_only_matched_exposures_take_part_in_the_choice() -> None:
    # b's exposure is after the purchase (beyond the skew): a is the last *matched* touch.
    p = purchase(exp(C, "1_2", visitor="a", at=T0 - HOUR), exp(C, "1_2", visitor="b", at=T0 + SKEW + 1))
    d = match(p, only(C, "1_2"), T0)
    assert [c.visitor_id for c in d.conversions] == ["a"]
    assert reasons(d) == [RejectReason.AFTER_PURCHASE]


def test_mapping_identifier_is_one_identity_under_every_model() -> None:
    for attribution, share in (("all", "split"), ("last_touch", "full")):
        s = only(K, "s", use_mapping_identifier=True, attribution=attribution, revenue_share=share)
        d = match(_three_identities(K, "s"), s, T0)
        assert _sent(d) == [("cust-9", ("1",), Decimal("10.00"))]
        assert d.rejections == ()


@pytest.mark.parametrize(
    ("revenue", "n", "expected"),
    [
        ("10.00", 3, ["3.34", "3.33", "3.33"]),
        ("10.00", 4, ["2.50", "2.50", "2.50", "2.50"]),
        ("0.02", 3, ["0.01", "0.01", "0.00"]),
        ("0.00", 2, ["0.00", "0.00"]),
        ("-1.01", 2, ["-0.50", "-0.51"]),  # floored: the shares still sum to the revenue
        ("9999999999.99", 7, ["1428571428.57"] * 7),
        ("100.01", 2, ["50.01", "50.00"]),
    ],
)
def test_split_in_exact_cents_the_remainder_to_the_first(revenue: str, n: int, expected: list[str]) -> None:
    visitors = [f"v{i}" for i in range(n)]
    s = only(D, "p", revenue_share="split")
    d = match(purchase(*(exp(D, "p", visitor=v) for v in visitors), revenue=Decimal(revenue)), s, T0)
    got = [c.revenue for c in d.conversions]
    assert [c.visitor_id for c in d.conversions] == visitors
    assert [str(r) for r in got] == expected
    assert sum(r for r in got if r is not None) == Decimal(revenue)


def test_split_happens_in_the_project_currency_after_conversion() -> None:
    s = only(D, "p", currency="EUR", revenue_share="split", min_revenue="9.00", matcher={"rates": {"USD/EUR": "0.9"}})
    # 10.01 USD -> 9.009 -> 9.01 EUR (quantized), then split: 4.51 + 4.50. min_revenue compares the whole 9.01.
    d = match(purchase(exp(D, "p", visitor="a"), exp(D, "p", visitor="b"), currency="USD",
                       revenue=Decimal("10.01")), s, T0)
    assert [(c.visitor_id, c.revenue) for c in d.conversions] == [("a", Decimal("4.51")), ("b", Decimal("4.50"))]


def test_split_without_revenue_sends_none() -> None:
    s = only(D, "p", revenue_share="split", send_revenue=False)
    d = match(purchase(exp(D, "p", visitor="a"), exp(D, "p", visitor="b")), s, T0)
    assert [c.revenue for c in d.conversions] == [None, None]
    assert d.credits[0].detail == "all: each of the 2 identities is credited (no revenue is sent)"


def test_split_groups_never_mix_projects_or_kameleoon_goals() -> None:
    s = MatchSettings.from_config(config(kameleoon={"s1": {"goals": ["1", "2"]}, "s2": {"goals": ["3"]}}))
    p = purchase(exp(K, "s1", visitor="a"), exp(K, "s1", visitor="b"), exp(K, "s2", visitor="a"),
                 revenue=Decimal("1.01"))
    assert [(c.project, c.visitor_id, c.goals, str(c.revenue)) for c in match(p, s, T0).conversions] == [
        ("s1", "a", ("1",), "0.51"), ("s1", "a", ("2",), "0.51"),
        ("s1", "b", ("1",), "0.50"), ("s1", "b", ("2",), "0.50"),
        ("s2", "a", ("3",), "1.01"),  # alone in its project: the whole revenue
    ]


def test_credit_details_say_what_was_chosen() -> None:
    s = MatchSettings.from_config(config(kameleoon={"s": {"goals": ["1"]}}, convert={"1_2": {"goals": ["5"]}}))
    p = purchase(*_three_identities(K, "s").exposures, exp(C, "1_2", visitor="only"), revenue=Decimal("10.00"))
    by_provider = {c.provider: c.detail for c in match(p, s, T0).credits}
    assert by_provider == {
        K: "all, split: 3 identities share the revenue, 3.34 + 3.33 + 3.33 EUR (the remainder cents go one each in "
           "code-point order of identity)",
        C: "one identity, credited (last_touch, full): nothing to choose",
    }
    d = match(_three_identities(C, "1_2"), s, T0)
    assert d.credits[0].detail == "last_touch: visitor b was exposed last; 2 other identities not credited"


@settings(max_examples=200, deadline=None)
@given(st.decimals(min_value=-10**6, max_value=10**6, places=2), st.integers(1, 40))
def test_property_shares_sum_to_the_total_and_differ_by_a_cent_at_most(total: Decimal, n: int) -> None:
    got = shares(total, n)
    assert sum(got) == total and len(got) == n
    assert max(got) - min(got) <= Decimal("0.01")
    assert all(g.as_tuple().exponent == -2 for g in got)
    assert got == sorted(got, reverse=True)  # the extra cents go to the first


# --------------------------------------------------------------------------- consent

CONSENT_TABLE = [
    # (the event's consent for this provider, require_consent, sent)
    (None, False, True),  # not stated: sent, as before consent existed
    (None, True, False),
    (True, False, True),
    (True, True, True),
    (False, False, False),  # a denial is honoured whatever the project says
    (False, True, False),
]


@pytest.mark.parametrize("provider", [K, C, D], ids=["kameleoon", "convert", "conductrics"])
@pytest.mark.parametrize(("granted", "required", "sent"), CONSENT_TABLE,
                         ids=[f"{g}-required={r}" for g, r, _ in CONSENT_TABLE])
def test_consent(provider: Provider, granted: bool | None, required: bool, sent: bool) -> None:
    other = next(p for p in (K, C, D) if p is not provider)
    consent = {other: not granted} if granted is None else {provider: granted, other: not granted}
    s = only(provider, "1_2", require_consent=required)
    p = purchase(exp(provider, "1_2"), consent=consent)
    d = match(p, s, T0)
    assert d.attributed is sent
    counts: dict[tuple[Provider | None, str], int] = {}
    match(p, s, T0, counts)
    if sent:
        assert reasons(d) == [] and counts == {(provider, "matched"): 1}
    else:
        assert reasons(d) == [RejectReason.NO_CONSENT] and counts == {(provider, RejectReason.NO_CONSENT): 1}
        assert d.rejections[0].detail == (
            f"the buyer declined consent for {provider.slug}" if granted is False
            else f"the event states no consent for {provider.slug} and the project has require_consent")


def test_consent_is_checked_before_the_window() -> None:
    p = purchase(exp(K, "site1", at=T0 - 30 * DAY), consent={K: False})
    assert reasons(match(p, standard(), T0)) == [RejectReason.NO_CONSENT]


def test_consent_is_per_provider() -> None:
    p = purchase(exp(K, "site1", visitor="k"), exp(C, "1111_2222", visitor="c"), exp(D, "cdx", visitor="d"),
                 consent={C: False})
    d = match(p, standard(), T0)
    assert sorted(c.provider for c in d.conversions) == [D, K]
    assert [(r.reason, r.exposure.provider if r.exposure else None) for r in d.rejections] == [
        (RejectReason.NO_CONSENT, C)]


# --------------------------------------------------------------------------- fan-out cap and unknown providers


@pytest.mark.parametrize("listing", [True, False], ids=["listing", "counting"])
def test_max_exposures_is_inclusive_and_raises_over_it(listing: bool) -> None:
    s = only(K, "s", matcher={"max_exposures": 3})
    counts: dict[tuple[Provider | None, str], int] | None = None if listing else {}
    three = purchase(*(exp(K, "s", visitor=f"v{i}") for i in range(3)))
    assert len(match(three, s, T0, counts).conversions) == 3
    four = dataclasses.replace(three, exposures=(*three.exposures, exp(K, "s", visitor="v3")))
    before = dict(counts) if counts is not None else None
    with pytest.raises(TooManyExposures) as info:
        match(four, s, T0, counts)
    assert (info.value.exposures, info.value.limit, info.value.reason) == (4, 3, RejectReason.TOO_MANY_EXPOSURES)
    assert str(info.value) == "order ord-1: 4 exposures, more than max_exposures 3"
    assert counts == before  # nothing counted: the service counts the dead letter
    # Exposures of unknown providers count too; so does a too-old purchase (the cap comes first).
    with pytest.raises(TooManyExposures):
        match(dataclasses.replace(three, unknown_provider_exposures=1), s, T0, counts)
    with pytest.raises(TooManyExposures):
        match(four, s, T0 + 365 * DAY, counts)


def test_the_default_cap_is_100() -> None:
    s = standard()
    assert s.max_exposures == 100
    match(purchase(*(exp(visitor=f"v{i}") for i in range(100))), s, T0)
    with pytest.raises(TooManyExposures):
        match(purchase(*(exp(visitor=f"v{i}") for i in range(101))), s, T0)


def test_exposures_of_unknown_providers_are_ignored_and_counted() -> None:
    p = purchase(exp(K, "site1"), unknown_provider_exposures=2)
    d = match(p, standard(), T0)
    assert d.attributed and d.matched == (exp(K, "site1"),)
    assert [(r.reason, r.exposure) for r in d.rejections] == [(RejectReason.UNKNOWN_PROVIDER, None)] * 2
    counts: dict[tuple[Provider | None, str], int] = {}
    match(p, standard(), T0, counts)
    assert counts == {(K, "matched"): 1, (None, RejectReason.UNKNOWN_PROVIDER): 2}
    # Only unknown ones: counted as such, not as a purchase without exposures.
    only_unknown = purchase(unknown_provider_exposures=1)
    assert reasons(match(only_unknown, standard(), T0)) == [RejectReason.UNKNOWN_PROVIDER]
    counts = {}
    match(only_unknown, standard(), T0, counts)
    assert counts == {(None, RejectReason.UNKNOWN_PROVIDER): 1}
