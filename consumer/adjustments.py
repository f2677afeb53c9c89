"""Plan what an order adjustment sends: cancellations and restatements of what was delivered (pure, no I/O).

Inputs: the adjustment (`OrderAdjusted`), what was delivered for its order (`DeliveredConversion`, the
ledger's records: the purchase's own conversions only), the order's earlier adjustments (so a second
partial refund accounts for the first) and each provider project's rules (`refunds`, `revenue_share`).
Output: an `AdjustmentPlan`, the same for the same inputs, so an adjustment read twice (a redelivery,
a restart after a crash) plans the same events with the same nonces, which Kameleoon de-duplicates.

Per provider project (docs/operations.md, "Refunds and cancellations"):

* Kameleoon (`refunds = "retract"`, its default): every conversion still standing for the order — the
  original, or the restatement a previous partial refund sent in its place — is cancelled with a
  CONVERSION event carrying `negative: true` and the same goal, visitor and revenue. A partial refund
  then restates: a new conversion per original with the revenue that is left. Cancel-and-restate keeps
  the conversion count at one and sets the revenue; a lone negative event for the refunded part would
  take the count to zero. That a negative event takes back one conversion of its goal and the revenue
  it carries is inferred: the documents say only "true cancels a conversion".
* What is left: each original's revenue times (T - R) / T, where T is the order's total and R every
  partial refund so far (this one included). T is the purchase's revenue the ledger recorded
  (`order_revenue`, in `order_currency`); without it, it is recovered from what was sent: the sum of
  the goal's conversions when the project splits revenue, their largest when each got the full revenue
  (then the refund must be in the currency sent). The goal's new total is rounded to the cent (half to
  even) and shared among its identities in proportion to their original revenue, in whole cents by
  largest remainder (ties: identity kind, then visitor id, as the matcher's split), summing exactly.
  R >= T takes everything back, as a full refund does.
* Convert and Conductrics document no retraction: `refunds = "skip"` is their only policy (counted as
  not_supported). Kameleoon with `refunds = "skip"`: counted as skipped.

Nonces: 16 hex of sha256("kameleoon-adjustment", site, adjustment event id, original key, role), role
"cancel" or "restate" (`consumer.providers.kameleoon.keys.adjustment_nonce`).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from fractions import Fraction
from typing import Protocol

from consumer.config import Rules
from consumer.model import (
    AdjustmentKind,
    Conversion,
    Identity,
    OrderAdjusted,
    Provider,
    RefundPolicy,
    RevenueShare,
)
from consumer.providers.kameleoon.keys import adjustment_nonce


class DeliveredConversion(Protocol):
    """One conversion delivered for a purchase, as the ledger recorded it (what the planner needs of it)."""

    @property
    def provider(self) -> Provider: ...

    @property
    def project(self) -> str: ...

    @property
    def key(self) -> str:
        """Its idempotency key (Kameleoon: the nonce)."""
        ...

    @property
    def goals(self) -> tuple[str, ...]:
        """Kameleoon: exactly one."""
        ...

    @property
    def identity(self) -> Identity: ...

    @property
    def visitor_id(self) -> str: ...

    @property
    def revenue(self) -> Decimal | None:
        """The revenue sent (None: sent without revenue)."""
        ...

    @property
    def currency(self) -> str | None:
        """The currency of `revenue` (the project's, or the purchase's when the project sets none)."""
        ...

    @property
    def order_revenue(self) -> Decimal | None:
        """The purchase's own total, as its event stated it (None: not recorded)."""
        ...

    @property
    def order_currency(self) -> str | None: ...


@dataclass(frozen=True, slots=True)
class Delivered:
    """A DeliveredConversion as a plain value (tests, explain, and an adapter for ledger records)."""

    provider: Provider
    project: str
    key: str
    goals: tuple[str, ...]
    identity: Identity
    visitor_id: str
    revenue: Decimal | None
    currency: str | None = None
    order_revenue: Decimal | None = None
    order_currency: str | None = None


class Role(enum.StrEnum):
    CANCEL = "cancel"  # `negative: true`: takes back a conversion standing for the order
    RESTATE = "restate"  # a conversion with the revenue a partial refund leaves, in the original's place


class AdjustmentOutcome(enum.StrEnum):
    """What an adjustment did for one provider project; the `outcome` label of adjustments_total."""

    RETRACTED = "retracted"  # every standing conversion cancelled (full refund, cancellation, refunded in full)
    RESTATED = "restated"  # cancelled and restated with the revenue that is left
    NOT_SUPPORTED = "not_supported"  # the provider documents no retraction (Convert, Conductrics)
    SKIPPED = "skipped"  # the project's policy is refunds = "skip"
    ALREADY_RETRACTED = "already_retracted"  # an earlier adjustment took everything back: nothing left
    NO_CHANGE = "no_change"  # nothing to change: a refund of 0, or conversions sent without revenue
    UNKNOWN_PROJECT = "unknown_project"  # delivered to a project the configuration no longer has
    NOT_DELIVERED = "not_delivered"  # nothing was delivered for the order (provider label "none")
    ORPHAN = "orphan"  # its purchase never came within orphan_wait: dead-lettered (provider "none")
    INVALID = "invalid"  # cannot be applied (see DeadLetterReason): dead-lettered


class DeadLetterReason(enum.StrEnum):
    """Why an adjustment goes to the dead-letter topic instead of being applied."""

    ORPHAN = "orphan_adjustment"
    UNKNOWN_KIND = "unknown_adjustment_kind"  # a newer writer's kind (read as UNKNOWN)
    NEGATIVE_AMOUNT = "negative_amount"
    CURRENCY = "currency_mismatch"  # the refund's currency is not the one its order total is known in
    LEDGER_UNAVAILABLE = "ledger_unavailable"  # the ledger could not be read until the orphan wait was over


NO_PROVIDER = "none"  # the provider label of outcomes that concern the whole order


@dataclass(frozen=True, slots=True)
class AdjustmentAction:
    """One event to send: a cancellation or a restatement, ready for the provider module."""

    role: Role
    conversion: Conversion  # Kameleoon: one goal; `negative` set on a cancellation
    original_key: str  # the key of the purchase's conversion this action is about
    replaces: str  # CANCEL: the key cancelled (the original, or an earlier restatement); RESTATE: the original's


@dataclass(frozen=True, slots=True)
class ProjectResult:
    provider: Provider | None  # None: the whole order (not_delivered, orphan, invalid before any project)
    project: str
    outcome: AdjustmentOutcome
    detail: str


@dataclass(frozen=True, slots=True)
class AdjustmentPlan:
    adjustment: OrderAdjusted
    actions: tuple[AdjustmentAction, ...]
    results: tuple[ProjectResult, ...]
    dead_letter: DeadLetterReason | None = None  # set: write the adjustment to the DLQ with this reason

    def counts(self) -> dict[tuple[str, str], int]:
        """(provider label, outcome) -> count, for offline_conversions_adjustments_total."""
        out: dict[tuple[str, str], int] = {}
        for r in self.results:
            label = (r.provider.slug if r.provider is not None else NO_PROVIDER, r.outcome.value)
            out[label] = out.get(label, 0) + 1
        return out


# --------------------------------------------------------------------------- waiting for the purchase


class Readiness(enum.StrEnum):
    WAIT = "wait"  # its purchase may still come: hold it until `until_ms`
    DEAD_LETTER = "dead_letter"
    PLAN = "plan"  # the ledger knows the order: plan it now


@dataclass(frozen=True, slots=True)
class Verdict:
    readiness: Readiness
    until_ms: int | None = None  # WAIT: when to decide again
    reason: DeadLetterReason | None = None  # DEAD_LETTER: why


def readiness(adjustment: OrderAdjusted, now_ms: int, first_seen_ms: int, purchase_known: bool,
              orphan_wait_ms: int) -> Verdict:
    """Whether to plan an adjustment now, hold it for its purchase, or dead-letter it.

    `purchase_known`: the ledger holds a record for the order (any outcome; a purchase that delivered
    nothing then plans to not_delivered). `first_seen_ms`: when the service first read this adjustment,
    so a wait is bounded by `orphan_wait_ms` from then, whatever the event's own clock says. A kind this
    reader does not know is dead-lettered at once: no purchase would make it plannable.
    """
    if adjustment.kind is AdjustmentKind.UNKNOWN:
        return Verdict(Readiness.DEAD_LETTER, reason=DeadLetterReason.UNKNOWN_KIND)
    if purchase_known:
        return Verdict(Readiness.PLAN)
    deadline = first_seen_ms + orphan_wait_ms
    if now_ms < deadline:
        return Verdict(Readiness.WAIT, until_ms=deadline)
    return Verdict(Readiness.DEAD_LETTER, reason=DeadLetterReason.ORPHAN)


def orphan_plan(adjustment: OrderAdjusted, reason: DeadLetterReason = DeadLetterReason.ORPHAN) -> AdjustmentPlan:
    """The plan of an adjustment `readiness` dead-letters: nothing sent, counted once for the order."""
    outcome = (AdjustmentOutcome.ORPHAN if reason in (DeadLetterReason.ORPHAN, DeadLetterReason.LEDGER_UNAVAILABLE)
               else AdjustmentOutcome.INVALID)
    return AdjustmentPlan(adjustment, (), (ProjectResult(None, "", outcome, reason.value),), reason)


# --------------------------------------------------------------------------- planning


def plan(adjustment: OrderAdjusted, delivered: Iterable[DeliveredConversion], previous: Sequence[OrderAdjusted],
         rules: Mapping[tuple[Provider, str], Rules]) -> AdjustmentPlan:
    """What `adjustment` sends, given the purchase's delivered conversions and the order's earlier adjustments.

    `previous`: the order's adjustments that were planned (not dead-lettered), in the order they were
    applied. If this one is among them (read again after a crash), only those before it count, so it
    is planned exactly as the first time. Order matters: each earlier partial refund replaced the
    standing conversions with its restatements.
    """
    invalid = _invalid(adjustment)
    if invalid is not None:
        return orphan_plan(adjustment, invalid)
    originals = sorted({d.key: d for d in delivered}.values(), key=_order)
    if not originals:
        return AdjustmentPlan(adjustment, (), (ProjectResult(None, "", AdjustmentOutcome.NOT_DELIVERED,
                                                             "nothing was delivered for this order"),))
    earlier = _earlier(previous, adjustment)
    projects: dict[tuple[Provider, str], list[DeliveredConversion]] = {}
    for d in originals:
        projects.setdefault((d.provider, d.project), []).append(d)
    actions: list[AdjustmentAction] = []
    results: list[ProjectResult] = []
    for (provider, project), members in projects.items():
        r = rules.get((provider, project))
        if r is None:
            results.append(ProjectResult(provider, project, AdjustmentOutcome.UNKNOWN_PROJECT,
                                         "the project is no longer configured"))
        elif provider is not Provider.KAMELEOON:
            results.append(ProjectResult(provider, project, AdjustmentOutcome.NOT_SUPPORTED,
                                         f"{provider.slug} documents no way to take a conversion back"))
        elif r.refunds is RefundPolicy.SKIP:
            results.append(ProjectResult(provider, project, AdjustmentOutcome.SKIPPED, 'refunds = "skip"'))
        else:
            result, sent = _kameleoon(adjustment, earlier, project, members, r.revenue_share)
            if result.outcome is AdjustmentOutcome.INVALID:
                # Applied to every project it concerns or to none: never half applied.
                return AdjustmentPlan(adjustment, (), (ProjectResult(None, "", AdjustmentOutcome.INVALID,
                                                                     f"{project}: {result.detail}"),),
                                      DeadLetterReason.CURRENCY)
            results.append(result)
            actions += sent
    return AdjustmentPlan(adjustment, tuple(actions), tuple(results))


def for_providers(p: AdjustmentPlan, providers: frozenset[Provider], designated: bool) -> AdjustmentPlan:
    """The part of a plan that one pipeline carries out: its providers' actions and results, and, for the
    designated pipeline, what concerns the whole order (not_delivered, orphan, invalid: counted and
    dead-lettered once)."""
    results = tuple(r for r in p.results if (r.provider in providers if r.provider is not None else designated))
    actions = tuple(a for a in p.actions if a.conversion.provider in providers)
    refused = any(r.outcome in (AdjustmentOutcome.ORPHAN, AdjustmentOutcome.INVALID) for r in results)
    return AdjustmentPlan(p.adjustment, actions, results, p.dead_letter if refused else None)


def _order(d: DeliveredConversion) -> tuple[str, str, str, str, str, tuple[str, ...]]:
    return (d.provider.value, d.project, d.identity.value, d.visitor_id, d.key, d.goals)


def _invalid(a: OrderAdjusted) -> DeadLetterReason | None:
    if a.kind is AdjustmentKind.UNKNOWN:
        return DeadLetterReason.UNKNOWN_KIND
    if a.amount < 0:
        return DeadLetterReason.NEGATIVE_AMOUNT
    return None


def _earlier(previous: Sequence[OrderAdjusted], current: OrderAdjusted) -> list[OrderAdjusted]:
    """The adjustments applied before this one: once each, none a planner refuses. When the current one is
    among them (read again), only those before it: it is planned as it was the first time."""
    seen = {current.event_id}
    out = []
    for a in previous:
        if a.event_id == current.event_id:
            break
        if a.event_id in seen or a.order_id != current.order_id or _invalid(a) is not None:
            continue
        seen.add(a.event_id)
        out.append(a)
    return out


@dataclass(slots=True)
class _Standing:
    """What Kameleoon counts now in place of one original conversion."""

    original: DeliveredConversion
    key: str
    revenue: Decimal | None


def _full(a: OrderAdjusted) -> bool:
    return a.kind is not AdjustmentKind.PARTIAL_REFUND


def _kameleoon(adjustment: OrderAdjusted, earlier: list[OrderAdjusted], site: str,
               members: list[DeliveredConversion], share: RevenueShare) -> tuple[ProjectResult, list[AdjustmentAction]]:
    for d in members:
        if len(d.goals) != 1:
            raise LedgerRecordError(f"Kameleoon conversion {d.key} records {len(d.goals)} goals, not one")
    base = _Base.of(members, share)
    standing: dict[str, _Standing] | None = {d.key: _Standing(d, d.key, d.revenue) for d in members}
    refunded = Decimal(0)
    # Replay the earlier adjustments: which conversions stand now, and how much was refunded so far.
    for a in earlier:
        if standing is None:
            break
        if _full(a):
            standing = None
            continue
        if not base.accepts(a.currency) or a.amount == 0 or not base.has_revenue:
            continue  # dead-lettered (currency) or nothing changed: it replaced nothing
        refunded += a.amount
        standing = None if refunded >= base.total_for() else _restated(a, site, standing, base, refunded)
    if standing is None:
        return ProjectResult(Provider.KAMELEOON, site, AdjustmentOutcome.ALREADY_RETRACTED,
                             "an earlier adjustment took every conversion back"), []
    a = adjustment
    if not _full(a):
        if not base.accepts(a.currency):
            return ProjectResult(Provider.KAMELEOON, site, AdjustmentOutcome.INVALID,
                                 f"refund in {a.currency}, the order total is known in {base.currency}"), []
        if a.amount == 0 or not base.has_revenue:
            why = "a refund of 0" if a.amount == 0 else "its conversions were sent without revenue"
            return ProjectResult(Provider.KAMELEOON, site, AdjustmentOutcome.NO_CHANGE, why), []
    if _full(a) or refunded + a.amount >= base.total_for():
        cancels = [_action(a, site, Role.CANCEL, s.original, s.key, s.revenue) for s in standing.values()]
        what = a.kind.value.lower() if _full(a) else "refunds reach the order total"
        return ProjectResult(Provider.KAMELEOON, site, AdjustmentOutcome.RETRACTED,
                             f"{len(cancels)} conversion(s) cancelled: {what}"), cancels
    restated = _restated(a, site, standing, base, refunded + a.amount)
    actions: list[AdjustmentAction] = []
    for s in standing.values():
        if s.original.revenue is None:
            continue  # sent without revenue: a partial refund leaves it as it is
        actions.append(_action(a, site, Role.CANCEL, s.original, s.key, s.revenue))
        actions.append(_action(a, site, Role.RESTATE, s.original, s.original.key, restated[s.original.key].revenue))
    return ProjectResult(Provider.KAMELEOON, site, AdjustmentOutcome.RESTATED,
                         f"{len(actions) // 2} conversion(s) cancelled and restated, {refunded + a.amount} of "
                         f"{base.total_for()} {a.currency} refunded"), actions


class LedgerRecordError(ValueError):
    """A delivered-conversion record the planner cannot use (a Kameleoon record with other than one goal)."""


@dataclass(frozen=True, slots=True)
class _Base:
    """What a refund is a fraction of: the order total T, and each goal's delivered revenue."""

    total: Decimal | None  # T from the ledger (order_revenue), None: recovered per goal
    currency: str | None  # T's currency (the order's, or the revenue sent's when recovered)
    goal_revenue: Mapping[str, Decimal]  # per goal: the sum of its originals' revenue
    goal_total: Mapping[str, Decimal]  # per goal: T in the revenue sent (recovered), or T
    has_revenue: bool

    @staticmethod
    def of(members: list[DeliveredConversion], share: RevenueShare) -> _Base:
        with_revenue = [d for d in members if d.revenue is not None]
        sums: dict[str, Decimal] = {}
        largest: dict[str, Decimal] = {}
        for d in with_revenue:
            g = d.goals[0]
            rev = d.revenue if d.revenue is not None else Decimal(0)
            sums[g] = sums.get(g, Decimal(0)) + rev
            largest[g] = max(largest.get(g, rev), rev)
        recorded = next((d for d in members if d.order_revenue is not None), None)
        if recorded is not None and recorded.order_revenue is not None:
            t = recorded.order_revenue
            return _Base(t, recorded.order_currency, sums, {g: t for g in sums}, bool(with_revenue) and t > 0)
        currency = next((d.currency for d in with_revenue), None)
        totals = sums if share is RevenueShare.SPLIT else largest
        return _Base(None, currency, sums, totals, bool(with_revenue) and all(t > 0 for t in totals.values()))

    def accepts(self, currency: str) -> bool:
        return self.currency is None or self.currency == currency

    def total_for(self) -> Decimal:
        """T, for comparing the refunds with (recovered: the smallest goal's, the same for every goal as sent)."""
        if self.total is not None:
            return self.total
        return min(self.goal_total.values()) if self.goal_total else Decimal(0)

    def left(self, goal: str, refunded: Decimal) -> int:
        """The goal's revenue left after `refunded`, in cents: its revenue x (T - R) / T, half to even."""
        t = self.goal_total[goal]
        return round(Fraction(self.goal_revenue[goal]) * 100 * (1 - Fraction(refunded) / Fraction(t)))


def _restated(a: OrderAdjusted, site: str, standing: dict[str, _Standing], base: _Base,
              refunded: Decimal) -> dict[str, _Standing]:
    """What stands after a partial refund: each original's share of what is left, restated under a new nonce
    (module doc); a conversion sent without revenue stays as it is."""
    by_goal: dict[str, list[_Standing]] = {}
    for s in standing.values():
        if s.original.revenue is not None:
            by_goal.setdefault(s.original.goals[0], []).append(s)
    new: dict[str, _Standing] = {}
    for goal, group in by_goal.items():
        cents = _largest_remainder(base.left(goal, refunded), [Fraction(s.original.revenue or 0) for s in group])
        for s, c in zip(group, cents, strict=True):
            key = adjustment_nonce(site, a.event_id, s.original.key, Role.RESTATE.value)
            new[s.original.key] = _Standing(s.original, key, Decimal(c).scaleb(-2))
    return {k: new.get(k, s) for k, s in standing.items()}


def _largest_remainder(total_cents: int, weights: list[Fraction]) -> list[int]:
    """`total_cents` in whole cents proportional to `weights`, summing exactly; spare cents to the largest
    remainders, ties to the earlier (the caller's order: identity kind, then visitor id)."""
    w = sum(weights, Fraction(0))
    if not weights:
        return []
    if w == 0:
        q, r = divmod(total_cents, len(weights))
        return [q + (1 if i < r else 0) for i in range(len(weights))]
    exact = [total_cents * x / w for x in weights]
    floors = [int(e.numerator // e.denominator) for e in exact]
    spare = total_cents - sum(floors)
    order = sorted(range(len(weights)), key=lambda i: (-(exact[i] - floors[i]), i))
    for i in order[:spare]:
        floors[i] += 1
    return floors


def _action(a: OrderAdjusted, site: str, role: Role, original: DeliveredConversion, replaces: str,
            revenue: Decimal | None) -> AdjustmentAction:
    key = adjustment_nonce(site, a.event_id, original.key, role.value)
    conversion = Conversion(
        provider=Provider.KAMELEOON,
        project=site,
        visitor_id=original.visitor_id,
        goals=original.goals,
        revenue=revenue,
        key=key,
        event_id=a.event_id,
        order_id=a.order_id,
        occurred_at=a.occurred_at,
        item_count=0,
        identity=original.identity,
        negative=role is Role.CANCEL,
    )
    return AdjustmentAction(role, conversion, original.key, replaces)
