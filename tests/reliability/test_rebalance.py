"""Scenario 4: members joining and leaving mid-stream (2 and 3 in-process Applications, one group).

Events are produced while members come and go. Every event is delivered or dead-lettered; a re-send
after a revoke (an event in flight at the old owner, re-read by the new one) is legitimate and counted.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from typing import Any

from consumer.embedded import EmbeddedBroker
from consumer.sandbox import Sandbox
from tests.conftest import read_all

from .harness import (
    Member,
    Stream,
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
    settled,
    to_config,
    wait_committed,
)


async def rebalance_round(broker: EmbeddedBroker, sandbox: Sandbox, seed: int) -> dict[str, Any]:
    topics = new_topics(broker, partitions=6)
    data = config_dict(broker.bootstrap, topics, sandbox.url)
    data["logging"] = {"level": "WARNING"}
    data["pipeline"]["max_in_flight"] = 200
    cfg = to_config(data)
    sandbox.set_latency("*", 0.01)
    rng = random.Random(seed)
    stream = Stream()

    def more(n: int, bad: int = 3) -> Stream:
        return produce(
            broker.bootstrap, topics["topic"], n, bad, seed=seed * 100 + rng.randrange(99), stream=stream, partitions=6
        )

    members: list[Member] = []
    changes = 0
    more(250)
    a = Member(cfg, "A")
    members.append(a)
    await a.assigned()
    await sandbox.wait_until(lambda s: len(s.records) >= 100, timeout=30)
    b = Member(cfg, "B")  # two members
    members.append(b)
    changes += 1
    more(250)
    await b.assigned()
    await settled(members)
    more(250)
    c = Member(cfg, "C")  # three members
    members.append(c)
    changes += 1
    await c.assigned()
    await settled(members)
    more(250)
    assert await a.leave() == 0, a.app.fatal  # A leaves mid-stream
    changes += 1
    await settled(members)
    more(250)
    d = Member(cfg, "D")  # D joins, then B leaves
    members.append(d)
    changes += 1
    await d.assigned()
    await settled(members)
    more(100)
    assert await b.leave() == 0, b.app.fatal
    changes += 1
    await settled(members)
    more(250)

    want = expected_view(conversions_of(cfg, stream.items))
    try:
        try:
            await sandbox.wait_until(lambda s: all_present(s, want), timeout=30)
        except TimeoutError:
            acc = account(sandbox, want)
            state = {
                m.name: {
                    "done": m.task.done(),
                    "assigned": {p.group: sorted(tp[1] for tp in p.source.assigned) for p in m.app.pipelines},
                    "paused": {p.group: p.source.paused for p in m.app.pipelines},
                    "consumed": m.app.consumed,
                    "live": m.app.live,
                }
                for m in members
            }
            got = await committed_async(broker.bootstrap, topics["group"], topics["topic"], 6)
            raise AssertionError(
                f"not delivered: lost {acc.lost} of {acc.expected}; members {state}; "
                f"committed {got}; ends {stream.ends()}"
            ) from None
        await wait_committed(broker.bootstrap, topics["group"], topics["topic"], stream.ends(), timeout=30)
    finally:
        codes = [await m.leave() for m in (c, d)]
        sandbox.clear_faults()
    assert codes == [0, 0]
    acc = account(sandbox, want)
    assert acc.lost == 0, f"lost {acc.lost}, e.g. {acc.missing_sample}"
    assert acc.unexpected == 0
    dlq = read_all(broker.bootstrap, topics["dlq"], len(stream.bad))
    sources = dlq_sources(dlq)
    assert set(sources) == stream.malformed_positions()
    consumed = Counter({m.name: m.app.consumed for m in members})
    return {
        "events": stream.total,
        "conversions": acc.expected,
        "changes": changes,
        "dupes": acc.duplicates,
        "dlq_dupes": sum(sources.values()) - len(sources),
        "consumed": dict(consumed),
    }


async def test_members_join_and_leave_mid_stream(broker: EmbeddedBroker, sandbox: Sandbox, soak_seconds: float) -> None:
    started = time.monotonic()
    rounds = []
    seed = 1
    while True:
        sandbox.reset()
        rounds.append(await rebalance_round(broker, sandbox, seed))
        seed += 1
        if time.monotonic() - started >= soak_seconds:
            break
    for r in rounds:
        result_line(
            "rebalance",
            events=r["events"],
            conversions=r["conversions"],
            faults=f"{r['changes']} membership changes (2 and 3 members)",
            consumed_by=r["consumed"],
            lost=0,
            duplicates=r["dupes"],
            dlq_duplicates=r["dlq_dupes"],
        )
    if len(rounds) > 1:
        result_line(
            "rebalance-soak",
            rounds=len(rounds),
            events=sum(r["events"] for r in rounds),
            lost=0,
            duplicates=sum(r["dupes"] for r in rounds),
            seconds=round(time.monotonic() - started),
        )
