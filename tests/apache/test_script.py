"""scripts/apache-kafka as a user runs it: one line `bootstrap.servers=…` once clients can connect, a clean exit on
SIGTERM, and a second start on the same --dir with the same address and the data of the first."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

from tests.reliability.harness import REPO

SCRIPT = REPO / "scripts" / "apache-kafka"


def start(*args: str) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen([str(SCRIPT), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()  # blocks until the script prints (or exits)
    assert line.startswith("bootstrap.servers="), (line, proc.stderr.read() if proc.poll() is not None else "")
    return proc, line.split("=", 1)[1]


def stop(proc: subprocess.Popen[str]) -> int:
    proc.send_signal(signal.SIGTERM)
    return proc.wait(60)


def test_script_prints_bootstrap_stops_on_sigterm_and_restarts_with_its_data(tmp_path: Path) -> None:
    proc, bootstrap = start("--dir", str(tmp_path / "kafka"))
    try:
        # Clients can connect the moment the line is printed: no retry loop here.
        admin = AdminClient({"bootstrap.servers": bootstrap})
        admin.create_topics([NewTopic("kept", 1, 1)])["kept"].result(30)
        producer = Producer({"bootstrap.servers": bootstrap, "acks": "all"})
        producer.produce("kept", b"still here")
        assert producer.flush(30) == 0
    finally:
        code = stop(proc)
    assert code == 0, proc.stderr.read() if proc.stderr else ""

    again, bootstrap2 = start("--dir", str(tmp_path / "kafka"))
    try:
        assert bootstrap2 == bootstrap, "a restart on the same folder keeps its ports"
        c = Consumer({"bootstrap.servers": bootstrap2, "group.id": "reader", "auto.offset.reset": "earliest"})
        c.subscribe(["kept"])
        values: list[bytes] = []
        deadline = time.monotonic() + 30
        while not values and time.monotonic() < deadline:
            values += [m.value() or b"" for m in c.consume(10, 0.5) if m.error() is None]
        c.close()
        assert values == [b"still here"]
    finally:
        assert stop(again) == 0


def test_script_starts_a_three_node_cluster() -> None:
    proc, bootstrap = start("--nodes", "3")
    try:
        assert len(bootstrap.split(",")) == 3
        md = AdminClient({"bootstrap.servers": bootstrap}).list_topics(timeout=10)
        assert sorted(md.brokers) == [1, 2, 3], "every node is a broker the moment the line is printed"
    finally:
        assert stop(proc) == 0


def test_a_cluster_id_never_reads_as_an_option() -> None:
    from consumer.apache_kafka import new_cluster_id

    ids = [new_cluster_id() for _ in range(5000)]  # ~78 of them would start with '-' without the rule
    assert not any(i.startswith("-") for i in ids) and len(set(ids)) == len(ids)
    assert all(len(i) == 22 for i in ids)
