"""Shared fixtures: the broker (Apache Kafka, or Tansu with --broker tansu), the provider sandbox, configs for both."""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, Protocol

import pytest
from confluent_kafka import Consumer, Message, TopicPartition
from confluent_kafka.admin import AdminClient

from consumer.apache_kafka import ApacheKafka
from consumer.app import Application
from consumer.config import Config, parse
from consumer.demo import EMBEDDED_CONSUMER, sample_config
from consumer.embedded import EmbeddedBroker
from consumer.metrics import Metrics
from consumer.model import Provider
from consumer.sandbox import Sandbox

FAST_GROUP = EMBEDDED_CONSUMER


BROKERS = ("apache", "tansu")


class Broker(Protocol):
    """What every broker-backed test uses of the session broker, whichever kind it is."""

    bootstrap: str

    def create_topics(self, names: Any, partitions: int = 3) -> None: ...


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--broker", choices=BROKERS, default=os.environ.get("OC_BROKER", "apache"),
        help="the session broker of every broker-backed test: Apache Kafka (default, what CI runs) or the "
             "embedded Tansu broker; OC_BROKER=tansu does the same")
    group = parser.getgroup("reliability", "fault-injection suite (tests/reliability)")
    group.addoption("--soak", action="store_true", default=False,
                    help="repeat the SIGKILL and rebalance scenarios for --soak-seconds")
    group.addoption("--soak-seconds", type=float, default=300.0,
                    help="how long --soak repeats each soak scenario (default 300)")


def broker_kind(config: pytest.Config) -> str:
    kind = str(config.getoption("--broker"))
    if kind not in BROKERS:
        raise pytest.UsageError(f"--broker/OC_BROKER must be one of {BROKERS}, not {kind!r}")
    return kind


def pytest_report_header(config: pytest.Config) -> str:
    return f"broker: {broker_kind(config)}"


@pytest.fixture(scope="session")
def broker(request: pytest.FixtureRequest) -> Iterator[Broker]:
    if broker_kind(request.config) == "tansu":
        with EmbeddedBroker() as b:
            yield b
    else:
        with ApacheKafka() as k:
            yield k


@pytest.fixture
def topics(broker: Broker) -> dict[str, str]:
    suffix = uuid.uuid4().hex[:8]
    names = {"topic": f"purchases-{suffix}", "dlq": f"purchases-{suffix}.dlq", "group": f"oc-{suffix}"}
    broker.create_topics([names["topic"], names["dlq"]], partitions=3)
    return names


@pytest.fixture
async def sandbox() -> AsyncIterator[Sandbox]:
    sb = Sandbox(conductrics_keys={"ac-xxx": "api-1234567890"}, kameleoon_clients={"client-1": "secret-1"})
    await sb.start()
    yield sb
    await sb.stop()


def config_dict(bootstrap: str, topics: dict[str, str], sandbox_url: str, **sections: Any) -> dict[str, Any]:
    """The demo's config for the sample projects, tuned for tests: fast commits, fast retries."""
    data = sample_config(bootstrap, topics["topic"], topics["dlq"], topics["group"], sandbox_url)
    data["pipeline"] = {"commit_interval": "200ms", "shutdown_deadline": "20s", "dlq_timeout": "10s"}
    data["logging"] = {"level": "INFO"}
    data["control"] = {"port": 0}  # several services run at once in the suite: any free port each
    data["kameleoon"]["batch"] = {"linger": "20ms"}
    data["conductrics"]["projects"]["ac-xxx"]["api_key"] = "api-1234567890"
    for provider in ("kameleoon", "convert", "conductrics"):
        data[provider]["retry"] = {"base_delay": "10ms", "max_delay": "200ms", "max_attempts": 5}
    for name, section in sections.items():
        if section is None:
            data.pop(name, None)
        else:
            data[name] = section
    return data


@pytest.fixture
def make_config(broker: Broker, topics: dict[str, str]) -> Callable[..., Config]:
    def make(sandbox_url: str, **sections: Any) -> Config:
        return parse(config_dict(broker.bootstrap, topics, sandbox_url, **sections), env={})
    return make


async def run_until_done(cfg: Config, expected: int, *, timeout: float = 60.0,
                         metrics: Metrics | None = None) -> Application:
    """Run the service until it has read `expected` events and finished all of them."""
    app = Application(cfg, metrics=metrics, install_signals=False,
                      stop_when=lambda a: a.consumed >= expected and a.live == 0)
    code = await asyncio.wait_for(app.run(), timeout)
    assert code == 0, f"the service exited with {code}: {app.fatal}"
    return app


def read_all(bootstrap: str, topic: str, expected: int, timeout: float = 30.0) -> list[Message]:
    """Every message of a topic, waiting (bounded) until `expected` have arrived."""
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"reader-{uuid.uuid4().hex[:6]}",
                  "auto.offset.reset": "earliest", "enable.auto.commit": False, **FAST_GROUP})
    c.subscribe([topic])
    out: list[Message] = []
    deadline = time.monotonic() + timeout
    try:
        while len(out) < expected and time.monotonic() < deadline:
            for m in c.consume(500, 0.2):
                if m.error() is None:
                    out.append(m)
        # Drain briefly past `expected` so an unexpected extra message is seen too.
        for m in c.consume(500, 0.5):
            if m.error() is None:
                out.append(m)
    finally:
        c.close()
    return out


PROVIDER_SLUGS = frozenset(p.slug for p in Provider)


def service_groups(bootstrap: str, group: str) -> list[str]:
    """The consumer groups a service configured with `group_id = group` runs: one per provider
    (`<group>.<provider>`, consumer/groups.py), or `group` itself when there are none (isolation "shared")."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    listed = admin.list_consumer_groups(request_timeout=10).result(20)
    names = sorted(g.group_id for g in listed.valid
                   if g.group_id.startswith(group + ".") and g.group_id[len(group) + 1:] in PROVIDER_SLUGS)
    return names or [group]


def group_committed(bootstrap: str, group: str, topic: str, partitions: int = 3) -> dict[int, int]:
    """One consumer group's committed offsets (-1001 where it has none)."""
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False})
    try:
        parts = c.committed([TopicPartition(topic, p) for p in range(partitions)], timeout=10)
        return {p.partition: p.offset for p in parts}
    finally:
        c.close()


def committed(bootstrap: str, group: str, topic: str, partitions: int = 3) -> dict[int, int]:
    """The offsets every group of the service has committed: per partition, the least over its provider
    groups (`service_groups`). Equal to the topic's ends only when every provider's group reached them."""
    per_group = [group_committed(bootstrap, g, topic, partitions) for g in service_groups(bootstrap, group)]
    return {p: min(offsets[p] for offsets in per_group) for p in range(partitions)}


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {v!r} as TOML")


def to_toml(data: dict[str, Any]) -> str:
    """A minimal TOML writer: nested dicts become [tables], keys are always quoted."""
    lines: list[str] = []

    def table(path: list[str], d: dict[str, Any]) -> None:
        scalars = [(k, v) for k, v in d.items() if not isinstance(v, dict)]
        tables = [(k, v) for k, v in d.items() if isinstance(v, dict)]
        if path and (scalars or not tables):
            lines.append("[" + ".".join(json.dumps(p) for p in path) + "]")
        for k, v in scalars:
            lines.append(f"{json.dumps(k)} = {_toml_value(v)}")
        if scalars:
            lines.append("")
        for k, v in tables:
            table([*path, k], v)

    table([], data)
    return "\n".join(lines) + "\n"
