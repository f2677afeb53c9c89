"""The reconciliation report: counted number for number from ledger records, as compaction leaves them."""

from __future__ import annotations

from decimal import Decimal

from consumer.ledger.record import LedgerRecord, Outcome
from consumer.ledger.report import as_dict, build, latest, render


def rec(key: str, outcome: Outcome, order: str, *, goal: str = "g1", revenue: str | None = "10.00",
        reasons: tuple[str, ...] = (), occurred: int = 1000, project: str = "site") -> LedgerRecord:
    return LedgerRecord(key=key, outcome=outcome, provider="kameleoon", order_id=order, project=project,
                        goals=(goal,) if outcome is not Outcome.UNATTRIBUTED else (),
                        revenue=Decimal(revenue) if revenue else None, currency="EUR", occurred_at=occurred,
                        reasons=reasons, experiment_id="e1", variation_id="v1")


def test_the_report_counts_outcomes_revenue_reasons_and_the_match_rate() -> None:
    stream = [
        ("k1", rec("k1", Outcome.DEAD_LETTERED, "o1")),
        ("k1", rec("k1", Outcome.DELIVERED, "o1")),  # the later outcome wins, as after compaction
        ("k2", rec("k2", Outcome.DELIVERED, "o2", revenue="5.50")),
        ("k3", rec("k3", Outcome.NOT_ACCEPTED, "o3")),
        ("k4", rec("k4", Outcome.DELIVERED, "o4")),
        ("k4", None),  # forgotten
        ("u1", rec("u1", Outcome.UNATTRIBUTED, "o5", reasons=("outside_window",))),
        ("u2", rec("u2", Outcome.UNATTRIBUTED, "o6", reasons=("currency", "outside_window"))),
        ("k9", rec("k9", Outcome.DELIVERED, "o9", occurred=5000)),  # outside --until
    ]
    rep = build(latest(stream).values(), until=2000)
    d = as_dict(rep)
    assert d["rows"] == [{"provider": "kameleoon", "project": "site", "goal": "g1", "experiment_id": "e1",
                          "variation_id": "v1", "purchases_attributed": 3, "delivered": 2, "not_accepted": 1,
                          "dead_lettered": 0, "skipped_duplicate": 0, "revenue_delivered": {"EUR": "15.50"}}]
    assert d["projects"] == [{"provider": "kameleoon", "project": "site", "purchases_attributed": 3,
                              "not_attributed": {"currency": 1, "outside_window": 2}, "match_rate": 0.6}]
    assert "15.50 EUR" in render(rep, "text") and "60.0%" in render(rep, "text")
    assert render(rep, "csv").splitlines()[1].startswith("kameleoon,site,g1,e1,v1,3,2,1,0,0,")
    assert build(latest(stream).values(), provider="convert").rows == {}
