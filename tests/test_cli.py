"""The command line: `run` as a real process (one and two workers), `explain`, `python -m consumer`."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

from confluent_kafka.admin import AdminClient

from consumer.config import parse
from consumer.embedded import EmbeddedBroker
from consumer.producer import encoded, produce_values
from consumer.samples import purchases
from consumer.sandbox import Sandbox
from tests.conftest import committed, config_dict, to_toml
from tests.test_pipeline import expected_conversions

N = 600


async def wait_exit(proc: subprocess.Popen[bytes], timeout: float) -> int:
    """The child's exit code; fails if it has not exited within `timeout` seconds."""
    return await asyncio.get_running_loop().run_in_executor(None, proc.wait, timeout)


def wait_members(bootstrap: str, group: str, n: int, timeout: float) -> None:
    """Until `group` has `n` members (bounded). Blocking."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    deadline = time.monotonic() + timeout
    members: list[object] = []
    while time.monotonic() < deadline:
        described = admin.describe_consumer_groups([group], request_timeout=10)[group].result(20)
        members = list(described.members or [])
        if len(members) >= n:
            return
        time.sleep(0.2)  # a poll interval, bounded by the deadline
    raise AssertionError(f"group {group} has {len(members)} members after {timeout}s, not {n}")


async def test_two_workers_share_the_group_and_stop_cleanly_on_sigterm(
    broker: EmbeddedBroker, topics: dict[str, str], sandbox: Sandbox, tmp_path: Path,
) -> None:
    data = config_dict(broker.bootstrap, topics, sandbox.url)
    data["kameleoon"]["projects"] = {"f17c21u1ag": {"base_url": sandbox.url, "goals": [36151]}}
    data.pop("convert")
    data.pop("conductrics")
    cfg_file = tmp_path / "config.toml"
    cfg_file.write_text(to_toml(data))
    assert tomllib.loads(cfg_file.read_text()) == data
    items = list(purchases(N, now_ms=int(time.time() * 1000), seed=21))
    tally = produce_values(broker.bootstrap, topics["topic"], encoded(items))
    expected = {c.key for _, c in expected_conversions(parse(data, env={}), items)["kameleoon"]}

    proc = subprocess.Popen([sys.executable, "-m", "consumer", "run", "--config", str(cfg_file), "--workers", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ})
    try:
        await sandbox.wait_until(lambda s: set(s.kameleoon_nonces()) >= expected, 60)
        # Both workers in the provider's group before the stop: on a loaded machine one worker can finish
        # everything before the other has started, and a SIGTERM then would find it still importing.
        group = f"{topics['group']}.kameleoon"
        await asyncio.get_running_loop().run_in_executor(None, wait_members, broker.bootstrap, group, 2, 60.0)
    finally:
        proc.send_signal(signal.SIGTERM)
        code = await wait_exit(proc, 40)
    stderr = proc.stderr.read().decode() if proc.stderr else ""
    assert code == 0, stderr[-2000:]
    assert sorted(sandbox.kameleoon_nonces()) == sorted(expected)
    starts = [json.loads(line) for line in stderr.splitlines() if line.startswith("{") and '"started"' in line]
    assert len(starts) == 2  # two members, one per worker
    assert committed(broker.bootstrap, topics["group"], topics["topic"]) == {
        p: off + 1 for p, off in tally.last_offset.items()}


def test_explain_prints_what_would_be_sent(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(to_toml(config_dict("127.0.0.1:1", {"topic": "t", "dlq": "d", "group": "g"}, "http://sandbox")))
    now = 1_790_000_000_000
    event = {
        "event_id": "e-1", "order_id": "ORD-1", "occurred_at": now - 1000, "channel": "STORE", "currency": "EUR",
        "revenue": "23.50", "item_count": 2, "customer_id": None,
        "exposures": [
            {"provider": "KAMELEOON", "project": "f17c21u1ag", "experiment_id": "1", "variation_id": "2",
             "visitor_id": "245fc", "exposed_at": now - 3_600_000},
            {"provider": "CONVERT", "project": "1111_2222", "experiment_id": "100001", "variation_id": "1000002",
             "visitor_id": "vis-1", "exposed_at": now - 40 * 86_400_000},
            {"provider": "KAMELEOON", "project": "unknown-site", "experiment_id": "1", "variation_id": "2",
             "visitor_id": "x", "exposed_at": now - 1000},
        ],
    }
    ev = tmp_path / "event.json"
    ev.write_text(json.dumps(event))
    proc = subprocess.run([sys.executable, "-m", "consumer", "explain", "--config", str(cfg), "--now", str(now),
                           "--json", str(ev)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert [c["provider"] for c in report["conversions"]] == ["KAMELEOON"]
    assert report["conversions"][0]["visitor"] == "245fc" and report["conversions"][0]["revenue"] == "23.50"
    assert sorted(r["reason"] for r in report["rejections"]) == ["outside_window", "unknown_project"]
    text = subprocess.run([sys.executable, "-m", "consumer", "explain", "--config", str(cfg), "--now", str(now),
                           str(ev)], capture_output=True, text=True)
    assert text.returncode == 0 and "outside_window" in text.stdout
