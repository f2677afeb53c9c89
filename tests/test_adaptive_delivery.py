"""End to end: adaptive concurrency through the real pipeline (broker, service, sandbox with a capacity).

The sandbox serves at most C Conductrics requests at once with log-normal latency and answers 429
beyond; the service, with `concurrency = "adaptive"`, must deliver everything at >= 90 % of the rate
C allows (C / mean latency) with < 1 % of requests answered 429. The same stream with a fixed
concurrency of 3C, in the same test, meets a storm of 429s: the scenario can tell the two apart.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from consumer.app import Application
from consumer.embedded import EmbeddedBroker
from consumer.metrics import Metrics
from consumer.sandbox import Profile, Sandbox
from tests.reliability.harness import (
    account,
    config_dict,
    conversions_of,
    expected_view,
    new_topics,
    produce,
    to_config,
)

C = 32
PROFILE = Profile("conductrics", median=0.12, p99=0.8, capacity=C, retry_after="1", error_rate=0.002, seed=3)
BOUND = C / PROFILE.mean  # requests per second the capacity allows: ~191


@dataclass
class Run:
    app: Application
    statuses: dict[int, int]
    rate: float  # accepted requests per second over the run's steady part
    limits: list[tuple[float, float]] = field(default_factory=list)  # (time, limit gauge) per loop iteration
    lost: int = 0


async def deliver(broker: EmbeddedBroker, sandbox: Sandbox, flow: dict[str, Any], purchases: int,
                  seed: int) -> Run:
    topics = new_topics(broker)
    data = config_dict(broker.bootstrap, topics, sandbox.url, kameleoon=None, convert=None)
    data["logging"] = {"level": "WARNING"}
    data["conductrics"]["flow"] = flow
    data["conductrics"]["retry"] = {"base_delay": "50ms", "max_delay": "2s", "max_attempts": 10,
                                    "max_elapsed": "120s"}
    cfg = to_config(data)
    stream = produce(broker.bootstrap, topics["topic"], purchases, seed=seed)
    want = expected_view(conversions_of(cfg, stream.items))
    sandbox.reset()
    sandbox.set_profile(PROFILE)
    metrics = Metrics()
    limits: list[tuple[float, float]] = []

    def done(a: Application) -> bool:
        # Called on every poll loop: the Conductrics project's limit as it goes.
        limits.extend((time.monotonic(), lane.gate.limit) for p in a.pipelines for lane in p.dispatcher.lanes.values())
        return a.consumed >= stream.total and a.live == 0

    app = Application(cfg, metrics=metrics, install_signals=False, stop_when=done)
    assert await app.run() == 0, app.fatal
    exported = metrics.registry.get_sample_value("offline_conversions_concurrency_limit",
                                                 {"provider": "conductrics", "project": "ac-xxx"})
    assert exported == limits[-1][1], "the metric is the limit in force"
    accepted = sorted(r.time for r in sandbox.requests if r.provider == "conductrics" and r.status == 200)
    # The steady part: past the first 4 s (slow start) and before the last second (the backlog runs out).
    steady = [t for t in accepted if accepted[0] + 4 <= t <= accepted[-1] - 1]
    rate = (len(steady) - 1) / (steady[-1] - steady[0])
    acc = account(sandbox, want)
    return Run(app, sandbox.status_counts("conductrics"), rate, limits, acc.lost)


async def test_adaptive_concurrency_finds_the_capacity_and_a_fixed_one_above_it_does_worse(
    broker: EmbeddedBroker, sandbox: Sandbox,
) -> None:
    adaptive = await deliver(broker, sandbox, {"concurrency": "adaptive", "max_concurrency": 200}, 4000, seed=41)
    total = sum(adaptive.statuses.values())
    share_429 = adaptive.statuses.get(429, 0) / total
    assert adaptive.lost == 0
    assert sandbox.profile_state("conductrics")["peak_busy"] == C, "it pushed up to the capacity"
    assert share_429 < 0.01, f"{adaptive.statuses}"
    assert adaptive.statuses.get(503, 0) > 0, "the profile's random 5xx were met, and retried"
    assert adaptive.rate >= 0.9 * BOUND, f"{adaptive.rate:.0f} requests/s of the {BOUND:.0f} the capacity allows"
    # The limit settled near C (it counts requests still on their way back, so a little above C is normal).
    t_end = adaptive.limits[-1][0]
    late = [v for t, v in adaptive.limits if t_end - 8 <= t <= t_end - 1]
    assert C * 0.6 <= sum(late) / len(late) <= C * 1.6, late[::50]

    fixed = await deliver(broker, sandbox, {"concurrency": 3 * C}, 300, seed=42)
    fixed_429 = fixed.statuses.get(429, 0) / sum(fixed.statuses.values())
    assert fixed_429 > 0.2, f"a fixed concurrency of {3 * C} should meet many 429s: {fixed.statuses}"
    print(f"adaptive: {adaptive.rate:.0f}/s of {BOUND:.0f} allowed, 429 {share_429:.2%}; "
          f"fixed {3 * C}: {fixed.rate:.0f}/s, 429 {fixed_429:.1%}")
