"""Scenario 3: the broker stopped and restarted under a running service, on the embedded Tansu broker.

This is the case of a broker that comes back empty (the durable case, Apache Kafka SIGKILLed and restarted
on its own logs, is tests/apache/test_broker_faults.py). Tansu keeps everything in memory: the restarted
broker is empty (no topics, no group, no committed offsets). The topics are recreated and new events
produced; the service must survive, reconnect and deliver the new events — which land at offsets 0..
again on the recreated topic.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest

from consumer.app import Application
from consumer.embedded import EmbeddedBroker
from consumer.metrics import Metrics
from consumer.sandbox import Sandbox

from .harness import (
    account,
    all_present,
    config_dict,
    conversions_of,
    expected_view,
    produce,
    result_line,
    to_config,
    wait_committed,
    wait_for,
)


@pytest.fixture
def own_broker() -> Iterator[EmbeddedBroker]:
    """A broker of this test's own, so stopping it does not disturb the session broker."""
    b = EmbeddedBroker().start()
    try:
        yield b
    finally:
        b.stop()


async def test_broker_restart_under_the_service(own_broker: EmbeddedBroker, sandbox: Sandbox) -> None:
    b = own_broker
    topics = {"topic": "restart.purchases", "dlq": "restart.purchases.dlq", "group": "restart-group"}
    b.create_topics([topics["topic"], topics["dlq"]], partitions=3)
    data = config_dict(b.bootstrap, topics, sandbox.url)
    data["logging"] = {"level": "WARNING"}
    cfg = to_config(data)

    before = produce(b.bootstrap, topics["topic"], 300, 0, seed=31)
    want_before = expected_view(conversions_of(cfg, before.items))
    metrics = Metrics()
    app = Application(cfg, metrics=metrics, install_signals=False)
    task = asyncio.get_running_loop().create_task(app.run())
    try:
        await sandbox.wait_until(lambda s: all_present(s, want_before), timeout=60)
        await wait_committed(b.bootstrap, topics["group"], topics["topic"], before.ends(), timeout=30)
        consumed_before = app.consumed

        # The broker goes away; the service notices and keeps running.
        stopped_at = time.monotonic()
        await asyncio.get_running_loop().run_in_executor(None, b.stop)
        await wait_for(lambda: bool(app.pipelines) and not any(p.source.broker_up for p in app.pipelines), 30,
                       "the service to notice the broker is down")
        assert not task.done(), f"the service exited when the broker went away: {app.fatal}"

        # Back, empty: recreate the topics and produce new events.
        await asyncio.get_running_loop().run_in_executor(None, b.start)
        await asyncio.get_running_loop().run_in_executor(
            None, lambda: b.create_topics([topics["topic"], topics["dlq"]], partitions=3))
        sandbox.records.clear()
        after = produce(b.bootstrap, topics["topic"], 300, 0, seed=32)
        want_after = expected_view(conversions_of(cfg, after.items))
        try:
            await sandbox.wait_until(lambda s: all_present(s, want_after), timeout=25)
        except TimeoutError:
            acc = account(sandbox, want_after)
            raise AssertionError(
                f"after the broker restart the service delivered {acc.received} of {acc.expected} conversions "
                f"of the new events (lost {acc.lost}); consumed {app.consumed - consumed_before} new messages, "
                f"fatal={app.fatal!r}, task done={task.done()}, "
                f"assigned={ {p.group: p.source.assigned for p in app.pipelines} }, "
                f"tracker partitions={ {p.group: p.tracker.partitions() for p in app.pipelines} }") from None
        await wait_committed(b.bootstrap, topics["group"], topics["topic"], after.ends(), timeout=30)
        assert not task.done()
        recovered = time.monotonic() - stopped_at
    finally:
        app.stop()
        code = await asyncio.wait_for(task, 30)
    assert code == 0, app.fatal
    acc = account(sandbox, want_after)
    assert acc.lost == 0 and acc.unexpected == 0, acc
    result_line("broker-restart", events=before.total + after.total, faults="1 broker stop+restart (data lost)",
                recovered_seconds=round(recovered, 1), lost=acc.lost, duplicates=acc.duplicates)
