"""On Apache Kafka, checked with clients that are not the project's: Kafka's own consumer-groups tool (from the
broker's jars) reads the same lag as the service's metric in every provider's consumer group, running the command
docs/operations.md gives operators; Debian's kcat produces raw Avro purchases that are delivered, and reads the DLQ
with its headers.
"""

from __future__ import annotations

import asyncio
import json
import re
import shlex
import subprocess
import time
from pathlib import Path

from consumer.apache_kafka import ApacheKafka, run_java
from consumer.app import Application
from consumer.groups import group_of
from consumer.metrics import Metrics
from consumer.producer import encoded
from consumer.samples import malformed, purchases
from consumer.sandbox import Sandbox
from tests.reliability.harness import (
    account,
    all_present,
    config_dict,
    conversions_of,
    expected_view,
    new_topics,
    produce,
    result_line,
    to_config,
    wait_committed,
    wait_for,
)

DOCS = Path(__file__).resolve().parents[2] / "docs" / "operations.md"
GROUPS_TOOL = "org.apache.kafka.tools.consumer.group.ConsumerGroupCommand"  # what kafka-consumer-groups.sh runs


def documented_command(tool: str, marker: str) -> list[str]:
    """The arguments of the `tool` command in docs/operations.md's block that follows `marker`."""
    text = DOCS.read_text()
    at = text.index(marker)
    block = text[at:text.index("```", text.index("```", at) + 3)]
    line = next(ln for ln in block.splitlines() if ln.strip().startswith(tool))
    return shlex.split(line.strip())[1:]


def describe_group(bootstrap: str, group: str) -> dict[int, int]:
    """partition -> LAG, as kafka-consumer-groups.sh --describe prints it for the group."""
    args = [a.replace("$BOOTSTRAP", bootstrap).replace("$GROUP", group)
            for a in documented_command("kafka-consumer-groups.sh", "<!-- lag-command -->")]
    done = run_java(GROUPS_TOOL, args, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [ln.split() for ln in done.stdout.splitlines() if ln.strip()]
    header = next(ln for ln in lines if "LAG" in ln)
    rows = [dict(zip(header, ln, strict=False)) for ln in lines if ln is not header and ln[0] == group]
    return {int(r["PARTITION"]): int(r["LAG"]) for r in rows if r["LAG"] != "-"}


def service_lag(metrics: Metrics, group: str, topic: str) -> dict[int, int]:
    """partition -> the service's offline_conversions_consumer_lag_messages in one consumer group."""
    out: dict[int, int] = {}
    for family in metrics.consumer_lag.collect():
        for s in family.samples:
            if s.labels.get("group") == group and s.labels.get("topic") == topic:
                out[int(s.labels["partition"])] = int(s.value)
    return out


async def test_lag_metric_agrees_with_kafka_consumer_groups_tool(apache: ApacheKafka, sandbox: Sandbox) -> None:
    topics = new_topics(apache)
    data = config_dict(apache.bootstrap, topics, sandbox.url)
    data["logging"] = {"level": "WARNING"}
    data["kafka"]["consumer"]["statistics.interval.ms"] = 300
    for provider in ("kameleoon", "convert", "conductrics"):
        data[provider]["retry"]["max_attempts"] = 50
    cfg = to_config(data)
    # A consumer group per provider, each with its own lag: the tool is asked about each by name.
    groups = sorted(group_of(cfg.kafka, p) for p in ("kameleoon", "convert", "conductrics"))
    assert cfg.kafka.isolation == "provider" and len(set(groups)) == 3
    first = produce(apache.bootstrap, topics["topic"], 300, 0, seed=81)
    metrics = Metrics()
    app = Application(cfg, metrics=metrics, install_signals=False)
    task = asyncio.get_running_loop().create_task(app.run())
    try:
        await sandbox.wait_until(lambda s: all_present(s, expected_view(conversions_of(cfg, first.items))), 60)
        await wait_committed(apache.bootstrap, topics["group"], topics["topic"], first.ends(), timeout=30)
        # Every provider stalls: what the service reads next cannot finish, so its committed offsets stand
        # still under a growing backlog, and the lag both sides report is the same still number.
        sandbox.set_latency("*", 20.0)
        backlog = produce(apache.bootstrap, topics["topic"], 900, 0, seed=82, stream=first)
        ends = backlog.ends()
        loop = asyncio.get_running_loop()
        seen: dict[str, dict[str, dict[int, int]]] = {}

        async def agree() -> bool:
            for group in groups:  # one at a time: each is a JVM start on a shared machine
                tool = await loop.run_in_executor(None, describe_group, apache.bootstrap, group)
                seen[group] = {"tool": tool, "service": service_lag(metrics, group, topics["topic"])}
            return all(bool(v["tool"]) and v["tool"] == v["service"] and sum(v["tool"].values()) > 0
                       for v in seen.values())

        try:
            await wait_for(agree, 90, "the service's lag metric and kafka-consumer-groups.sh to agree in every "
                           "provider's group", every=0.5)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; last seen {seen}") from None
        tool_lag = {g: v["tool"] for g, v in seen.items()}
        assert all(sum(lag.values()) <= sum(ends.values()) for lag in tool_lag.values()), tool_lag
        sandbox.set_latency("*", 0.0)
        want = expected_view(conversions_of(cfg, backlog.items))
        await sandbox.wait_until(lambda s: all_present(s, want), timeout=90)
        await wait_committed(apache.bootstrap, topics["group"], topics["topic"], ends, timeout=30)

        async def zero() -> bool:
            for group in groups:
                tool = await loop.run_in_executor(None, describe_group, apache.bootstrap, group)
                if set(tool.values()) != {0} or set(service_lag(metrics, group, topics["topic"]).values()) != {0}:
                    return False
            return True

        await wait_for(zero, 60, "both to read a lag of 0 in every group once caught up", every=0.5)
    finally:
        app.stop()
        code = await asyncio.wait_for(task, 60)
    assert code == 0, app.fatal
    result_line("lag-vs-kafka-tool", backlog_lag={g: sum(lag.values()) for g, lag in tool_lag.items()},
                per_partition=tool_lag, agreed=True)


def kcat(*args: str, stdin: bytes | None = None, timeout: float = 60) -> subprocess.CompletedProcess[bytes]:
    done = subprocess.run(["kcat", *args], input=stdin, capture_output=True, timeout=timeout, check=False)
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-2000:]
    return done


async def test_kcat_produces_purchases_and_reads_dead_letters(apache: ApacheKafka, sandbox: Sandbox,
                                                              tmp_path: Path) -> None:
    topics = new_topics(apache)
    cfg = to_config({**config_dict(apache.bootstrap, topics, sandbox.url), "logging": {"level": "WARNING"}})
    items = list(purchases(40, now_ms=int(time.time() * 1000), seed=91))
    bad = list(malformed(4, seed=92))
    files = []
    for i, (_key, value) in enumerate(encoded(items)):
        files.append(tmp_path / f"purchase-{i}.avro")
        files[-1].write_bytes(value)
    for i, value in enumerate(bad):
        files.append(tmp_path / f"bad-{i}.avro")
        files[-1].write_bytes(value)
    # kcat -P with file arguments sends each file as one message: binary Avro needs no delimiter.
    kcat("-b", apache.bootstrap, "-t", topics["topic"], "-P", "-H", "source=kcat", *map(str, files))
    total = len(files)
    app = Application(cfg, metrics=Metrics(), install_signals=False,
                      stop_when=lambda a: a.consumed >= total and a.live == 0)
    assert await asyncio.wait_for(app.run(), 90) == 0, app.fatal
    want = expected_view(conversions_of(cfg, items))
    acc = account(sandbox, want)
    assert acc.lost == 0 and acc.unexpected == 0, acc

    out = kcat("-b", apache.bootstrap, "-t", topics["dlq"], "-C", "-o", "beginning", "-e", "-J").stdout
    # kcat's JSON envelope escapes quotes and control characters but passes the payload's other bytes through.
    letters = [json.loads(line) for line in out.decode("utf-8", "surrogateescape").splitlines() if line.strip()]
    assert len(letters) == len(bad)
    for m in letters:
        headers = dict(zip(m["headers"][::2], m["headers"][1::2], strict=True))
        assert headers["source"] == "kcat", "the original headers travel with the dead letter"
        assert headers["dlq.stage"] == "decode"
        assert headers["dlq.original.topic"] == topics["topic"]
        assert re.fullmatch(r"\d+", headers["dlq.original.offset"])
        assert headers["dlq.exception.class"] and headers["dlq.exception.message"], headers
    result_line("kcat", produced=total, conversions=acc.expected, dead_letters=len(letters),
                dlq_headers=sorted(k for k in dict(zip(letters[0]["headers"][::2], letters[0]["headers"][1::2],
                                                       strict=True)) if k.startswith("dlq.")))
