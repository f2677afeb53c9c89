"""Scenario 1: the service SIGKILLed at random points of a stream, restarted, run to completion.

At-least-once across crashes: every event reaches the sandbox or the DLQ, committed offsets reach the
partition ends, and anything the sandbox saw twice is a re-send of an expected conversion (a crash
between delivery and commit makes that legitimate; Kameleoon de-duplicates by nonce).
"""

from __future__ import annotations

import random
import time
from pathlib import Path

from consumer.embedded import EmbeddedBroker
from consumer.sandbox import Sandbox
from tests.conftest import read_all

from .harness import (
    Service,
    account,
    all_present,
    config_dict,
    conversions_of,
    dlq_sources,
    expected_total,
    expected_view,
    new_topics,
    produce,
    result_line,
    to_config,
    wait_committed,
)

N_PURCHASES = 1500
N_MALFORMED = 30
KILLS = 3
SHORT_SESSION = {"session.timeout.ms": 3000, "heartbeat.interval.ms": 300}


async def sigkill_round(broker: EmbeddedBroker, sandbox: Sandbox, workdir: Path, seed: int) -> dict[str, int]:
    topics = new_topics(broker)
    data = config_dict(broker.bootstrap, topics, sandbox.url)
    data["logging"] = {"level": "INFO", "format": "json"}
    # A dead member holds its partitions until its session times out: keep that short.
    data["kafka"]["consumer"].update(SHORT_SESSION)
    # Latency and a modest in-flight bound stretch the stream over a few seconds, so that commits
    # progress between kills and each kill lands with work in flight.
    data["pipeline"]["max_in_flight"] = 200
    sandbox.set_latency("*", 0.02)
    stream = produce(broker.bootstrap, topics["topic"], N_PURCHASES, N_MALFORMED, seed=seed)
    want = expected_view(conversions_of(to_config(data), stream.items))
    total = expected_total(want)

    rng = random.Random(seed)
    # One kill point in each third of the stream (as a share of the conversions the sandbox has seen).
    points = [rng.uniform(lo, hi) for lo, hi in ((0.03, 0.3), (0.3, 0.6), (0.6, 0.9))][:KILLS]
    svc = Service(data, workdir, name=f"sigkill-{seed}")
    kills: list[int] = []
    try:
        for share in points:
            await svc.start()
            target = int(share * total)
            await sandbox.wait_until(lambda s, t=target: len(s.records) >= t, timeout=90)
            svc.kill()
            code = await svc.wait(10)
            assert code == -9, f"expected death by SIGKILL, got {code}"
            kills.append(len(sandbox.records))
        # The last run goes to completion.
        await svc.start()
        await sandbox.wait_until(lambda s: all_present(s, want), timeout=120)
        final = await wait_committed(broker.bootstrap, topics["group"], topics["topic"], stream.ends(), timeout=60)
        svc.terminate()
        code = await svc.wait(30)
        assert code == 0, f"the last run exited with {code}:\n{svc.tail()}"
    finally:
        await svc.stop()
        sandbox.clear_faults()

    assert final == stream.ends(), f"committed {final}, partition ends {stream.ends()}"
    acc = account(sandbox, want)
    assert acc.lost == 0, f"lost {acc.lost} conversions, e.g. {acc.missing_sample}"
    assert acc.unexpected == 0, f"{acc.unexpected} records that are not re-sends of expected conversions"

    dlq = read_all(broker.bootstrap, topics["dlq"], N_MALFORMED)
    sources = dlq_sources(dlq)
    bad = stream.malformed_positions()
    assert set(sources) == bad, f"DLQ sources differ: missing {sorted(bad - set(sources))[:5]}, " \
                                f"extra {sorted(set(sources) - bad)[:5]}"
    dlq_dupes = sum(sources.values()) - len(sources)
    return {"events": stream.total, "conversions": total, "kills": len(kills), "kill_points": kills,
            "dupes": acc.duplicates, "dup_keys": acc.duplicate_keys, "dlq_dupes": dlq_dupes}


async def test_sigkill_at_random_points_then_complete(
    broker: EmbeddedBroker, sandbox: Sandbox, tmp_path: Path, soak_seconds: float,
) -> None:
    started = time.monotonic()
    rounds = []
    seed = 1
    while True:
        sandbox.reset()
        rounds.append(await sigkill_round(broker, sandbox, tmp_path, seed))
        seed += 1
        if time.monotonic() - started >= soak_seconds:
            break
    for r in rounds:
        result_line(
            "sigkill", events=r["events"], conversions=r["conversions"],
            faults=f"{r['kills']} SIGKILL (after {r['kill_points']} records)", lost=0,
            duplicates=r["dupes"], duplicate_keys=r["dup_keys"], dlq_duplicates=r["dlq_dupes"],
        )
    if len(rounds) > 1:
        result_line("sigkill-soak", rounds=len(rounds), events=sum(r["events"] for r in rounds),
                    faults=sum(r["kills"] for r in rounds), lost=0, duplicates=sum(r["dupes"] for r in rounds),
                    seconds=round(time.monotonic() - started))
