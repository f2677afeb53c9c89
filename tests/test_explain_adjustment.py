"""`explain` of an order adjustment: the documented example, the JSON report, and bad input named."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from consumer.config import load
from consumer.explain_adjustment import adjustment_from_json, explain_adjustment, is_adjustment

ROOT = Path(__file__).resolve().parent.parent
PURCHASE = json.loads((ROOT / "docs" / "examples" / "purchase.json").read_text())
REFUND = json.loads((ROOT / "docs" / "examples" / "refund.json").read_text())
NOW = 1_796_378_400_000  # 2026-12-04T10:00:00Z


@pytest.fixture(scope="module")
def cfg() -> Any:
    return load(ROOT / "deploy" / "config.example.toml", env={"CONDUCTRICS_API_KEY": "example-key"})


def test_the_documented_example_runs_as_documented() -> None:
    doc = (ROOT / "docs" / "operations.md").read_text()
    section = doc[doc.index("### Explaining an adjustment"):doc.index("`offline_conversions_adjustments_total{")]
    m = re.search(r"```sh\n(CONDUCTRICS_API_KEY=\S+) (offline-conversions explain [^`]*?)\n```", section)
    assert m
    argv = m.group(2).replace("\\\n", " ").split()
    env = {**os.environ, "CONDUCTRICS_API_KEY": m.group(1).split("=", 1)[1]}
    run = [sys.executable, "-m", "consumer", *argv[1:]]
    out = subprocess.run(run, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    quotes = re.findall(r"`([^`]*(?:restated \(|negative )[^`]*)`", section[m.end():])
    assert len(quotes) == 3
    for quoted in quotes:
        assert quoted in out.stdout, quoted
    report = json.loads(subprocess.run([*run, "--json"], cwd=ROOT, env=env, capture_output=True, text=True,
                                       timeout=60, check=True).stdout)
    assert [(x["role"], x["revenue"], x["negative"]) for x in report["actions"]] == [
        ("cancel", "129.90", True), ("restate", "100.00", False)]
    assert len(report["requests"]) == 1 and '"negative":true' in report["requests"][0]["body"]


def test_the_report_follows_earlier_adjustments(cfg: Any) -> None:
    second = {**REFUND, "event_id": "refund-2", "amount": "100.00"}
    report = explain_adjustment(cfg, second, PURCHASE, [REFUND], NOW)
    assert report["previous"] == [REFUND["event_id"]]
    [kameleoon] = [r for r in report["results"] if r["provider"] == "KAMELEOON"]
    assert kameleoon["outcome"] == "retracted"  # 29.90 + 100.00 reach the total
    assert [(x["role"], x["revenue"]) for x in report["actions"]] == [("cancel", "100.00")]  # the restatement


def test_an_adjustment_is_told_from_a_purchase() -> None:
    assert is_adjustment(REFUND) and not is_adjustment(PURCHASE)


@pytest.mark.parametrize(("change", "field"), [
    ({"kind": "REFUNDED"}, "kind"),
    ({"kind": "UNKNOWN"}, "kind"),
    ({"amount": "1.234"}, "amount"),
    ({"amount": True}, "amount"),
    ({"currency": "euro"}, "currency"),
    ({"items_returned": -1}, "items_returned"),
    ({"reason": 3}, "reason"),
    ({"occurred_at": "yesterday"}, "occurred_at"),
])
def test_bad_input_names_the_field(change: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=rf"^{field}:"):
        adjustment_from_json({**REFUND, **change})


def test_the_purchase_must_be_the_adjusted_order(cfg: Any) -> None:
    with pytest.raises(ValueError, match="order_id"):
        explain_adjustment(cfg, {**REFUND, "order_id": "other"}, PURCHASE, [], NOW)


def test_without_the_purchase_the_command_says_what_it_needs() -> None:
    env = {**os.environ, "CONDUCTRICS_API_KEY": "x"}
    out = subprocess.run([sys.executable, "-m", "consumer", "explain", "--config", "deploy/config.example.toml",
                          "docs/examples/refund.json"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "--purchase" in out.stderr
