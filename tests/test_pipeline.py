"""End to end on the real embedded broker and the sandbox: delivered or dead-lettered, never lost, never twice."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from confluent_kafka import Producer

from consumer.config import Config
from consumer.dlq import parse_headers
from consumer.embedded import EmbeddedBroker
from consumer.matcher import MatchSettings, match
from consumer.metrics import Metrics
from consumer.model import Conversion, Provider, Purchase
from consumer.producer import encoded, produce_values
from consumer.samples import malformed, purchases
from consumer.sandbox import Sandbox
from tests.conftest import committed, read_all, run_until_done

N_PURCHASES = 1940
N_MALFORMED = 60


def expected_conversions(cfg: Config, items: list[Purchase]) -> dict[str, list[tuple[Purchase, Conversion]]]:
    settings = MatchSettings.from_config(cfg)
    now = int(time.time() * 1000)
    out: dict[str, list[tuple[Purchase, Conversion]]] = {p.slug: [] for p in Provider}
    for p in items:
        for c in match(p, settings, now).conversions:
            out[c.provider.slug].append((p, c))
    return out


def sandbox_view(sandbox: Sandbox) -> dict[str, list[Any]]:
    return {
        "kameleoon": sorted(r.nonce for r in sandbox.records_for("kameleoon")),
        "convert": sorted((r.visitor, r.experiment_id, r.variation_id, r.transaction_id)
                          for r in sandbox.records_for("convert")),
        "conductrics": sorted((r.visitor, r.goals) for r in sandbox.records_for("conductrics")),
    }


def view_of(conversions: list[Conversion], provider: str) -> list[Any]:
    if provider == "kameleoon":
        return sorted(c.key for c in conversions)
    if provider == "convert":
        return sorted((c.visitor_id, c.experiment_id, c.variation_id, c.order_id) for c in conversions)
    return sorted((c.visitor_id, (g,)) for c in conversions for g in c.goals)


async def test_two_thousand_events_delivered_or_dead_lettered_once(
    broker: EmbeddedBroker, topics: dict[str, str], sandbox: Sandbox, make_config: Callable[..., Config],
) -> None:
    cfg = make_config(sandbox.url)
    items = list(purchases(N_PURCHASES, now_ms=int(time.time() * 1000), seed=3))
    expected = expected_conversions(cfg, items)
    # Permanent failures: Kameleoon refuses some visitors (400), Convert refuses others.
    k_bad = {c.visitor_id for _, c in expected["kameleoon"][::40]}
    v_bad = {c.visitor_id for _, c in expected["convert"][::50]}
    sandbox.reject("kameleoon", visitors=k_bad)
    sandbox.reject("convert", visitors=v_bad)
    # And a transient outage to retry through.
    sandbox.fail("kameleoon", 503, times=3, retry_after=0)
    sandbox.fail("conductrics", 502, times=3)

    values = list(encoded(items)) + [(b"bad", v) for v in malformed(N_MALFORMED)]
    tally = produce_values(broker.bootstrap, topics["topic"], values)
    assert tally.delivered == N_PURCHASES + N_MALFORMED

    metrics = Metrics()
    app = await run_until_done(cfg, N_PURCHASES + N_MALFORMED, metrics=metrics)
    assert app.consumed == N_PURCHASES + N_MALFORMED

    # Every matcher decision is counted once, by provider and outcome (the service counts, explain lists).
    settings, now = MatchSettings.from_config(cfg), int(time.time() * 1000)
    want_decisions: Counter[tuple[str, str]] = Counter()
    for p in items:
        d = match(p, settings, now)
        want_decisions.update((e.provider.slug, "matched") for e in d.matched)
        want_decisions.update((r.exposure.provider.slug if r.exposure else "none", r.reason.value)
                              for r in d.rejections)
    got_decisions = {(s.labels["provider"], s.labels["reason"]): s.value
                     for m in metrics.registry.collect() if m.name == "offline_conversions_match_decisions"
                     for s in m.samples if s.name.endswith("_total")}
    assert got_decisions == want_decisions and want_decisions[("kameleoon", "matched")] > 1000

    failed = {"kameleoon": k_bad, "convert": v_bad, "conductrics": set()}
    got = sandbox_view(sandbox)
    for provider in ("kameleoon", "convert", "conductrics"):
        want = [c for _, c in expected[provider] if c.visitor_id not in failed[provider]]
        assert got[provider] == view_of(want, provider), provider
    assert sandbox.duplicates() == {}
    assert len(got["kameleoon"]) > 1000 and len(got["convert"]) > 500 and len(got["conductrics"]) > 500

    # The DLQ holds exactly the malformed events and one record per (event, failed provider).
    failed_pairs = {(p.event_id, prov) for prov in ("kameleoon", "convert")
                    for p, c in expected[prov] if c.visitor_id in failed[prov]}
    dlq = read_all(broker.bootstrap, topics["dlq"], N_MALFORMED + len(failed_pairs))
    assert len(dlq) == N_MALFORMED + len(failed_pairs)
    decode = [m for m in dlq if parse_headers(m.headers())["stage"] == "decode"]
    dispatch = [m for m in dlq if parse_headers(m.headers())["stage"] == "dispatch"]
    assert len(decode) == N_MALFORMED
    assert {m.value() for m in decode} == {v for v in malformed(N_MALFORMED)}
    for m in decode:
        h = parse_headers(m.headers())
        assert h["original.topic"] == topics["topic"]
        assert int(h["original.partition"]) in (0, 1, 2) and int(h["original.offset"]) >= 0
        assert h["exception.class"] == "DecodeError" and h["exception.message"]
        assert m.key() == b"bad"
    by_event = {p.event_id: p for p in items}
    seen_pairs = set()
    for m in dispatch:
        h = parse_headers(m.headers())
        seen_pairs.add((h["event_id"], h["provider"]))
        assert h["http.status"] == "400" and int(h["attempts"]) >= 1 and "time" in h
        purchase = by_event[h["event_id"]]
        assert m.key() == purchase.order_id.encode()  # the original key and value, untouched
        keys = set(h["conversion.keys"].split(","))
        assert keys == {c.key for p, c in expected[h["provider"]]
                        if p.event_id == h["event_id"] and c.visitor_id in failed[h["provider"]]}
    assert seen_pairs == failed_pairs

    # Offsets reach the end of every partition.
    ends = {p: off + 1 for p, off in tally.last_offset.items()}
    assert committed(broker.bootstrap, topics["group"], topics["topic"]) == ends

    value = metrics.registry.get_sample_value
    for g in app.pipelines:  # every provider's group read every message
        assert value("offline_conversions_events_consumed_total", {"group": g.group}) == N_PURCHASES + N_MALFORMED
    assert sorted(g.group for g in app.pipelines) == [f"{topics['group']}.{p}"
                                                       for p in ("conductrics", "convert", "kameleoon")]
    # Undecodable messages are dead-lettered once, not once per provider group.
    assert value("offline_conversions_dlq_messages_total", {"stage": "decode", "provider": "none"}) == N_MALFORMED
    assert value("offline_conversions_conversions_total",
                 {"provider": "kameleoon", "outcome": "delivered"}) == len(got["kameleoon"])
    assert (value("offline_conversions_http_retries_total", {"provider": "kameleoon", "reason": "http"}) or 0) >= 3

    # A second run reads only what is new (one sentinel per partition) and sends nothing again.
    before = len(sandbox.records)
    sentinel_producer = Producer({"bootstrap.servers": broker.bootstrap})
    sentinel = replace(next(iter(purchases(1, now_ms=int(time.time() * 1000), seed=99))), exposures=())
    value_bytes = next(iter(encoded([sentinel])))[1]
    for partition in range(3):
        sentinel_producer.produce(topics["topic"], value=value_bytes, partition=partition)
    assert sentinel_producer.flush(10) == 0
    again = await run_until_done(cfg, 3)
    assert again.consumed == 3
    assert len(sandbox.records) == before
