"""The demo's progress line and `scripts/demo`'s install-once behaviour."""

from __future__ import annotations

import io
import os
import stat
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from consumer.demo import Progress
from consumer.metrics import Metrics

ROOT = Path(__file__).resolve().parent.parent


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_line_says_which_numbers_are_events_and_which_conversions() -> None:
    m = Metrics()
    m.conversions.labels("kameleoon", "delivered").inc(40)
    m.conversions.labels("convert", "delivered").inc(2)
    m.conversions.labels("convert", "dead_lettered").inc(1)  # a conversion dead-lettered: not a delivery
    m.dlq_produced.labels("decode", "none").inc(3)
    m.dlq_produced.labels("dispatch", "convert").inc(1)
    p = Progress(m, 100, io.StringIO())
    line = p.line(consumed=30, live=7, now=p.started + 2)
    assert line == "events: 30/100 read, 15/s, 7 in flight, lag 70, 4 dead-lettered | conversions: 42 delivered"


def test_progress_rewritten_in_place_leaves_no_tail() -> None:
    out = Terminal()
    p = Progress(Metrics(), 100_000, out)
    app: Any = SimpleNamespace(consumed=0, live=12345)
    p.show(app)
    app.consumed, app.live = 100_000, 0  # shorter: "lag 0", "0 in flight"
    p.show(app, final=True)
    first, second = out.getvalue().split("\r")[1:]
    assert len(second.rstrip("\n")) >= len(first)


def fake_venv(tmp_path: Path) -> tuple[Path, Path]:
    """A venv whose python records pip calls (and runs everything else for real) and whose CLI echoes."""
    venv, log = tmp_path / "venv", tmp_path / "calls.log"
    (venv / "bin").mkdir(parents=True)
    python = venv / "bin" / "python"
    python.write_text(
        "#!/bin/sh\n"
        f'if [ "$1" = "-m" ] && [ "$2" = "pip" ]; then\n'
        f'  echo "pip $* PYTHONWARNINGS=$PYTHONWARNINGS" >> {log}; exit 0\n'
        "fi\n"
        f'exec {sys.executable} "$@"\n'
    )
    cli = venv / "bin" / "offline-conversions"
    cli.write_text(f'#!/bin/sh\necho "cli $*" >> {log}\n')
    for f in (python, cli):
        f.chmod(f.stat().st_mode | stat.S_IXUSR)
    return venv, log


def test_scripts_demo_installs_once_then_only_when_pyproject_changes(tmp_path: Path) -> None:
    venv, log = fake_venv(tmp_path)
    env = {**os.environ, "OFFLINE_CONVERSIONS_VENV": str(venv)}

    def demo() -> list[str]:
        before = log.read_text().splitlines() if log.exists() else []
        subprocess.run([str(ROOT / "scripts" / "demo"), "--events", "5"], env=env, check=True, timeout=60)
        return log.read_text().splitlines()[len(before):]

    first = demo()
    assert [c.split()[:5] for c in first] == [
        ["pip", "-m", "pip", "install", "-q"], ["pip", "-m", "pip", "install", "-q"], ["cli", "demo", "--events", "5"]]
    assert "--upgrade pip" in first[0] and "-e .[embedded] PYTHONWARNINGS=ignore:Editable installation" in first[1]
    assert demo() == ["cli demo --events 5"]  # installed and up to date: straight to the demo
    stamp = venv / ".offline-conversions-demo-installed"
    stamp.write_text("an older pyproject.toml [embedded]\n")
    assert [c.split()[0] for c in demo()] == ["pip", "pip", "cli"]
    assert demo() == ["cli demo --events 5"]
