"""On Apache Kafka: the three group protocols under a steady stream while the group grows 1→3 and shrinks back,
and static membership (a member restarted within its session timeout causes no rebalance).

Every conversion of the stream is delivered (re-sends after a revoke are counted, never a loss), and the
pause in deliveries that each membership change causes is measured and printed as a RESULT line; the
figures are in docs/operations.md ("Group protocol").
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka.admin import AdminClient  # type: ignore[attr-defined]

from consumer.apache_kafka import ApacheKafka
from consumer.group_protocol import CLASSIC_ONLY
from consumer.sandbox import Sandbox
from tests.conftest import Broker
from tests.reliability.harness import (
    Member,
    Service,
    SteadyStream,
    account,
    all_present,
    config_dict,
    conversions_of,
    expected_view,
    longest_gap,
    new_topics,
    result_line,
    settled,
    to_config,
    wait_committed,
    wait_for,
)

PARTITIONS = 6
RATE = 500.0  # events/s, the steady stream
PROTOCOLS = ("eager", "cooperative-sticky", "consumer")  # [kafka] group_protocol


def protocol_config(broker: Broker, topics: dict[str, str], sandbox: Sandbox, protocol: str) -> dict[str, Any]:
    data = config_dict(broker.bootstrap, topics, sandbox.url)
    data["logging"] = {"level": "WARNING"}
    consumer = dict(data["kafka"]["consumer"])
    if protocol in ("consumer", "auto"):
        for key in CLASSIC_ONLY:  # the broker owns these under KIP-848 (500 ms heartbeats in the test cluster)
            consumer.pop(key, None)
    consumer["fetch.wait.max.ms"] = 20
    data["kafka"]["consumer"] = consumer
    data["kafka"]["group_protocol"] = protocol
    # One group for the three providers: these scenarios time one group's rebalances (each provider group
    # of the default isolation rebalances the same way; tests/reliability/test_rebalance.py runs those).
    data["kafka"]["isolation"] = "shared"
    return data


async def wait_flowing(sandbox: Sandbox, more: int = 150, timeout: float = 30.0) -> None:
    """Until `more` further conversions have arrived: deliveries are flowing again after a change."""
    target = len(sandbox.records) + more
    await sandbox.wait_until(lambda s: len(s.records) >= target, timeout=timeout)


def group_owners(bootstrap: str, group: str, topic: str) -> list[list[int]] | None:
    """Each member's partitions of `topic` while the group is stable, from Kafka's own DescribeGroups."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    try:
        desc = admin.describe_consumer_groups([group], request_timeout=5)[group].result(10)
    except Exception:  # the coordinator is busy rebalancing: ask again
        return None
    if str(desc.state).rsplit(".", 1)[-1] != "STABLE":
        return None
    return [sorted(tp.partition for tp in m.assignment.topic_partitions if tp.topic == topic) for m in desc.members]


async def group_settled(bootstrap: str, group: str, topic: str, members: int, timeout: float = 45.0) -> float:
    """Until the group is stable with `members` members, each owning some of the partitions, each partition
    owned once; returns when (epoch s)."""
    loop = asyncio.get_running_loop()
    deadline = time.monotonic() + timeout
    last: list[list[int]] | None = None
    while time.monotonic() < deadline:
        last = await loop.run_in_executor(None, group_owners, bootstrap, group, topic)
        if last is not None and len(last) == members and all(last) and \
                sorted(p for m in last for p in m) == list(range(PARTITIONS)):
            return time.time()
        await asyncio.sleep(0.05)  # poll interval under a deadline
    raise AssertionError(f"the group did not settle with {members} members within {timeout}s: {last}")


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_group_grows_and_shrinks_under_a_steady_stream(apache: ApacheKafka, sandbox: Sandbox, protocol: str,
                                                             tmp_path: Path) -> None:
    """Members are processes (as in production): one member's shutdown cannot stall another's event loop."""
    broker = apache
    topics = new_topics(broker, partitions=PARTITIONS)
    data = protocol_config(broker, topics, sandbox, protocol)
    cfg = to_config(data)
    bootstrap, group, topic = broker.bootstrap, topics["group"], topics["topic"]
    steady = SteadyStream(bootstrap, topic, RATE, seed=40 + len(protocol)).start()
    members: list[Service] = []
    changes: list[tuple[str, float, float]] = []  # (change, started, settled)
    try:
        members.append(Service(data, tmp_path, name="A"))
        await members[0].start()
        await group_settled(bootstrap, group, topic, 1)
        await wait_flowing(sandbox)
        for name in ("B", "C"):
            svc = Service(data, tmp_path, name=name)
            members.append(svc)
            await svc.start()
            started = time.time()
            done = await group_settled(bootstrap, group, topic, len(members))
            await wait_flowing(sandbox)
            changes.append((f"join {name} ({len(members)} members)", started, done))
        for svc in (members[2], members[1]):
            started = time.time()
            svc.terminate()
            assert await svc.wait(40) == 0, svc.tail()
            done = await group_settled(bootstrap, group, topic, 1 if svc is members[1] else 2)
            await wait_flowing(sandbox)
            changes.append((f"leave {svc.name}", started, done))
        # The stream runs on past the last change's measuring window (until a second after it settled).
        await wait_for(lambda: time.time() > changes[-1][2] + 1.5, 10, "the last window to pass")
    finally:
        stream = steady.stop()
    try:
        want = expected_view(conversions_of(cfg, stream.items))
        await sandbox.wait_until(lambda s: all_present(s, want), timeout=60)
        await wait_committed(bootstrap, group, topic, stream.ends(), timeout=30)
        members[0].terminate()
        assert await members[0].wait(40) == 0, members[0].tail()
    finally:
        for svc in members:
            await svc.stop()
    acc = account(sandbox, want)
    assert acc.lost == 0, f"{protocol}: lost {acc.lost} of {acc.expected}, e.g. {acc.missing_sample}"
    assert acc.unexpected == 0
    times = [r.time for r in sandbox.records]
    # The pause a change caused: the longest stretch without a delivery from the change until a second
    # after the group settled (the stream never stops, so a healthy group delivers every few ms). A join
    # starts when the new process starts (its imports take ~1 s and pause nothing).
    measured = [(what, s, d, longest_gap(times, s, d + 1.0)) for what, s, d in changes]
    for what, s, d, gap in measured:
        result_line(f"group-protocol {protocol}", change=what, settle_s=round(d - s, 2), pause_s=round(gap, 2))
    result_line(f"group-protocol {protocol} total", events=stream.total, conversions=acc.expected,
                duplicates=acc.duplicates, max_pause_s=round(max(g for *_, g in measured), 2))
    # A bound that fails if a change stalls deliveries (Tansu's cooperative stall was 20 s and more).
    assert max(g for *_, g in measured) < 15.0, measured


async def test_static_member_restarted_within_session_timeout_causes_no_rebalance(
    apache: ApacheKafka, sandbox: Sandbox
) -> None:
    broker = apache
    topics = new_topics(broker, partitions=PARTITIONS)
    data = protocol_config(broker, topics, sandbox, "cooperative-sticky")
    data["kafka"]["consumer"]["session.timeout.ms"] = 30000  # a static member's partitions wait this long

    def member_config(instance: str) -> Any:
        d = {**data, "kafka": {**data["kafka"], "consumer": {**data["kafka"]["consumer"],
                                                             "group.instance.id": instance}}}
        return to_config(d)

    steady = SteadyStream(broker.bootstrap, topics["topic"], 200.0, seed=61).start()
    try:
        a, b = Member(member_config("pod-a"), "A"), Member(member_config("pod-b"), "B")
        await settled([a, b], PARTITIONS)
        await wait_flowing(sandbox)
        a_parts, b_parts = a.owned(), b.owned()
        before = callbacks(b)
        assert await a.leave() == 0, a.app.fatal
        a2 = Member(member_config("pod-a"), "A'")
        await a2.assigned()
        await wait_flowing(sandbox)
        # A rebalance would have run B's callbacks: revoke everything (eager) or hand it A's partitions
        # (cooperative), as it does when a dynamic member leaves. A static member's return runs none.
        assert callbacks(b) == before, f"B saw rebalance callbacks while A restarted: {before} -> {callbacks(b)}"
        assert b.owned() == b_parts
        assert a2.owned() == a_parts, f"A came back with {a2.owned()}, had {a_parts}"
    finally:
        stream = steady.stop()
    want = expected_view(conversions_of(to_config(data), stream.items))
    await sandbox.wait_until(lambda s: all_present(s, want), timeout=60)
    for m in (a2, b):
        assert await m.leave() == 0, m.app.fatal
    acc = account(sandbox, want)
    assert acc.lost == 0
    result_line("static-membership", events=stream.total, b_partitions=b_parts, a_partitions=a_parts,
                b_callbacks_during_restart=0, duplicates=acc.duplicates)


def callbacks(m: Member) -> dict[str, float]:
    r = m.app.metrics.registry
    return {e: r.get_sample_value("offline_conversions_rebalance_callbacks_total", {"event": e}) or 0.0
            for e in ("assigned", "revoked", "lost")}


def group_type(bootstrap: str, group: str) -> str:
    admin = AdminClient({"bootstrap.servers": bootstrap})  # kept alive until its future resolves
    desc = admin.describe_consumer_groups([group])[group].result(10)
    return str(desc.type).rsplit(".", 1)[-1]


async def test_auto_joins_with_kip848_where_the_broker_offers_it(apache: ApacheKafka, sandbox: Sandbox) -> None:
    topics = new_topics(apache, partitions=PARTITIONS)
    data = protocol_config(apache, topics, sandbox, "auto")
    member = Member(to_config(data), "auto")
    try:
        await member.assigned()
        assert [p.source.consumer_protocol for p in member.app.pipelines] == ["consumer"]
        loop = asyncio.get_running_loop()
        assert await loop.run_in_executor(None, group_type, apache.bootstrap, topics["group"]) == "CONSUMER"
    finally:
        assert await member.leave() == 0, member.app.fatal


async def test_rolling_upgrade_from_eager_to_kip848(apache: ApacheKafka, sandbox: Sandbox, tmp_path: Path) -> None:
    """An eager group (every earlier release) upgraded member by member to `auto` (KIP-848 on Kafka 4): the
    upgraded members join the running group, nothing stalls, nothing is lost."""
    topics = new_topics(apache, partitions=PARTITIONS)
    old, new = protocol_config(apache, topics, sandbox, "eager"), protocol_config(apache, topics, sandbox, "auto")
    bootstrap, group, topic = apache.bootstrap, topics["group"], topics["topic"]
    steady = SteadyStream(bootstrap, topic, 300.0, seed=77).start()
    procs: list[Service] = []
    try:
        for i in range(2):
            procs.append(Service(old, tmp_path, name=f"old-{i}"))
            await procs[-1].start()
        await group_settled(bootstrap, group, topic, 2)
        await wait_flowing(sandbox)
        for i in range(2):  # replace one pod at a time, as the Deployment's rollout does
            procs[i].terminate()
            assert await procs[i].wait(40) == 0, procs[i].tail()
            procs.append(Service(new, tmp_path, name=f"new-{i}"))
            await procs[-1].start()
            await group_settled(bootstrap, group, topic, 2)
            await wait_flowing(sandbox)
        loop = asyncio.get_running_loop()
        assert await loop.run_in_executor(None, group_type, bootstrap, group) == "CONSUMER"
    finally:
        stream = steady.stop()
    try:
        want = expected_view(conversions_of(to_config(new), stream.items))
        await sandbox.wait_until(lambda s: all_present(s, want), timeout=60)
        await wait_committed(bootstrap, group, topic, stream.ends(), timeout=30)
    finally:
        for p in procs:
            await p.stop()
    acc = account(sandbox, want)
    assert acc.lost == 0 and acc.unexpected == 0, acc
    result_line("rolling-upgrade eager->kip848", events=stream.total, lost=0, duplicates=acc.duplicates,
                group_type="CONSUMER")
