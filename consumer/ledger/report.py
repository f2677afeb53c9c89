"""The reconciliation report from ledger records: per provider, project, goal (and experiment/variation). Pure.

`latest` keeps the last record per key, as compaction does, so reading an uncompacted topic gives the
same numbers. Filters: purchase time (`occurred_at`) in [since, until), provider, project.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from decimal import Decimal

from consumer.ledger.record import LedgerRecord, Outcome


def latest(records: Iterable[tuple[str, LedgerRecord | None]]) -> dict[str, LedgerRecord]:
    """The last record per key, a tombstone (None) removing it: what compaction leaves."""
    out: dict[str, LedgerRecord] = {}
    for key, rec in records:
        if rec is None:
            out.pop(key, None)
        else:
            out[key] = rec
    return out


@dataclass(slots=True)
class Row:
    provider: str
    project: str
    goal: str
    experiment_id: str
    variation_id: str
    purchases_attributed: set[str] = field(default_factory=set)
    delivered: int = 0
    not_accepted: int = 0
    dead_lettered: int = 0
    skipped_duplicate: int = 0
    revenue_delivered: dict[str, Decimal] = field(default_factory=dict)  # per currency


@dataclass(slots=True)
class ProjectTotals:
    attributed: set[str] = field(default_factory=set)
    unattributed: dict[str, set[str]] = field(default_factory=dict)  # reason -> orders

    @property
    def match_rate(self) -> float | None:
        missed = set().union(*self.unattributed.values()) - self.attributed if self.unattributed else set()
        total = len(self.attributed) + len(missed)
        return len(self.attributed) / total if total else None


@dataclass(slots=True)
class Report:
    rows: dict[tuple[str, str, str, str, str], Row] = field(default_factory=dict)
    projects: dict[tuple[str, str], ProjectTotals] = field(default_factory=dict)


def build(records: Iterable[LedgerRecord], *, since: int | None = None, until: int | None = None,
          provider: str | None = None, project: str | None = None) -> Report:
    rep = Report()
    for r in records:
        if (since is not None and r.occurred_at < since) or (until is not None and r.occurred_at >= until):
            continue
        if (provider and r.provider != provider) or (project and r.project != project):
            continue
        totals = rep.projects.setdefault((r.provider, r.project), ProjectTotals())
        if r.outcome is Outcome.UNATTRIBUTED:
            for reason in r.reasons:
                totals.unattributed.setdefault(reason, set()).add(r.order_id)
            continue
        if r.outcome is Outcome.UNKNOWN:
            continue
        totals.attributed.add(r.order_id)
        for goal in r.goals or ("",):
            k = (r.provider, r.project, goal, r.experiment_id or "", r.variation_id or "")
            row = rep.rows.get(k)
            if row is None:
                row = rep.rows[k] = Row(*k)
            row.purchases_attributed.add(r.order_id)
            if r.outcome is Outcome.DELIVERED:
                row.delivered += 1
                if r.revenue is not None:
                    cur = r.currency or ""
                    row.revenue_delivered[cur] = row.revenue_delivered.get(cur, Decimal(0)) + r.revenue
            elif r.outcome is Outcome.NOT_ACCEPTED:
                row.not_accepted += 1
            elif r.outcome is Outcome.DEAD_LETTERED:
                row.dead_lettered += 1
            elif r.outcome is Outcome.SKIPPED_DUPLICATE:
                row.skipped_duplicate += 1
    return rep


def as_dict(rep: Report) -> dict[str, object]:
    return {
        "rows": [
            {"provider": r.provider, "project": r.project, "goal": r.goal, "experiment_id": r.experiment_id,
             "variation_id": r.variation_id, "purchases_attributed": len(r.purchases_attributed),
             "delivered": r.delivered, "not_accepted": r.not_accepted, "dead_lettered": r.dead_lettered,
             "skipped_duplicate": r.skipped_duplicate,
             "revenue_delivered": {c: str(v) for c, v in sorted(r.revenue_delivered.items())}}
            for _, r in sorted(rep.rows.items())
        ],
        "projects": [
            {"provider": p, "project": proj, "purchases_attributed": len(t.attributed),
             "not_attributed": {reason: len(o) for reason, o in sorted(t.unattributed.items())},
             "match_rate": t.match_rate}
            for (p, proj), t in sorted(rep.projects.items())
        ],
    }


def render(rep: Report, fmt: str) -> str:
    d = as_dict(rep)
    if fmt == "json":
        return json.dumps(d, indent=2)
    rows = d["rows"]
    assert isinstance(rows, list)
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["provider", "project", "goal", "experiment_id", "variation_id", "purchases_attributed",
                    "delivered", "not_accepted", "dead_lettered", "skipped_duplicate", "revenue_delivered"])
        for r in rows:
            w.writerow([r["provider"], r["project"], r["goal"], r["experiment_id"], r["variation_id"],
                        r["purchases_attributed"], r["delivered"], r["not_accepted"], r["dead_lettered"],
                        r["skipped_duplicate"], " ".join(f"{v} {c}" for c, v in r["revenue_delivered"].items())])
        return buf.getvalue()
    lines = []
    for r in rows:
        revenue = ", ".join(f"{v} {c}".strip() for c, v in r["revenue_delivered"].items()) or "-"
        lines.append(f"{r['provider']:<12} {r['project']:<14} goal {r['goal'] or '-':<10} "
                     f"exp {r['experiment_id'] or '-'}/{r['variation_id'] or '-'}: "
                     f"{r['purchases_attributed']} purchases, {r['delivered']} delivered, "
                     f"{r['not_accepted']} not accepted, {r['dead_lettered']} dead-lettered, revenue {revenue}")
    projects = d["projects"]
    assert isinstance(projects, list)
    for p in projects:
        rate = "-" if p["match_rate"] is None else f"{p['match_rate']:.1%}"
        reasons = ", ".join(f"{k} {v}" for k, v in p["not_attributed"].items()) or "none"
        lines.append(f"{p['provider'] or '(none)':<12} {p['project'] or '-':<14} attributed "
                     f"{p['purchases_attributed']}, not attributed: {reasons}; match rate {rate}")
    return "\n".join(lines) + "\n"
