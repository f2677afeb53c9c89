"""Tally: counts and histogram observations applied in bulk equal the same applied one by one."""

from __future__ import annotations

import math

from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from consumer.metrics import Metrics, Tally, observe_many

BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 1.0, 10.0)
edges = st.sampled_from([*BUCKETS, 0.0, -1.0, math.inf, math.nan, 1e-9, 10.000001])
values = st.lists(st.one_of(edges, st.floats(-5, 50, allow_nan=False)), max_size=40)


def _histogram() -> tuple[CollectorRegistry, Histogram]:
    r = CollectorRegistry()
    return r, Histogram("h_seconds", "h", ["p"], buckets=BUCKETS, registry=r)


def _samples(r: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for m in r.collect() for s in m.samples if not s.name.endswith("_created")}


def _same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12) or a == b


@given(st.lists(values, max_size=4))
def test_observe_many_equals_observe_one_by_one(batches: list[list[float]]) -> None:
    one, h1 = _histogram()
    many, h2 = _histogram()
    for batch in batches:
        for v in batch:
            h1.labels("x").observe(v)
        if batch:
            observe_many(h2.labels("x"), list(batch))
    a, b = _samples(one), _samples(many)
    assert a.keys() == b.keys()
    assert all(_same(a[k], b[k]) for k in a), (a, b)


def test_tally_flushes_counts_and_observations() -> None:
    m = Metrics()
    t = Tally()
    cell = t.count(m.conversions, "kameleoon", "delivered")
    assert t.count(m.conversions, "kameleoon", "delivered") is cell  # one cell per child
    cell.n += 3
    t.inc(m.conversions, "kameleoon", "delivered", n=2)
    t.histogram(m.processing_delay).values.extend([0.001, 0.2, 7.0])
    assert m.registry.get_sample_value("offline_conversions_conversions_total",
                                       {"provider": "kameleoon", "outcome": "delivered"}) in (None, 0.0)
    t.flush()
    assert m.registry.get_sample_value("offline_conversions_conversions_total",
                                       {"provider": "kameleoon", "outcome": "delivered"}) == 5
    assert m.registry.get_sample_value("offline_conversions_processing_delay_seconds_count") == 3
    assert m.registry.get_sample_value("offline_conversions_processing_delay_seconds_bucket", {"le": "0.25"}) == 2
    t.flush()  # nothing new: nothing changes
    assert m.registry.get_sample_value("offline_conversions_processing_delay_seconds_count") == 3
    assert b"offline_conversions_processing_delay_seconds_sum 7.201" in generate_latest(m.registry)
