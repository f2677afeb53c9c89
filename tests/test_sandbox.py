"""The provider sandbox: accepts the seeds' own requests, enforces every documented rule, injects faults."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from consumer.config import parse
from consumer.model import Conversion, Identity, Provider
from consumer.providers.base import Verdict
from consumer.providers.convert.request import ConvertModule, order_id_of, transaction_id
from consumer.providers.kameleoon.emulator import KameleoonEmulator
from consumer.sandbox import Fault, Record, Sandbox, SpecError, load_options, redact_query
from consumer.transport import Transport

SITE = "f17c21u1ag"
AUTH_SITE = "authsite01"
CLIENT_ID, CLIENT_SECRET = "client-1", "s3cret-value"
APIKEY = "api-1234567890"
SEED_EVENT = b'[{"nonce":"a2bb4d22083348ef","eventType":"CONVERSION","goalId":36151,"revenue":23.50}]'
UA = {"User-Agent": "CustomUserAgent/1.0", "Content-Type": "application/json"}
CONVERT_UA = {"User-Agent": "ConvertAgent/1.0 (offline-conversions)"}


@pytest.fixture
async def sandbox() -> AsyncIterator[Sandbox]:
    sb = Sandbox(
        kameleoon_auth_sites=[AUTH_SITE],
        kameleoon_clients={CLIENT_ID: CLIENT_SECRET},
        conductrics_keys={"ac-xxx": APIKEY, "ac-two": ["k-a", "k-b"]},
        conductrics_no_selection=["never-selected"],
        kameleoon_max_body=4096,
    )
    await sb.start()
    try:
        yield sb
    finally:
        await sb.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


def event(nonce: str = "a2bb4d22083348ef", goal: Any = 36151, **extra: Any) -> dict[str, Any]:
    return {"nonce": nonce, "eventType": "CONVERSION", "goalId": goal, **extra}


async def post_events(
    http: aiohttp.ClientSession, sb: Sandbox, body: Any, query: str = f"siteCode={SITE}&visitorCode=245fc&json=true",
    headers: dict[str, str] | None = None,
) -> tuple[int, Any]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with http.post(f"{sb.url}/visit/events?{query}", data=data, headers=headers or UA) as r:
        raw = await r.read()
        return r.status, (json.loads(raw) if raw else None)


# --------------------------------------------------------------------------- Kameleoon


async def test_kameleoon_seed_request_is_recorded_exactly(sandbox: Sandbox, http: aiohttp.ClientSession) -> None:
    url = f"{sandbox.url}/visit/events?siteCode=f17c21u1ag&visitorCode=245fc&json=true"
    async with http.post(url, data=SEED_EVENT, headers=UA) as r:
        assert r.status == 204
        assert await r.read() == b""
    [rec] = sandbox.records
    assert (rec.provider, rec.api, rec.project, rec.visitor, rec.identity) == (
        "kameleoon", "visit/events", "f17c21u1ag", "245fc", "visitor")
    assert (rec.goals, rec.revenue, rec.nonce, rec.negative, rec.event_type) == (
        ("36151",), 23.5, "a2bb4d22083348ef", False, "CONVERSION")
    assert rec.query == "siteCode=f17c21u1ag&visitorCode=245fc&json=true"
    assert rec.user_agent == "CustomUserAgent/1.0"
    assert sandbox.kameleoon_nonces() == ["a2bb4d22083348ef"]
    assert sandbox.counts() == {"kameleoon": 1, "convert": 0, "conductrics": 0}

    get = (f"{sandbox.url}/visit/visitor?siteCode=f17c21u1ag&visitorCode=245fc"
           "&maxNumberPreviousVisits=5&currentVisit=true&conversion=true")
    async with http.get(get, headers=UA) as r:
        assert r.status == 200
        body = await r.json()
    [visit] = body["previousVisits"]
    assert visit["siteCode"] == "f17c21u1ag" and visit["visitorCode"] == "245fc"
    assert isinstance(visit["timeStarted"], int)
    [conv] = visit["conversionEvents"]
    assert conv["itp"] is False and conv["time"] == int(rec.time * 1000)
    assert conv["data"] == {"goalId": 36151, "revenue": 23.5, "negative": False, "metadata": {}}


async def test_kameleoon_unknown_visitor_has_no_visits(sandbox: Sandbox, http: aiohttp.ClientSession) -> None:
    await post_events(http, sandbox, [event()])
    async with http.get(f"{sandbox.url}/visit/visitor?siteCode={SITE}&visitorCode=other&conversion=true") as r:
        assert r.status == 200
        assert await r.json() == {"previousVisits": []}


async def test_kameleoon_bulk_visitors_and_mapping_value(sandbox: Sandbox, http: aiohttp.ClientSession) -> None:
    body = [
        event("0000000000000001", 1, visitorCode="v-1", revenue=10),
        event("0000000000000002", 2, mappingValue="customer-9", negative=True, metadata={"k": "v"}),
        {"nonce": "0000000000000003", "eventType": "PAGE", "visitorCode": "v-1"},  # valid, not a conversion
    ]
    status, _ = await post_events(http, sandbox, body, query=f"siteCode={SITE}&json=true")
    assert status == 204
    assert [(r.visitor, r.identity, r.goals, r.revenue, r.negative) for r in sandbox.records] == [
        ("v-1", "visitor", ("1",), 10.0, False),
        ("customer-9", "mapping", ("2",), None, True),
    ]
    assert sandbox.records[0].request_id == sandbox.records[1].request_id
    assert sandbox.records[1].metadata == {"k": "v"}


async def test_without_records_every_request_is_still_validated_and_counted(http: aiohttp.ClientSession) -> None:
    async with Sandbox(records=False, request_log=False) as sb:
        body = [event("0000000000000001", 1, visitorCode="v-1"), event("0000000000000002", 1, visitorCode="v-2")]
        assert (await post_events(http, sb, body, query=f"siteCode={SITE}&json=true"))[0] == 204
        assert (await post_events(http, sb, body[:1], query=f"siteCode={SITE}&json=true"))[0] == 204
        status, err = await post_events(http, sb, [event(nonce="not-hex")], query=f"siteCode={SITE}&json=true")
        assert status == 400 and err["field"] == "[0].nonce"
        assert sb.records == [] and sb.requests == []
        assert sb.counts()["kameleoon"] == 3
        assert sb.duplicates() == {f"kameleoon|{SITE}|0000000000000001": 2}
        assert sb.status_counts("kameleoon") == {204: 2, 400: 1}


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ([event(nonce="a2bb4d22083348e")], "[1].nonce"),  # 15 chars
        ([event(nonce="a2bb4d22083348eg")], "[1].nonce"),  # not hex
        ([{"nonce": "a2bb4d22083348ef", "goalId": 1}], "[1].eventType"),
        ([event(eventType="NOPE")], "[1].eventType"),
        ([event(goal="36151")], "[1].goalId"),
        ([event(goal=True)], "[1].goalId"),
        ([event(revenue="23.50")], "[1].revenue"),
        ([event(negative="false")], "[1].negative"),
        ([event(metadata="x")], "[1].metadata"),
        ([event(visitorCode="x" * 101)], "[1].visitorCode"),
        ([event(mappingValue="")], "[1].mappingValue"),
        (["not an object"], "[1]"),
    ],
)
async def test_kameleoon_invalid_event_rejects_the_whole_request(
    sandbox: Sandbox, http: aiohttp.ClientSession, body: list[Any], field: str
) -> None:
    good = event("ffffffffffffffff", 7)
    status, err = await post_events(http, sandbox, [good, *body])
    assert status == 400
    assert err["field"] == field and err["status"] == 400
    assert sandbox.records == []
    assert sandbox.requests[-1].status == 400 and sandbox.requests[-1].error == field


@pytest.mark.parametrize(
    ("body", "query", "field"),
    [
        (b"{not json", f"siteCode={SITE}&visitorCode=v&json=true", "body"),
        (b'{"nonce":"a2bb4d22083348ef"}', f"siteCode={SITE}&visitorCode=v&json=true", "body"),
        (b"[]", f"siteCode={SITE}&visitorCode=v&json=true", "body"),
        (SEED_EVENT, "visitorCode=v&json=true", "siteCode"),
        (SEED_EVENT, f"siteCode={SITE}&visitorCode=v", "json"),
        (SEED_EVENT, f"siteCode={SITE}&json=true", "[0].visitorCode"),  # no visitor anywhere
        (SEED_EVENT, f"siteCode={SITE}&visitorCode={'x' * 101}&json=true", "visitorCode"),
    ],
)
async def test_kameleoon_invalid_request(
    sandbox: Sandbox, http: aiohttp.ClientSession, body: bytes, query: str, field: str
) -> None:
    status, err = await post_events(http, sandbox, body, query=query)
    assert (status, err["field"]) == (400, field)
    assert sandbox.records == []


async def test_kameleoon_visitor_code_of_100_chars_is_accepted(sandbox: Sandbox, http: aiohttp.ClientSession) -> None:
    status, _ = await post_events(http, sandbox, [event(visitorCode="x" * 100)])
    assert status == 204
    assert sandbox.records[0].visitor == "x" * 100


async def test_kameleoon_requires_a_user_agent(sandbox: Sandbox) -> None:
    async with aiohttp.ClientSession(skip_auto_headers=["User-Agent"]) as http:
        status, err = await post_events(http, sandbox, SEED_EVENT, headers={"Content-Type": "application/json"})
        assert (status, err["field"]) == (403, "User-Agent")
        status, _ = await post_events(http, sandbox, SEED_EVENT, headers={"User-Agent": " "})
        assert status == 403
    assert sandbox.records == []


async def test_kameleoon_body_over_the_size_limit_is_413(sandbox: Sandbox, http: aiohttp.ClientSession) -> None:
    # the fixture's limit is 4096 bytes
    big = [event(f"{i:016x}", i, visitorCode=f"visitor-{i}") for i in range(100)]
    data = json.dumps(big).encode()
    assert len(data) > 4096
    status, err = await post_events(http, sandbox, data, query=f"siteCode={SITE}&json=true")
    assert (status, err["field"]) == (413, "body")
    half = json.dumps(big[:30]).encode()
    assert len(half) <= 4096
    status, _ = await post_events(http, sandbox, half, query=f"siteCode={SITE}&json=true")
    assert status == 204
    assert sandbox.counts()["kameleoon"] == 30


async def test_kameleoon_default_size_limit_is_3mb() -> None:
    assert Sandbox().max_body == 3_000_000


async def test_duplicate_nonces_are_recorded_not_hidden(sandbox: Sandbox, http: aiohttp.ClientSession) -> None:
    for _ in range(2):
        assert (await post_events(http, sandbox, SEED_EVENT))[0] == 204
    assert sandbox.kameleoon_nonces() == ["a2bb4d22083348ef"] * 2
    assert sandbox.duplicates() == {f"kameleoon|{SITE}|a2bb4d22083348ef": 2}
    assert len(sandbox.records) == 2


# --------------------------------------------------------------------------- OAuth


async def get_token(http: aiohttp.ClientSession, sb: Sandbox, secret: str = CLIENT_SECRET) -> tuple[int, Any]:
    form = {"grant_type": "client_credentials", "client_id": CLIENT_ID, "client_secret": secret}
    async with http.post(f"{sb.url}/oauth/token", data=form) as r:
        return r.status, await r.json()


async def test_auth_site_needs_a_valid_token(sandbox: Sandbox, http: aiohttp.ClientSession) -> None:
    q = f"siteCode={AUTH_SITE}&visitorCode=v&json=true"
    status, err = await post_events(http, sandbox, SEED_EVENT, query=q)
    assert (status, err["field"]) == (401, "Authorization")
    status, err = await post_events(http, sandbox, SEED_EVENT, query=q, headers={**UA, "Authorization": "Bearer nope"})
    assert status == 401

    status, tok = await get_token(http, sandbox)
    assert status == 200
    assert tok["token_type"] == "Bearer" and tok["expires_in"] == 3600 and tok["access_token"]
    bearer = {**UA, "Authorization": f"Bearer {tok['access_token']}"}
    assert (await post_events(http, sandbox, SEED_EVENT, query=q, headers=bearer))[0] == 204

    sandbox.expire_tokens()
    assert (await post_events(http, sandbox, SEED_EVENT, query=q, headers=bearer))[0] == 401
    status, tok2 = await get_token(http, sandbox)
    assert tok2["access_token"] != tok["access_token"]
    bearer2 = {**UA, "Authorization": f"Bearer {tok2['access_token']}"}
    assert (await post_events(http, sandbox, SEED_EVENT, query=q, headers=bearer2))[0] == 204

    sandbox.revoke_tokens()
    assert (await post_events(http, sandbox, SEED_EVENT, query=q, headers=bearer2))[0] == 401
    assert sandbox.token_grants == 2
    assert sandbox.counts()["kameleoon"] == 2
    # the visitor lookup is guarded the same way
    async with http.get(f"{sandbox.url}/visit/visitor?siteCode={AUTH_SITE}&visitorCode=v", headers=UA) as r:
        assert r.status == 401


async def test_short_token_lifetime_expires(http: aiohttp.ClientSession) -> None:
    async with Sandbox(kameleoon_auth_sites=[AUTH_SITE], kameleoon_clients={CLIENT_ID: CLIENT_SECRET},
                       token_lifetime=0) as sb:
        status, tok = await get_token(http, sb)
        assert status == 200 and tok["expires_in"] == 0
        bearer = {**UA, "Authorization": f"Bearer {tok['access_token']}"}
        status, _ = await post_events(http, sb, SEED_EVENT, query=f"siteCode={AUTH_SITE}&visitorCode=v&json=true",
                                      headers=bearer)
        assert status == 401


async def test_token_endpoint_rejects_bad_clients(sandbox: Sandbox, http: aiohttp.ClientSession) -> None:
    status, body = await get_token(http, sandbox, secret="wrong")
    assert (status, body) == (401, {"error": "invalid_client"})
    async with http.post(f"{sandbox.url}/oauth/token", data={"grant_type": "password", "client_id": CLIENT_ID,
                                                              "client_secret": CLIENT_SECRET}) as r:
        assert r.status == 400
    assert sandbox.token_grants == 0
    assert CLIENT_SECRET not in repr(sandbox.__dict__)  # only a digest is kept


# --------------------------------------------------------------------------- Convert


async def convert_get(http: aiohttp.ClientSession, sb: Sandbox, query: str) -> tuple[int, Any]:
    async with http.get(f"{sb.url}/track/?{query}") as r:
        raw = await r.read()
        return r.status, (json.loads(raw) if r.content_type == "application/json" else raw)


async def test_convert_seed_goal_requests(sandbox: Sandbox, http: aiohttp.ClientSession) -> None:
    status, body = await convert_get(http, sandbox, "c=1111&p=2222&e=100-200&g=300&ga=1")
    assert status == 200 and body.startswith(b"GIF89a")
    status, _ = await convert_get(http, sandbox, "c=1111&p=2222&e=100-200&g=100,101,102&ga=3&vi=visitor-7")
    assert status == 200
    first, second = sandbox.records
    assert (first.provider, first.api, first.project, first.goals, first.experiment_id, first.variation_id) == (
        "convert", "track", "1111_2222", ("300",), "100", "200")
    assert first.visitor == "" and first.transaction_id is None and first.revenue is None
    assert second.goals == ("100", "101", "102") and second.visitor == "visitor-7"


async def test_convert_seed_transaction_and_mixed_request(sandbox: Sandbox, http: aiohttp.ClientSession) -> None:
    status, _ = await convert_get(http, sandbox, "c=1111&p=2222&e=100-200&t=300|tx-1|23.50|2&vi=v1")
    assert status == 200
    status, _ = await convert_get(http, sandbox, "c=1111&p=2222&e=100-200&g=5,6&ga=2&t=300.301|tx-2|5.00|1&vi=v1")
    assert status == 200
    tx1, tx2 = sandbox.records
    assert (tx1.goals, tx1.transaction_goals, tx1.transaction_id, tx1.revenue, tx1.products_count) == (
        (), ("300",), "tx-1", 23.5, 2)
    assert (tx2.goals, tx2.transaction_goals, tx2.transaction_id, tx2.revenue) == (
        ("5", "6"), ("300", "301"), "tx-2", 5.0)
    assert sandbox.duplicates() == {}


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("p=2222&e=1-2&g=3&ga=1", "c"),
        ("c=11a1&p=2222&e=1-2&g=3&ga=1", "c"),
        ("c=1111&e=1-2&g=3&ga=1", "p"),
        ("c=1111&p=2222&g=3&ga=1", "e"),
        ("c=1111&p=2222&e=1_2&g=3&ga=1", "e"),
        ("c=1111&p=2222&e=1-2", "g"),
        ("c=1111&p=2222&e=1-2&g=3,4&ga=1", "ga"),
        ("c=1111&p=2222&e=1-2&g=3", "ga"),
        ("c=1111&p=2222&e=1-2&g=3,x&ga=2", "g"),
        ("c=1111&p=2222&e=1-2&ga=1&t=3|tx|1.00|1", "ga"),
        ("c=1111&p=2222&e=1-2&t=3|tx|1.5|1", "t"),
        ("c=1111&p=2222&e=1-2&t=3|tx|1|1", "t"),
        ("c=1111&p=2222&e=1-2&t=3|tx|1.00", "t"),
        ("c=1111&p=2222&e=1-2&t=3|tx|1.00|two", "t"),
        ("c=1111&p=2222&e=1-2&t=3,4|tx|1.00|1", "t"),
        ("c=1111&p=2222&e=1-2&t=3||1.00|1", "t"),
        ("c=1111&p=2222&e=1-2&t=3|a|b|1.00|1", "t"),  # an unescaped `|` in the transaction id: five parts
        ("c=1111&p=2222&e=1-2&t=3|a%7Cb|1.00|1", "t"),  # the same, percent-encoded: decoded, still five
    ],
)
async def test_convert_track_validation(sandbox: Sandbox, http: aiohttp.ClientSession, query: str, field: str) -> None:
    status, body = await convert_get(http, sandbox, query)
    assert (status, body["field"]) == (400, field)
    assert sandbox.records == []


async def test_convert_duplicate_transaction_is_visible(sandbox: Sandbox, http: aiohttp.ClientSession) -> None:
    for _ in range(2):
        await convert_get(http, sandbox, "c=1111&p=2222&e=100-200&t=300|tx-1|23.50|2&vi=v1")
    await convert_get(http, sandbox, "c=1111&p=2222&e=100-201&t=300|tx-1|23.50|2&vi=v1")  # other variation
    assert sandbox.duplicates() == {"convert|1111_2222|v1|100-200|t:tx-1": 2}


ODD_ORDERS = ["x|y", "|", "a|b|c|d", "50%", "%7C", "x%7Cy", "%25|", "ORD-1"]


def convert_module(sandbox: Sandbox, api: str) -> ConvertModule:
    cfg = parse({"kafka": {"bootstrap_servers": "unused:1", "topic": "t", "group_id": "g", "dlq_topic": "t.dlq"},
                 "convert": {"projects": {"1111_2222": {"base_url": sandbox.url, "api": api, "goals": [100],
                                                        "transaction_goals": [100]}}}}, env={})
    return ConvertModule(cfg.providers["convert"])


def convert_conversion(order_id: str) -> Conversion:
    return Conversion(Provider.CONVERT, "1111_2222", f"v-{order_id}", ("100",), Decimal("12.50"), f"k-{order_id}",
                      "e", order_id, 0, 3, Identity.VISITOR, experiment_id="100", variation_id="200",
                      transaction_goals=("100",))


@pytest.mark.parametrize("api", ["track", "v1"])
async def test_convert_orders_with_the_separator_reach_a_strict_server(sandbox: Sandbox, api: str) -> None:
    # The sandbox splits `t` into exactly four parts; the module's requests, sent by the service's own
    # transport, are accepted for every order id, and each order keeps a transaction id of its own.
    module, transport = convert_module(sandbox, api), Transport()
    try:
        for order in ODD_ORDERS:
            c = convert_conversion(order)
            request = module.build(module.route(c), [c])
            resp = await transport.send(request, 5)
            assert module.classify(request, resp.status, resp.headers, resp.body).verdict is Verdict.DELIVERED, (
                order, resp.body)
    finally:
        await transport.close()
    got = {r.visitor: r.transaction_id for r in sandbox.records}
    if api == "track":  # what the server reads from `t`: the escaped id, which maps back to the order
        assert got == {f"v-{o}": transaction_id(o) for o in ODD_ORDERS}
        assert {order_id_of(tx) for tx in got.values() if tx is not None} == set(ODD_ORDERS)
    else:  # a JSON string carries the order id as it is
        assert got == {f"v-{o}": o for o in ODD_ORDERS}
    assert len(set(got.values())) == len(ODD_ORDERS)
    assert all(r.revenue == 12.5 and r.products_count == 3 for r in sandbox.records)


def v1_body(visitor: str = "vis-1", tx: str = "order-1", **over: Any) -> dict[str, Any]:
    body = {
        "accountId": "1111",
        "projectId": "2222",
        "visitors": [{"visitorId": visitor, "events": [{"eventType": "conversion", "data": {
            "goalId": 300,
            "goalData": [{"key": "amount", "value": 23.5}, {"key": "productsCount", "value": 2},
                         {"key": "transactionId", "value": tx}],
            "bucketingData": {"100": "200"}}}]}],
    }
    body.update(over)
    return body


async def post_v1(
    http: aiohttp.ClientSession, sb: Sandbox, body: Any, headers: dict[str, str] | None = None, path: str = "1111/2222"
) -> tuple[int, Any]:
    async with http.post(f"{sb.url}/v1/track/{path}", json=body, headers=headers or CONVERT_UA) as r:
        return r.status, await r.json()


async def test_convert_v1_accepts_and_records(sandbox: Sandbox, http: aiohttp.ClientSession) -> None:
    status, _ = await post_v1(http, sandbox, v1_body())
    assert status == 200
    [rec] = sandbox.records
    assert (rec.api, rec.project, rec.visitor, rec.goals, rec.revenue, rec.products_count, rec.transaction_id) == (
        "v1/track", "1111_2222", "vis-1", ("300",), 23.5, 2, "order-1")
    assert (rec.experiment_id, rec.variation_id, rec.bucketing) == ("100", "200", (("100", "200"),))


async def test_convert_v1_bot_filter_drops_silently(sandbox: Sandbox, http: aiohttp.ClientSession) -> None:
    status, _ = await post_v1(http, sandbox, v1_body(), headers={"User-Agent": "offline-conversions/1.0"})
    assert status == 200
    assert sandbox.records == [] and len(sandbox.dropped) == 1
    assert sandbox.requests[-1].outcome == "dropped"


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda b: b.update(accountId="9999"), "accountId"),
        (lambda b: b.pop("projectId"), "projectId"),
        (lambda b: b.update(visitors=[]), "visitors"),
        (lambda b: b["visitors"][0].update(visitorId=""), "visitors[0].visitorId"),
        (lambda b: b["visitors"][0].update(events=[]), "visitors[0].events"),
        (lambda b: b["visitors"][0]["events"][0].update(eventType="purchase"), "visitors[0].events[0].eventType"),
        (lambda b: b["visitors"][0]["events"][0]["data"].pop("goalId"), "visitors[0].events[0].data.goalId"),
        (lambda b: b["visitors"][0]["events"][0]["data"]["goalData"].append({"key": "price", "value": 1}),
         "visitors[0].events[0].data.goalData[3]"),
        (lambda b: b["visitors"][0]["events"][0]["data"]["goalData"][0].update(value="23.5"),
         "visitors[0].events[0].data.goalData[0].value"),
        (lambda b: b["visitors"][0]["events"][0]["data"].update(bucketingData={"exp": "var"}),
         "visitors[0].events[0].data.bucketingData"),
    ],
)
async def test_convert_v1_validation(sandbox: Sandbox, http: aiohttp.ClientSession, mutate: Any, field: str) -> None:
    body = v1_body()
    mutate(body)
    status, err = await post_v1(http, sandbox, body)
    assert (status, err["field"]) == (400, field)
    assert sandbox.records == [] and sandbox.dropped == []


async def test_convert_v1_path_must_match_body(sandbox: Sandbox, http: aiohttp.ClientSession) -> None:
    status, err = await post_v1(http, sandbox, v1_body(), path="1111/3333")
    assert (status, err["field"]) == (400, "projectId")


# --------------------------------------------------------------------------- Conductrics


async def conductrics(
    http: aiohttp.ClientSession, sb: Sandbox, body: Any, query: str = f"vid=lana-123&session=lana-123&apikey={APIKEY}",
    account: str = "ac-xxx",
) -> tuple[int, Any]:
    async with http.post(f"{sb.url}/{account}/v3/agent-api?{query}", json=body) as r:
        return r.status, await r.json()


async def test_conductrics_seed_request(sandbox: Sandbox, http: aiohttp.ClientSession) -> None:
    status, body = await conductrics(http, sandbox, {"commands": [{"g": "g-purchase", "v": 19.99}]})
    assert status == 200
    assert body == {"status": 200, "data": {"items": [{"g": "g-purchase", "rs": [{"a": "a-agent", "v": 19.99}]}]}}
    [rec] = sandbox.records
    assert (rec.provider, rec.project, rec.visitor, rec.session, rec.goals, rec.revenue) == (
        "conductrics", "ac-xxx", "lana-123", "lana-123", ("g-purchase",), 19.99)
    assert rec.query == "vid=lana-123&session=lana-123&apikey=REDACTED"


async def test_conductrics_never_stores_the_api_key(sandbox: Sandbox, http: aiohttp.ClientSession) -> None:
    await conductrics(http, sandbox, {"commands": [{"g": "g-purchase", "v": 19.99}]})
    await conductrics(http, sandbox, {"commands": [{"g": "g-purchase"}]}, query="vid=v&session=s&apikey=wrong-key")
    async with http.get(f"{sandbox.url}/_sandbox/records?requests=true") as r:
        dumped = await r.text()
    assert "lana-123" in dumped and "REDACTED" in dumped
    assert APIKEY not in dumped and "wrong-key" not in dumped
    assert APIKEY not in repr(sandbox.__dict__)
    assert all("apikey=REDACTED" in e.query for e in sandbox.requests)


async def test_conductrics_several_commands(sandbox: Sandbox, http: aiohttp.ClientSession) -> None:
    status, body = await conductrics(http, sandbox, {"commands": [{"g": "g-a", "v": 5}, {"g": "g-b"}]},
                                     query="vid=v9&session=order-1&apikey=k-b", account="ac-two")
    assert status == 200 and [i["g"] for i in body["data"]["items"]] == ["g-a", "g-b"]
    assert [(r.project, r.goals, r.revenue) for r in sandbox.records] == [("ac-two", ("g-a",), 5.0),
                                                                           ("ac-two", ("g-b",), None)]


@pytest.mark.parametrize(
    ("query", "account", "status", "field"),
    [
        ("vid=v&session=s", "ac-xxx", 401, "apikey"),
        ("vid=v&session=s&apikey=wrong", "ac-xxx", 401, "apikey"),
        (f"vid=v&session=s&apikey={APIKEY}", "ac-unknown", 401, "apikey"),
        ("vid=v&session=s&apikey=k-a", "ac-xxx", 401, "apikey"),  # another account's key
        (f"session=s&apikey={APIKEY}", "ac-xxx", 400, "vid"),
        (f"vid=v&apikey={APIKEY}", "ac-xxx", 400, "session"),
    ],
)
async def test_conductrics_query_rules(
    sandbox: Sandbox, http: aiohttp.ClientSession, query: str, account: str, status: int, field: str
) -> None:
    got, body = await conductrics(http, sandbox, {"commands": [{"g": "g-purchase"}]}, query=query, account=account)
    assert (got, body["status"], body["field"]) == (status, status, field)
    assert sandbox.records == []


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "commands"),
        ({"commands": []}, "commands"),
        ({"commands": [{"v": 1}]}, "commands[0].g"),
        ({"commands": [{"g": ""}]}, "commands[0].g"),
        ({"commands": [{"g": "g-a"}, {"g": "g-b", "v": "1.00"}]}, "commands[1].v"),
        ([1, 2], "commands"),
    ],
)
async def test_conductrics_body_rules(sandbox: Sandbox, http: aiohttp.ClientSession, body: Any, field: str) -> None:
    status, err = await conductrics(http, sandbox, body)
    assert (status, err["field"]) == (400, field)
    assert sandbox.records == []


async def test_conductrics_without_configured_keys_accepts_any_key(http: aiohttp.ClientSession) -> None:
    async with Sandbox() as sb:
        assert (await conductrics(http, sb, {"commands": [{"g": "g"}]}, query="vid=v&session=s&apikey=any"))[0] == 200
        assert (await conductrics(http, sb, {"commands": [{"g": "g"}]}, query="vid=v&session=s"))[0] == 401


async def test_conductrics_no_selection_answers_empty_rs(sandbox: Sandbox, http: aiohttp.ClientSession) -> None:
    status, body = await conductrics(http, sandbox, {"commands": [{"g": "g-purchase", "v": 1}]},
                                     query=f"vid=never-selected&session=s&apikey={APIKEY}")
    assert (status, body) == (200, {"status": 200, "data": {"items": [{"g": "g-purchase", "rs": []}]}})
    assert sandbox.records == [] and len(sandbox.unrewarded) == 1
    sandbox.no_selection(all_vids=True)
    _, body = await conductrics(http, sandbox, {"commands": [{"g": "g-purchase"}]})
    assert body["data"]["items"][0]["rs"] == []
    sandbox.clear_faults()  # back to the constructor's rule: lana-123 is selected again
    _, body = await conductrics(http, sandbox, {"commands": [{"g": "g-purchase"}]})
    assert body["data"]["items"][0]["rs"] != []


async def test_conductrics_json_status_fault(sandbox: Sandbox, http: aiohttp.ClientSession) -> None:
    sandbox.json_status(500, times=1)
    status, body = await conductrics(http, sandbox, {"commands": [{"g": "g-purchase", "v": 19.99}]})
    assert status == 200 and body["status"] == 500 and "data" not in body
    assert sandbox.records == []
    status, body = await conductrics(http, sandbox, {"commands": [{"g": "g-purchase", "v": 19.99}]})
    assert (status, body["status"]) == (200, 200)
    assert [e.outcome for e in sandbox.requests] == ["fault:json_status", "accepted"]


async def test_conductrics_duplicates(sandbox: Sandbox, http: aiohttp.ClientSession) -> None:
    for _ in range(2):
        await conductrics(http, sandbox, {"commands": [{"g": "g-purchase", "v": 19.99}]},
                          query=f"vid=lana-123&session=order-1&apikey={APIKEY}")
    await conductrics(http, sandbox, {"commands": [{"g": "g-purchase", "v": 19.99}]},
                      query=f"vid=lana-123&session=order-2&apikey={APIKEY}")
    assert sandbox.duplicates() == {"conductrics|ac-xxx|lana-123|order-1|g-purchase": 2}


def test_redact_query() -> None:
    assert redact_query("vid=a&apikey=s&session=b") == "vid=a&apikey=REDACTED&session=b"
    assert redact_query("apikey=s") == "apikey=REDACTED"
    assert redact_query("myapikey=s") == "myapikey=s"


# --------------------------------------------------------------------------- faults


async def test_status_fault_n_times_then_recovers(sandbox: Sandbox, http: aiohttp.ClientSession) -> None:
    sandbox.fail("kameleoon", 503, times=2, retry_after=7)
    for _ in range(2):
        async with http.post(f"{sandbox.url}/visit/events?siteCode={SITE}&visitorCode=v&json=true", data=SEED_EVENT,
                             headers=UA) as r:
            assert r.status == 503
            assert r.headers["Retry-After"] == "7"
    assert (await post_events(http, sandbox, SEED_EVENT))[0] == 204
    assert [e.status for e in sandbox.requests] == [503, 503, 204]
    assert [e.outcome for e in sandbox.requests] == ["fault:status", "fault:status", "accepted"]
    assert len(sandbox.records) == 1
    assert sandbox.status_counts("kameleoon") == {503: 2, 204: 1}


async def test_faults_only_hit_their_provider(sandbox: Sandbox, http: aiohttp.ClientSession) -> None:
    sandbox.fail("convert", 429, times=None)
    assert (await post_events(http, sandbox, SEED_EVENT))[0] == 204
    for _ in range(3):
        status, _ = await convert_get(http, sandbox, "c=1&p=2&e=3-4&g=5&ga=1")
        assert status == 429
    sandbox.clear_faults()
    assert (await convert_get(http, sandbox, "c=1&p=2&e=3-4&g=5&ga=1"))[0] == 200


async def test_status_fault_without_retry_after_has_no_header(sandbox: Sandbox, http: aiohttp.ClientSession) -> None:
    sandbox.fail("kameleoon", 500)
    async with http.post(f"{sandbox.url}/visit/events?siteCode={SITE}&visitorCode=v&json=true", data=SEED_EVENT,
                         headers=UA) as r:
        assert r.status == 500 and "Retry-After" not in r.headers


async def test_probability_fault_is_seeded(http: aiohttp.ClientSession) -> None:
    async def run() -> list[int]:
        async with Sandbox() as sb:
            sb.fail("convert", 503, times=None, probability=0.5, seed=42)
            return [(await convert_get(http, sb, "c=1&p=2&e=3-4&g=5&ga=1"))[0] for _ in range(40)]

    first, second = await run(), await run()
    assert first == second
    assert 5 < first.count(503) < 35 and first.count(200) + first.count(503) == 40


async def test_latency_delays_every_request(sandbox: Sandbox, http: aiohttp.ClientSession) -> None:
    sandbox.set_latency("convert", 0.2)
    started = time.monotonic()
    statuses = await asyncio.gather(*(convert_get(http, sandbox, "c=1&p=2&e=3-4&g=5&ga=1") for _ in range(3)))
    elapsed = time.monotonic() - started
    assert [s for s, _ in statuses] == [200, 200, 200]
    assert 0.2 <= elapsed < 1.0  # concurrent: the delay is per request, not a queue
    started = time.monotonic()
    assert (await post_events(http, sandbox, SEED_EVENT))[0] == 204
    assert time.monotonic() - started < 0.2  # other providers are not delayed


async def test_hang_outlasts_the_client_timeout(sandbox: Sandbox, http: aiohttp.ClientSession) -> None:
    sandbox.hang("kameleoon", times=1)
    with pytest.raises(asyncio.TimeoutError):
        async with http.post(f"{sandbox.url}/visit/events?siteCode={SITE}&visitorCode=v&json=true", data=SEED_EVENT,
                             headers=UA, timeout=aiohttp.ClientTimeout(total=0.3)):
            pass
    assert (await post_events(http, sandbox, SEED_EVENT))[0] == 204
    assert [e.outcome for e in sandbox.requests] == ["fault:hang", "accepted"]
    assert len(sandbox.records) == 1


async def test_hang_is_released_by_stop(http: aiohttp.ClientSession) -> None:
    sb = Sandbox(hang_seconds=3600)
    await sb.start()
    sb.hang("convert")
    task = asyncio.create_task(convert_get(http, sb, "c=1&p=2&e=3-4&g=5&ga=1"))
    await sb.wait_until(lambda s: len(s.requests) == 1)
    started = time.monotonic()
    await sb.stop()
    with pytest.raises(aiohttp.ClientError):
        await task
    assert time.monotonic() - started < 5


async def test_connection_reset(sandbox: Sandbox, http: aiohttp.ClientSession) -> None:
    sandbox.reset_connections("conductrics", times=1)
    with pytest.raises(aiohttp.ClientConnectionError):
        await conductrics(http, sandbox, {"commands": [{"g": "g-purchase"}]})
    assert (await conductrics(http, sandbox, {"commands": [{"g": "g-purchase"}]}))[0] == 200
    assert [(e.status, e.outcome) for e in sandbox.requests] == [(0, "fault:reset"), (200, "accepted")]


async def test_token_endpoint_faults(sandbox: Sandbox, http: aiohttp.ClientSession) -> None:
    sandbox.fail("token", 503, times=1)
    assert (await get_token(http, sandbox))[0] == 503
    assert (await get_token(http, sandbox))[0] == 200
    assert sandbox.token_grants == 1


async def test_reject_rule_fails_chosen_visitors_and_goals_permanently(
    sandbox: Sandbox, http: aiohttp.ClientSession
) -> None:
    sandbox.reject("kameleoon", visitors=["bad-visitor"], goals=[666])
    q = f"siteCode={SITE}&json=true"
    for _ in range(2):
        status, err = await post_events(http, sandbox, [event(visitorCode="bad-visitor")], query=q)
        assert (status, err["field"]) == (400, "[0].visitor")
    status, err = await post_events(http, sandbox, [event(visitorCode="ok"), event("1111111111111111", 666,
                                                                                     visitorCode="ok")], query=q)
    assert (status, err["field"]) == (400, "[1].goal")
    assert (await post_events(http, sandbox, [event(visitorCode="ok")], query=q))[0] == 204
    sandbox.reject("convert", visitors=["v-bad"])
    assert (await convert_get(http, sandbox, "c=1&p=2&e=3-4&g=5&ga=1&vi=v-bad"))[0] == 400
    sandbox.reject("conductrics", goals=["g-never"])
    assert (await conductrics(http, sandbox, {"commands": [{"g": "g-never"}]}))[0] == 400
    assert sandbox.counts() == {"kameleoon": 1, "convert": 0, "conductrics": 0}


async def test_a_fault_with_a_duration_ends_by_itself(sandbox: Sandbox, http: aiohttp.ClientSession) -> None:
    started = time.monotonic()
    sandbox.fail("convert", 503, times=None, duration=0.4)  # down for 0.4 s, then up without being told
    statuses = []
    while time.monotonic() - started < 10:
        statuses.append((await convert_get(http, sandbox, "c=1&p=2&e=3-4&g=5&ga=1"))[0])
        if statuses[-1] != 503:
            break
    assert statuses[0] == 503 and statuses[-1] == 200 and set(statuses) == {503, 200}
    assert time.monotonic() - started >= 0.4
    assert sandbox._faults == []  # expired faults are dropped
    # The same over the control API; `times` still bounds it.
    async with http.post(f"{sandbox.url}/_sandbox/faults",
                         json={"provider": "convert", "status": 502, "times": 1, "duration": 60}) as r:
        assert r.status == 200
    assert [(await convert_get(http, sandbox, "c=1&p=2&e=3-4&g=5&ga=1"))[0] for _ in range(2)] == [502, 200]


async def test_credentials_can_be_changed_while_it_runs(sandbox: Sandbox, http: aiohttp.ClientSession) -> None:
    assert (await get_token(http, sandbox, "new-secret"))[0] == 401
    assert (await conductrics(http, sandbox, {"commands": [{"g": "g"}]}, "vid=v&session=s&apikey=new-key"))[0] == 401
    sandbox.set_credentials(kameleoon_clients={CLIENT_ID: "new-secret"})
    assert (await get_token(http, sandbox, "new-secret"))[0] == 200
    assert (await get_token(http, sandbox))[0] == 401  # the old secret no longer works
    async with http.post(f"{sandbox.url}/_sandbox/credentials", json={"conductrics_keys": {"ac-xxx": "new-key"}}) as r:
        assert r.status == 204
    assert (await conductrics(http, sandbox, {"commands": [{"g": "g"}]}, "vid=v&session=s&apikey=new-key"))[0] == 200
    assert (await conductrics(http, sandbox, {"commands": [{"g": "g"}]}))[0] == 401
    for bad in ({"kameleoon_clients": {CLIENT_ID: ""}}, {"conductrics_keys": ["k"]}, {"tokens": {}}, [1]):
        async with http.post(f"{sandbox.url}/_sandbox/credentials", json=bad) as r:
            assert r.status == 400, bad
    assert (await get_token(http, sandbox, "new-secret"))[0] == 200  # a refused change changed nothing


def test_fault_validation() -> None:
    with pytest.raises(ValueError, match="provider"):
        Fault("nobody")
    with pytest.raises(ValueError, match="kind"):
        Fault("kameleoon", kind="explode")
    with pytest.raises(ValueError, match="conductrics"):
        Fault("kameleoon", kind="json_status", status=500)
    with pytest.raises(ValueError, match="probability"):
        Fault("kameleoon", probability=1.5)
    for duration in (0.0, -1.0, float("inf")):
        with pytest.raises(ValueError, match="duration"):
            Fault("kameleoon", duration=duration)
    sb = Sandbox()
    with pytest.raises(SpecError):
        sb.apply_spec({"provider": "kameleoon", "duration": "soon"})
    with pytest.raises(SpecError):
        sb.apply_spec({"provider": "kameleoon", "colour": "red"})
    with pytest.raises(SpecError):
        sb.apply_spec([{"provider": "kameleoon", "times": 1}, {"kind": "reject", "provider": "token"}])
    assert sb._faults == []  # all or nothing


# --------------------------------------------------------------------------- control endpoints and waiting


async def test_control_endpoints(sandbox: Sandbox, http: aiohttp.ClientSession) -> None:
    spec = [
        {"kind": "status", "provider": "kameleoon", "status": 429, "times": 1, "retry_after": "3"},
        {"kind": "latency", "provider": "token", "seconds": 0.01},
        {"kind": "reject", "provider": "convert", "goals": ["13"]},
        {"kind": "json_status", "times": 1},
        {"kind": "no_selection", "vids": ["x"]},
    ]
    async with http.post(f"{sandbox.url}/_sandbox/faults", json=spec) as r:
        assert r.status == 200 and (await r.json())["added"] == 5
    async with http.post(f"{sandbox.url}/visit/events?siteCode={SITE}&visitorCode=v&json=true", data=SEED_EVENT,
                         headers=UA) as r:
        assert (r.status, r.headers["Retry-After"]) == (429, "3")
    assert (await convert_get(http, sandbox, "c=1&p=2&e=3-4&g=13&ga=1"))[0] == 400
    async with http.post(f"{sandbox.url}/_sandbox/faults", json={"provider": "nobody"}) as r:
        assert r.status == 400
    async with http.delete(f"{sandbox.url}/_sandbox/faults") as r:
        assert r.status == 204
    assert (await convert_get(http, sandbox, "c=1&p=2&e=3-4&g=13&ga=1"))[0] == 200
    assert (await post_events(http, sandbox, SEED_EVENT))[0] == 204
    assert (await post_events(http, sandbox, SEED_EVENT))[0] == 204

    async with http.get(f"{sandbox.url}/_sandbox/records") as r:
        summary = await r.json()
    assert summary["counts"] == {"kameleoon": 2, "convert": 1, "conductrics": 0}
    assert summary["duplicates"] == {f"kameleoon|{SITE}|a2bb4d22083348ef": 2}
    assert summary["statuses"]["kameleoon"] == {"429": 1, "204": 2}
    assert [r["provider"] for r in summary["records"]] == ["convert", "kameleoon", "kameleoon"]
    assert "request_log" not in summary
    async with http.get(f"{sandbox.url}/_sandbox/records?records=false&requests=true") as r:
        slim = await r.json()
    assert "records" not in slim and len(slim["request_log"]) == summary["requests"] == 5

    async with http.post(f"{sandbox.url}/_sandbox/reset") as r:
        assert r.status == 204
    assert sandbox.records == [] and sandbox.requests == [] and sandbox.counts()["kameleoon"] == 0


async def test_token_control_endpoints(sandbox: Sandbox, http: aiohttp.ClientSession) -> None:
    _, tok = await get_token(http, sandbox)
    bearer = {**UA, "Authorization": f"Bearer {tok['access_token']}"}
    q = f"siteCode={AUTH_SITE}&visitorCode=v&json=true"
    assert (await post_events(http, sandbox, SEED_EVENT, query=q, headers=bearer))[0] == 204
    async with http.post(f"{sandbox.url}/_sandbox/tokens/expire") as r:
        assert r.status == 204
    assert (await post_events(http, sandbox, SEED_EVENT, query=q, headers=bearer))[0] == 401
    _, tok = await get_token(http, sandbox)
    bearer = {**UA, "Authorization": f"Bearer {tok['access_token']}"}
    async with http.post(f"{sandbox.url}/_sandbox/tokens/revoke") as r:
        assert r.status == 204
    assert (await post_events(http, sandbox, SEED_EVENT, query=q, headers=bearer))[0] == 401


async def test_wait_for_records(sandbox: Sandbox, http: aiohttp.ClientSession) -> None:
    async def send() -> None:
        for i in range(3):
            await post_events(http, sandbox, [event(f"{i:016x}")])

    task = asyncio.create_task(send())
    await sandbox.wait_for_records(3, "kameleoon", timeout=5)
    assert len(sandbox.records) == 3
    await task
    with pytest.raises(TimeoutError):
        await sandbox.wait_for_records(4, timeout=0.05)


def test_records_are_plain_dataclasses() -> None:
    rec = Record("kameleoon", "visit/events", "s", "v", "visitor", ("1",), None, "k", "", 0.0, 0)
    with pytest.raises(AttributeError):
        rec.visitor = "other"  # type: ignore[misc]


def test_load_options(tmp_path: Path) -> None:
    p = tmp_path / "sandbox.json"
    p.write_text(json.dumps({"kameleoon_auth_sites": ["s"], "conductrics_keys": {"ac": "k"}}))
    opts = load_options(p)
    assert Sandbox(**opts).auth_sites == frozenset({"s"})
    p.write_text(json.dumps({"colour": "red"}))
    with pytest.raises(ValueError, match="colour"):
        load_options(p)


def test_serve_runs_until_sigterm() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = (f"from consumer.sandbox import serve; serve('127.0.0.1', {port}, "
            f"conductrics_keys={{'ac-xxx': {APIKEY!r}}})")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    with subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env) as proc:
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            assert line.strip() == f"provider sandbox listening on http://127.0.0.1:{port}"

            async def probe() -> tuple[int, Any]:
                async with aiohttp.ClientSession() as http, http.post(
                    f"http://127.0.0.1:{port}/ac-xxx/v3/agent-api?vid=v&session=s&apikey={APIKEY}",
                    json={"commands": [{"g": "g"}]},
                ) as r:
                    return r.status, await r.json()

            assert asyncio.run(probe())[0] == 200
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=10) == 0
        finally:
            if proc.poll() is None:  # an assertion above failed
                proc.kill()
                proc.wait()

async def test_request_log_can_be_turned_off_for_benchmarks(http: aiohttp.ClientSession) -> None:
    async with Sandbox(request_log=False) as sb:
        sb.fail("convert", 503)
        assert (await convert_get(http, sb, "c=1&p=2&e=3-4&g=5&ga=1"))[0] == 503
        assert (await convert_get(http, sb, "c=1&p=2&e=3-4&g=5&ga=1"))[0] == 200
        assert sb.requests == []
        assert sb.status_counts("convert") == {503: 1, 200: 1}
        assert sb.records[0].request_id == 1
        assert sb.summary()["requests"] == 2


async def test_kameleoon_shows_a_conversion_only_once_the_visit_is_processed(
        sandbox: Sandbox, http: aiohttp.ClientSession) -> None:
    """As seed 001 says: without Feature Experimentation the conversion appears after the visit is processed."""
    kameleoon = sandbox.emulator("kameleoon")
    assert isinstance(kameleoon, KameleoonEmulator)
    kameleoon.kameleoon_visit_delay = 3600.0
    await post_events(http, sandbox, [event()])
    get = f"{sandbox.url}/visit/visitor?siteCode={SITE}&visitorCode=245fc&maxNumberPreviousVisits=5&conversion=true"
    async with http.get(get, headers=UA) as r:
        assert await r.json() == {"previousVisits": []}
    kameleoon.kameleoon_visit_delay = 0.0  # the hour has passed
    async with http.get(get, headers=UA) as r:
        [visit] = (await r.json())["previousVisits"]
    assert [c["data"]["goalId"] for c in visit["conversionEvents"]] == [36151]


async def test_kameleoon_visit_delay_is_an_option_of_the_kameleoon_emulator(http: aiohttp.ClientSession) -> None:
    """`Sandbox(kameleoon_visit_delay=...)` (and `--options`) reaches the Kameleoon emulator."""
    async with Sandbox(kameleoon_visit_delay=1800.0) as sb:
        assert sb.kameleoon_visit_delay == 1800.0
        await post_events(http, sb, [event()])
        get = f"{sb.url}/visit/visitor?siteCode={SITE}&visitorCode=245fc&maxNumberPreviousVisits=5&conversion=true"
        async with http.get(get, headers=UA) as r:
            assert await r.json() == {"previousVisits": []}
