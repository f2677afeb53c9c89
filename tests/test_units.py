"""Unit tests of the pure core: offset tracking, batching limits, backoff, the breaker, DLQ headers."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from consumer.batching import ENVELOPE_BYTES, Batcher
from consumer.config import BatchConfig, RetryConfig
from consumer.dlq import DeadLetter, SourceRef, dead_letter_headers, parse_headers
from consumer.flow import BreakerState, CircuitBreaker, RateLimiter
from consumer.offsets import OffsetOrderError, OffsetTracker
from consumer.providers.base import Verdict, classify_status, parse_retry_after
from consumer.retry import backoff, gives_up

TP = ("purchases", 0)

# ------------------------------------------------------------------ offsets


def test_offsets_commit_only_the_contiguous_finished_prefix() -> None:
    t = OffsetTracker()
    for off in range(10, 15):
        t.track(TP, off)
    assert t.finish(TP, 12) is None  # 10 and 11 still open
    assert t.finish(TP, 11) is None
    assert t.committable() == {}
    assert t.finish(TP, 10) == 13  # 10, 11, 12 done: next to read after a restart is 13
    assert t.finish(TP, 14) is None
    assert t.finish(TP, 13) == 15
    assert t.in_flight == 0 and t.committable() == {TP: 15}


def test_offsets_finishing_twice_or_unknown_changes_nothing() -> None:
    t = OffsetTracker()
    t.track(TP, 0)
    t.track(TP, 1)
    assert t.finish(TP, 0) == 1
    assert t.finish(TP, 0) is None
    assert t.finish(TP, 7) is None
    assert t.finish(("other", 0), 0) is None
    assert t.in_flight == 1 and t.committable() == {TP: 1}


def test_offsets_refuse_to_go_backwards_and_forget_revoked_partitions() -> None:
    t = OffsetTracker()
    t.track(TP, 5)
    with pytest.raises(OffsetOrderError):
        t.track(TP, 5)
    t.track(("purchases", 1), 0)
    t.forget([TP])
    assert t.in_flight == 1
    assert t.finish(TP, 5) is None  # a late result for a revoked partition is ignored
    assert t.partitions() == [("purchases", 1)]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 3), min_size=1, max_size=60), st.randoms())
def test_offsets_committable_is_always_the_first_unfinished(gaps: list[int], rnd: random.Random) -> None:
    t = OffsetTracker()
    offsets, off = [], 0
    for g in gaps:  # offsets with gaps, as compacted topics and transaction markers leave them
        off += g
        offsets.append(off)
        t.track(TP, off)
    order = offsets[:]
    rnd.shuffle(order)
    finished: set[int] = set()
    for o in order:
        t.finish(TP, o)
        finished.add(o)
        open_ = [x for x in offsets if x not in finished]
        got = t.committable().get(TP)
        if offsets[0] in finished:
            assert got == (open_[0] if open_ else offsets[-1] + 1)
        else:
            assert got is None  # the oldest event is unfinished: nothing may be committed
        assert t.in_flight == len(open_)
    assert t.committable() == {TP: offsets[-1] + 1}


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 3), st.booleans()), min_size=1, max_size=60), st.randoms())
def test_offsets_track_done_is_track_then_finish(steps: list[tuple[int, bool]], rnd: random.Random) -> None:
    # Events done as they are read (nothing to deliver) mixed with events finished later in any order.
    fast, slow = OffsetTracker(), OffsetTracker()
    off, later = 0, []
    for gap, done_at_once in steps:
        off += gap
        if done_at_once:
            fast.track_done(TP, off)
            slow.track(TP, off)
            slow.finish(TP, off)
        else:
            fast.track(TP, off)
            slow.track(TP, off)
            later.append(off)
        assert fast.committable() == slow.committable() and fast.in_flight == slow.in_flight
    rnd.shuffle(later)
    for o in later:
        assert fast.finish(TP, o) == slow.finish(TP, o)
        assert fast.committable() == slow.committable() and fast.in_flight == slow.in_flight
    assert fast.committable() == {TP: off + 1}
    with pytest.raises(OffsetOrderError):
        fast.track_done(TP, off)


# ------------------------------------------------------------------ batching

LIMITS = BatchConfig(max_events=3, max_bytes=ENVELOPE_BYTES + 100, linger=0.05)


def test_a_batch_closes_on_count() -> None:
    b: Batcher[str] = Batcher()
    assert b.add("k", LIMITS, "a", 10, 0.0) == []
    assert b.add("k", LIMITS, "b", 10, 0.0) == []
    closed = b.add("k", LIMITS, "c", 10, 0.0)
    assert [x.items for x in closed] == [["a", "b", "c"]] and len(b) == 0


def test_a_batch_closes_before_an_item_that_would_overflow_its_bytes() -> None:
    b: Batcher[str] = Batcher()
    b.add("k", LIMITS, "a", 60, 0.0)
    closed = b.add("k", LIMITS, "b", 60, 0.0)  # 256 + 60 + 60 > 356
    assert [x.items for x in closed] == [["a"]]
    assert b.open["k"].items == ["b"]
    # An item larger than the limit on its own still goes, alone (the provider's 413 then decides).
    closed = b.add("k", LIMITS, "huge", 10_000, 0.0)
    assert [x.items for x in closed] == [["b"]] and b.open["k"].items == ["huge"]


def test_batches_are_per_key_with_their_own_linger_deadline() -> None:
    b: Batcher[str] = Batcher()
    b.add("k1", LIMITS, "a", 1, 0.0)
    b.add("k2", LIMITS, "b", 1, 0.02)
    b.add("k1", LIMITS, "c", 1, 0.04)
    assert b.open["k1"].items == ["a", "c"] and b.open["k2"].items == ["b"]
    assert b.open["k1"].deadline == pytest.approx(0.05)  # from its first item, not its last
    assert b.open["k2"].deadline == pytest.approx(0.07)
    assert sorted(x.items[0] for x in b.drain()) == ["a", "b"] and len(b) == 0


def test_no_linger_sends_at_once() -> None:
    b: Batcher[str] = Batcher()
    closed = b.add("k", BatchConfig(max_events=10, max_bytes=10_000, linger=0), "a", 1, 0.0)
    assert [x.items for x in closed] == [["a"]]


# ------------------------------------------------------------------ retries

RETRY = RetryConfig(base_delay=0.1, max_delay=1.0)


@pytest.mark.parametrize(("attempt", "ceiling"), [(1, 0.1), (2, 0.2), (3, 0.4), (4, 0.8), (5, 1.0), (9, 1.0)])
def test_backoff_is_exponential_with_full_jitter_and_capped(attempt: int, ceiling: float) -> None:
    assert backoff(attempt, RETRY, rand=lambda: 1.0) == pytest.approx(ceiling)
    assert backoff(attempt, RETRY, rand=lambda: 0.0) == 0.0
    draws = [backoff(attempt, RETRY) for _ in range(200)]
    assert all(0 <= d <= ceiling for d in draws) and len(set(draws)) > 100


def test_retry_after_is_a_floor() -> None:
    assert backoff(1, RETRY, retry_after=3.0, rand=lambda: 0.5) == 3.0
    assert backoff(1, RETRY, retry_after=0.01, rand=lambda: 0.5) == pytest.approx(0.05)


def test_backoff_stays_capped_however_long_the_outage() -> None:
    # A provider down for days: the attempt count grows without bound, the wait does not (nor overflows).
    assert backoff(10_000, RETRY, rand=lambda: 1.0) == 1.0
    assert backoff(2**40, RETRY, rand=lambda: 1.0) == 1.0
    assert backoff(0, RETRY, rand=lambda: 1.0) == pytest.approx(0.1)


def test_transient_failures_never_give_up_by_default() -> None:
    assert RetryConfig().give_up_after == 0.0
    assert not gives_up(10 * 86400.0, 30.0, RETRY)  # ten days old, the legacy max_elapsed long past
    assert not gives_up(1e9, 30.0, RetryConfig(max_elapsed=1.0, max_attempts=1))


def test_give_up_after_bounds_the_age_including_the_next_wait() -> None:
    cfg = RetryConfig(base_delay=0.1, max_delay=1.0, give_up_after=10.0)
    assert not gives_up(9.0, 0.5, cfg)
    assert not gives_up(9.5, 0.5, cfg)  # the retry is still inside the age
    assert gives_up(9.8, 0.5, cfg)
    assert gives_up(10.5, 0.0, cfg)


@pytest.mark.parametrize(("status", "verdict"), [
    (200, Verdict.DELIVERED), (204, Verdict.DELIVERED), (400, Verdict.PERMANENT), (403, Verdict.PERMANENT),
    (404, Verdict.PERMANENT), (408, Verdict.RETRY), (413, Verdict.SPLIT), (429, Verdict.RETRY),
    (500, Verdict.RETRY), (502, Verdict.RETRY), (503, Verdict.RETRY), (401, Verdict.PERMANENT),
])
def test_status_classification(status: int, verdict: Verdict) -> None:
    assert classify_status(status, {}).verdict is verdict


def test_a_401_with_a_token_reauthenticates_and_retry_after_is_read() -> None:
    assert classify_status(401, {}, has_token=True).verdict is Verdict.REAUTH
    assert classify_status(429, {"Retry-After": "7"}).retry_after == 7.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412470.0) == pytest.approx(10.0)
    assert parse_retry_after("soon") is None and parse_retry_after(None) is None


# ------------------------------------------------------------------ circuit breaker and rate


def test_breaker_opens_after_consecutive_failures_and_a_probe_closes_it() -> None:
    b = CircuitBreaker(failures=3, cooldown=10.0)
    for i in range(2):
        b.record(False, float(i))
    assert b.state is BreakerState.CLOSED and b.wait_time(2.0) is None
    b.record(True, 2.0)  # a success resets the count
    for _ in range(3):
        b.record(False, 3.0)
    assert b.state is BreakerState.OPEN
    assert b.wait_time(5.0) == pytest.approx(8.0)  # requests wait instead of hammering
    assert b.wait_time(13.0) is None and b.state is BreakerState.HALF_OPEN  # the probe goes
    assert b.wait_time(13.0) is not None  # everyone else waits for the probe
    b.record(False, 13.5)
    assert b.state is BreakerState.OPEN and b.wait_time(14.0) == pytest.approx(9.5)
    assert b.wait_time(23.5) is None
    b.record(True, 23.6)
    assert b.state is BreakerState.CLOSED and b.wait_time(23.7) is None


def test_rate_limiter_spaces_requests() -> None:
    now = [0.0]
    r = RateLimiter(rate=10.0, clock=lambda: now[0])
    delays = [r.delay() for _ in range(12)]
    assert delays[:10] == [0.0] * 10  # a burst of one second's worth
    assert delays[10] == pytest.approx(0.1) and delays[11] == pytest.approx(0.2)
    now[0] = 10.0
    assert r.delay() == 0.0


# ------------------------------------------------------------------ dead letters


def test_dead_letter_headers_carry_the_context_and_keep_the_originals() -> None:
    src = SourceRef("purchases", 2, 41, b"ORD-1", b"\x00raw", [("trace", b"t-1"), ("dlq.stage", b"stale")], 1700)
    dl = DeadLetter(src, "dispatch", "DeliveryFailed", "http 400", provider="convert", project="1111_2222",
                    attempts=3, http_status=400, keys=["k1", "k2"], event_id="e-1")
    headers = dead_letter_headers(dl, now_ms=1234)
    assert headers[0] == ("trace", b"t-1")
    assert ("dlq.stage", b"stale") not in headers  # an earlier dead-lettering's headers are replaced
    h = parse_headers(headers)
    assert h == {
        "original.topic": "purchases", "original.partition": "2", "original.offset": "41", "stage": "dispatch",
        "exception.class": "DeliveryFailed", "exception.message": "http 400", "attempts": "3", "time": "1234",
        "original.timestamp": "1700", "provider": "convert", "project": "1111_2222", "http.status": "400",
        "conversion.keys": "k1,k2", "event_id": "e-1",
    }
    long = DeadLetter(src, "decode", "DecodeError", "x" * 5000)
    assert len(parse_headers(dead_letter_headers(long, 0))["exception.message"]) == 512


def test_the_service_tunes_gc_while_it_runs_and_restores_it() -> None:
    import gc

    from consumer.app import tune_gc
    from consumer.config import parse

    cfg = parse({"kafka": {"bootstrap_servers": "unused:1", "topic": "t", "group_id": "g", "dlq_topic": "d"},
                 "kameleoon": {"projects": {"s": {"goals": ["1"]}}}, "pipeline": {"gc_threshold": 12345}}, env={})
    before = gc.get_threshold()
    restore = tune_gc(cfg.pipeline.gc_threshold)
    try:
        assert gc.get_threshold()[0] == 12345 and gc.get_freeze_count() > 0
    finally:
        assert restore is not None
        gc.set_threshold(*restore)
        gc.unfreeze()
    assert gc.get_threshold() == before
    off = parse({"kafka": {"bootstrap_servers": "unused:1", "topic": "t", "group_id": "g", "dlq_topic": "d"},
                 "kameleoon": {"projects": {"s": {"goals": ["1"]}}}, "pipeline": {"gc_threshold": 0}}, env={})
    assert tune_gc(off.pipeline.gc_threshold) is None and gc.get_threshold() == before
