"""The benchmark runs end to end at a small size and writes every section. No timing assertions."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent



def test_benchmark_small_run_writes_every_section(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--events", "1500", "--latency-ms", "1",
         "--out", str(out), "--naive-events", "100", "--naive-seconds", "2", "--half-seconds", "2",
         "--workers", "1,2", "--backlog", "1000", "--repeat", "2"],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    for section in ("machine", "params", "ceiling", "service", "http_client", "naive", "workers",
                    "half_throughput", "backlog", "ratios", "targets"):
        assert section in res, section
    assert res["ceiling"]["events"] == 1500
    assert len(res["ceiling"]["runs_events_per_s"]) == 2  # alternated with the Kameleoon service
    assert len(res["service"]["kameleoon"]["runs_events_per_s"]) == 2
    assert set(res["service"]) == {"kameleoon", "convert", "conductrics", "all"}
    for name, run in res["service"].items():
        assert "error" not in run, (name, run)
        assert run["complete"] and run["events"] == 1500, (name, run)
        assert run["peak_rss_mb"] > 0
    assert set(res["http_client"]) == {"convert", "conductrics"}
    assert all(r["ok"] == r["requests"] > 0 for r in res["http_client"].values())
    assert set(res["naive"]) == {"kameleoon", "convert", "conductrics", "all"}
    assert all(r["events"] > 0 for r in res["naive"].values())
    assert "1 worker" in res["workers"] and "2 workers" in res["workers"]
    assert res["half_throughput"]["run"]["complete"]
    half = res["half_throughput"]["run"]
    assert half["event_to_delivery_p99_s"] is not None and half["event_to_read_p99_s"] is not None
    # Every delivered conversion of the half run is in exactly one second of the per-second breakdown.
    assert sum(b["conversions"] for b in half["by_second"]) == sum(half["delivered"].values())
    assert "where the time goes" in proc.stdout
    assert res["backlog"]["run"]["complete"]
    assert all(t["result"] in ("PASS", "FAIL", "n/a") for t in res["targets"])
    assert (out / "results.md").read_text().startswith("| run |")
    assert "| target |" in proc.stdout


def test_benchmark_runs_on_apache_kafka(tmp_path: Path) -> None:
    out = tmp_path / "bench-apache"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--broker", "apache", "--events", "800",
         "--latency-ms", "1", "--out", str(out), "--only", "ceiling,service", "--sets", "kameleoon",
         "--repeat", "1", "--workers", ""],
        capture_output=True, text=True, timeout=240, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert res["params"]["broker"] == "apache" and res["params"]["broker_version"].startswith("Apache Kafka 4.")
    assert res["ceiling"]["events"] == 800
    assert res["service"]["kameleoon"]["complete"] and res["service"]["kameleoon"]["broker_cpu_seconds"] > 0
    assert "broker Apache Kafka 4." in (out / "results.md").read_text()
