"""On Apache Kafka with logs on disk: the single broker SIGKILLed and restarted on its directory, and the
leader of the source and DLQ partitions SIGKILLed in a three-node cluster (replication 3, min.insync 2).

Nothing produced is lost (the broker kept it), every conversion reaches the sandbox and every malformed
event the DLQ, the service reconnects by itself, and — sampled all through the failover — it never
commits an offset past an event it had not finished.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path
from typing import Any

from consumer.apache_kafka import ApacheKafka
from consumer.app import Application
from consumer.metrics import Metrics
from consumer.sandbox import Sandbox
from tests.conftest import read_all
from tests.reliability.harness import (
    SteadyStream,
    Stream,
    account,
    all_present,
    committed_async,
    config_dict,
    conversions_of,
    dlq_sources,
    expected_view,
    produce,
    result_line,
    sandbox_view,
    to_config,
    wait_committed,
    wait_for,
)


def service_config(k: ApacheKafka, topics: dict[str, str], sandbox: Sandbox) -> dict[str, Any]:
    data = config_dict(k.bootstrap, topics, sandbox.url)
    data["logging"] = {"level": "WARNING"}
    # The DLQ must outlast a broker outage: a dead letter waits for the broker, it is never dropped.
    data["pipeline"]["dlq_timeout"] = "120s"
    return data


async def test_broker_sigkilled_and_restarted_on_its_directory(sandbox: Sandbox, tmp_path: Path) -> None:
    topics = {"topic": "durable.purchases", "dlq": "durable.purchases.dlq", "group": "durable"}
    with ApacheKafka(directory=tmp_path / "kafka") as k:
        k.create_topics([topics["topic"], topics["dlq"]], partitions=3)
        cfg = to_config(service_config(k, topics, sandbox))
        app = Application(cfg, metrics=Metrics(), install_signals=False)
        task = asyncio.get_running_loop().create_task(app.run())
        steady = SteadyStream(k.bootstrap, topics["topic"], 200.0, seed=71).start()
        try:
            await wait_for(lambda: app.readiness()[0], 30, "the service to be ready")
            await sandbox.wait_until(lambda s: len(s.records) >= 300, timeout=30)
            k.kill(1)
            killed = time.monotonic()
            await wait_for(lambda: not app.readiness()[0], 30, "readiness to drop with the broker gone", every=0.05)
            dropped = time.monotonic() - killed
            k.restart(1)  # the same directory and ports: the log, the group and its offsets are still there
            restarted = time.monotonic()
            await wait_for(lambda: app.readiness()[0], 60, "readiness to recover", every=0.05)
            recovered = time.monotonic() - restarted
            at = len(sandbox.records)
            await sandbox.wait_until(lambda s: len(s.records) >= at + 300, timeout=60)
        finally:
            stream = steady.stop()
        want = expected_view(conversions_of(cfg, stream.items))
        try:
            await sandbox.wait_until(lambda s: all_present(s, want), timeout=60)
            await wait_committed(k.bootstrap, topics["group"], topics["topic"], stream.ends(), timeout=30)
        finally:
            app.stop()
            code = await asyncio.wait_for(task, 40)
        assert code == 0, app.fatal
        acc = account(sandbox, want)
        assert acc.lost == 0, f"lost {acc.lost} of {acc.expected}, e.g. {acc.missing_sample}"
        assert acc.unexpected == 0
        # The broker's log kept every produced message across the SIGKILL: all of them are still readable.
        assert len(read_all(k.bootstrap, topics["topic"], stream.total)) == stream.total
        result_line("broker-restart (durable)", events=stream.total, conversions=acc.expected, lost=0,
                    duplicates=acc.duplicates, ready_dropped_after_s=round(dropped, 2),
                    ready_recovered_after_s=round(recovered, 2))


class CommitAudit:
    """Samples the group's committed offsets; each time, every purchase below them must already be in the sandbox."""

    def __init__(self, k: ApacheKafka, topics: dict[str, str], steady: SteadyStream, cfg: Any) -> None:
        self.k, self.topics, self.steady, self.cfg = k, topics, steady, cfg
        self.checked: dict[int, int] = {}
        self.samples = 0
        self.violations: list[str] = []

    async def run(self, sandbox: Sandbox, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                got = await committed_async(self.k.bootstrap, self.topics["group"], self.topics["topic"])
            except Exception:  # the coordinator may be the node that was killed: sample again
                await asyncio.sleep(0.2)  # a sampling interval
                continue
            view = sandbox_view(sandbox)  # read after the offsets: what was finished before they were committed
            for p, c in got.items():
                start = self.checked.get(p, 0)
                if c <= start:
                    continue
                items = [self.steady.landed[(p, o)] for o in range(start, c) if (p, o) in self.steady.landed]
                owed = expected_view(conversions_of(self.cfg, items))
                for provider, keys in owed.items():
                    missing = keys - view[provider]
                    if missing:
                        self.violations.append(f"committed {c} on partition {p} before {provider} had "
                                               f"{len(missing)} conversions, e.g. {next(iter(missing))}")
                self.checked[p] = c
            self.samples += 1
            await asyncio.sleep(0.2)  # a sampling interval


async def test_leader_of_source_and_dlq_sigkilled_in_a_three_node_cluster(sandbox: Sandbox, tmp_path: Path) -> None:
    topics = {"topic": "failover.purchases", "dlq": "failover.purchases.dlq", "group": "failover"}
    with ApacheKafka(nodes=3, directory=tmp_path / "kafka") as k:
        # Node 1 is the preferred leader of partition 0 of both topics: killing it moves both leaderships.
        placement = [[1, 2, 3], [2, 3, 1], [3, 1, 2]]
        k.create_topics([topics["topic"], topics["dlq"]], config={"min.insync.replicas": "2"}, assignment=placement)
        victim = k.leaders(topics["topic"])[0]
        assert victim == k.leaders(topics["dlq"])[0] == 1
        cfg = to_config(service_config(k, topics, sandbox))
        app = Application(cfg, metrics=Metrics(), install_signals=False)
        task = asyncio.get_running_loop().create_task(app.run())
        steady = SteadyStream(k.bootstrap, topics["topic"], 200.0, seed=72).start()
        bad = Stream()
        audit = CommitAudit(k, topics, steady, cfg)
        stop_audit = asyncio.Event()
        auditing = asyncio.get_running_loop().create_task(audit.run(sandbox, stop_audit))
        try:
            await sandbox.wait_until(lambda s: len(s.records) >= 300, timeout=60)
            produce(k.bootstrap, topics["topic"], 0, 6, seed=73, stream=bad)  # dead letters before the kill
            k.kill(victim)
            # Malformed events right after the kill: their dead letters are written while partition 0 of
            # the DLQ elects a new leader.
            await asyncio.get_running_loop().run_in_executor(
                None, lambda: produce(k.bootstrap, topics["topic"], 0, 9, seed=74, stream=bad))
            await wait_for(lambda: k.leaders(topics["topic"])[0] not in (victim, -1)
                           and k.leaders(topics["dlq"])[0] not in (victim, -1), 30, "new leaders")
            at = len(sandbox.records)
            await sandbox.wait_until(lambda s: len(s.records) >= at + 300, timeout=60)
            await asyncio.get_running_loop().run_in_executor(None, k.restart, victim)
            await wait_for(lambda: all(len(r) == 3 for r in k.in_sync(topics["topic"]).values()), 60,
                           "the restarted node back in sync")
            at = len(sandbox.records)
            await sandbox.wait_until(lambda s: len(s.records) >= at + 200, timeout=60)
        finally:
            stream = steady.stop()
        want = expected_view(conversions_of(cfg, stream.items))
        ends = stream.ends()
        for (p, o) in bad.positions:
            ends[p] = max(ends.get(p, 0), o + 1)
        try:
            await sandbox.wait_until(lambda s: all_present(s, want), timeout=60)
            await wait_committed(k.bootstrap, topics["group"], topics["topic"], ends, timeout=60)
        finally:
            stop_audit.set()
            await auditing
            app.stop()
            code = await asyncio.wait_for(task, 40)
        assert code == 0, app.fatal
        assert not audit.violations, audit.violations[:5]
        assert audit.samples >= 10, f"only {audit.samples} commit samples were taken"
        acc = account(sandbox, want)
        assert acc.lost == 0, f"lost {acc.lost} of {acc.expected}, e.g. {acc.missing_sample}"
        assert acc.unexpected == 0
        sources = dlq_sources(read_all(k.bootstrap, topics["dlq"], len(bad.positions)))
        assert set(sources) == set(bad.positions), "every malformed event has its dead letter"
        repeats = Counter(sources.values())
        result_line("leader-failover", events=stream.total + len(bad.positions), conversions=acc.expected,
                    dead_letters=len(sources), lost=0, duplicates=acc.duplicates,
                    dlq_duplicates=sum(n - 1 for n in sources.values()), dlq_copies=dict(repeats),
                    commit_samples=audit.samples, commits_past_unfinished=0)


async def test_readiness_recovers_on_an_idle_topic_after_a_broker_restart(sandbox: Sandbox, tmp_path: Path) -> None:
    """No traffic at all: readiness must come back from the client's view of the broker, not from a message."""
    topics = {"topic": "idle.purchases", "dlq": "idle.purchases.dlq", "group": "idle"}
    with ApacheKafka(directory=tmp_path / "kafka") as k:
        k.create_topics([topics["topic"], topics["dlq"]], partitions=3)
        data = service_config(k, topics, sandbox)
        data["kafka"]["consumer"]["statistics.interval.ms"] = 500
        app = Application(to_config(data), metrics=Metrics(), install_signals=False)
        task = asyncio.get_running_loop().create_task(app.run())
        try:
            await wait_for(lambda: app.readiness()[0], 30, "the service to be ready")
            k.kill(1)
            await wait_for(lambda: not app.readiness()[0], 30, "readiness to drop with the broker gone", every=0.05)
            await asyncio.get_running_loop().run_in_executor(None, k.restart, 1)
            await wait_for(lambda: app.readiness()[0], 30, "readiness to recover with no message flowing")
            assert app.consumed == 0
        finally:
            app.stop()
            assert await asyncio.wait_for(task, 40) == 0, app.fatal
