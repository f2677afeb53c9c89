"""Scenario 5: the dead-letter topic cannot be written.

What makes a DLQ write fail on Tansu: Tansu auto-creates a topic on the first produce to it, so a
missing dlq_topic alone is not enough; with `allow.auto.create.topics = false` on the producer,
librdkafka waits for the topic's metadata and fails the record with _MSG_TIMED_OUT after
message.timeout.ms (= [pipeline] dlq_timeout). With malformed events in the stream, the service must
stop consuming, exit 3 (EXIT_DLQ) in bounded time, and commit nothing at or past the first malformed
message of any partition.
"""

from __future__ import annotations

import time
from pathlib import Path

from consumer.app import EXIT_DLQ
from consumer.embedded import EmbeddedBroker
from consumer.sandbox import Sandbox

from .harness import Service, committed_async, config_dict, new_topics, produce, result_line

DLQ_TIMEOUT = 2.0


async def test_unwritable_dlq_stops_the_service_with_exit_3(
    broker: EmbeddedBroker, sandbox: Sandbox, tmp_path: Path,
) -> None:
    topics = new_topics(broker, create_dlq=False)
    topics["dlq"] = topics["topic"] + ".missing-dlq"  # never created
    data = config_dict(broker.bootstrap, topics, sandbox.url)
    data["logging"] = {"level": "INFO", "format": "json"}
    data["kafka"]["producer"] = {"allow.auto.create.topics": False}
    data["pipeline"].update({"dlq_timeout": f"{DLQ_TIMEOUT}s", "shutdown_deadline": "5s"})
    stream = produce(broker.bootstrap, topics["topic"], 600, 6, seed=51, malformed_first_at=0.3)
    first_bad = stream.first_malformed()
    assert set(first_bad) == {0, 1, 2}

    svc = Service(data, tmp_path, "dlq")
    await svc.start()
    started = time.monotonic()
    try:
        # Join (~3 s) + DLQ timeout + drain bounded by min(shutdown_deadline, dlq_timeout) + close.
        code = await svc.wait(3 + 6 + DLQ_TIMEOUT + DLQ_TIMEOUT + 10)
    finally:
        await svc.stop()
    elapsed = time.monotonic() - started
    assert code == EXIT_DLQ, f"exit code {code}, expected {EXIT_DLQ}:\n{svc.tail()}"
    logs = svc.log_lines()
    assert any("not writable" in str(line.get("msg", "")) for line in logs), svc.tail()

    got = await committed_async(broker.bootstrap, topics["group"], topics["topic"])
    past = {p: (got.get(p), first) for p, first in first_bad.items() if got.get(p, -1) > first}
    assert not past, f"committed past the first undead-lettered malformed message (partition: (committed, first " \
                     f"malformed)): {past}"
    result_line("dlq-unwritable", events=stream.total, faults=f"DLQ unwritable, {len(stream.bad)} malformed",
                exit_code=code, seconds_to_exit=round(elapsed, 1), committed=got, first_malformed=first_bad,
                lost=0, duplicates=0)
