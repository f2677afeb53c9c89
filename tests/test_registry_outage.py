"""A Schema Registry that hangs while the service runs: events whose schema is cached, deliveries and timers go on."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from registry_server import RegistryServer

from consumer.app import Application
from consumer.config import parse
from consumer.decoding import encode_confluent, load_schema
from consumer.embedded import EmbeddedBroker
from consumer.metrics import Metrics
from consumer.model import Purchase
from consumer.producer import produce_values
from consumer.samples import purchases
from consumer.sandbox import Sandbox
from tests.conftest import config_dict
from tests.loopwatch import LoopWatch
from tests.test_pipeline import expected_conversions

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = ROOT / "schemas" / "purchase_completed.avsc"
V2 = Path(__file__).resolve().parent / "schemas" / "purchase_completed_v2.avsc"
# Every event whose schema is cached reaches its providers within this long of being produced, hang or not.
# The old client blocked the loop for its 5 s timeout on each attempt for an uncached id.
DELIVERY_BOUND = 2.0


@pytest.fixture
def registry() -> Iterator[RegistryServer]:
    with RegistryServer() as reg:
        yield reg


def total(counts: dict[str, int]) -> int:
    return sum(counts.values())


def accepted(expected: dict[str, list[object]], items: list[Purchase]) -> int:
    """How many conversions the sandbox counts for `items` (a Conductrics conversion counts once per goal)."""
    orders = {p.order_id for p in items}
    n = 0
    for provider, pairs in expected.items():
        for p, c in pairs:  # type: ignore[misc]
            if p.order_id in orders:
                n += len(c.goals) if provider == "conductrics" else 1
    return n


async def test_a_hanging_registry_delays_only_events_with_an_uncached_schema(
    broker: EmbeddedBroker, topics: dict[str, str], sandbox: Sandbox, registry: RegistryServer,
) -> None:
    cached_id = registry.register("purchases-value", SCHEMA.read_text())
    new_id = registry.register("purchases-value", V2.read_text())  # a newer writer nobody has used yet
    # No [decoding.schema_registry] table: the defaults (5 s request timeout) are what is measured against.
    data = config_dict(broker.bootstrap, topics, sandbox.url,
                       decoding={"format": "confluent", "schema_registry_url": registry.url})
    cfg = parse(data, env={})
    now = int(time.time() * 1000)
    items = list(purchases(90, now_ms=now, seed=21))
    first, uncached, later = items[:30], items[30], items[31:]
    expected = expected_conversions(cfg, items)
    assert accepted(expected, [uncached]) > 0  # it has conversions to deliver, once decoded
    schema = load_schema(SCHEMA)
    v2 = load_schema(V2)

    def values(batch: list[Purchase], schema_id: int) -> list[tuple[bytes | None, bytes]]:
        return [(p.order_id.encode(), encode_confluent(p, schema_id, v2 if schema_id == new_id else schema))
                for p in batch]

    loop = asyncio.get_running_loop()
    metrics = Metrics()
    app = Application(cfg, metrics=metrics, install_signals=False,
                      stop_when=lambda a: a.consumed >= len(items) and a.live == 0)
    run = asyncio.create_task(app.run())
    watch = LoopWatch().start()
    try:
        # 1. The cached id is fetched once, while the registry answers.
        await loop.run_in_executor(None, produce_values, broker.bootstrap, topics["topic"], values(first, cached_id))
        await sandbox.wait_until(lambda s: total(s.counts()) == accepted(expected, first), 30)

        # 2. The registry hangs; an event with a new schema id arrives, then events with the cached one.
        registry.hang()
        watch.gaps.clear()
        produced = values([uncached], new_id) + values(later, cached_id)
        await loop.run_in_executor(None, produce_values, broker.bootstrap, topics["topic"], produced)
        produced_at = time.monotonic()
        await sandbox.wait_until(lambda s: total(s.counts()) == accepted(expected, first + later), 15)
        delay = time.monotonic() - produced_at
        assert delay < DELIVERY_BOUND, f"events with a cached schema id took {delay:.2f} s while the registry hung"
        assert watch.longest < 0.5, f"the event loop was blocked for {watch.longest:.2f} s"
        assert ("GET", f"/schemas/ids/{new_id}") in registry.requests  # asked, and still waiting
        assert total(sandbox.counts()) == accepted(expected, first + later)  # not the uncached event's
        assert not run.done() and app.live >= 1

        # 3. The registry answers again: the waiting event is decoded and delivered; nothing is dead-lettered.
        registry.hang(False)
        await sandbox.wait_until(lambda s: total(s.counts()) == accepted(expected, items), 30)
        assert await asyncio.wait_for(run, 30) == 0
    finally:
        watch.stop()
        if not run.done():
            app.stop()
            await asyncio.wait_for(run, 30)
    assert metrics.registry.get_sample_value("offline_conversions_dlq_produced_total",
                                             {"stage": "decode", "provider": "none"}) in (None, 0.0)
    assert sandbox.duplicates() == {}
    assert registry.requests.count(("GET", f"/schemas/ids/{cached_id}")) == 1
