"""The delivery layer against the sandbox, without Kafka: batching, splitting, retries, OAuth, timeouts."""

from __future__ import annotations

from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any

import pytest

from consumer.config import parse
from consumer.delivery import Dispatcher, Result, Status, each
from consumer.metrics import Metrics
from consumer.model import Conversion, Identity, Provider
from consumer.providers.kameleoon.keys import nonce
from consumer.providers.registry import modules
from consumer.sandbox import Sandbox
from consumer.transport import TokenCache, Transport
from tests.reliability.harness import wait_for

SITE = "f17c21u1ag"


def kameleoon_config(url: str, **project: Any) -> dict[str, Any]:
    return {
        "kafka": {"bootstrap_servers": "unused:1", "topic": "t", "group_id": "g", "dlq_topic": "t.dlq"},
        "kameleoon": {
            "user_agent": "tests/1.0",
            "token_url": f"{url}/oauth/token",
            "batch": {"linger": "30ms", "max_events": 500},
            "retry": {"base_delay": "5ms", "max_delay": "50ms", "max_attempts": 4},
            "flow": {"timeout": "500ms", "breaker_failures": 50},
            "projects": {SITE: {"base_url": url, "goals": [36151], **project}},
        },
    }


def conversion(i: int, visitor: str | None = None) -> Conversion:
    v = visitor or f"visitor-{i}"
    return Conversion(Provider.KAMELEOON, SITE, v, ("36151",), Decimal("10.00"), nonce(SITE, f"o{i}", "36151", v),
                      f"e{i}", f"o{i}", 0, 1, Identity.VISITOR)


class Harness:
    def __init__(self, cfg_data: dict[str, Any]) -> None:
        cfg = parse(cfg_data, env={})
        self.transport = Transport()
        self.tokens = TokenCache(self.transport, "tests/1.0")
        self.metrics = Metrics()
        self.results: dict[str, Result] = {}
        self.dispatcher = Dispatcher(modules(cfg), self.transport, self.tokens, self.metrics,
                                     each(lambda _t, c, r: self.results.__setitem__(c.key, r)))

    async def deliver(self, conversions: list[Conversion], timeout: float = 20) -> dict[str, Result]:
        for c in conversions:
            self.dispatcher.submit(c, None)
        assert await self.dispatcher.wait_idle(timeout)
        return self.results

    async def close(self) -> None:
        await self.dispatcher.close()
        await self.transport.close()


@pytest.fixture
async def harness(sandbox: Sandbox) -> AsyncIterator[Harness]:
    h = Harness(kameleoon_config(sandbox.url))
    yield h
    await h.close()


async def test_many_visitors_share_one_request(sandbox: Sandbox, harness: Harness) -> None:
    results = await harness.deliver([conversion(i) for i in range(120)])
    assert {r.status for r in results.values()} == {Status.DELIVERED}
    assert len({r.request_id for r in sandbox.records}) == 1  # one POST for 120 visitors
    assert sorted(sandbox.kameleoon_nonces()) == sorted(c.key for c in (conversion(i) for i in range(120)))


async def test_a_batch_opened_by_an_overflow_still_lingers_out(sandbox: Sandbox) -> None:
    # A byte limit of about ten events: each new batch is opened by an event that did not fit the
    # previous one. After the last event nothing else arrives, so only the linger timer of the batch
    # it opened can send it (a batch opened that way once had no timer and waited for shutdown).
    cfg = kameleoon_config(sandbox.url)
    cfg["kameleoon"]["batch"] = {"linger": "30ms", "max_events": 500, "max_bytes": 1500}
    h = Harness(cfg)
    try:
        results = await h.deliver([conversion(i) for i in range(25)], timeout=5)
    finally:
        await h.close()
    assert len(results) == 25 and {r.status for r in results.values()} == {Status.DELIVERED}
    sizes = sorted(len(r) for r in _events_per_request(sandbox))
    assert sum(sizes) == 25 and len(sizes) >= 3, sizes


def _events_per_request(sandbox: Sandbox) -> list[list[str]]:
    by_request: dict[str, list[str]] = {}
    for r in sandbox.records:
        by_request.setdefault(r.request_id, []).append(r.nonce or "")
    return list(by_request.values())


async def test_a_413_splits_the_batch_until_it_fits() -> None:
    sandbox = Sandbox(kameleoon_max_body=4000)
    await sandbox.start()
    h = Harness(kameleoon_config(sandbox.url))
    try:
        results = await h.deliver([conversion(i) for i in range(100)])  # ~12 kB in one batch
        assert {r.status for r in results.values()} == {Status.DELIVERED}
        assert len(sandbox.kameleoon_nonces()) == 100 and sandbox.duplicates() == {}
        assert sandbox.status_counts("kameleoon").get(413, 0) >= 1
    finally:
        await h.close()
        await sandbox.stop()


async def test_a_400_is_bisected_so_only_the_bad_event_fails(sandbox: Sandbox, harness: Harness) -> None:
    sandbox.reject("kameleoon", visitors=["bad-visitor"])
    items = [conversion(i) for i in range(30)] + [conversion(99, "bad-visitor")]
    results = await harness.deliver(items)
    failed = [k for k, r in results.items() if r.status is Status.FAILED]
    assert failed == [conversion(99, "bad-visitor").key]
    assert results[failed[0]].outcome.status == 400
    assert len(sandbox.kameleoon_nonces()) == 30


async def test_transient_errors_are_retried_within_the_budget(sandbox: Sandbox, harness: Harness) -> None:
    sandbox.fail("kameleoon", 503, times=2)
    sandbox.fail("kameleoon", 429, times=1, retry_after=0)
    results = await harness.deliver([conversion(1)])
    assert results[conversion(1).key].status is Status.DELIVERED
    assert results[conversion(1).key].attempts == 4


async def test_an_outage_past_give_up_after_fails_with_the_last_reason(sandbox: Sandbox) -> None:
    # Without give_up_after a transient failure waits for the provider (tests/test_delivery_pause.py).
    cfg = kameleoon_config(sandbox.url)
    cfg["kameleoon"]["retry"]["give_up_after"] = "300ms"
    h = Harness(cfg)
    sandbox.fail("kameleoon", 500, times=None)
    try:
        results = await h.deliver([conversion(1)])
    finally:
        await h.close()
    r = results[conversion(1).key]
    assert r.status is Status.FAILED and r.attempts >= 2
    assert r.outcome.reason == "gave up after 0.3s: http 500" and r.outcome.status == 500


async def test_a_hang_times_out_and_is_retried(sandbox: Sandbox, harness: Harness) -> None:
    sandbox.hang("kameleoon", times=1, seconds=5)
    sandbox.reset_connections("kameleoon", times=1)
    results = await harness.deliver([conversion(1)])
    assert results[conversion(1).key].status is Status.DELIVERED
    assert results[conversion(1).key].attempts == 3


async def test_oauth_token_is_fetched_once_and_replaced_after_a_401() -> None:
    sandbox = Sandbox(kameleoon_auth_sites=[SITE], kameleoon_clients={"client-1": "very-secret"})
    await sandbox.start()
    h = Harness(kameleoon_config(sandbox.url, client_id="client-1", client_secret="very-secret"))
    try:
        await h.deliver([conversion(i) for i in range(5)])
        await h.deliver([conversion(i) for i in range(5, 10)])
        assert sandbox.token_grants == 1  # cached across requests
        sandbox.revoke_tokens()
        results = await h.deliver([conversion(i) for i in range(10, 15)])
        assert {r.status for r in list(results.values())[10:]} == {Status.DELIVERED}
        assert sandbox.token_grants == 2 and len(sandbox.kameleoon_nonces()) == 15
        assert sandbox.status_counts("kameleoon").get(401) == 1  # retried once with a new token
    finally:
        await h.close()
        await sandbox.stop()


async def test_refused_client_credentials_pause_without_the_secret(caplog: pytest.LogCaptureFixture) -> None:
    sandbox = Sandbox(kameleoon_auth_sites=[SITE], kameleoon_clients={"client-1": "very-secret"})
    await sandbox.start()
    h = Harness(kameleoon_config(sandbox.url, client_id="client-1", client_secret="wrong-secret-value"))
    try:
        h.dispatcher.submit(conversion(1), None)
        await wait_for(lambda: any(s.state == "paused" for s in h.dispatcher.statuses()), 10, "the pause")
        (status,) = h.dispatcher.statuses()
        assert (status.state, status.paused_by, status.in_flight) == ("paused", "credentials", 1)
        assert status.reason == "credentials refused: token endpoint answered 401"
        assert h.results == {} and sandbox.counts()["kameleoon"] == 0
        assert "wrong-secret-value" not in repr(status) and "wrong-secret-value" not in caplog.text
    finally:
        await h.close()
        await sandbox.stop()
