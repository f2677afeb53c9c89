"""The three provider modules: exact requests pinned to the seeds' examples, encoding, classification."""

from __future__ import annotations

import dataclasses
import json
from decimal import Decimal
from typing import Any
from urllib.parse import parse_qs, urlsplit

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from consumer.config import BatchConfig, FlowConfig, RetryConfig, Rules, Secret, parse
from consumer.model import Conversion, Identity, Provider
from consumer.providers.base import HttpRequest, ProviderModule, Verdict, json_number, json_string
from consumer.providers.conductrics.config import ConductricsConfig, ConductricsProject
from consumer.providers.conductrics.keys import conductrics_key
from consumer.providers.conductrics.request import ConductricsModule
from consumer.providers.convert.config import ConvertConfig, ConvertProject
from consumer.providers.convert.keys import transaction_key
from consumer.providers.convert.request import ConvertModule, amount, order_id_of, transaction_id, v1_body
from consumer.providers.kameleoon.config import KameleoonConfig, KameleoonProject
from consumer.providers.kameleoon.keys import nonce
from consumer.providers.kameleoon.request import KameleoonModule
from consumer.providers.registry import modules

WEEK = 7 * 86400.0
ODD = ["a b", "a+b", "a&b=c", "x|y", "a,b.c", "ünï😀", "%41", "#frag", "/?", "tab\tnl\n", '"q"\\', "", "-"]
odd_text = st.text(max_size=40)


def conv(provider: Provider, project: str, **kw: Any) -> Conversion:
    base: dict[str, Any] = dict(
        provider=provider,
        project=project,
        visitor_id="v1",
        goals=("1",),
        revenue=None,
        key="k",
        event_id="e1",
        order_id="o1",
        occurred_at=1_740_447_713_028,
        item_count=1,
    )
    base.update(kw)
    return Conversion(**base)


# --------------------------------------------------------------------------- Kameleoon

SITE = "f17c21u1ag"
KAM_FLOW = FlowConfig(concurrency=3)


def kameleoon(**project: Any) -> KameleoonModule:
    rules = Rules(goals=("36151",), attribution_window=WEEK)
    p = KameleoonProject(site_code=SITE, rules=rules, flow=KAM_FLOW, **project)
    return KameleoonModule(KameleoonConfig(user_agent="CustomUserAgent/1.0", projects={SITE: p}))


def kconv(**kw: Any) -> Conversion:
    base: dict[str, Any] = dict(visitor_id="245fc", goals=("36151",), revenue=Decimal("23.50"), key="a2bb4d22083348ef")
    base.update(kw)
    return conv(Provider.KAMELEOON, SITE, **base)


def test_kameleoon_seed_001() -> None:
    # The seed sends visitorCode in the query, which applies it to every event; we batch many
    # visitors per request, so visitorCode moves into each event and leaves the query.
    m = kameleoon()
    c = kconv()
    req = m.build(m.route(c), [c])
    assert req.method == "POST"
    assert req.url == "https://eu-data.kameleoon.io/visit/events?siteCode=f17c21u1ag&json=true"
    assert req.redacted_url == req.url
    assert req.body == (
        b'[{"nonce":"a2bb4d22083348ef","eventType":"CONVERSION","goalId":36151,"revenue":23.50,"visitorCode":"245fc"}]'
    )
    assert req.headers == {"Content-Type": "application/json", "User-Agent": "CustomUserAgent/1.0"}


def test_kameleoon_mapping_identity_and_no_revenue() -> None:
    m = kameleoon()
    c = kconv(identity=Identity.MAPPING, visitor_id="customer-9", revenue=None)
    assert m.build(m.route(c), [c]).body == (
        b'[{"nonce":"a2bb4d22083348ef","eventType":"CONVERSION","goalId":36151,"mappingValue":"customer-9"}]'
    )


@pytest.mark.parametrize(
    ("revenue", "token"),
    [
        (Decimal("23.50"), "23.50"),
        (Decimal("23.5"), "23.5"),
        (Decimal("0.1") + Decimal("0.2"), "0.3"),
        (Decimal("1E+2"), "100"),
        (Decimal("1e-7"), "0.0000001"),
        (Decimal("19.99"), "19.99"),
        (Decimal("-4.10"), "-4.10"),
        (Decimal("12345678901234567890.123456789"), "12345678901234567890.123456789"),
    ],
)
def test_revenue_is_an_exact_json_number(revenue: Decimal, token: str) -> None:
    assert json_number(revenue) == token
    m = kameleoon()
    c = kconv(revenue=revenue)
    body = m.build(m.route(c), [c]).body
    assert body is not None
    assert f'"revenue":{token},'.encode() in body
    assert json.loads(body, parse_float=Decimal)[0]["revenue"] == revenue  # a valid JSON number, same value


@pytest.mark.parametrize("bad", [Decimal("NaN"), Decimal("Infinity"), Decimal("-Infinity")])
def test_json_number_rejects_non_finite(bad: Decimal) -> None:
    with pytest.raises(ValueError):
        json_number(bad)


REVENUES = st.sampled_from([None, Decimal("0.01"), Decimal("1E+3"), Decimal("23.50")])


@given(st.lists(st.tuples(odd_text, st.booleans(), REVENUES), min_size=1, max_size=8))
def test_kameleoon_item_bytes_sum_to_the_body(items: list[tuple[str, bool, Decimal | None]]) -> None:
    m = kameleoon()
    cs = [
        kconv(visitor_id=v, identity=Identity.MAPPING if mapping else Identity.VISITOR, revenue=r, key=f"{i:016x}")
        for i, (v, mapping, r) in enumerate(items)
    ]
    body = m.build(m.route(kconv()), cs).body
    assert body is not None
    # "[" + events joined by "," + "]": one byte more than the sum (the last event has no comma).
    assert len(body) == sum(m.item_bytes(c) for c in cs) + 1
    events = orjson.loads(body)
    assert [e.get("visitorCode", e.get("mappingValue")) for e in events] == [v for v, _, _ in items]


def test_kameleoon_route_and_token() -> None:
    m = kameleoon()
    r = m.route(kconv())
    assert r.key == ("https://eu-data.kameleoon.io", SITE)
    assert r.project == SITE
    assert r.flow is KAM_FLOW
    assert r.batch == BatchConfig()
    assert r.token is None
    assert m.route(kconv(visitor_id="other")).key == r.key  # many visitors share a body

    mt = kameleoon(client_id=Secret("cid"), client_secret=Secret("csec"))
    rt = mt.route(kconv())
    assert rt.token is not None
    assert (rt.token.token_url, rt.token.client_id.reveal(), rt.token.client_secret.reveal()) == (
        "https://api.kameleoon.com/oauth/token",
        "cid",
        "csec",
    )
    assert rt.token.refresh_margin == 60.0
    req = mt.build(rt, [kconv()], token="tok-123")
    assert req.headers["Authorization"] == "Bearer tok-123"
    assert "tok-123" not in repr(req)

    with pytest.raises(ValueError, match="unknown Kameleoon project"):
        m.route(dataclasses.replace(kconv(), project="nope"))


def test_kameleoon_site_code_is_url_encoded() -> None:
    p = KameleoonProject(site_code="a b&c", rules=Rules(goals=("1",), attribution_window=WEEK))
    m = KameleoonModule(KameleoonConfig(projects={"a b&c": p}))
    c = conv(Provider.KAMELEOON, "a b&c")
    assert m.build(m.route(c), [c]).url == "https://eu-data.kameleoon.io/visit/events?siteCode=a%20b%26c&json=true"


def _kreq(m: KameleoonModule, n: int, token: str | None = None) -> HttpRequest:
    # The visitor text looks like an event start: counting must not be fooled by it.
    cs = [kconv(visitor_id='{"nonce":x', key=f"{i:016x}") for i in range(n)]
    return m.build(m.route(cs[0]), cs, token=token)


@pytest.mark.parametrize(
    ("status", "events", "token", "headers", "verdict", "reason", "retry_after"),
    [
        (204, 3, None, {}, Verdict.DELIVERED, "ok", None),
        (200, 1, None, {}, Verdict.DELIVERED, "ok", None),
        (400, 2, None, {}, Verdict.SPLIT, None, None),
        (400, 1, None, {}, Verdict.PERMANENT, "http 400", None),
        (401, 2, "t", {}, Verdict.REAUTH, "token refused", None),
        (401, 2, None, {}, Verdict.PERMANENT, "http 401", None),
        (403, 2, None, {}, Verdict.PERMANENT, "forbidden (user-agent?)", None),
        (403, 1, "t", {}, Verdict.PERMANENT, "forbidden (user-agent?)", None),
        (404, 2, None, {}, Verdict.PERMANENT, "http 404", None),
        (408, 1, None, {}, Verdict.RETRY, "http 408", None),
        (413, 5, None, {}, Verdict.SPLIT, "payload too large", None),
        (429, 1, None, {"Retry-After": "7"}, Verdict.RETRY, "http 429", 7.0),
        (429, 1, None, {"retry-after": "2"}, Verdict.RETRY, "http 429", 2.0),
        (500, 2, None, {}, Verdict.RETRY, "http 500", None),
        (503, 2, None, {"Retry-After": "120"}, Verdict.RETRY, "http 503", 120.0),
    ],
)
def test_kameleoon_classify(
    status: int,
    events: int,
    token: str | None,
    headers: dict[str, str],
    verdict: Verdict,
    reason: str | None,
    retry_after: float | None,
) -> None:
    m = kameleoon(client_id=Secret("cid"), client_secret=Secret("csec")) if token else kameleoon()
    out = m.classify(_kreq(m, events, token), status, headers, b"")
    assert out.verdict is verdict
    assert out.status == status
    assert out.retry_after == retry_after
    if reason is not None:
        assert out.reason == reason


def test_nonce() -> None:
    args = ("f17c21u1ag", "ORDER-1", "36151", "245fc")
    n = nonce(*args)
    assert len(n) == 16 and all(ch in "0123456789abcdef" for ch in n)
    assert nonce(*args) == n
    for i in range(4):  # any differing input gives another nonce
        site, order, goal, visitor = (a + "x" if j == i else a for j, a in enumerate(args))
        assert nonce(site, order, goal, visitor) != n
    # Unambiguous encoding: moving characters across a boundary changes the nonce.
    assert nonce("ab", "c", "1", "v") != nonce("a", "bc", "1", "v")
    assert nonce("a", "b|c", "1", "v") != nonce("a|b", "c", "1", "v")
    assert nonce("s", "o", "1", "2") != nonce("s", "o", "12", "")
    assert nonce(*args, Identity.MAPPING) != n  # a mapping value is another visitor than an equal visitorCode
    # Pinned: the matcher computes the same keys (same length-prefixed sha256 encoding).
    assert n == "b38f790588e178cb"


@given(odd_text, odd_text, odd_text, odd_text)
def test_nonce_is_hex_for_any_text(a: str, b: str, c: str, d: str) -> None:
    n = nonce(a, b, c, d)
    assert len(n) == 16 and int(n, 16) >= 0 and n == n.lower()


# --------------------------------------------------------------------------- Convert

CV_KEY = "1111_2222"
TRACK_BASE = "https://2222.track.convertexperiments.com"
V1_BASE = "https://2222.metrics.convertexperiments.com"


def convert(api: str = "track", tx: tuple[str, ...] = ("100",)) -> ConvertModule:
    p = ConvertProject(
        key=CV_KEY,
        account_id="1111",
        project_id="2222",
        rules=Rules(goals=("100", "101", "102"), attribution_window=WEEK),
        base_url=TRACK_BASE if api == "track" else V1_BASE,
        api=api,
        transaction_goals=tx,
    )
    return ConvertModule(ConvertConfig(projects={CV_KEY: p}))


def cconv(**kw: Any) -> Conversion:
    base: dict[str, Any] = dict(
        visitor_id="v1", goals=("100", "101", "102"), experiment_id="1000", variation_id="2000", key="ck"
    )
    base.update(kw)
    return conv(Provider.CONVERT, CV_KEY, **base)


def track(c: Conversion, m: ConvertModule | None = None) -> HttpRequest:
    m = m or convert()
    return m.build(m.route(c), [c])


def query(url: str) -> dict[str, str]:
    qs = parse_qs(urlsplit(url).query, keep_blank_values=True, strict_parsing=True)
    assert all(len(v) == 1 for v in qs.values()), qs
    return {k: v[0] for k, v in qs.items()}


def split_t(t: str) -> tuple[str, str, str, str]:
    """How a strict server reads `t` (seed 002): exactly four parts on `|`; the order id from the second."""
    parts = t.split("|")
    assert len(parts) == 4, f"t has {len(parts)} parts: {t!r}"
    goals, tx, value, count = parts
    return goals, order_id_of(tx), value, count


def test_convert_seed_002_goals() -> None:
    req = track(cconv())
    assert req.method == "GET"
    assert req.body is None
    assert req.url == f"{TRACK_BASE}/track/?c=1111&p=2222&e=1000-2000&g=100,101,102&ga=3&vi=v1"
    assert req.redacted_url == req.url
    assert req.headers == {"User-Agent": "ConvertAgent/1.0 (offline-conversions)"}


def test_convert_seed_002_transaction() -> None:
    c = cconv(goals=("100",), transaction_goals=("100",), revenue=Decimal("23.5"), order_id="TX1", item_count=3)
    req = track(c)
    assert req.url == f"{TRACK_BASE}/track/?c=1111&p=2222&e=1000-2000&g=100&ga=1&t=100%7CTX1%7C23.50%7C3&vi=v1"
    assert query(req.url)["t"] == "100|TX1|23.50|3"


def test_convert_transaction_goals_are_dot_separated() -> None:
    c = cconv(transaction_goals=("100", "102"), revenue=Decimal("10"), order_id="T", item_count=2)
    q = query(track(c).url)
    assert (q["g"], q["ga"], q["t"]) == ("100,101,102", "3", "100.102|T|10.00|2")


@pytest.mark.parametrize(
    ("order_id", "sent"),
    [("TX1", "TX1"), ("x|y", "x%7Cy"), ("|", "%7C"), ("a|b|c|d", "a%7Cb%7Cc%7Cd"), ("50%", "50%25"),
     ("%7C", "%257C"), ("%25|", "%2525%7C"), ("", "")],
)
def test_convert_transaction_id_escapes_the_separator(order_id: str, sent: str) -> None:
    # A `|` in an order id would give a server that splits `t` on `|` more than four parts.
    c = cconv(goals=("100",), transaction_goals=("100",), revenue=Decimal("1.5"), order_id=order_id, item_count=2)
    t = query(track(c).url)["t"]
    assert t == f"100|{sent}|1.50|2"
    assert t.split("|") == ["100", sent, "1.50", "2"]
    assert transaction_id(order_id) == sent and order_id_of(sent) == order_id


@given(odd_text, odd_text)
def test_convert_transaction_id_is_deterministic_and_injective(a: str, b: str) -> None:
    ta = transaction_id(a)
    assert "|" not in ta and ta == transaction_id(a)
    assert order_id_of(ta) == a  # a left inverse: distinct orders never share a transaction id
    assert (ta == transaction_id(b)) == (a == b)


@pytest.mark.parametrize("tx", ["a|b", "50%", "%7c", "%2", "%41"])
def test_order_id_of_refuses_what_transaction_id_never_makes(tx: str) -> None:
    with pytest.raises(ValueError, match="not a transaction id"):
        order_id_of(tx)


def test_convert_v1_sends_the_order_id_unchanged() -> None:
    # JSON strings carry any text: the v1 body needs no escape.
    c = cconv(goals=("100",), transaction_goals=("100",), revenue=Decimal("1.5"), order_id="a|b%7C", item_count=2)
    body = orjson.loads(v1_body(convert("v1")._project(CV_KEY), [c]))
    assert body["visitors"][0]["events"][0]["data"]["goalData"][2] == {"key": "transactionId", "value": "a|b%7C"}


@pytest.mark.parametrize(
    "c",
    [cconv(revenue=Decimal("5")), cconv(transaction_goals=("100",), revenue=None)],
    ids=["no transaction goals", "no revenue"],
)
def test_convert_no_t_without_transaction(c: Conversion) -> None:
    assert "t" not in query(track(c).url)


@pytest.mark.parametrize(
    ("revenue", "expected"),
    [
        ("0.005", "0.01"),
        ("2.675", "2.68"),
        ("2.665", "2.67"),
        ("0.004", "0.00"),
        ("23.5", "23.50"),
        ("1", "1.00"),
        ("1E+3", "1000.00"),
        ("19.994999", "19.99"),
        ("-0.005", "-0.01"),
    ],
)
def test_convert_amount_rounds_half_up(revenue: str, expected: str) -> None:
    assert amount(Decimal(revenue)) == expected


@pytest.mark.parametrize("odd", ODD)
def test_convert_odd_values_round_trip(odd: str) -> None:
    c = cconv(visitor_id=odd, order_id=odd, transaction_goals=("100",), revenue=Decimal("1.5"), item_count=2)
    url = track(c).url
    parts = urlsplit(url)
    assert not parts.fragment and parts.path == "/track/"
    assert " " not in url and "+" not in url and "#" not in url
    q = query(url)
    assert q["vi"] == odd
    assert split_t(q["t"]) == ("100", odd, "1.50", "2")
    assert (q["c"], q["p"], q["e"], q["g"], q["ga"]) == ("1111", "2222", "1000-2000", "100,101,102", "3")


@given(odd_text, odd_text)
def test_convert_any_text_round_trips(visitor: str, order_id: str) -> None:
    c = cconv(visitor_id=visitor, order_id=order_id, transaction_goals=("100",), revenue=Decimal("0.1"))
    q = query(track(c).url)
    assert q["vi"] == visitor
    assert split_t(q["t"])[1] == order_id


def test_convert_track_route_is_per_conversion() -> None:
    m = convert()
    a, b = cconv(key="ka"), cconv(key="kb")
    ra, rb = m.route(a), m.route(b)
    assert ra.key != rb.key
    assert ra.batch.max_events == 1 and ra.batch.linger == 0.0
    assert ra.project == CV_KEY
    assert m.item_bytes(a) == 0  # a GET has no body
    with pytest.raises(ValueError):
        m.build(ra, [a, b])


def test_convert_needs_an_exposure() -> None:
    with pytest.raises(ValueError, match="experiment_id"):
        convert().route(cconv(experiment_id=None))


def test_convert_v1_body() -> None:
    m = convert("v1")
    c = cconv(transaction_goals=("100",), revenue=Decimal("23.5"), order_id="TX1", item_count=3, goals=("100", "101"))
    req = m.build(m.route(c), [c])
    assert req.method == "POST"
    assert req.url == f"{V1_BASE}/v1/track/1111/2222"
    assert req.headers["User-Agent"].startswith("ConvertAgent/")
    assert req.headers["Content-Type"] == "application/json"
    assert req.body == (
        b'{"accountId":"1111","projectId":"2222","visitors":[{"visitorId":"v1","events":['
        b'{"eventType":"conversion","data":{"goalId":100,"goalData":[{"key":"amount","value":23.50},'
        b'{"key":"productsCount","value":3},{"key":"transactionId","value":"TX1"}],"bucketingData":{"1000":"2000"}}},'
        b'{"eventType":"conversion","data":{"goalId":101,"bucketingData":{"1000":"2000"}}}]}]}'
    )


def test_convert_v1_no_goal_data_without_revenue() -> None:
    c = cconv(transaction_goals=("100",), goals=("100",))
    body = orjson.loads(v1_body(convert("v1")._project(CV_KEY), [c]))
    assert body["visitors"][0]["events"] == [
        {"eventType": "conversion", "data": {"goalId": 100, "bucketingData": {"1000": "2000"}}}
    ]


@given(st.lists(st.tuples(odd_text, st.sampled_from([None, Decimal("2.675")])), min_size=1, max_size=6))
def test_convert_v1_batches_visitors_and_item_bytes_are_exact(items: list[tuple[str, Decimal | None]]) -> None:
    m = convert("v1")
    cs = [cconv(visitor_id=v, revenue=r, key=f"k{i}") for i, (v, r) in enumerate(items)]
    routes = {m.route(c).key for c in cs}
    assert len(routes) == 1  # many visitors share a body
    body = m.build(m.route(cs[0]), cs).body
    assert body is not None
    envelope = len(v1_body(m._project(CV_KEY), [])) - 1  # the fixed part, minus the last entry's comma
    assert len(body) == envelope + sum(m.item_bytes(c) for c in cs)
    doc = orjson.loads(body)
    assert [v["visitorId"] for v in doc["visitors"]] == [v for v, _ in items]


@pytest.mark.parametrize(
    ("api", "visitors", "status", "headers", "verdict", "retry_after"),
    [
        ("track", 1, 200, {}, Verdict.DELIVERED, None),
        ("v1", 3, 200, {}, Verdict.DELIVERED, None),
        ("v1", 3, 400, {}, Verdict.SPLIT, None),
        ("v1", 1, 400, {}, Verdict.PERMANENT, None),
        ("track", 1, 400, {}, Verdict.PERMANENT, None),
        ("v1", 2, 401, {}, Verdict.PERMANENT, None),
        ("track", 1, 403, {}, Verdict.PERMANENT, None),
        ("v1", 2, 413, {}, Verdict.SPLIT, None),
        ("track", 1, 429, {"Retry-After": "3"}, Verdict.RETRY, 3.0),
        ("v1", 2, 502, {}, Verdict.RETRY, None),
        ("track", 1, 408, {}, Verdict.RETRY, None),
    ],
)
def test_convert_classify(
    api: str, visitors: int, status: int, headers: dict[str, str], verdict: Verdict, retry_after: float | None
) -> None:
    m = convert(api)
    cs = [cconv(visitor_id='{"visitorId":', key=f"k{i}") for i in range(visitors)]
    out = m.classify(m.build(m.route(cs[0]), cs), status, headers, b"")
    assert (out.verdict, out.status, out.retry_after) == (verdict, status, retry_after)


def test_transaction_key() -> None:
    args = ("1111_2222", "v1", "1000", "2000", "TX1")
    k = transaction_key(*args)
    assert k == transaction_key(*args) and len(k) == 32 and k == k.lower()
    for i in range(5):
        changed = list(args)
        changed[i] += "x"
        assert transaction_key(*changed) != k
    assert transaction_key("a", "bc", "1", "2", "t") != transaction_key("ab", "c", "1", "2", "t")
    assert k == "1afa7be122b1ebf2db1d3c17e48e8c0c"  # pinned, equal to the matcher's


# --------------------------------------------------------------------------- Conductrics

API_KEY = "api-1234567890"
AGENT = "https://api-xxx.conductrics.com/ac-xxx/v3/agent-api"


def conductrics(session: str = "{vid}", url: str = AGENT) -> ConductricsModule:
    p = ConductricsProject(
        key="shop",
        agent_api_url=url,
        api_key=Secret(API_KEY),
        rules=Rules(goals=("g-purchase",), attribution_window=72 * 3600.0),
        session=session,
    )
    return ConductricsModule(ConductricsConfig(retry=RetryConfig(max_attempts=3), projects={"shop": p}))


def dconv(**kw: Any) -> Conversion:
    base: dict[str, Any] = dict(visitor_id="lana-123", goals=("g-purchase",), revenue=Decimal("19.99"), key="dk")
    base.update(kw)
    return conv(Provider.CONDUCTRICS, "shop", **base)


def dreq(c: Conversion | None = None, m: ConductricsModule | None = None) -> HttpRequest:
    m, c = m or conductrics(), c or dconv()
    return m.build(m.route(c), [c])


def test_conductrics_seed_003() -> None:
    req = dreq()
    assert req.method == "POST"
    assert req.url == f"{AGENT}?vid=lana-123&session=lana-123&apikey=api-1234567890"
    assert req.redacted_url == f"{AGENT}?vid=lana-123&session=lana-123&apikey=***"
    assert req.body == b'{"commands":[{"g":"g-purchase","v":19.99}]}'
    assert req.headers == {"Content-Type": "application/json", "User-Agent": "offline-conversions/1.0"}


def test_conductrics_commands_per_goal_and_no_revenue() -> None:
    assert dreq(dconv(goals=("g-a", "g-b"), revenue=Decimal("5.50"))).body == (
        b'{"commands":[{"g":"g-a","v":5.50},{"g":"g-b","v":5.50}]}'
    )
    assert dreq(dconv(revenue=None)).body == b'{"commands":[{"g":"g-purchase"}]}'


@pytest.mark.parametrize("odd", ODD)
def test_conductrics_session_template_and_odd_values(odd: str) -> None:
    m = conductrics(session="{vid}/{order_id}/{event_id}")
    q = query(dreq(dconv(visitor_id=odd, order_id="o&1", event_id="e 1"), m).url)
    assert q == {"vid": odd, "session": f"{odd}/o&1/e 1", "apikey": API_KEY}


def test_conductrics_url_with_a_query_already() -> None:
    req = dreq(m=conductrics(url=f"{AGENT}?env=prod"))
    assert req.url == f"{AGENT}?env=prod&vid=lana-123&session=lana-123&apikey=api-1234567890"


def test_conductrics_route_and_item_bytes() -> None:
    m = conductrics()
    a, b = dconv(key="a"), dconv(key="b")
    assert m.route(a).key != m.route(b).key
    r = m.route(a)
    assert (r.project, r.batch.max_events, r.batch.linger, r.retry.max_attempts, r.token) == ("shop", 1, 0.0, 3, None)
    assert m.item_bytes(a) == len(dreq(a).body or b"")


def ok(items: list[Any] | None, status: Any = 200) -> bytes:
    return orjson.dumps({"status": status, "data": {} if items is None else {"items": items}})


@pytest.mark.parametrize(
    ("status", "headers", "body", "verdict", "reason", "retry_after"),
    [
        (200, {}, ok([{"g": "g-purchase", "rs": [{"a": "a-1", "v": 19.99}]}]), Verdict.DELIVERED, "ok", None),
        (200, {}, ok([{"g": "g-a", "rs": []}, {"g": "g-b", "rs": [{"a": "a-1"}]}]), Verdict.DELIVERED, "ok", None),
        (200, {}, ok([{"g": "a", "rs": []}, {"g": "b", "rs": []}]), Verdict.NOT_ACCEPTED, "no agent accepted", None),
        (200, {}, ok(None), Verdict.DELIVERED, "ok", None),
        (200, {}, ok([], 500), Verdict.RETRY, "json status 500", None),
        (200, {}, ok([], 503), Verdict.RETRY, "json status 503", None),
        (200, {}, ok([], 429), Verdict.RETRY, "json status 429", None),
        (200, {}, ok([], 400), Verdict.PERMANENT, "json status 400", None),
        (200, {}, ok([], 401), Verdict.PERMANENT, "json status 401", None),
        (200, {}, ok([], "200"), Verdict.RETRY, "json status missing", None),
        (200, {}, b"<html>oops</html>", Verdict.RETRY, "unparseable body", None),
        (200, {}, b"", Verdict.RETRY, "unparseable body", None),
        (200, {}, b"[]", Verdict.RETRY, "unparseable body", None),
        (401, {}, b'{"error":"bad key api-1234567890"}', Verdict.PERMANENT, "unauthorized (api key?)", None),
        (403, {}, b"", Verdict.PERMANENT, "forbidden (api key?)", None),
        (400, {}, b"", Verdict.PERMANENT, "http 400", None),
        (413, {}, b"", Verdict.SPLIT, "payload too large", None),
        (429, {"Retry-After": "11"}, b"", Verdict.RETRY, "http 429", 11.0),
        (500, {}, b"", Verdict.RETRY, "http 500", None),
    ],
)
def test_conductrics_classify(
    status: int, headers: dict[str, str], body: bytes, verdict: Verdict, reason: str, retry_after: float | None
) -> None:
    out = conductrics().classify(dreq(), status, headers, body)
    assert (out.verdict, out.reason, out.status, out.retry_after) == (verdict, reason, status, retry_after)
    assert API_KEY not in out.reason


def test_conductrics_api_key_only_in_url() -> None:
    m = conductrics()
    req = dreq(m=m)
    assert API_KEY in req.url
    leaks = [req.redacted_url, repr(req), str(req), repr(req.headers), repr(m), repr(m.route(dconv()))]
    leaks += [m.classify(req, s, {}, b'{"status":401,"message":"api-1234567890"}').reason for s in (200, 401, 403, 500)]
    for text in leaks:
        assert API_KEY not in text, text


def test_conductrics_key() -> None:
    k = conductrics_key("shop", "lana-123", "O1")
    assert k == conductrics_key("shop", "lana-123", "O1") and len(k) == 32
    assert k != conductrics_key("shop2", "lana-123", "O1")
    assert k != conductrics_key("shop", "lana-1234", "O1")
    assert k != conductrics_key("shop", "lana-123", "O2")
    assert conductrics_key("a", "bc", "d") != conductrics_key("ab", "c", "d")
    assert k == "34740a09ef9cfb89c3d7d24142e284e4"  # pinned, equal to the matcher's


# --------------------------------------------------------------------------- registry

KAFKA = {"bootstrap_servers": "localhost:9092", "topic": "t", "group_id": "g", "dlq_topic": "dlq"}


def test_registry_builds_a_module_per_configured_provider() -> None:
    cfg = parse(
        {
            "kafka": KAFKA,
            "kameleoon": {"projects": {SITE: {"goals": ["36151"]}}},
            "conductrics": {"projects": {"shop": {"goals": ["g-purchase"], "agent_api_url": AGENT, "api_key": "k"}}},
        },
        env={},
    )
    mods: dict[Provider, ProviderModule] = modules(cfg)
    assert set(mods) == {Provider.KAMELEOON, Provider.CONDUCTRICS}
    assert isinstance(mods[Provider.KAMELEOON], KameleoonModule)
    assert isinstance(mods[Provider.CONDUCTRICS], ConductricsModule)
    assert all(m.provider is p for p, m in mods.items())

    cfg2 = parse({"kafka": KAFKA, "convert": {"projects": {CV_KEY: {"goals": ["100"], "api": "v1"}}}}, env={})
    m2 = modules(cfg2)
    assert set(m2) == {Provider.CONVERT}
    c = cconv(goals=("100",))
    assert m2[Provider.CONVERT].build(m2[Provider.CONVERT].route(c), [c]).url == f"{V1_BASE}/v1/track/1111/2222"


def test_lone_surrogates_do_not_break_a_build() -> None:
    # A visitor id decoded with surrogateescape must not crash the batch: it is \u-escaped.
    m = kameleoon()
    c = kconv(visitor_id="bad\udcff")
    body = m.build(m.route(c), [c]).body
    assert body is not None and b'"visitorCode":"bad\\udcff"' in body
    assert len(body) == m.item_bytes(c) + 1
    assert len(nonce(SITE, "o", "1", "bad\udcff")) == 16
    assert b'"g":"g\\udcff"' in (dreq(dconv(goals=("g\udcff",), visitor_id="v\udcff")).body or b"")
    assert "vi=v%ED%B3%BF" in track(cconv(visitor_id="v\udcff")).url


@pytest.mark.parametrize("odd", ODD)
def test_urls_survive_aiohttp_requoting(odd: str) -> None:
    # aiohttp turns a str URL into yarl.URL, which re-quotes it; the decoded values must not change.
    import yarl  # aiohttp's own URL type

    c = cconv(visitor_id=odd, order_id=odd, transaction_goals=("100",), revenue=Decimal("1.5"), item_count=2)
    q = yarl.URL(track(c).url).query
    assert q["vi"] == odd and split_t(q["t"]) == ("100", odd, "1.50", "2")
    d = yarl.URL(dreq(dconv(visitor_id=odd)).url).query
    assert (d["vid"], d["session"], d["apikey"]) == (odd, odd, API_KEY)


@given(st.text(max_size=40))
def test_json_string_is_a_json_literal_of_the_same_text(value: str) -> None:
    literal = json_string(value)
    assert json.loads(literal) == value
    if not any("\ud800" <= ch <= "\udfff" for ch in value):  # lone surrogates take the json module's path
        assert literal == orjson.dumps(value).decode()  # the fast path writes what the encoder would


def test_every_built_in_provider_is_one_registered_package() -> None:
    from consumer.decoding import read_schema_json, with_providers
    from consumer.providers import registry
    from consumer.sandbox import Sandbox

    specs = registry.specs()
    assert [s.slug for s in specs] == ["kameleoon", "convert", "conductrics"]
    sandbox = Sandbox()
    for spec in specs:
        assert spec.provider is Provider(spec.symbol) and spec.symbol == spec.slug.upper()
        assert spec.emulator is not None and spec.emulator().names[0] == spec.slug
        assert sandbox.emulator(spec.slug).slug == spec.slug
        assert spec.sample is not None and spec.module.__module__.startswith(f"consumer.providers.{spec.slug}.")
    # The published contract lists exactly the built-in providers: a reader with only them reads it as it is
    # (the same JSON, so a writer with the contract's schema needs no resolution).
    from consumer.config import DEFAULT_SCHEMA

    contract = read_schema_json(DEFAULT_SCHEMA)
    assert with_providers(contract, [s.symbol for s in specs]) == contract
    extended = json.dumps(with_providers(contract, ["KAMELEOON", "NEWCO"]))
    assert '"symbols": ["KAMELEOON", "CONVERT", "CONDUCTRICS", "NEWCO", "UNKNOWN"], "default": "UNKNOWN"' in extended


def test_a_second_spec_under_a_taken_slug_is_refused() -> None:
    import dataclasses

    from consumer.providers import registry

    kameleoon = registry.spec_of("kameleoon")
    assert registry.register(kameleoon) is kameleoon  # the same spec again: nothing changes
    with pytest.raises(ValueError, match="registered already"):
        registry.register(dataclasses.replace(kameleoon, description="an impostor"))
    assert registry.spec_of("kameleoon") is kameleoon
