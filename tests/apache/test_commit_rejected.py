"""On Apache Kafka: a commit the broker rejects is not forgotten; it is retried and confirmed afterwards.

How the broker is made to reject a commit, deterministically. The group coordinator stores each offset
commit as a record in `__consumer_offsets`, and a record larger than that topic's `max.message.bytes`
is refused: with the limit lowered to 16 bytes (a dynamic topic config, set with the admin API) every
OffsetCommit is answered with an error for each of its partitions (the broker logs "Writing records
to __consumer_offsets-N failed due to: The request included a message larger than the max message
size the server will accept"; librdkafka reports `UNKNOWN`, "Unknown broker error"), while the member
stays in the group, owns its partitions and goes on consuming. Deleting the override makes commits
succeed again. A commit from a probe consumer of its own group shows when either change has taken
effect, so no test waits on a guess.

This is the path a rebalance takes in production ("Broker: Specified group generation id is not
valid" from a commit sent under the previous generation): an OffsetCommit answered with an error for
partitions still owned. A rebalance is not used here because it is not deterministic: measured on this
broker with a bare member committing every 2 ms while a second member joins (cooperative-sticky), two
runs had 2,464 and 2,766 commits rejected with ILLEGAL_GENERATION, but in three more the window opened
4 to 7 s after the join, at a moment set by heartbeats and the coordinator, and whether the service has
a commit in it depends on its poll loop's timing. Here the rejection lands on the commit of the
partitions' last offsets, after which nothing new arrives: before the fix that commit was recorded as
done when it was queued, so no later commit (the final one included) sent it again, and both tests
fail (checked: the committed offsets stayed at -1001, and no final commit was sent).
"""

from __future__ import annotations

import asyncio
import time
import uuid

from confluent_kafka import Consumer, KafkaException, TopicPartition
from confluent_kafka.admin import (  # type: ignore[attr-defined]
    AdminClient,
    AlterConfigOpType,
    ConfigEntry,
    ConfigResource,
    ResourceType,
)

from consumer.apache_kafka import ApacheKafka
from consumer.app import Application
from consumer.config import Config
from consumer.metrics import Metrics
from consumer.sandbox import Sandbox
from tests.conftest import committed
from tests.reliability.harness import config_dict, new_topics, produce, to_config, wait_committed, wait_for

N_PURCHASES = 300


def service_config(k: ApacheKafka, topics: dict[str, str], sandbox: Sandbox) -> Config:
    data = config_dict(k.bootstrap, topics, sandbox.url)  # commits every 200 ms
    data["logging"] = {"level": "WARNING"}
    return to_config(data)


def _offsets_limit(bootstrap: str, value: str | None) -> None:
    """Set (or, with None, delete) `max.message.bytes` of `__consumer_offsets`."""
    op = AlterConfigOpType.SET if value is not None else AlterConfigOpType.DELETE
    entry = ConfigEntry("max.message.bytes", value or "", incremental_operation=op)
    resource = ConfigResource(ResourceType.TOPIC, "__consumer_offsets", incremental_configs=[entry])
    admin = AdminClient({"bootstrap.servers": bootstrap})
    for future in admin.incremental_alter_configs([resource]).values():
        future.result(15)


def _probe_commits(bootstrap: str, topic: str) -> bool:
    """Whether the broker takes an offset commit now (from a consumer of its own group, not subscribed)."""
    probe = Consumer({"bootstrap.servers": bootstrap, "group.id": f"probe-{uuid.uuid4().hex[:8]}",
                      "enable.auto.commit": False})
    try:
        probe.commit(offsets=[TopicPartition(topic, 0, 0)], asynchronous=False)
        return True
    except KafkaException:
        return False
    finally:
        probe.close()


def refuse_commits(bootstrap: str, topic: str, refuse: bool, timeout: float = 30.0) -> None:
    """Make the broker refuse every offset commit (or take them again), and wait until it does. Blocking."""
    if refuse:
        _probe_commits(bootstrap, topic)  # __consumer_offsets exists only once a group has used the broker
    _offsets_limit(bootstrap, "16" if refuse else None)
    deadline = time.monotonic() + timeout
    while _probe_commits(bootstrap, topic) == refuse:
        if time.monotonic() > deadline:
            raise AssertionError(f"the broker still {'takes' if refuse else 'refuses'} commits after {timeout}s")
        time.sleep(0.1)  # a poll interval, bounded by the deadline above


class RejectedWhenDone:
    """True once every event is done (each partition committable at its end) and a commit failed after that.

    Only the tracker (which the fix leaves alone) and the commits counter are read, so it means the same
    with and without the fix. After the events are done a commit can fail only by sending the partitions'
    end offsets, the last commit each partition needs.
    """

    def __init__(self, app: Application, metrics: Metrics, topic: str, ends: dict[int, int]) -> None:
        self.app, self.metrics, self.topic, self.ends = app, metrics, topic, ends
        self.failed_when_done: float | None = None

    def __call__(self) -> bool:
        if self.failed_when_done is None:
            done = {(self.topic, p): end for p, end in self.ends.items()}
            if not self.ends or self.app.live or any(p.tracker.committable(done) != done for p in self.app.pipelines):
                return False
            self.failed_when_done = commits(self.metrics, "failed")
            return False
        return commits(self.metrics, "failed") > self.failed_when_done


def commits(metrics: Metrics, result: str) -> float:
    """Commits of every provider group together."""
    return sum(s.value for m in metrics.registry.collect() if m.name == "offline_conversions_commits"
               for s in m.samples if s.name.endswith("_total") and s.labels.get("result") == result)


def failing(app: Application) -> list[float]:
    """offline_conversions_commit_failing_partitions of each provider group."""
    return [app.metrics.registry.get_sample_value("offline_conversions_commit_failing_partitions",
                                                  {"group": p.group}) or 0.0 for p in app.pipelines]


async def test_a_rejected_commit_is_retried_at_the_next_commit(apache: ApacheKafka, sandbox: Sandbox) -> None:
    topics = new_topics(apache)
    cfg = service_config(apache, topics, sandbox)
    metrics = Metrics()
    app = Application(cfg, metrics=metrics, install_signals=False)
    loop = asyncio.get_running_loop()
    task = loop.create_task(app.run())
    refused = False
    try:
        await wait_for(lambda: app.readiness()[0], 30, "the service to be ready")
        await loop.run_in_executor(None, refuse_commits, apache.bootstrap, topics["topic"], True)
        refused = True
        ends = (await loop.run_in_executor(None, produce, apache.bootstrap, topics["topic"], N_PURCHASES)).ends()
        await wait_for(RejectedWhenDone(app, metrics, topics["topic"], ends), 30,
                       "every event done, then a commit rejected", every=0.05)
        # Every provider group commits on its own tick: each has failed by the next one or two.
        await wait_for(lambda: failing(app) == [len(ends)] * len(app.pipelines), 10,
                       "every provider group's commit to be rejected")
        before = await loop.run_in_executor(None, committed, apache.bootstrap, topics["group"], topics["topic"])
        assert all(before[p] < end for p, end in ends.items()), f"the broker took a commit: {before} vs {ends}"

        await loop.run_in_executor(None, refuse_commits, apache.bootstrap, topics["topic"], False)
        refused = False
        # Nothing new is read: only a retry of the rejected commit can move the committed offsets now.
        await wait_committed(apache.bootstrap, topics["group"], topics["topic"], ends, timeout=20)
        await wait_for(lambda: all(p.checkpoint.failing == 0 for p in app.pipelines), 10,
                       "the retry's confirmation to be read")
        assert failing(app) == [0] * len(app.pipelines)
        assert not task.done(), "the retry happened while the service ran, at a commit tick"
    finally:
        if refused:
            await loop.run_in_executor(None, refuse_commits, apache.bootstrap, topics["topic"], False)
        app.stop()
        code = await asyncio.wait_for(task, 40)
    assert code == 0, app.fatal
    assert commits(metrics, "failed") >= 1 and commits(metrics, "ok") >= 1


async def test_the_final_commit_sends_what_the_broker_rejected(apache: ApacheKafka, sandbox: Sandbox) -> None:
    """The service stops right after a rejection: no commit tick runs between the broker taking commits again
    and the shutdown, so only the final synchronous commit can carry the rejected offsets."""
    topics = new_topics(apache)
    cfg = service_config(apache, topics, sandbox)
    metrics = Metrics()
    ends: dict[int, int] = {}
    refused = False
    rejected: RejectedWhenDone | None = None

    def stop_when(app: Application) -> bool:
        nonlocal refused, rejected
        rejected = rejected or RejectedWhenDone(app, metrics, topics["topic"], ends)
        if not (refused and rejected()):
            return False
        # Blocking on the service's own loop thread: it runs no commit tick until this returns, and then stops.
        refuse_commits(apache.bootstrap, topics["topic"], False)
        refused = False
        return True

    app = Application(cfg, metrics=metrics, install_signals=False, stop_when=stop_when)
    loop = asyncio.get_running_loop()
    task = loop.create_task(app.run())
    try:
        await wait_for(lambda: app.readiness()[0], 30, "the service to be ready")
        await loop.run_in_executor(None, refuse_commits, apache.bootstrap, topics["topic"], True)
        refused = True
        ends.update((await loop.run_in_executor(None, produce, apache.bootstrap, topics["topic"], N_PURCHASES)).ends())
        code = await asyncio.wait_for(task, 60)
    finally:
        if refused:
            await loop.run_in_executor(None, refuse_commits, apache.bootstrap, topics["topic"], False)
        if not task.done():
            app.stop()
            await asyncio.wait_for(task, 40)
    assert code == 0, app.fatal
    assert commits(metrics, "failed") >= 1
    assert commits(metrics, "ok") == len(app.pipelines), "one commit taken per provider group: the final one"
    final = await loop.run_in_executor(None, committed, apache.bootstrap, topics["group"], topics["topic"])
    assert final == ends
