"""The fan-out cap on the real broker: an event over [matcher] max_exposures is dead-lettered whole, nothing sent."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace

from consumer.config import Config, parse
from consumer.dlq import parse_headers
from consumer.embedded import EmbeddedBroker
from consumer.matcher import MatchSettings, match
from consumer.metrics import Metrics
from consumer.model import Exposure, Provider
from consumer.producer import encoded, produce_values
from consumer.samples import PROJECTS, purchases
from consumer.sandbox import Sandbox
from tests.conftest import committed, config_dict, read_all, run_until_done
from tests.test_pipeline import expected_conversions, sandbox_view, view_of

N = 60
BIG = 5000


async def test_a_5000_exposure_purchase_is_dead_lettered_whole_and_nothing_of_it_is_sent(
    broker: EmbeddedBroker, topics: dict[str, str], sandbox: Sandbox, make_config: Callable[..., Config],
) -> None:
    cfg = make_config(sandbox.url)
    assert cfg.matcher.max_exposures == 100  # the default is what is under test
    now = int(time.time() * 1000)
    items = list(purchases(N, now_ms=now, seed=21))
    providers = list(Provider)
    big = replace(items[0], event_id="big-event", order_id="ORD-BIG", exposures=tuple(
        Exposure(providers[i % 3], PROJECTS[providers[i % 3]], str(100_000 + i % 20), "1000001", f"big-{i:04d}",
                 items[0].occurred_at - 60_000 - i)
        for i in range(BIG)))
    # Without the cap this one event would fan out to thousands of conversions, each crediting revenue.
    uncapped = parse({**config_dict(broker.bootstrap, topics, sandbox.url), "matcher": {"max_exposures": BIG}}, env={})
    assert len(match(big, MatchSettings.from_config(uncapped), now).conversions) > 3000

    values = list(encoded(items[:N // 2])) + list(encoded([big])) + list(encoded(items[N // 2:]))
    tally = produce_values(broker.bootstrap, topics["topic"], values)
    metrics = Metrics()
    await run_until_done(cfg, N + 1, metrics=metrics)

    # The whole event, as it was read, in the DLQ, once, with the reason.
    [letter] = read_all(broker.bootstrap, topics["dlq"], 1)
    h = parse_headers(letter.headers())
    assert (h["stage"], h["reason"], h["exception.class"], h["event_id"]) == (
        "match", "too_many_exposures", "TooManyExposures", "big-event")
    assert h["exception.message"] == f"order ORD-BIG: {BIG} exposures, more than max_exposures 100"
    assert (letter.key(), letter.value()) == next(iter(encoded([big])))

    # Nothing of it reached the sandbox; every other event was delivered as matched.
    got = sandbox_view(sandbox)
    expected = expected_conversions(cfg, items)
    for provider in ("kameleoon", "convert", "conductrics"):
        assert got[provider] == view_of([c for _, c in expected[provider]], provider), provider
    assert sandbox.records and not [r for r in sandbox.records if r.visitor.startswith("big-")
                                    or r.transaction_id == "ORD-BIG"]

    value = metrics.registry.get_sample_value
    assert value("offline_conversions_match_decisions_total", {"provider": "none", "reason": "too_many_exposures"}) == 1
    assert value("offline_conversions_dlq_messages_total", {"stage": "match", "provider": "none"}) == 1
    # Its offset was finished like any other: the group's position reaches the end of every partition.
    assert committed(broker.bootstrap, topics["group"], topics["topic"]) == {
        p: off + 1 for p, off in tally.last_offset.items()}
