"""librdkafka's own log lines go through the JSON logger at mapped levels, each failure logged once."""

from __future__ import annotations

import json
import logging
import signal
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Producer

from consumer.logs import KafkaLog
from tests.conftest import config_dict, to_toml

CLI = [sys.executable, "-m", "consumer"]


def closed_port() -> int:
    """A loopback port nothing listens on: connecting is refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def write_config(tmp_path: Path, data: dict[str, Any], name: str = "config.toml") -> Path:
    path = tmp_path / name
    path.write_text(to_toml(data))
    assert tomllib.loads(path.read_text()) == data
    return path


def offline_service_config(bootstrap: str, metrics_port: int = 0) -> dict[str, Any]:
    data = config_dict(bootstrap, {"topic": "t", "dlq": "t.dlq", "group": "g"}, "http://127.0.0.1:1")
    data["metrics"] = {"host": "127.0.0.1", "port": metrics_port}
    return data


@pytest.fixture
def rdkafka_records() -> Iterator[list[logging.LogRecord]]:
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    logger, handler = logging.getLogger("rdkafka"), Keep(logging.DEBUG)
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    yield records
    logger.removeHandler(handler)
    logger.setLevel(level)


def test_a_real_clients_log_lines_arrive_as_records_at_mapped_levels(rdkafka_records: list[logging.LogRecord]) -> None:
    # No broker list (nothing connects): librdkafka says so at syslog 5 (notice), and warns (4) of a
    # SASL mechanism without a SASL protocol.
    producer = Producer({"sasl.mechanism": "PLAIN", "logger": KafkaLog()})
    producer.poll(0)
    producer.flush(0)
    by_text = {r.getMessage(): r for r in rdkafka_records}
    notice = next(r for t, r in by_text.items() if "No `bootstrap.servers` configured" in t)
    warning = next(r for t, r in by_text.items() if "`sasl.mechanism` set to `PLAIN`" in t)
    assert (notice.levelno, warning.levelno) == (logging.INFO, logging.WARNING)
    fields = vars(warning)
    assert fields["facility"] == "CONFWARN" and fields["rdkafka_thread"] == "app"
    assert fields["client"].startswith("rdkafka#producer-")
    assert not warning.getMessage().startswith("[thrd:")


def test_a_repeated_failure_is_held_back_and_counted(rdkafka_records: list[logging.LogRecord]) -> None:
    now = [100.0]
    kafka_log = KafkaLog(clock=lambda: now[0])
    line = "[thrd:b:9092/bootstrap]: b:9092/bootstrap: Connect to ipv4#10.0.0.1:9092 failed: Connection refused"
    client = "rdkafka#consumer-1"
    for ms in range(5):
        kafka_log.log(logging.ERROR, "%s [%s] %s", "FAIL", client, f"{line} (after {ms}ms in state CONNECT)")
    kafka_log.log(logging.INFO, "%s [%s] %s", "INFO", client, "[thrd:main]: a note")
    kafka_log.log(logging.INFO, "%s [%s] %s", "INFO", client, "[thrd:main]: a note")
    now[0] += 10.0
    kafka_log.log(logging.ERROR, "%s [%s] %s", "FAIL", client, f"{line} (after 0ms in state CONNECT)")
    fails = [vars(r) for r in rdkafka_records if vars(r)["facility"] == "FAIL"]
    assert [r.get("repeated") for r in fails] == [None, 4]
    assert len([r for r in rdkafka_records if r.levelno == logging.INFO]) == 2  # notes are never held back
    assert kafka_log.logged("b:9092/bootstrap: Connect to ipv4#10.0.0.1:9092 failed: Connection refused")
    assert not kafka_log.logged("1/1 brokers are down")


def test_with_no_broker_every_output_line_is_json_and_each_failure_is_logged_once(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, offline_service_config(f"127.0.0.1:{closed_port()}"))
    err_path = tmp_path / "stderr"
    with err_path.open("w") as err, (tmp_path / "stdout").open("w") as out:
        proc = subprocess.Popen([*CLI, "run", "--config", str(cfg)], stdout=out, stderr=err)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and proc.poll() is None:
            text = err_path.read_text()
            if '"rdkafka#consumer-' in text and ("brokers are down" in text or "offsets yet" in text) \
                    and '"rdkafka#producer-' in text:
                break
            time.sleep(0.05)  # polling the output for a condition, with a deadline
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(40)
    lines = [ln for ln in (err_path.read_text() + (tmp_path / "stdout").read_text()).splitlines() if ln]
    records = [json.loads(ln) for ln in lines]  # every line is one JSON object
    assert code == 0, lines[-5:]
    rdkafka = [r for r in records if r["logger"] == "rdkafka"]
    fails = [r for r in rdkafka if r["facility"] == "FAIL"]
    assert {r["client"].split("-")[0] for r in fails} == {"rdkafka#consumer", "rdkafka#producer"}
    assert all(r["level"] == "error" and "Connection refused" in r["msg"] for r in fails)
    # The error callback does not log again what librdkafka logged: only the "all brokers down" summary.
    # (At start the provider groups' offsets are read first: the service waits for the broker there, unready.)
    ours = [r["msg"] for r in records if r["logger"] in ("consumer.source", "consumer.app")
            and r["msg"].startswith("kafka:")]
    assert ours and all(m == "kafka: 1/1 brokers are down"
                        or m.startswith("kafka: cannot read the consumer groups' offsets yet") for m in ours)
    # A refused connection repeats many times a second; within 10 s it is logged once per client.
    assert len(fails) <= 4, [r["msg"] for r in fails]
