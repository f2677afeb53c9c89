"""The realistic-latency benchmark's arithmetic: rates, 429 shares and re-convergence from a sandbox series."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import run as bench


def series(rates: list[tuple[float, float, float]], step: float = 0.5) -> list[dict[str, Any]]:
    """A sandbox series from (seconds, accepted/s, 429/s) phases, sampled every `step`."""
    out: list[dict[str, Any]] = []
    t = ok = r429 = 0.0
    for seconds, ok_rate, rate_429 in rates:
        for _ in range(int(seconds / step)):
            out.append({"t": t, "ok": int(ok), "r429": int(r429), "all": int(ok + r429), "conversions": int(ok)})
            t += step
            ok += ok_rate * step
            r429 += rate_429 * step
    out.append({"t": t, "ok": int(ok), "r429": int(r429), "all": int(ok + r429), "conversions": int(ok)})
    return out


def test_window_gives_rates_and_the_429_share() -> None:
    s = series([(10, 100, 0), (10, 50, 50)])
    w = bench.window(s, 0, 10)
    assert w is not None and w["requests_per_s"] == pytest.approx(100) and w["share_429"] == 0
    w = bench.window(s, 10, 20)
    assert w is not None and w["requests_per_s"] == pytest.approx(50) and w["share_429"] == pytest.approx(0.5)
    assert bench.window(s, 30, 40) is None


def test_active_span_ends_at_the_last_accepted_request() -> None:
    s = series([(2, 0, 0), (10, 100, 0), (5, 0, 0)])
    assert bench.active_span(s) == (2.5, 12.0)


def test_reconverged_is_the_first_clean_window_at_90_percent_of_the_new_bound() -> None:
    # Capacity halves at t=10 (bound 50/s): 429s for 3 s, then 47/s clean; later only 40/s.
    s = series([(10, 100, 0), (3, 50, 30), (10, 47, 0), (10, 40, 0)])
    assert bench.reconverged(s, 10.0, 50.0, until=23.0) == 3.0
    assert bench.reconverged(s, 23.0, 50.0, until=33.0) is None


def test_realistic_mode_runs_end_to_end_at_a_small_size(tmp_path: Path) -> None:
    """One provider, short runs: every run and the capacity change are reported (no timing assertions)."""
    import json
    import subprocess

    root = Path(__file__).resolve().parent.parent
    out = tmp_path / "bench"
    proc = subprocess.run(
        [sys.executable, str(root / "benchmarks" / "run.py"), "--latency", "realistic", "--events", "3000",
         "--realistic-providers", "conductrics", "--capacity", "conductrics=8", "--median-ms", "20",
         "--p99-ms", "60", "--realistic-seconds", "4", "--change-seconds", "3", "--warmup-seconds", "1",
         "--out", str(out)],
        capture_output=True, text=True, timeout=300, cwd=root,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((out / "realistic.json").read_text())
    runs = res["providers"]["conductrics"]["runs"]
    assert set(runs) == {"adaptive", "fixed 4 (C/2)", "fixed 8 (C)", "fixed 16 (2C)"}
    for name, r in runs.items():
        assert "error" not in r, (name, r)
        assert r["steady"]["requests_per_s"] > 0 and r["limit"] is not None, name
    assert runs["fixed 16 (2C)"]["steady"]["requests_429"] > 0  # above the capacity: 429s
    change = res["providers"]["conductrics"]["change"]
    assert change["capacity"] == [8, 4, 8] and change["exit_code"] == 0
    assert "| conductrics | C → C/2 (8 → 4)" in (out / "realistic.md").read_text()
