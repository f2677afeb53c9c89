"""Scenario 6: SIGTERM during heavy load (a subprocess, many events, a slow provider).

The service exits 0 within its shutdown deadline, what it committed is all done (every event below a
committed offset reached the sandbox or the DLQ), and a restart finishes the rest with nothing lost.
"""

from __future__ import annotations

import time
from pathlib import Path

from consumer.embedded import EmbeddedBroker
from consumer.model import Purchase
from consumer.sandbox import Sandbox
from tests.conftest import read_all

from .harness import (
    Service,
    account,
    all_present,
    committed_async,
    config_dict,
    conversions_of,
    dlq_sources,
    expected_view,
    new_topics,
    produce,
    result_line,
    sandbox_view,
    to_config,
    wait_committed,
)

SHUTDOWN_DEADLINE = 5.0


async def test_sigterm_under_load_then_restart(broker: EmbeddedBroker, sandbox: Sandbox, tmp_path: Path) -> None:
    topics = new_topics(broker)
    data = config_dict(broker.bootstrap, topics, sandbox.url)
    data["logging"] = {"level": "INFO", "format": "json"}
    data["pipeline"].update({"shutdown_deadline": f"{SHUTDOWN_DEADLINE}s", "max_in_flight": 1000})
    cfg = to_config(data)
    stream = produce(broker.bootstrap, topics["topic"], 2000, 20, seed=61)
    want = expected_view(conversions_of(cfg, stream.items))
    sandbox.set_latency("*", 0.05)

    svc = Service(data, tmp_path, "sigterm")
    await svc.start()
    try:
        await sandbox.wait_until(lambda s: len(s.records) >= 600, timeout=60)
        svc.terminate()
        t0 = time.monotonic()
        code = await svc.wait(SHUTDOWN_DEADLINE + 10)
        stop_seconds = time.monotonic() - t0
        assert code == 0, f"exit {code} after SIGTERM:\n{svc.tail()}"
        assert stop_seconds <= SHUTDOWN_DEADLINE + 5, f"took {stop_seconds:.1f}s to stop"

        # Nothing committed that is not done.
        first = await committed_async(broker.bootstrap, topics["group"], topics["topic"])
        assert any(o > 0 for o in first.values()), f"nothing committed on SIGTERM: {first}"
        got = sandbox_view(sandbox)
        settings_cfg = cfg
        bad_below = [(p, o) for p, o in stream.malformed_positions() if o < first.get(p, -1)]
        dlq_now = dlq_sources(read_all(broker.bootstrap, topics["dlq"], len(bad_below), timeout=15))
        undone = []
        for (p, o), ref in stream.by_position().items():
            if o >= first.get(p, -1):
                continue
            if isinstance(ref, Purchase):
                w = expected_view(conversions_of(settings_cfg, [ref]))
                if any(w[k] - got[k] for k in w):
                    undone.append((p, o))
            elif (p, o) not in dlq_now:
                undone.append((p, o))
        assert not undone, f"committed past {len(undone)} events that were not done, e.g. {undone[:5]}"
        done_at_stop = len(sandbox.records)

        # A restart finishes the rest.
        sandbox.set_latency("*", 0.0)
        await svc.start()
        await sandbox.wait_until(lambda s: all_present(s, want), timeout=90)
        final = await wait_committed(broker.bootstrap, topics["group"], topics["topic"], stream.ends(), timeout=60)
        svc.terminate()
        assert await svc.wait(30) == 0, svc.tail()
    finally:
        await svc.stop()
        sandbox.clear_faults()
    assert final == stream.ends()
    acc = account(sandbox, want)
    assert acc.lost == 0 and acc.unexpected == 0, acc
    sources = dlq_sources(read_all(broker.bootstrap, topics["dlq"], len(stream.bad)))
    assert set(sources) == stream.malformed_positions()
    result_line("sigterm", events=stream.total, conversions=acc.expected,
                faults="SIGTERM under load (latency 50ms)", stop_seconds=round(stop_seconds, 1),
                committed_at_stop=first, delivered_at_stop=done_at_stop, lost=acc.lost, duplicates=acc.duplicates)
