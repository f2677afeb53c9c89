"""The adaptive concurrency limit (pure, clock passed in), the resizable slots and the Gate that uses them."""

from __future__ import annotations

import asyncio
import copy
import heapq
import itertools
import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

from consumer.concurrency import AdaptiveLimit, AdaptiveSettings, Reason, Signal
from consumer.config import ConfigError, FlowConfig, parse
from consumer.flow import Gate, Slots

RTT = 0.15
JITTER = (1.0, 0.96, 1.04, 0.98, 1.02)  # window means of a real provider are never all the same


class Driver:
    """Feeds an AdaptiveLimit windows of answers on a fake clock."""

    def __init__(self, **settings: int | float) -> None:
        self.limit = AdaptiveLimit(AdaptiveSettings(**settings))  # type: ignore[arg-type]
        self.now = 0.0
        self.count = 0

    def window(self, rtt: float = RTT, *, errors: int = 0, busy: int | None = None,
               overload: int = 0) -> int:
        """`busy` requests (default: the whole limit) sent at once and answered over one `rtt`: `errors`
        5xx and `overload` 429 among them. Returns the limit after the window."""
        ctl = self.limit
        rtt *= JITTER[self.count % len(JITTER)]
        self.count += 1
        n = ctl.limit if busy is None else busy
        for _ in range(n):
            ctl.started()
        for i in range(n):
            t = self.now + rtt * (i + 1) / n
            if i < overload:
                ctl.finished(t, Signal.OVERLOAD)
            elif i < overload + errors:
                ctl.finished(t, Signal.ERROR)
            else:
                ctl.finished(t, Signal.OK, rtt)
        self.now += rtt
        return ctl.limit

    def windows(self, k: int, rtt: float = RTT, **kw: int) -> list[int]:
        return [self.window(rtt, **kw) for _ in range(k)]


def settled(**settings: int | float) -> Driver:
    """Past slow start (ended by one 429) with a history of unsaturated windows: limit 20."""
    d = Driver(initial=40, **settings)
    d.window()  # the first window sets the RTT reference
    d.limit.finished(d.now, Signal.OVERLOAD)  # slow start ends: 40 -> 20
    d.windows(6, busy=5)  # not saturated: no growth, and the RTT history has its normal spread
    assert d.limit.limit == 20 and not d.limit.slow_start
    return d


def decreases(before: int, after: list[int]) -> int:
    seq = [before, *after]
    return sum(b < a for a, b in itertools.pairwise(seq))


# --------------------------------------------------------------------------- the decisions, table-driven


@dataclass(frozen=True)
class Case:
    name: str
    run: Callable[[Driver], list[int]]
    want: Callable[[list[int]], bool]  # given the limit after each step (the first value is before: 20)


CASES = [
    Case("grows while the RTT holds and the limit is used",
         lambda d: d.windows(12), lambda seq: seq[-1] >= 24 and decreases(20, seq) == 0),
    Case("does not grow when the limit is not used",
         lambda d: d.windows(12, busy=10), lambda seq: set(seq) == {20}),
    Case("one slow window is noise: no decrease",
         lambda d: [d.window(RTT * 1.6)], lambda seq: seq[-1] >= 20),
    Case("backs off when the RTT rises for two windows",
         lambda d: d.windows(2, RTT * 1.6), lambda seq: seq[-1] == 18),
    Case("backs off at once on a 429 (0.9 times)",
         lambda d: [d.limit.finished(d.now + 0.001, Signal.OVERLOAD) and d.limit.limit], lambda seq: seq[-1] == 18),
    Case("a burst of 429s in one window backs off once",
         lambda d: [d.window(overload=10)], lambda seq: seq[-1] == 18),
    Case("a 429 a window apart backs off again",
         lambda d: [d.window(overload=1), d.window(overload=1)], lambda seq: seq == [18, 16]),
    Case("backs off on 5xx above the tolerance",
         lambda d: [d.window(errors=4)], lambda seq: seq[-1] == 18),
    Case("a single 5xx is not overload",
         lambda d: [d.window(errors=1)], lambda seq: seq[-1] >= 20),
    Case("answers that say nothing change nothing",
         lambda d: [d.limit.finished(d.now + 1, Signal.IGNORE) or d.limit.limit for _ in range(50)],
         lambda seq: set(seq) == {20}),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_decision(case: Case) -> None:
    d = settled()
    seq = case.run(d)
    assert case.want(seq), f"limits {seq}, last change {d.limit.last_change}"


def test_slow_start_grows_by_half_then_steps_back_on_the_first_trouble() -> None:
    d = Driver(initial=4)
    d.window()  # the first window only sets the RTT reference
    seq = d.windows(20)
    steps = [(a, b) for a, b in zip([4, *seq], seq, strict=False) if b != a]
    assert seq[-1] >= 64 and all(b == min(200, max(a + 1, a * 3 // 2)) for a, b in steps)
    assert d.limit.last_change is Reason.SLOW_START
    before_last = steps[-1][0]
    d.limit.finished(d.now, Signal.OVERLOAD)
    assert d.limit.limit == before_last and not d.limit.slow_start  # the last limit without trouble
    seq = d.windows(10)
    assert before_last < seq[-1] <= before_last + 10  # now one at a time


def test_bounds_are_respected() -> None:
    d = Driver(initial=3, min_limit=2, max_limit=10)
    assert max(d.windows(30)) == 10
    for _ in range(30):
        d.window(overload=1)
    assert d.limit.limit == 2
    d = Driver(initial=1, min_limit=1, max_limit=1)
    assert set([*d.windows(5), d.window(overload=3)]) == {1}


def test_near_the_last_429_it_probes_slowly() -> None:
    def after_429_at_20(probe_windows: int) -> list[int]:
        d = Driver(initial=20, probe_windows=probe_windows)
        d.window()
        d.limit.finished(d.now, Signal.OVERLOAD)  # the 429 came at 20: slow start ends at 10
        return d.windows(60)

    eager, patient = after_429_at_20(1), after_429_at_20(20)
    assert eager.index(19) == patient.index(19), "both climb back alike"
    assert patient.index(20) - patient.index(19) >= 10 > eager.index(20) - eager.index(19)
    assert 21 in patient, "a clean window at the old ceiling clears it"


def test_a_creeping_rtt_is_queueing_and_backs_off() -> None:
    d = settled()
    d.windows(10)
    rtt = RTT
    changes: list[Reason | None] = []
    for _ in range(60):  # +2 % per window: within the spread of the windows before it
        rtt *= 1.02
        before = d.limit.limit
        d.window(rtt)
        if d.limit.limit < before:
            changes.append(d.limit.last_change)
    assert changes.count(Reason.QUEUEING) > changes.count(Reason.RTT_RISE)
    assert d.limit.limit < 20


def test_the_providers_own_slowdown_becomes_the_reference() -> None:
    d = settled()
    d.windows(10)
    start = d.limit.limit
    slow = RTT * 3  # the provider got slower on its own: less load does not bring it down
    seq = d.windows(40, slow)
    low = min(seq)
    assert low <= start // 2 + 1, "it backs off first: the rise could be its own load"
    assert seq[-1] > low, "after halving without effect the new latency is the reference, and it grows again"
    i = seq.index(low)
    assert decreases(seq[i], seq[i + 1:]) == 0


def test_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="min_limit"):
        AdaptiveSettings(min_limit=5, max_limit=4)
    with pytest.raises(ValueError, match="initial"):
        AdaptiveSettings(min_limit=5, max_limit=10, initial=2)
    with pytest.raises(ValueError, match="decrease_ratio"):
        AdaptiveSettings(decrease_ratio=1.0)


# --------------------------------------------------------------------------- against a simulated provider

MEDIAN, P99 = 0.12, 0.8
SIGMA = math.log(P99 / MEDIAN) / 2.3263478740408408
MEAN = MEDIAN * math.exp(SIGMA**2 / 2)


def simulate(capacity: Callable[[float], int], seconds: float, *, error_rate: float = 0.002,
             seed: int = 1) -> list[tuple[float, int, int, int]]:
    """A saturated client under the limit against a provider serving `capacity(t)` requests at once with
    log-normal latency, answering 429 beyond it: (time, limit, ok answers, 429 answers) every 0.5 s."""
    rng = random.Random(seed)
    ctl = AdaptiveLimit(AdaptiveSettings())
    heap: list[tuple[float, int, float, bool]] = []
    seq = serving = ok = rejected = 0
    in_flight = 0
    trace: list[tuple[float, int, int, int]] = []
    now = next_trace = 0.0

    def fill() -> None:
        nonlocal seq, serving, in_flight
        while in_flight < ctl.limit:
            in_flight += 1
            ctl.started()
            seq += 1
            if serving >= capacity(now):
                heapq.heappush(heap, (now + 0.002, seq, now, False))
            else:
                serving += 1
                heapq.heappush(heap, (now + MEDIAN * math.exp(SIGMA * rng.gauss(0, 1)) + 0.002, seq, now, True))

    fill()
    while heap and now < seconds:
        now, _, sent, served = heapq.heappop(heap)
        in_flight -= 1
        if served:
            serving -= 1
            if rng.random() < error_rate:
                ctl.finished(now, Signal.ERROR)
            else:
                ok += 1
                ctl.finished(now, Signal.OK, now - sent)
        else:
            rejected += 1
            ctl.finished(now, Signal.OVERLOAD)
        while now >= next_trace:
            trace.append((next_trace, ctl.limit, ok, rejected))
            next_trace += 0.5
        fill()
    return trace


def window_stats(trace: list[tuple[float, int, int, int]], start: float, end: float) -> tuple[float, float]:
    """(ok answers per second, share of answers that were 429) between two times of the trace."""
    a = next(x for x in trace if x[0] >= start)
    b = next(x for x in trace if x[0] >= end)
    ok, rejected = b[2] - a[2], b[3] - a[3]
    return ok / (b[0] - a[0]), rejected / max(1, ok + rejected)


@pytest.mark.parametrize("capacity", [8, 32, 64])
def test_converges_near_the_capacity_with_few_429s(capacity: int) -> None:
    trace = simulate(lambda t: capacity, 90)
    rate, share = window_stats(trace, 30, 90)
    assert rate >= 0.9 * capacity / MEAN, f"{rate:.0f}/s of {capacity / MEAN:.0f}"
    assert share < 0.01


def test_re_converges_when_the_capacity_halves_then_doubles() -> None:
    c = 64
    trace = simulate(lambda t: c if t < 60 or t >= 120 else c // 2, 180)

    def converged_after(t0: float, cap: int) -> float:
        for x in trace:
            if x[0] >= t0 and x[0] + 5 <= trace[-1][0]:
                rate, share = window_stats(trace, x[0], x[0] + 5)
                if rate >= 0.9 * cap / MEAN and share < 0.01:
                    return x[0] - t0
        return math.inf

    assert converged_after(60, c // 2) <= 30
    assert converged_after(120, c) <= 30


# --------------------------------------------------------------------------- slots and the gate


async def test_slots_grow_and_shrink_while_in_use() -> None:
    slots = Slots(2)
    await slots.acquire()
    await slots.acquire()
    waiters = [asyncio.ensure_future(slots.acquire()) for _ in range(3)]
    await asyncio.sleep(0)
    assert not any(w.done() for w in waiters)
    slots.resize(4)  # two more at once, in arrival order
    await asyncio.sleep(0)
    assert [w.done() for w in waiters] == [True, True, False]
    slots.resize(1)  # nobody loses a slot; the excess drains
    assert slots.used == 4
    for _ in range(3):
        slots.release()
    await asyncio.sleep(0)
    assert not waiters[2].done() and slots.used == 1
    slots.release()
    await asyncio.sleep(0)
    assert waiters[2].done() and slots.used == 1


async def test_a_cancelled_waiter_gives_its_slot_on() -> None:
    slots = Slots(1)
    await slots.acquire()
    first = asyncio.ensure_future(slots.acquire())
    second = asyncio.ensure_future(slots.acquire())
    await asyncio.sleep(0)
    slots.release()  # granted to `first`...
    first.cancel()  # ...which is cancelled before it runs
    with pytest.raises(asyncio.CancelledError):
        await first
    await asyncio.sleep(0)
    assert second.done() and slots.used == 1


async def test_an_adaptive_gate_publishes_its_limit_and_resizes() -> None:
    now = [0.0]
    published: list[int] = []
    cfg = FlowConfig(concurrency=4, adaptive=True, min_concurrency=1, max_concurrency=16)
    gate = Gate(cfg, clock=lambda: now[0], on_limit=published.append)
    assert published == [4] and gate.limit == 4
    for _ in range(4):
        await gate.enter()
    now[0] = 0.01
    gate.leave(False, Signal.OVERLOAD, 0.001)  # a 429: back to the limit before the last step (slow start ends)
    assert gate.limit == 2 and published == [4, 2]
    fixed = Gate(FlowConfig(concurrency=7), on_limit=published.append)
    assert fixed.limit == 7 and fixed.adaptive is None and published[-1] == 7


# --------------------------------------------------------------------------- the config keys

BASE: dict[str, Any] = {
    "kafka": {"bootstrap_servers": "b:9092", "topic": "t", "group_id": "g", "dlq_topic": "t.dlq"},
    "convert": {"projects": {"1111_2222": {"goals": [100]}, "3333_4444": {"goals": [100]}}},
}


def convert_flows(flow: dict[str, Any], project_flow: dict[str, Any] | None = None) -> tuple[FlowConfig, FlowConfig]:
    data = copy.deepcopy(BASE)
    data["convert"]["flow"] = flow
    if project_flow is not None:
        data["convert"]["projects"]["3333_4444"]["flow"] = project_flow
    projects = parse(data, env={}).providers["convert"].projects
    return projects["1111_2222"].flow, projects["3333_4444"].flow


def test_adaptive_concurrency_is_configured_per_provider_and_project() -> None:
    fixed, _ = convert_flows({})
    assert (fixed.adaptive, fixed.concurrency) == (False, 64)  # fixed numbers keep working
    a, b = convert_flows({"concurrency": "adaptive"})
    assert a == b and (a.adaptive, a.concurrency, a.min_concurrency, a.max_concurrency) == (True, 8, 1, 200)
    a, b = convert_flows({"concurrency": "adaptive", "min_concurrency": 4, "max_concurrency": 100,
                          "initial_concurrency": 32}, {"max_concurrency": 50})
    assert (a.concurrency, a.min_concurrency, a.max_concurrency) == (32, 4, 100)
    assert (b.adaptive, b.concurrency, b.min_concurrency, b.max_concurrency) == (True, 32, 4, 50)
    a, b = convert_flows({"concurrency": "adaptive"}, {"concurrency": 10})
    assert a.adaptive and (b.adaptive, b.concurrency) == (False, 10)
    a, b = convert_flows({"concurrency": 12}, {"concurrency": "adaptive", "min_concurrency": 20})
    assert (b.adaptive, b.concurrency, b.min_concurrency) == (True, 20, 20)  # the initial is within the bounds


@pytest.mark.parametrize(("flow", "project_flow", "key", "needle"), [
    ({"concurrency": "fast"}, None, "convert.flow.concurrency", 'integer or "adaptive"'),
    ({"concurrency": 0}, None, "convert.flow.concurrency", "at least 1"),
    ({"max_concurrency": 10}, None, "convert.flow.max_concurrency", 'only with concurrency = "adaptive"'),
    ({"concurrency": "adaptive"}, {"concurrency": 5, "min_concurrency": 2},
     "convert.projects.3333_4444.flow.min_concurrency", "only with"),
    ({"concurrency": "adaptive", "min_concurrency": 0}, None, "convert.flow.min_concurrency", "at least 1"),
    ({"concurrency": "adaptive", "min_concurrency": 300}, None, "convert.flow.min_concurrency", "at most"),
    ({"concurrency": "adaptive", "min_concurrency": 8, "max_concurrency": 4}, None,
     "convert.flow.max_concurrency", "at least 8"),
    ({"concurrency": "adaptive", "initial_concurrency": 500}, None, "convert.flow.initial_concurrency", "at most"),
])
def test_bad_adaptive_settings_fail_naming_the_key(flow: dict[str, Any], project_flow: dict[str, Any] | None,
                                                   key: str, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle) as err:
        convert_flows(flow, project_flow)
    assert err.value.key == key
