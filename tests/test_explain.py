"""explain: the event as JSON in, a JSON-serialisable report of the matcher's decision out."""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

import pytest

from consumer.config import Config, parse
from consumer.explain import explain, purchase_from_json, render_text, unknown_fields
from consumer.model import Channel, Provider

T0 = 1_700_000_000_000  # 2023-11-14T22:13:20Z
KAFKA = {"bootstrap_servers": "localhost:9092", "topic": "purchases", "group_id": "g", "dlq_topic": "purchases-dlq"}


def cfg() -> Config:
    return parse(
        {
            "kafka": KAFKA,
            "kameleoon": {"projects": {"site1": {"goals": ["11", "12"]}}},
            "convert": {"projects": {"1111_2222": {"goals": ["31"], "transaction_goals": ["31"], "currency": "USD"}}},
            "conductrics": {
                "projects": {
                    "cdx": {
                        "goals": ["g-purchase"],
                        "agent_api_url": "https://api-x.conductrics.com/ac-x/v3/agent-api",
                        "api_key": "very-secret",
                        "send_revenue": False,
                    }
                }
            },
            "matcher": {"rates": {"USD/EUR": "0.9"}},
        },
        env={},
    )


def event(**kw: Any) -> dict[str, Any]:
    e: dict[str, Any] = {
        "event_id": "evt-1",
        "order_id": "ord-1",
        "occurred_at": T0,
        "channel": "web",
        "currency": "EUR",
        "revenue": "23.50",
        "item_count": 2,
        "customer_id": "cust-9",
        "exposures": [
            {
                "provider": "kameleoon",
                "project": "site1",
                "experiment_id": "100",
                "variation_id": "1",
                "visitor_id": "kv",
                "exposed_at": T0 - 60_000,
            },
            {
                "provider": "Convert",
                "project": "1111_2222",
                "experiment_id": "300",
                "variation_id": "3",
                "visitor_id": "cv",
                "exposed_at": "2023-11-14T21:13:20Z",
            },
            {
                "provider": "CONDUCTRICS",
                "project": "cdx",
                "experiment_id": "a",
                "variation_id": "b",
                "visitor_id": "",
                "exposed_at": T0,
            },
            {
                "provider": "KAMELEOON",
                "project": "site1",
                "experiment_id": "100",
                "variation_id": "1",
                "visitor_id": "old",
                "exposed_at": T0 - 8 * 86_400_000,
            },
            {
                "provider": "KAMELEOON",
                "project": "elsewhere",
                "experiment_id": "1",
                "variation_id": "1",
                "visitor_id": "x",
                "exposed_at": T0,
            },
        ],
        "attributes": {"store": "S-12"},
    }
    e.update(kw)
    return e


# --------------------------------------------------------------------------- purchase_from_json


def test_purchase_from_json_reads_every_field() -> None:
    p = purchase_from_json(event())
    assert (p.event_id, p.order_id, p.occurred_at, p.channel, p.currency) == ("evt-1", "ord-1", T0, Channel.WEB, "EUR")
    assert (p.revenue, p.item_count, p.customer_id, p.attributes) == (Decimal("23.50"), 2, "cust-9", {"store": "S-12"})
    assert [(e.provider, e.visitor_id, e.exposed_at) for e in p.exposures] == [
        (Provider.KAMELEOON, "kv", T0 - 60_000),
        (Provider.CONVERT, "cv", T0 - 3_600_000),
        (Provider.CONDUCTRICS, "", T0),
        (Provider.KAMELEOON, "old", T0 - 8 * 86_400_000),
        (Provider.KAMELEOON, "x", T0),
    ]


def test_schema_defaults() -> None:
    minimal = {k: v for k, v in event().items() if k not in ("channel", "customer_id", "exposures", "attributes")}
    p = purchase_from_json(minimal)
    assert (p.channel, p.customer_id, p.exposures, p.attributes) == (Channel.OTHER, None, (), {})


@pytest.mark.parametrize(
    ("revenue", "expected"),
    [("23.50", "23.50"), (" 23.5 ", "23.5"), (23.5, "23.5"), (0.1, "0.1"), (19, "19"), ("-4.00", "-4.00")],
)
def test_revenue_as_string_or_number(revenue: Any, expected: str) -> None:
    assert str(purchase_from_json(event(revenue=revenue)).revenue) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (T0, T0),
        (float(T0), T0),
        (str(T0), T0),
        ("2023-11-14T22:13:20Z", T0),
        ("2023-11-14T22:13:20.123Z", T0 + 123),
        ("2023-11-14T22:13:20.123999+00:00", T0 + 123),  # sub-millisecond digits are dropped
        ("2023-11-14T23:13:20+01:00", T0),
        ("2023-11-14 17:13:20-05:00", T0),
    ],
)
def test_timestamps_as_epoch_ms_or_iso(value: Any, expected: int) -> None:
    assert purchase_from_json(event(occurred_at=value)).occurred_at == expected


@pytest.mark.parametrize("channel", ["store", "Store", "STORE", " store "])
def test_channel_case_insensitive(channel: str) -> None:
    assert purchase_from_json(event(channel=channel)).channel is Channel.STORE


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"order_id": None}, "order_id"),
        ({"order_id": ""}, "order_id"),
        ({"revenue": "12,50"}, "revenue"),
        ({"revenue": "NaN"}, "revenue"),
        ({"revenue": True}, "revenue"),
        ({"occurred_at": "yesterday"}, "occurred_at"),
        ({"occurred_at": "2023-11-14T22:13:20"}, "occurred_at"),  # no offset: ambiguous
        ({"occurred_at": 1.5}, "occurred_at"),
        ({"channel": "fax"}, "channel"),
        ({"currency": "EURO"}, "currency"),
        ({"item_count": True}, "item_count"),
        ({"item_count": -1}, "item_count"),
        ({"customer_id": ["x"]}, "customer_id"),
        ({"exposures": {"a": 1}}, "exposures"),
        ({"exposures": ["x"]}, "exposures[0]"),
        ({"exposures": [{"provider": "optimizely"}]}, "exposures[0].provider"),
        ({"exposures": [{"provider": "convert", "project": "1_2"}]}, "exposures[0].experiment_id"),
        (
            {
                "exposures": [
                    {
                        "provider": "convert",
                        "project": "1_2",
                        "experiment_id": "1",
                        "variation_id": "2",
                        "visitor_id": "v",
                        "exposed_at": "soon",
                    }
                ]
            },
            "exposures[0].exposed_at",
        ),
        ({"attributes": {"k": 1}}, "attributes.k"),
    ],
)
def test_bad_input_names_the_field(change: dict[str, Any], field: str) -> None:
    e = event(**change)
    if change.get("order_id", 0) is None:
        del e["order_id"]
    with pytest.raises(ValueError) as info:
        purchase_from_json(e)
    assert str(info.value).startswith(f"{field}: ")


def test_missing_required_field_is_named() -> None:
    e = event()
    del e["item_count"]
    with pytest.raises(ValueError, match=r"^item_count: is required$"):
        purchase_from_json(e)


def test_unknown_fields_are_listed() -> None:
    e = event(customerId="typo")
    e["exposures"][1]["visitorId"] = "typo"
    assert unknown_fields(e) == ["customerId", "exposures[1].visitorId"]
    assert unknown_fields(event()) == []


# --------------------------------------------------------------------------- explain


def test_explain_report() -> None:
    report = explain(cfg(), event(), now_ms=T0 + 1000)
    assert json.loads(json.dumps(report)) == report  # JSON-serialisable, nothing lost
    assert report["attributed"] is True
    assert report["purchase"] == {
        "event_id": "evt-1",
        "order_id": "ord-1",
        "occurred_at": T0,
        "occurred_at_iso": "2023-11-14T22:13:20.000Z",
        "age_ms": 1000,
        "channel": "WEB",
        "currency": "EUR",
        "revenue": "23.50",
        "item_count": 2,
        "customer_id": "cust-9",
        "exposures": 5,
    }
    sent = [
        (c["provider"], c["project"], c["visitor"], c["goals"], c["revenue"], c["currency"])
        for c in report["conversions"]
    ]
    assert sent == [
        ("CONDUCTRICS", "cdx", "cust-9", ["g-purchase"], None, None),  # vid fallback; send_revenue false
        ("CONVERT", "1111_2222", "cv", ["31"], "26.11", "USD"),  # 23.50 EUR / 0.9 = 26.111.. USD
        ("KAMELEOON", "site1", "kv", ["11"], "23.50", "EUR"),
        ("KAMELEOON", "site1", "kv", ["12"], "23.50", "EUR"),
    ]
    convert = report["conversions"][1]
    assert (convert["experiment_id"], convert["variation_id"], convert["transaction_goals"]) == ("300", "3", ["31"])
    assert all(isinstance(c["key"], str) and c["key"] for c in report["conversions"])
    assert [m["visitor_id"] for m in report["matched"]] == ["", "cv", "kv"]
    assert [(r["reason"], r["exposure"]["visitor_id"]) for r in report["rejections"]] == [
        ("unknown_project", "x"),
        ("outside_window", "old"),
    ]
    assert report["warnings"] == []
    assert "very-secret" not in json.dumps(report)


def test_explain_whole_purchase_rejection_and_warnings() -> None:
    report = explain(cfg(), event(typo=1), now_ms=T0 + 91 * 86_400_000)
    assert report["attributed"] is False
    assert report["conversions"] == [] and report["matched"] == []
    assert [(r["reason"], r["exposure"]) for r in report["rejections"]] == [("too_old", None)]
    assert report["warnings"] == ["unknown field typo ignored"]


def test_explain_propagates_bad_input() -> None:
    with pytest.raises(ValueError, match=r"^revenue:"):
        explain(cfg(), event(revenue="lots"), now_ms=T0)


def test_render_text() -> None:
    report = explain(cfg(), event(typo=1), now_ms=T0 + 1000)
    text = render_text(report)
    assert text.startswith("order ord-1 (event evt-1): 23.50 EUR, 2 items, channel WEB, at 2023-11-14T22:13:20.000Z")
    assert "warning: unknown field typo ignored" in text
    assert "matched exposures: 3" in text
    assert "  - outside_window: kameleoon/site1 experiment 100 variation 1 visitor old at " in text
    assert "  - unknown_project: kameleoon/elsewhere" in text
    assert "conversions: 4\n" in text
    convert_key = report["conversions"][1]["key"]
    assert (
        "  > convert/1111_2222 visitor cv experiment 300-3 goals 31 transaction goals 31,"
        f" revenue 26.11 USD, key {convert_key}\n" in text
    )
    assert "  > conductrics/cdx visitor cust-9 goals g-purchase, no revenue, key " in text
    assert text.count("\n  > ") == 4
    nothing = render_text(explain(cfg(), event(exposures=[]), now_ms=T0))
    assert "conversions: 0 (not attributed)" in nothing
    assert "  - no_exposures: order ord-1: purchase carries no exposures" in nothing
