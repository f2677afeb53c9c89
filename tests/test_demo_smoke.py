"""The demo stays on the embedded Tansu broker (it installs from PyPI alone): a smoke test of the command users run."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys

from tests.reliability.harness import REPO


def test_demo_runs_on_the_embedded_broker_and_counts_nothing_twice() -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, "-m", "consumer", "demo", "--events", "400", "--malformed", "8"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=180, check=False)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-3000:]
    assert "embedded broker 127.0.0.1:" in out, out[-3000:]
    received = re.search(r"sandbox received: (\{.*\}) accepted conversions, (\d+) duplicate keys", out)
    assert received, out[-3000:]
    counts = ast.literal_eval(received.group(1))
    assert all(counts[p] > 0 for p in ("kameleoon", "convert", "conductrics")), counts
    assert received.group(2) == "0"
    assert re.search(r"events read\s+408 \(400 purchases \+ 8 malformed\)", out), out[-3000:]
