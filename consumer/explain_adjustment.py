"""Explain what the service would send for one order adjustment given as JSON, with the purchase it adjusts.

Without a ledger at hand, the purchase's conversions are taken as the matcher decides them now and as
all delivered: what the service would take back if they were. `explain --purchase P.json A.json`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from decimal import Decimal, InvalidOperation
from typing import Any

from consumer.adjustments import AdjustmentPlan, Delivered, plan
from consumer.config import Config
from consumer.decoding import RevenueError, contract_revenue
from consumer.explain import _iso, _printable, _text, _timestamp, planned_requests, purchase_from_json
from consumer.matcher import MatchSettings, TooManyExposures, match
from consumer.model import AdjustmentKind, OrderAdjusted, Purchase

ADJUSTMENT_FIELDS = ("event_id", "order_id", "occurred_at", "kind", "amount", "currency", "items_returned", "reason")
_KINDS = tuple(k.value for k in AdjustmentKind if k is not AdjustmentKind.UNKNOWN)


def is_adjustment(obj: object) -> bool:
    """Whether an event given as JSON is an order adjustment (it has a `kind` and no purchase `revenue`)."""
    return isinstance(obj, Mapping) and "kind" in obj and "revenue" not in obj


def adjustment_from_json(obj: Mapping[str, Any]) -> OrderAdjusted:
    """An OrderAdjusted from JSON with schemas/order_adjusted.avsc's fields; ValueError names a bad field."""
    if not isinstance(obj, Mapping):
        raise ValueError(f"adjustment: expected a JSON object, got {type(obj).__name__}")
    kind = obj.get("kind")
    if not isinstance(kind, str) or kind.strip().upper() not in _KINDS:
        raise ValueError(f"kind: expected one of {', '.join(_KINDS)} (any case), got {kind!r}")
    currency = _text(obj, "currency", "")
    if not re.fullmatch(r"[A-Za-z]{3}", currency):
        raise ValueError(f"currency: expected an ISO 4217 code like 'EUR', got {currency!r}")
    amount = obj.get("amount")
    try:
        if isinstance(amount, bool) or not isinstance(amount, str | int | float):
            raise InvalidOperation
        value = contract_revenue(Decimal(str(amount).strip()))
    except (InvalidOperation, RevenueError):
        raise ValueError(f'amount: expected a decimal string like "10.00" with at most 2 decimals, got {amount!r}'
                         ) from None
    items = obj.get("items_returned", 0)
    if isinstance(items, bool) or not isinstance(items, int) or items < 0:
        raise ValueError(f"items_returned: expected a non-negative integer, got {items!r}")
    reason = obj.get("reason")
    if reason is not None and not isinstance(reason, str):
        raise ValueError(f"reason: expected a string or null, got {reason!r}")
    return OrderAdjusted(_text(obj, "event_id", ""), _text(obj, "order_id", ""), _timestamp(obj, "occurred_at", ""),
                         AdjustmentKind(kind.strip().upper()), value, currency.upper(), items, reason)


def delivered_as_matched(cfg: Config, purchase: Purchase, now_ms: int) -> list[Delivered]:
    """The purchase's conversions as the matcher decides them at `now_ms`, as the ledger would record them."""
    settings = MatchSettings.from_config(cfg)
    try:
        decision = match(purchase, settings, now_ms)
    except TooManyExposures:
        return []  # dead-lettered whole: nothing was delivered
    return [Delivered(c.provider, c.project, c.key, c.goals, c.identity, c.visitor_id, c.revenue,
                      settings.currency_of(c.provider, c.project, purchase), purchase.revenue, purchase.currency)
            for c in decision.conversions]


def plan_json(p: AdjustmentPlan) -> dict[str, Any]:
    """A plan as JSON: each project's outcome and each event to send (for explain, and the ledger's views)."""
    a = p.adjustment
    return {
        "adjustment": {"event_id": a.event_id, "order_id": a.order_id, "occurred_at": a.occurred_at,
                       "occurred_at_iso": _iso(a.occurred_at), "kind": a.kind.value, "amount": str(a.amount),
                       "currency": a.currency, "items_returned": a.items_returned, "reason": a.reason},
        "dead_letter": None if p.dead_letter is None else p.dead_letter.value,
        "results": [{"provider": None if r.provider is None else r.provider.value, "project": r.project,
                     "outcome": r.outcome.value, "detail": r.detail} for r in p.results],
        "actions": [{"role": x.role.value, "provider": x.conversion.provider.value, "project": x.conversion.project,
                     "identity": x.conversion.identity.value, "visitor": x.conversion.visitor_id,
                     "goals": list(x.conversion.goals),
                     "revenue": None if x.conversion.revenue is None else str(x.conversion.revenue),
                     "negative": x.conversion.negative, "key": x.conversion.key, "replaces": x.replaces}
                    for x in p.actions],
    }


def explain_adjustment(cfg: Config, event: Mapping[str, Any], purchase_event: Mapping[str, Any],
                       previous: Sequence[Mapping[str, Any]], now_ms: int) -> dict[str, Any]:
    """What the service would send for `event` if `purchase_event`'s conversions were all delivered, after
    the `previous` adjustments of the order (in the order they were applied)."""
    adjustment = adjustment_from_json(event)
    purchase = purchase_from_json(purchase_event)
    if purchase.order_id != adjustment.order_id:
        raise ValueError(f"order_id: the adjustment is for order {adjustment.order_id!r}, the purchase is "
                         f"{purchase.order_id!r}")
    earlier = [adjustment_from_json(e) for e in previous]
    delivered = delivered_as_matched(cfg, purchase, now_ms)
    planned = plan(adjustment, delivered, earlier, cfg.rules())
    return {
        "now": now_ms,
        "now_iso": _iso(now_ms),
        "assumed_delivered": [{"provider": d.provider.value, "project": d.project, "identity": d.identity.value,
                               "visitor": d.visitor_id, "goals": list(d.goals),
                               "revenue": None if d.revenue is None else str(d.revenue), "currency": d.currency,
                               "key": d.key} for d in delivered],
        "previous": [e.event_id for e in earlier],
        **plan_json(planned),
        "requests": planned_requests(cfg, [x.conversion for x in planned.actions]),
        "warnings": [f"unknown field {k} ignored" for k in event if k not in ADJUSTMENT_FIELDS],
    }


def render_adjustment_text(report: Mapping[str, Any]) -> str:
    """The adjustment report for humans, one fact per line."""
    a = report["adjustment"]
    lines = [f"adjustment {a['event_id']} of order {a['order_id']}: {a['kind']} {a['amount']} {a['currency']}"
             f" at {a['occurred_at_iso']}" + (f", reason {a['reason']}" if a["reason"] else "")]
    lines += [f"warning: {w}" for w in report["warnings"]]
    lines.append(f"assumed delivered (the purchase as matched now): {len(report['assumed_delivered'])}")
    for d in report["assumed_delivered"]:
        revenue = "no revenue" if d["revenue"] is None else f"revenue {d['revenue']} {d['currency']}"
        lines.append(f"  = {d['provider'].lower()}/{d['project']} {d['identity']} {d['visitor']} goals "
                     f"{','.join(d['goals'])}, {revenue}, key {d['key']}")
    if report["previous"]:
        lines.append(f"after the earlier adjustments: {', '.join(report['previous'])}")
    if report["dead_letter"] is not None:
        lines.append(f"dead-lettered at stage adjust, reason {report['dead_letter']}; nothing is sent")
    lines.append(f"outcomes: {len(report['results'])}")
    for r in report["results"]:
        where = f"{r['provider'].lower()}/{r['project']}" if r["provider"] else "the order"
        lines.append(f"  - {where}: {r['outcome']} ({r['detail']})")
    lines.append(f"events: {len(report['actions'])}")
    for x in report["actions"]:
        revenue = "no revenue" if x["revenue"] is None else f"revenue {x['revenue']}"
        lines.append(f"  > {x['role']} {x['provider'].lower()}/{x['project']} {x['identity']} {x['visitor']} goals "
                     f"{','.join(x['goals'])}, {revenue}, negative {str(x['negative']).lower()}, key {x['key']}"
                     f" (in place of {x['replaces']})")
    lines.append(f"requests: {len(report['requests'])}" + (" (secrets shown as ***)" if report["requests"] else ""))
    for r in report["requests"]:
        lines.append(f"  {r['method']} {r['url']}  ({r['provider'].lower()}/{r['project']})")
        if r["body"] is not None:
            lines.append(f"    body: {r['body']}")
    return "\n".join(_printable(line) for line in lines) + "\n"
