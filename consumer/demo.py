"""`offline-conversions demo`: the whole pipeline on an embedded broker and the sandbox, with live progress."""

from __future__ import annotations

import asyncio
import gc
import logging
import sys
import time
import uuid
from typing import Any, TextIO

from consumer.app import Application
from consumer.config import Config, parse
from consumer.embedded import EmbeddedBroker, EmbeddedBrokerError
from consumer.metrics import Metrics
from consumer.producer import encoded, produce_values
from consumer.providers import registry
from consumer.samples import malformed, purchases
from consumer.sandbox import Sandbox

# librdkafka defaults make a group join take ~23 s on the embedded broker; these make it ~3 s.
# fetch.wait.max.ms: measured on Tansu, a resumed partition's first fetch arrives after ~50 ms
# with 100, ~450 ms with the default 500, and ~950 ms with 5 — backpressure pauses and resumes.
EMBEDDED_CONSUMER = {"session.timeout.ms": 6000, "heartbeat.interval.ms": 500, "fetch.wait.max.ms": 100}


def sample_config(bootstrap: str, topic: str, dlq_topic: str, group: str, sandbox_url: str) -> dict[str, Any]:
    """A config for the sample projects with every provider pointed at the sandbox."""
    return {
        # The embedded Tansu broker speaks only the classic protocol, and cooperative rebalances stall on it.
        "kafka": {"bootstrap_servers": bootstrap, "topic": topic, "group_id": group, "dlq_topic": dlq_topic,
                  "group_protocol": "eager", "consumer": dict(EMBEDDED_CONSUMER)},
        "metrics": {"host": "127.0.0.1", "port": 0},
        "control": {"port": 0},
        "pipeline": {"commit_interval": "1s"},
        "logging": {"level": "WARNING"},
        # Every provider with a sample project (its package's `Sample`), pointed at the sandbox.
        **{spec.slug: spec.sample.section(sandbox_url) for spec in registry.specs() if spec.sample},
    }


def sandbox_options() -> dict[str, Any]:
    """What the sandbox needs to accept the sample projects (e.g. their API keys), from each provider."""
    out: dict[str, Any] = {}
    for spec in registry.specs():
        if spec.sample:
            out.update(spec.sample.sandbox_options)
    return out


def _slugs() -> tuple[str, ...]:
    return tuple(spec.slug for spec in registry.specs())


def _counter(metrics: Metrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels or None)
    return value or 0.0


class Progress:
    """One line, rewritten in place on a terminal (appended every few seconds otherwise).

    It counts two things that must not be mistaken for each other: events (Kafka messages: read, in
    flight, lag, dead letters) and conversions (what the providers received: one event gives 0 to many).
    """

    def __init__(self, metrics: Metrics, total: int, out: TextIO) -> None:
        self.metrics, self.total, self.out = metrics, total, out
        self.tty = out.isatty()
        self.started = time.monotonic()
        self._width = 0

    def line(self, consumed: int, live: int, now: float) -> str:
        m = self.metrics
        delivered = sum(_counter(m, "offline_conversions_conversions_total", provider=p, outcome="delivered")
                        for p in _slugs())
        dead = sum(_counter(m, "offline_conversions_dlq_messages_total", stage=s, provider=p)
                   for s in ("decode", "match", "dispatch") for p in ("none", *_slugs()))
        rate = consumed / max(now - self.started, 1e-6)
        return (f"events: {consumed}/{self.total} read, {rate:.0f}/s, {live} in flight, lag {self.total - consumed}, "
                f"{int(dead)} dead-lettered | conversions: {int(delivered)} delivered")

    async def run(self, app: Application) -> None:
        every = 0.25 if self.tty else 2.0
        while True:
            await asyncio.sleep(every)
            self.show(app)

    def show(self, app: Application, final: bool = False) -> None:
        text = self.line(app.consumed, app.live, time.monotonic())
        if self.tty:
            # Padded to the last line's width: a shorter line (lag falling) must not leave its tail behind.
            self.out.write("\r" + text.ljust(self._width) + ("\n" if final else ""))
            self._width = len(text)
        else:
            self.out.write(text + "\n")
        self.out.flush()


def summary(metrics: Metrics, app: Application, produced: int, bad: int, seconds: float) -> str:
    rows = []
    for p in _slugs():
        cells = [_counter(metrics, "offline_conversions_conversions_total", provider=p, outcome=o)
                 for o in ("delivered", "not_accepted", "dead_lettered", "skipped")]
        rows.append((p, *(int(c) for c in cells)))
    head = f"{'provider':<12} {'delivered':>10} {'not accepted':>13} {'dead-lettered':>14} {'skipped':>8}"
    lines = [head, "-" * len(head)]
    lines += [f"{r[0]:<12} {r[1]:>10} {r[2]:>13} {r[3]:>14} {r[4]:>8}" for r in rows]
    unattributed = int(_counter(metrics, "offline_conversions_purchases_total", result="unattributed"))
    attributed = int(_counter(metrics, "offline_conversions_purchases_total", result="attributed"))
    undecodable = int(sum(s.value for m in metrics.decode_failures.collect() for s in m.samples
                          if s.name.endswith("_total")))
    lines += [
        "",
        f"events read      {app.consumed} ({produced} purchases + {bad} malformed) in {seconds:.1f} s "
        f"= {app.consumed / max(seconds, 1e-6):.0f} events/s",
        f"attributed       {attributed}",
        f"unattributed     {unattributed} (no exposure inside a window: counted, not sent)",
        f"undecodable      {undecodable} (sent to the dead-letter topic with the reason)",
    ]
    return "\n".join(lines)


async def _demo(broker: EmbeddedBroker, events: int, bad: int, seed: int, out: TextIO) -> int:
    suffix = uuid.uuid4().hex[:6]
    topic, dlq, group = f"demo.purchases.{suffix}", f"demo.purchases.{suffix}.dlq", f"demo-{suffix}"
    broker.create_topics([topic, dlq], partitions=3)
    sandbox = Sandbox(**sandbox_options())
    url = await sandbox.start()
    # A little weather: a hiccup to retry through (the first five requests, whichever providers they go to).
    sandbox.fail("*", 503, times=5)
    now = int(time.time() * 1000)
    items = list(purchases(events, now_ms=now, seed=seed))
    values = list(encoded(items)) + [(b"malformed", v) for v in malformed(bad, seed)]
    out.write(f"embedded broker {broker.bootstrap}, sandbox {url}; producing {len(values)} events to {topic}\n")
    await asyncio.get_running_loop().run_in_executor(None, produce_values, broker.bootstrap, topic, values)
    cfg: Config = parse(sample_config(broker.bootstrap, topic, dlq, group, url), env={})
    metrics = Metrics()
    total = len(values)
    app = Application(cfg, metrics=metrics, stop_when=lambda a: a.consumed >= total and a.live == 0)
    progress = Progress(metrics, total, out)
    ticker = asyncio.get_running_loop().create_task(progress.run(app))
    started = time.monotonic()
    try:
        code = await app.run()
    finally:
        ticker.cancel()
        await sandbox.stop()
    seconds = time.monotonic() - started
    progress.show(app, final=True)
    out.write("\n" + summary(metrics, app, events, bad, seconds) + "\n")
    out.write(f"sandbox received: {sandbox.counts()} accepted conversions, "
              f"{len(sandbox.duplicates())} duplicate keys\n")
    return code


def run_demo(events: int = 3000, malformed: int = 30, seed: int = 7, out: TextIO | None = None) -> int:
    stream = out or sys.stdout
    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(name)s %(message)s")
    try:
        broker = EmbeddedBroker().start()
    except EmbeddedBrokerError as exc:
        print(f"offline-conversions demo: {exc}", file=sys.stderr)
        return 1
    try:
        return asyncio.run(_demo(broker, events, malformed, seed, stream))
    finally:
        # Kafka clients caught in reference cycles would log the broker going away; free them first.
        gc.collect()
        broker.stop()
