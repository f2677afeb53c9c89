"""explain: the event as JSON in, a JSON-serialisable report of the matcher's decision out."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import re
import subprocess
import sys
from decimal import Decimal
from pathlib import Path
from typing import Any

import fastavro
import pytest

from consumer.config import DEFAULT_SCHEMA, Config, parse
from consumer.decoding import RevenueError, encode_raw, load_schema
from consumer.durations import human
from consumer.explain import (
    CONSENT_FIELDS,
    EXPOSURE_FIELDS,
    PURCHASE_FIELDS,
    explain,
    purchase_from_json,
    render_text,
    unknown_fields,
)
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
    [("23.50", "23.50"), (" 23.5 ", "23.50"), (23.5, "23.50"), (0.1, "0.10"), (19, "19.00"), ("-4.00", "-4.00")],
)
def test_revenue_as_string_or_number(revenue: Any, expected: str) -> None:
    # At the contract's scale, as the decoder gives it: explain sees what the service would.
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
        "age": "1 s",
        "channel": "WEB",
        "currency": "EUR",
        "revenue": "23.50",
        "item_count": 2,
        "customer_id": "cust-9",
        "exposures": 5,
        "consent": {},
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


# --------------------------------------------------------------------------- durations


@pytest.mark.parametrize(
    ("ms", "text"),
    [
        (2_592_000_000, "30 days"),
        (2_595_600_000, "30 days 1 h"),
        (86_400_000, "1 day"),
        (7 * 86_400_000 + 1, "7 days 0.001 s"),  # exact: one millisecond past a window shows
        (90_061_001, "1 day 1 h 1 min 1.001 s"),
        (300_000, "5 min"),
        (1_500, "1.5 s"),
        (59_999, "59.999 s"),
        (250, "250 ms"),
        (0, "0 s"),
        (-7_200_000, "-2 h"),
    ],
)
def test_durations_read_as_a_person_reads_them(ms: int, text: str) -> None:
    assert human(ms) == text


def test_report_durations_are_readable() -> None:
    report = explain(cfg(), event(), now_ms=T0 + 30 * 60_000)
    assert (report["purchase"]["age_ms"], report["purchase"]["age"]) == (1_800_000, "30 min")
    [window] = [r["detail"] for r in report["rejections"] if r["reason"] == "outside_window"]
    assert window == "exposed 8 days before the purchase (attribution window 7 days)"
    assert "(30 min before now 2023-11-14T22:43:20.000Z)" in render_text(report)
    old = explain(cfg(), event(), now_ms=T0 + 91 * 86_400_000)
    assert old["rejections"][0]["detail"] == "order ord-1: purchase is 91 days old (max_age 90 days)"
    text = render_text(old)
    assert not re.search(r"\d{5,} ms", text), text  # no raw millisecond counts left for a person to divide


# --------------------------------------------------------------------------- requests


def test_explain_shows_the_exact_requests_with_secrets_redacted() -> None:
    report = explain(cfg(), event(), now_ms=T0 + 1000)
    keys = {c["provider"]: c["key"] for c in report["conversions"]}
    conductrics, convert, kameleoon = report["requests"]
    assert conductrics == {
        "provider": "CONDUCTRICS", "project": "cdx", "purpose": "conversions", "conversions": [keys["CONDUCTRICS"]],
        "method": "POST",
        "url": "https://api-x.conductrics.com/ac-x/v3/agent-api?vid=cust-9&session=cust-9&apikey=***",
        "headers": {"Content-Type": "application/json", "User-Agent": "offline-conversions/1.0"},
        "body": '{"commands":[{"g":"g-purchase"}]}',
    }
    assert (convert["method"], convert["body"]) == ("GET", None)
    assert convert["url"] == ("https://2222.track.convertexperiments.com/track/?c=1111&p=2222&e=300-3&g=31&ga=1"
                              "&t=31%7Cord-1%7C26.11%7C2&vi=cv")
    # Both Kameleoon goals share one POST, as the delivery layer batches them.
    assert kameleoon["conversions"] == [c["key"] for c in report["conversions"] if c["provider"] == "KAMELEOON"]
    assert json.loads(kameleoon["body"]) == [
        {"nonce": k, "eventType": "CONVERSION", "goalId": g, "revenue": 23.5, "visitorCode": "kv"}
        for k, g in zip(kameleoon["conversions"], (11, 12), strict=True)
    ]
    assert kameleoon["url"] == "https://eu-data.kameleoon.io/visit/events?siteCode=site1&json=true"
    assert "very-secret" not in json.dumps(report) and "very-secret" not in render_text(report)
    text = render_text(report)
    assert "requests: 3 (secrets shown as ***)\n" in text
    assert "  POST https://api-x.conductrics.com/ac-x/v3/agent-api?vid=cust-9&session=cust-9&apikey=***" in text
    assert '    body: {"commands":[{"g":"g-purchase"}]}\n' in text


def oauth_cfg(**project: Any) -> Config:
    return parse(
        {
            "kafka": KAFKA,
            "kameleoon": {
                "token_url": "https://api.kameleoon.com/oauth/token",
                "projects": {"site1": {"goals": ["11"], "client_id": "${KID}", "client_secret": "${KSECRET}",
                                       **project}},
            },
        },
        env={"KID": "client/id+1", "KSECRET": "s3cr&t=value"},
    )


def test_oauth_grant_and_bearer_token_are_shown_redacted() -> None:
    report = explain(oauth_cfg(), event(), now_ms=T0 + 1000)
    grant, post = report["requests"]
    assert (grant["purpose"], grant["method"], grant["url"]) == ("token", "POST", "https://api.kameleoon.com/oauth/token")
    assert grant["headers"]["Content-Type"] == "application/x-www-form-urlencoded"
    assert grant["body"] == "grant_type=client_credentials&client_id=***&client_secret=***"
    assert post["headers"]["Authorization"] == "Bearer ***"
    dumped = json.dumps(report) + render_text(report)
    for leaked in ("client/id+1", "client%2Fid%2B1", "s3cr&t=value", "s3cr%26t%3Dvalue"):
        assert leaked not in dumped
    assert "(kameleoon/site1: OAuth token, sent once and cached)" in render_text(report)


def test_a_password_in_a_url_is_redacted() -> None:
    report = explain(oauth_cfg(base_url="https://user:pa55@eu-data.kameleoon.io"), event(), now_ms=T0 + 1000)
    assert report["requests"][1]["url"].startswith("https://user:***@eu-data.kameleoon.io/visit/events?")
    assert "pa55" not in json.dumps(report)


def test_no_conversions_no_requests() -> None:
    report = explain(cfg(), event(exposures=[]), now_ms=T0)
    assert report["requests"] == []
    assert "requests: 0\n" in render_text(report)


# --------------------------------------------------------------------------- revenue the contract cannot carry


@pytest.mark.parametrize("revenue", ["23.505", 23.456, "0.001", "-1.125", "1E-3"])
def test_revenue_with_more_than_two_decimals_is_refused(revenue: Any) -> None:
    with pytest.raises(ValueError, match=r"^revenue: .* has more than 2 decimals, which decimal\(12,2\) cannot carry"):
        purchase_from_json(event(revenue=revenue))


def test_revenue_too_large_for_the_contract_is_refused() -> None:
    with pytest.raises(ValueError, match=r"^revenue: '10000000000.00' does not fit decimal\(12,2\)"):
        purchase_from_json(event(revenue="10000000000.00"))
    assert purchase_from_json(event(revenue="9999999999.99")).revenue == Decimal("9999999999.99")


def test_exact_two_decimal_revenue_is_kept_at_scale_two() -> None:
    # 23.500 is 23.50 exactly: nothing is rounded, the value takes the contract's scale.
    for given_, kept in (("23.500", "23.50"), ("23.5", "23.50"), (19, "19.00"), (0.1, "0.10")):
        assert str(purchase_from_json(event(revenue=given_)).revenue) == kept


def test_the_encoder_refuses_rather_than_rounds() -> None:
    schema = load_schema(DEFAULT_SCHEMA)
    p = purchase_from_json(event())
    with pytest.raises(RevenueError, match=r"^revenue 1.005 has more than 2 decimals"):
        encode_raw(dataclasses.replace(p, revenue=Decimal("1.005")), schema)
    # fastavro alone refuses 23.500 too (its scale is 3); the encoder writes the exact 23.50.
    raw = encode_raw(dataclasses.replace(p, revenue=Decimal("23.500")), schema)
    assert fastavro.schemaless_reader(io.BytesIO(raw), schema)["revenue"] == Decimal("23.50")


# --------------------------------------------------------------------------- the shipped example


ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "docs" / "examples" / "purchase.json"
OPERATIONS = ROOT / "docs" / "operations.md"


def test_the_documented_example_runs_as_documented(tmp_path: Path) -> None:
    doc = OPERATIONS.read_text()
    m = re.search(r"```sh\n(CONDUCTRICS_API_KEY=\S+) (offline-conversions explain [^`]*?)\n```", doc)
    assert m, "docs/operations.md shows the explain command for docs/examples/purchase.json"
    env_name, env_value = m.group(1).split("=", 1)
    argv = m.group(2).replace("\\\n", " ").split()
    assert argv[-1] == "docs/examples/purchase.json"
    run = [sys.executable, "-m", "consumer", *argv[1:]]
    env = {**os.environ, env_name: env_value}
    text = subprocess.run(run, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert text.returncode == 0, text.stderr
    quotes = re.findall(r"`((?:exposed|POST) [^`]+)`", doc[m.end():m.end() + 2000])
    assert len(quotes) == 2
    for quoted in quotes:
        assert quoted in text.stdout, quoted  # what the docs say it prints, it prints
    report = json.loads(subprocess.run([*run, "--json"], cwd=ROOT, env=env, capture_output=True, text=True,
                                       timeout=60, check=True).stdout)
    assert sorted(c["provider"] for c in report["conversions"]) == ["CONDUCTRICS", "CONVERT", "KAMELEOON"]
    assert [r["reason"] for r in report["rejections"]] == ["outside_window"]
    assert report["warnings"] == [] and len(report["requests"]) == 3
    assert env_value not in text.stdout and env_value not in json.dumps(report)


def test_the_documented_event_shape_names_every_field() -> None:
    doc = OPERATIONS.read_text()
    table = doc[doc.index("The event is the Avro contract"):doc.index("What the requests show")]
    documented = set(re.findall(r"^\| `([a-z_\[\]\.]+)`", table, flags=re.M))
    documented |= {f"exposures[].{f}" for f in re.findall(r"`(variation_id)`", table)}
    assert documented == (set(PURCHASE_FIELDS) | {f"exposures[].{f}" for f in EXPOSURE_FIELDS}
                          | {f"consent[].{f}" for f in CONSENT_FIELDS})
    example = json.loads(EXAMPLE.read_text())
    assert unknown_fields(example) == [] and set(example) == set(PURCHASE_FIELDS)
    purchase_from_json(example)  # valid as shipped


# --------------------------------------------------------------------------- attribution, consent, the cap


def _devices(**kw: Any) -> dict[str, Any]:
    """The buyer on three devices in Kameleoon (split by default) and two visitors in one Convert experiment."""
    k = [{"provider": "KAMELEOON", "project": "site1", "experiment_id": "100", "variation_id": "1",
          "visitor_id": v, "exposed_at": T0 - at} for v, at in (("phone", 3_600_000), ("laptop", 60_000),
                                                                ("tablet", 7_200_000))]
    c = [{"provider": "CONVERT", "project": "1111_2222", "experiment_id": "300", "variation_id": var,
          "visitor_id": v, "exposed_at": T0 - at} for v, var, at in (("c-phone", "3", 60_000),
                                                                     ("c-laptop", "4", 120_000))]
    return event(exposures=k + c, revenue="10.00", **kw)


def test_explain_shows_the_attribution_models_choice() -> None:
    report = explain(cfg(), _devices(), now_ms=T0 + 1000)
    assert json.loads(json.dumps(report)) == report
    convert, kameleoon = report["attribution"]  # sorted by provider
    assert (kameleoon["attribution"], kameleoon["revenue_share"], kameleoon["experiment_id"]) == ("all", "split", None)
    assert [(i["visitor"], i["credited"], i["revenue"]) for i in kameleoon["identities"]] == [
        ("laptop", True, "3.34"), ("phone", True, "3.33"), ("tablet", True, "3.33")]
    assert kameleoon["detail"].startswith("all, split: 3 identities share the revenue, 3.34 + 3.33 + 3.33 EUR")
    assert (convert["attribution"], convert["revenue_share"], convert["experiment_id"]) == ("last_touch", "full", "300")
    assert [(i["visitor"], i["variation_id"], i["credited"], i["revenue"]) for i in convert["identities"]] == [
        ("c-phone", "3", True, "11.11"), ("c-laptop", "4", False, None)]  # 10.00 EUR / 0.9 USD
    [not_credited] = [r for r in report["rejections"] if r["reason"] == "not_credited"]
    assert not_credited["exposure"]["visitor_id"] == "c-laptop"
    assert not_credited["detail"] == ("last_touch credits visitor c-phone in variation 3 in experiment 300, exposed "
                                      "1 min later than visitor c-laptop in variation 4")
    text = render_text(report)
    assert "attribution: 2\n" in text
    assert "  = convert/1111_2222 experiment 300: last_touch: visitor c-phone was exposed last; 1 other identities" \
           " not credited\n" in text
    assert "    visitor c-laptop variation 4: not credited; 1 exposures, last at 2023-11-14T22:11:20.000Z\n" in text
    assert "    visitor laptop: credited, revenue 3.34; 1 exposures, last at " in text
    assert "  - not_credited: convert/1111_2222 experiment 300 variation 4 visitor c-laptop at " in text


def test_explain_shows_consent_decisions() -> None:
    consent = [{"provider": "convert", "granted": False}, {"provider": "KAMELEOON", "granted": True}]
    report = explain(cfg(), event(consent=consent), now_ms=T0 + 1000)
    assert report["purchase"]["consent"] == {"CONVERT": False, "KAMELEOON": True}
    assert [(r["reason"], r["exposure"]["provider"], r["detail"]) for r in report["rejections"]
            if r["reason"] == "no_consent"] == [("no_consent", "CONVERT", "the buyer declined consent for convert")]
    assert "CONVERT" not in {c["provider"] for c in report["conversions"]}
    text = render_text(report)
    assert "consent: convert declined, kameleoon granted" in text
    assert "  - no_consent: convert/1111_2222 experiment 300 variation 3 visitor cv at " in text
    assert "consent: (not stated)" in render_text(explain(cfg(), event(), now_ms=T0 + 1000))


@pytest.mark.parametrize(("consent", "message"), [
    ({"kameleoon": True}, "consent: expected a list"),
    ([{"provider": "optimizely", "granted": True}], "consent[0].provider: expected one of"),
    ([{"provider": "convert", "granted": "yes"}], "consent[0].granted: expected true or false"),
    ([{"provider": "convert"}], "consent[0].granted: is required"),
    (["convert"], "consent[0]: expected an object"),
])
def test_bad_consent_is_named(consent: Any, message: str) -> None:
    with pytest.raises(ValueError) as err:
        purchase_from_json(event(consent=consent))
    assert str(err.value).startswith(message)


def test_explain_an_event_over_the_cap_is_dead_lettered_and_sends_nothing() -> None:
    exposures = [{"provider": "KAMELEOON", "project": "site1", "experiment_id": "100", "variation_id": "1",
                  "visitor_id": f"v{i}", "exposed_at": T0 - 60_000} for i in range(101)]
    report = explain(cfg(), event(exposures=exposures), now_ms=T0 + 1000)
    assert report["dead_letter"] == {"stage": "match", "reason": "too_many_exposures",
                                     "detail": "order ord-1: 101 exposures, more than max_exposures 100"}
    assert (report["attributed"], report["conversions"], report["requests"]) == (False, [], [])
    assert "dead-lettered whole at stage match, reason too_many_exposures: order ord-1: 101 exposures" \
           in render_text(report)
    assert explain(cfg(), event(), now_ms=T0 + 1000)["dead_letter"] is None


def test_a_hostile_visitor_id_cannot_drive_the_terminal() -> None:
    e = event()
    e["exposures"][0]["visitor_id"] = "kv\x1b[2J\x00"
    text = render_text(explain(cfg(), e, now_ms=T0 + 1000))
    assert "visitor kv\\u001b[2J\\u0000" in text
    assert all(c.isprintable() or c == "\n" for c in text), "no control character reaches the terminal"
