"""Fixtures and options of the fault-injection suite.

`--soak` repeats the SIGKILL and rebalance scenarios for `--soak-seconds` (default 300).

The options are registered in tests/conftest.py (pytest reads `pytest_addoption` only from initial
conftests); the environment variables OC_SOAK=1 / OC_SOAK_SECONDS=N work too.
"""

from __future__ import annotations

import os

import pytest


def _option(config: pytest.Config, name: str, default: object) -> object:
    try:
        return config.getoption(name)
    except ValueError:
        return default


@pytest.fixture
def soak_seconds(request: pytest.FixtureRequest) -> float:
    """0 without --soak (run each scenario once), else how long to keep repeating it."""
    soak = bool(_option(request.config, "--soak", False)) or os.environ.get("OC_SOAK") == "1"
    if not soak:
        return 0.0
    env = os.environ.get("OC_SOAK_SECONDS")
    return float(env) if env else float(_option(request.config, "--soak-seconds", 300.0))  # type: ignore[arg-type]
