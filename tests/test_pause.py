"""Pure logic of pausing a provider project (flow.Pause, delivery.refused) and its retry settings, in milliseconds."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from consumer.config import ConfigErrors, FlowConfig, RetryConfig, parse
from consumer.delivery import refused
from consumer.flow import BreakerState, Gate, Pause, PausedBy
from consumer.providers.base import Outcome, Verdict, classify_status
from consumer.providers.conductrics import ConductricsModule
from consumer.providers.kameleoon import KameleoonModule

# ------------------------------------------------------------------ which answers pause a project


@pytest.mark.parametrize(("outcome", "pauses"), [
    (Outcome(Verdict.PERMANENT, "http 401", 401), True),  # Convert: no re-authentication to try
    (Outcome(Verdict.REAUTH, "token refused", 401), True),  # a 401 after the one re-authentication
    (Outcome(Verdict.PERMANENT, "forbidden (user-agent?)", 403), True),
    (Outcome(Verdict.PERMANENT, "http 400", 400), False),  # the conversion is bad, not the credentials
    (Outcome(Verdict.PERMANENT, "http 404", 404), False),
    (Outcome(Verdict.RETRY, "http 503", 503), False),
    (Outcome(Verdict.RETRY, "http 429", 429), False),
    (Outcome(Verdict.DELIVERED, "ok", 200), False),
    (Outcome(Verdict.RETRY, "json status 500", 200), False),  # Conductrics' JSON 500: transient
])
def test_only_refused_credentials_pause(outcome: Outcome, pauses: bool) -> None:
    assert refused(outcome) is pauses


def test_what_the_provider_modules_answer_for_401_and_403_pauses() -> None:
    from consumer.providers.base import HttpRequest
    request = HttpRequest("POST", "http://x/", {"Authorization": "Bearer t"}, b"[]")
    conductrics = ConductricsModule.__new__(ConductricsModule)
    kameleoon = KameleoonModule.__new__(KameleoonModule)
    assert refused(conductrics.classify(request, 401, {}, b""))
    assert refused(conductrics.classify(request, 403, {}, b""))
    assert refused(kameleoon.classify(request, 403, {}, b""))
    # Kameleoon's first 401 re-authenticates (the dispatcher retries once); a second one is a refusal.
    assert kameleoon.classify(request, 401, {}, b"").verdict is Verdict.REAUTH
    assert refused(classify_status(401, {})) and refused(classify_status(403, {}))
    assert not refused(classify_status(500, {}))


# ------------------------------------------------------------------ the pause state machine


def test_refused_credentials_pause_and_are_probed_every_interval() -> None:
    p = Pause()
    assert not p.held and p.paused_by is None and p.reason is None
    assert p.refused("credentials refused: http 401", now=100.0, interval=30.0)
    assert p.held and p.paused_by is PausedBy.CREDENTIALS and p.since == 100.0
    assert not p.refused("credentials refused: http 401", now=101.0, interval=30.0)  # the others in flight
    assert p.since == 100.0 and p.next_probe == 130.0
    assert not p.probe_due(129.9) and p.probe_due(130.0)
    p.start_probe()
    assert not p.probe_due(131.0)  # one probe at a time
    assert not p.probe_answered(False, now=131.0, interval=30.0)  # refused again
    assert p.held and p.next_probe == 161.0 and p.probe_due(161.0)
    p.start_probe()
    assert p.probe_answered(True, now=162.0, interval=30.0)  # accepted: the pause ends by itself
    assert not p.held and p.paused_by is None and p.next_probe is None and not p.probing


def test_a_transient_answer_to_a_probe_keeps_the_pause() -> None:
    p = Pause()
    p.refused("credentials refused: http 403", 0.0, 5.0)
    p.start_probe()
    assert not p.probe_answered(False, 5.0, 5.0)  # a 503 proves nothing about the credentials
    assert p.held and p.next_probe == 10.0


def test_an_operator_pause_holds_until_resumed_and_stops_probes() -> None:
    p = Pause()
    assert p.hold("maintenance", 10.0)
    assert p.held and p.paused_by is PausedBy.OPERATOR and p.reason == "maintenance" and p.since == 10.0
    assert not p.hold("maintenance", 11.0)  # the same again: no change to publish
    assert p.hold("longer maintenance", 12.0) and p.since == 10.0
    p.refused("credentials refused: http 401", 13.0, 1.0)
    assert p.paused_by is PausedBy.OPERATOR  # nothing goes, not even a probe, while an operator holds it
    assert not p.probe_due(100.0)
    assert p.resume()
    assert not p.held and p.credentials is None and p.operator is None
    assert not p.resume()  # nothing left to lift


def test_resume_lifts_a_pause_on_credentials_at_once() -> None:
    p = Pause()
    p.refused("credentials refused: http 401", 0.0, 30.0)
    p.start_probe()
    assert p.resume() and not p.held and not p.probing
    # The probe that was in flight answers after the resume: nothing to lift, nothing scheduled.
    assert not p.probe_answered(True, 1.0, 30.0) and p.next_probe is None


def test_an_accepted_probe_leaves_an_operator_hold_in_place() -> None:
    p = Pause()
    p.refused("credentials refused: http 401", 0.0, 1.0)
    p.start_probe()
    p.hold("wait", 0.5)
    assert p.probe_answered(True, 1.0, 1.0)  # the credentials' hold is lifted…
    assert p.held and p.paused_by is PausedBy.OPERATOR  # …the operator's is not


# ------------------------------------------------------------------ the breaker's waiters


async def test_requests_behind_a_probe_wait_for_its_answer_not_a_poll() -> None:
    now = [0.0]
    gate = Gate(FlowConfig(concurrency=4, breaker_failures=1, breaker_cooldown=60.0), clock=lambda: now[0])
    await gate.enter()
    gate.leave(False)  # one failure opens it
    assert gate.breaker.state is BreakerState.OPEN
    now[0] = 61.0
    await gate.enter()  # the probe
    assert gate.breaker.state is BreakerState.HALF_OPEN
    waiter = asyncio.create_task(gate.enter())
    await asyncio.sleep(0.01)
    assert not waiter.done()  # waiting for the probe (up to a cool-down), not polling every 50 ms
    gate.leave(True)
    await asyncio.wait_for(waiter, 1.0)  # woken by the answer
    assert gate.breaker.state is BreakerState.CLOSED
    gate.leave(True)


# ------------------------------------------------------------------ configuration


def config(**retry: Any) -> dict[str, Any]:
    return {"kafka": {"bootstrap_servers": "b:1", "topic": "t", "group_id": "g", "dlq_topic": "d"},
            "convert": {"retry": retry, "projects": {"1_2": {"goals": ["1"]}}}}


def test_give_up_after_is_off_by_default_and_parsed() -> None:
    assert parse(config(), env={}).providers["convert"].retry == RetryConfig()
    r = parse(config(give_up_after="2h", auth_probe_interval="5s"), env={}).providers["convert"].retry
    assert (r.give_up_after, r.auth_probe_interval) == (7200.0, 5.0)
    assert parse(config(give_up_after="0s"), env={}).providers["convert"].retry.give_up_after == 0.0


@pytest.mark.parametrize(("retry", "key"), [
    ({"give_up_after": "soon"}, "convert.retry.give_up_after"),
    ({"give_up_after": "10ms", "base_delay": "1s"}, "convert.retry.give_up_after"),
    ({"auth_probe_interval": "0s"}, "convert.retry.auth_probe_interval"),
    ({"give_up_afterr": "1h"}, "convert.retry.give_up_afterr"),
])
def test_bad_retry_settings_name_their_key(retry: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigErrors) as info:
        parse(config(**retry), env={})
    assert key in {e.key for e in info.value.errors}


def test_an_old_config_with_max_elapsed_still_loads_and_is_told_what_changed() -> None:
    warnings: list[Any] = []
    cfg = parse(config(max_attempts=8, max_elapsed="5m"), env={}, warnings=warnings)
    assert cfg.providers["convert"].retry.max_elapsed == 300.0 and cfg.providers["convert"].retry.give_up_after == 0.0
    assert {w.key for w in warnings} == {"convert.retry.max_attempts", "convert.retry.max_elapsed"}
    assert all("give_up_after" in w.message for w in warnings)
