"""Fixtures and options of the fault-injection suite.

`--soak` repeats the SIGKILL and rebalance scenarios for `--soak-seconds` (default 300).

pytest only honours `pytest_addoption` in *initial* conftests: those at the rootdir, in `testpaths`
and in the directories named on the command line. So `pytest tests/reliability --soak` works with
this file alone; `pytest --soak` (no path) needs the options registered from tests/conftest.py — see
the report. The environment variables OC_SOAK=1 / OC_SOAK_SECONDS=N work in every case.
"""

from __future__ import annotations

import os

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("reliability", "fault-injection suite")
    try:
        group.addoption("--soak", action="store_true", default=False,
                        help="repeat the SIGKILL and rebalance scenarios for --soak-seconds")
        group.addoption("--soak-seconds", type=float, default=300.0,
                        help="how long --soak repeats each soak scenario (default 300)")
    except ValueError:
        pass  # already registered (e.g. by tests/conftest.py)


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
