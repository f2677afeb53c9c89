"""The dispatcher against the sandbox through outages and refused credentials: nothing dead-lettered, all once.

Outages longer than the old `max_elapsed` wait for the provider; `give_up_after` restores a give-up age;
a 401 after re-authentication, a 403 or a refused token grant pauses the provider project until a probe
or a resume finds the credentials working; an operator's pause holds batches until resumed.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from decimal import Decimal
from typing import Any

import pytest

from consumer.config import parse
from consumer.delivery import AmbiguousProject, Dispatcher, ProjectStatus, Result, Status, UnknownProject, each
from consumer.metrics import Metrics
from consumer.model import Conversion, Identity, Provider
from consumer.providers.conductrics.emulator import CONDUCTRICS
from consumer.providers.kameleoon.keys import nonce
from consumer.providers.registry import modules
from consumer.sandbox import Fault, Sandbox
from consumer.transport import TokenCache, Transport
from tests.reliability.harness import wait_for

SITE = "f17c21u1ag"
CONVERT = "1111_2222"
ACCOUNT = "ac-xxx"
FAST_RETRY = {"base_delay": "5ms", "max_delay": "50ms"}
FAST_BREAKER = {"timeout": "1s", "breaker_failures": 3, "breaker_cooldown": "200ms", "concurrency": 4}


def config(url: str, *, retry: dict[str, Any] | None = None, client_secret: str | None = None,
           api_key: str = "api-1234567890") -> dict[str, Any]:
    retry = {**FAST_RETRY, **(retry or {})}
    kameleoon: dict[str, Any] = {"base_url": url, "goals": [36151]}
    if client_secret is not None:
        kameleoon |= {"client_id": "client-1", "client_secret": client_secret}
    return {
        "kafka": {"bootstrap_servers": "unused:1", "topic": "t", "group_id": "g", "dlq_topic": "t.dlq"},
        "kameleoon": {"user_agent": "tests/1.0", "token_url": f"{url}/oauth/token", "batch": {"linger": "10ms"},
                      "retry": retry, "flow": FAST_BREAKER, "projects": {SITE: kameleoon}},
        "convert": {"retry": retry, "flow": FAST_BREAKER,
                    "projects": {CONVERT: {"base_url": url, "goals": ["100"]}}},
        "conductrics": {"retry": retry, "flow": FAST_BREAKER,
                        "projects": {ACCOUNT: {"agent_api_url": f"{url}/{ACCOUNT}/v3/agent-api", "api_key": api_key,
                                               "goals": ["g-purchase"]}}},
    }


def kameleoon(i: int) -> Conversion:
    v = f"visitor-{i}"
    return Conversion(Provider.KAMELEOON, SITE, v, ("36151",), Decimal("10.00"), nonce(SITE, f"o{i}", "36151", v),
                      f"e{i}", f"o{i}", 0, 1, Identity.VISITOR)


def convert(i: int) -> Conversion:
    return Conversion(Provider.CONVERT, CONVERT, f"v-{i}", ("100",), Decimal("12.50"), f"k-{i}", f"e{i}", f"o{i}", 0,
                      1, Identity.VISITOR, experiment_id="100", variation_id="200", transaction_goals=("100",))


def conductrics(i: int) -> Conversion:
    return Conversion(Provider.CONDUCTRICS, ACCOUNT, f"vid-{i}", ("g-purchase",), Decimal("5.00"), f"c-{i}", f"e{i}",
                      f"o{i}", 0, 1, Identity.VISITOR)


class Harness:
    def __init__(self, cfg_data: dict[str, Any]) -> None:
        cfg = parse(cfg_data, env={})
        self.transport = Transport()
        self.tokens = TokenCache(self.transport, "tests/1.0")
        self.metrics = Metrics()
        self.results: dict[str, list[Result]] = {}
        self.changes: list[ProjectStatus] = []
        self.dispatcher = Dispatcher(modules(cfg), self.transport, self.tokens, self.metrics,
                                     each(lambda _t, c, r: self.results.setdefault(c.key, []).append(r)),
                                     projects=cfg.rules(), on_pause=self.changes.append)

    def submit(self, conversions: list[Conversion]) -> None:
        for c in conversions:
            self.dispatcher.submit(c, None)

    def status(self, project: str) -> ProjectStatus:
        return self.dispatcher.status(project)

    def paused_gauge(self, provider: str, project: str, reason: str) -> float | None:
        return self.metrics.registry.get_sample_value(
            "offline_conversions_project_paused", {"provider": provider, "project": project, "reason": reason})

    def statuses_of_results(self) -> set[Status]:
        return {r.status for rs in self.results.values() for r in rs}

    async def close(self) -> None:
        await self.dispatcher.close()
        await self.transport.close()


@pytest.fixture
async def harness_for(sandbox: Sandbox) -> AsyncIterator[Callable[..., Harness]]:
    made: list[Harness] = []

    def make(**kw: Any) -> Harness:
        h = Harness(config(sandbox.url, **kw))
        made.append(h)
        return h

    yield make
    for h in made:
        await h.close()


def delivered_once(results: dict[str, list[Result]], conversions: list[Conversion]) -> bool:
    return sorted(results) == sorted(c.key for c in conversions) and all(
        [r.status for r in rs] == [Status.DELIVERED] for rs in results.values())


# ------------------------------------------------------------------ transient outages


async def test_an_outage_longer_than_max_elapsed_dead_letters_nothing(
    sandbox: Sandbox, harness_for: Callable[..., Harness],
) -> None:
    # The old configuration would have dead-lettered everything after 2 s (and after 4 attempts).
    h = harness_for(retry={"max_elapsed": "2s", "max_attempts": 4})
    items = [conductrics(i) for i in range(40)]
    outage = 5.0
    started = time.monotonic()
    sandbox.fail(CONDUCTRICS, 503, times=None, duration=outage / 2)
    sandbox.add_fault(Fault(CONDUCTRICS, "json_status", 500, None, duration=outage))  # then Conductrics' JSON 500
    h.submit(items)
    await wait_for(lambda: h.status(ACCOUNT).state == "failed", 10, "the circuit to open")
    s = h.status(ACCOUNT)
    assert s.circuit in ("open", "half_open") and s.in_flight == 40 and s.reason is not None
    # Bounded during the outage: at most twice the concurrency limit of senders; the rest queued as tuples.
    lane = h.dispatcher.lanes[(Provider.CONDUCTRICS, ACCOUNT)]
    assert len(h.dispatcher.tasks) <= 2 * 4 and len(lane.backlog) >= 40 - 2 * 4
    assert await h.dispatcher.wait_idle(30)
    assert time.monotonic() - started >= outage  # nothing ended before the provider came back
    assert delivered_once(h.results, items)
    assert sandbox.counts()["conductrics"] == 40 and sandbox.duplicates() == {}
    faulted = sum(n for st, n in sandbox.status_counts("conductrics").items() if st == 503)
    assert faulted >= 3  # the outage was seen
    # The breaker kept probing instead of every sender hammering: a few requests per cool-down, not hundreds.
    assert len(sandbox.requests) - 40 < 5 * outage / 0.2, len(sandbox.requests)
    s = h.status(ACCOUNT)
    assert (s.state, s.circuit, s.in_flight) == ("running", "closed", 0)
    assert s.counts["delivered"] == 40 and s.counts["dead_lettered"] == 0 and s.counts["retries"] > 0


async def test_give_up_after_dead_letters_an_outage_once_it_is_that_old(
    sandbox: Sandbox, harness_for: Callable[..., Harness],
) -> None:
    h = harness_for(retry={"give_up_after": "1s"})
    items = [kameleoon(i) for i in range(10)]
    sandbox.fail("kameleoon", 500, times=None)  # down until cleared: longer than the give-up age
    started = time.monotonic()
    h.submit(items)
    assert await h.dispatcher.wait_idle(20)
    assert time.monotonic() - started >= 1.0
    assert sorted(h.results) == sorted(c.key for c in items)
    for rs in h.results.values():
        assert [r.status for r in rs] == [Status.FAILED]
        assert rs[0].outcome.reason == "gave up after 1s: http 500" and rs[0].outcome.status == 500
    assert h.status(SITE).counts["dead_lettered"] == 10 and sandbox.counts()["kameleoon"] == 0


# ------------------------------------------------------------------ refused credentials


async def test_a_refused_client_secret_pauses_and_a_probe_resumes_once_it_works() -> None:
    sandbox = Sandbox(kameleoon_auth_sites=[SITE], kameleoon_clients={"client-1": "the-right-secret"})
    await sandbox.start()
    h = Harness(config(sandbox.url, client_secret="rotated-secret", retry={"auth_probe_interval": "200ms"}))
    items = [kameleoon(i) for i in range(30)]
    try:
        h.submit(items)
        await wait_for(lambda: h.status(SITE).state == "paused", 10, "the project to pause")
        s = h.status(SITE)
        assert (s.paused_by, s.reason) == ("credentials", "credentials refused: token endpoint answered 401")
        assert s.since is not None and s.in_flight == 30 and s.last_error == "token endpoint answered 401"
        assert "rotated-secret" not in repr(s) and "the-right-secret" not in repr(s)
        assert h.paused_gauge("kameleoon", SITE, "credentials") == 1.0
        assert h.paused_gauge("kameleoon", SITE, "operator") == 0.0
        assert h.dispatcher.paused() == {f"kameleoon/{SITE}": f"credentials: {s.reason}"}
        # Probed, not flooded: a refused grant every 200 ms at most while it waits.
        await wait_for(lambda: sandbox.status_counts("token").get(401, 0) >= 3, 10, "probes")
        assert h.results == {} and sandbox.counts()["kameleoon"] == 0
        refusals = sandbox.status_counts("token")[401]
        sandbox.set_credentials(kameleoon_clients={"client-1": "rotated-secret"})  # the provider side is fixed
        assert await h.dispatcher.wait_idle(10)
        assert delivered_once(h.results, items)
        assert sorted(sandbox.kameleoon_nonces()) == sorted(c.key for c in items) and sandbox.duplicates() == {}
        assert sandbox.status_counts("token")[401] <= refusals + 1
        s = h.status(SITE)
        assert (s.state, s.paused_by, s.reason, s.counts["delivered"]) == ("running", None, None, 30)
        assert h.paused_gauge("kameleoon", SITE, "credentials") == 0.0
        assert [(c.state, c.paused_by) for c in h.changes] == [("paused", "credentials"), ("running", None)]
        assert h.dispatcher.pause_changes == 2
    finally:
        await h.close()
        await sandbox.stop()


async def test_a_401_after_reauthentication_pauses_and_the_probe_reauthenticates() -> None:
    sandbox = Sandbox(kameleoon_auth_sites=[SITE], kameleoon_clients={"client-1": "s"})
    await sandbox.start()
    h = Harness(config(sandbox.url, client_secret="s", retry={"auth_probe_interval": "200ms"}))
    items = [kameleoon(i) for i in range(10)]
    try:
        sandbox.fail("kameleoon", 401, times=None)  # the token is granted, every request refused
        h.submit(items)
        await wait_for(lambda: h.status(SITE).paused_by == "credentials", 10, "the project to pause")
        assert h.status(SITE).reason == "credentials refused: token refused"
        await wait_for(lambda: sandbox.token_grants >= 3, 10, "a probe that re-authenticates first")
        assert h.results == {}
        sandbox.clear_faults()
        assert await h.dispatcher.wait_idle(10)
        assert delivered_once(h.results, items) and sandbox.duplicates() == {}
        assert h.status(SITE).state == "running"
    finally:
        await h.close()
        await sandbox.stop()


async def test_a_403_pauses_and_the_probe_resumes(sandbox: Sandbox, harness_for: Callable[..., Harness]) -> None:
    h = harness_for(retry={"auth_probe_interval": "100ms"})
    items = [convert(i) for i in range(20)]
    sandbox.fail("convert", 403, times=None)
    h.submit(items)
    await wait_for(lambda: h.status(CONVERT).paused_by == "credentials", 10, "the project to pause")
    assert h.status(CONVERT).reason == "credentials refused: http 403"
    await wait_for(lambda: sandbox.status_counts("convert").get(403, 0) >= 3, 10, "probes")
    # One probe per interval, not the 20 waiting conversions each time.
    assert sandbox.status_counts("convert")[403] < 2 * 4 + 20
    assert h.results == {}
    sandbox.clear_faults()
    assert await h.dispatcher.wait_idle(10)
    assert delivered_once(h.results, items) and sandbox.counts()["convert"] == 20 and sandbox.duplicates() == {}


async def test_an_explicit_resume_retries_at_once(sandbox: Sandbox, harness_for: Callable[..., Harness]) -> None:
    h = harness_for(api_key="not-the-key", retry={"auth_probe_interval": "1h"})  # only a resume can end it
    items = [conductrics(i) for i in range(12)]
    h.submit(items)
    await wait_for(lambda: h.status(ACCOUNT).paused_by == "credentials", 10, "the project to pause")
    s = h.status(ACCOUNT)
    assert s.reason == "credentials refused: unauthorized (api key?)" and "not-the-key" not in repr(s)
    assert h.paused_gauge("conductrics", ACCOUNT, "credentials") == 1.0
    await wait_for(lambda: len(h.dispatcher.lanes[(Provider.CONDUCTRICS, ACCOUNT)].backlog) == 12, 10,
                   "every batch parked")
    sandbox.set_credentials(conductrics_keys={ACCOUNT: "not-the-key"})
    h.dispatcher.resume(ACCOUNT)
    assert await h.dispatcher.wait_idle(10)
    assert delivered_once(h.results, items) and sandbox.counts()["conductrics"] == 12
    assert h.paused_gauge("conductrics", ACCOUNT, "credentials") == 0.0
    # Still refused after a resume: paused again, nothing dead-lettered.
    sandbox.set_credentials(conductrics_keys={ACCOUNT: "another-key"})
    more = [conductrics(i) for i in range(100, 104)]
    h.submit(more)
    await wait_for(lambda: h.status(ACCOUNT).paused_by == "credentials", 10, "the project to pause again")
    assert h.statuses_of_results() == {Status.DELIVERED}


async def test_other_providers_keep_delivering_while_one_project_is_paused(
    sandbox: Sandbox, harness_for: Callable[..., Harness],
) -> None:
    h = harness_for(api_key="not-the-key")
    h.submit([conductrics(i) for i in range(5)])
    await wait_for(lambda: h.status(ACCOUNT).paused_by == "credentials", 10, "the project to pause")
    others = [kameleoon(i) for i in range(10)] + [convert(i) for i in range(10)]
    h.submit(others)
    await wait_for(lambda: len(h.results) == 20, 10, "the other providers' deliveries")
    assert delivered_once(h.results, others)
    assert {s.provider: s.state for s in h.dispatcher.statuses()} == {
        "conductrics": "paused", "convert": "running", "kameleoon": "running"}


# ------------------------------------------------------------------ an operator's pause


async def test_an_operator_pause_holds_batches_and_resume_releases_them(
    sandbox: Sandbox, harness_for: Callable[..., Harness],
) -> None:
    h = harness_for()
    h.dispatcher.pause(SITE, "provider maintenance\nuntil 10:00")
    s = h.status(SITE)
    assert (s.state, s.paused_by, s.reason) == ("paused", "operator", "provider maintenance until 10:00")
    assert h.paused_gauge("kameleoon", SITE, "operator") == 1.0
    items = [kameleoon(i) for i in range(25)]
    h.submit(items)
    lane_key = (Provider.KAMELEOON, SITE)
    await wait_for(lambda: lane_key in h.dispatcher.lanes and h.dispatcher.lanes[lane_key].backlog, 10,
                   "the batch to be queued behind the pause")
    assert h.status(SITE).in_flight == 25
    assert sandbox.requests == [] and h.results == {}
    h.dispatcher.resume(SITE)
    assert await h.dispatcher.wait_idle(10)
    assert delivered_once(h.results, items) and len(sandbox.kameleoon_nonces()) == 25
    assert h.paused_gauge("kameleoon", SITE, "operator") == 0.0
    assert [(c.state, c.paused_by) for c in h.changes] == [("paused", "operator"), ("running", None)]


async def test_an_operator_pause_during_an_outage_parks_the_retrying_batches(
    sandbox: Sandbox, harness_for: Callable[..., Harness],
) -> None:
    h = harness_for()
    items = [conductrics(i) for i in range(20)]
    sandbox.fail(CONDUCTRICS, 503, times=None)
    h.submit(items)
    await wait_for(lambda: h.status(ACCOUNT).state == "failed", 10, "the circuit to open")
    h.dispatcher.pause(ACCOUNT, "provider incident", provider="conductrics")
    lane = h.dispatcher.lanes[(Provider.CONDUCTRICS, ACCOUNT)]
    await wait_for(lambda: not h.dispatcher.tasks and len(lane.backlog) == 20, 10, "every sender to park")
    sandbox.clear_faults()
    seen = len(sandbox.requests)
    h.dispatcher.resume(ACCOUNT, provider="conductrics")
    assert await h.dispatcher.wait_idle(10)
    assert delivered_once(h.results, items) and len(sandbox.requests) >= seen + 20


def test_pause_and_resume_name_a_project_unambiguously() -> None:
    data = config("http://127.0.0.1:9")
    data["conductrics"]["projects"][SITE] = {**data["conductrics"]["projects"].pop(ACCOUNT)}  # the same name twice
    cfg = parse(data, env={})
    d = Dispatcher(modules(cfg), Transport(), TokenCache(Transport(), "t"), Metrics(), lambda _i, _r: None,
                   projects=cfg.rules())
    with pytest.raises(AmbiguousProject, match="name the provider"):
        d.pause(SITE, "x")
    with pytest.raises(UnknownProject):
        d.pause("nope", "x")
    with pytest.raises(UnknownProject):
        d.resume(SITE, provider="optimizely")
    d.pause(SITE, "x", provider="conductrics")
    assert [(s.provider, s.state) for s in d.statuses() if s.project == SITE] == [
        ("conductrics", "paused"), ("kameleoon", "running")]
    d.resume(SITE, provider=Provider.CONDUCTRICS)
    assert {s.state for s in d.statuses()} == {"running"}
    assert d.pause_changes == 2
