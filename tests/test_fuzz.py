"""A short coverage-guided fuzzing run of the decoder and matcher (atheris); the harness runs longer by hand."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HARNESS = Path(__file__).parent / "fuzz" / "fuzz_decode_match.py"


def test_atheris_finds_no_crash_in_decode_and_match(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    proc = subprocess.run(
        [sys.executable, str(HARNESS), str(corpus), "-runs=30000", "-max_len=2048", "-seed=1", "-rss_limit_mb=1024"],
        capture_output=True, text=True, timeout=240, cwd=Path(__file__).parent.parent,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Done 30000 runs" in proc.stderr
    assert len(list(corpus.iterdir())) >= 20  # the seeds, plus whatever new coverage it found
