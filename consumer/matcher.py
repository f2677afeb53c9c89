"""Attribution: which exposures of a purchase become which conversions, and why the others do not.

`match` is a pure function of (purchase, settings, now_ms): no clock, no I/O, no randomness. The same
input gives an identical `Decision`, including the order of its tuples, whatever the order of the
purchase's exposures.

Decisions worth knowing (tests pin each one to the millisecond):

* Time is integer epoch milliseconds. Config durations (float seconds) are rounded to milliseconds once,
  in `MatchSettings.from_config`.
* Window, inclusive at both edges: an exposure counts when
  ``occurred_at - window <= exposed_at <= occurred_at + clock_skew``.
  An exposure up to `clock_skew` after the purchase is accepted (the order system's and the tag's clocks
  disagree); one later than that is AFTER_PURCHASE, one earlier than the window is OUTSIDE_WINDOW.
* Age, inclusive: a purchase exactly `max_age` old is still matched; one millisecond older is TOO_OLD.
* Checks per exposure, first failure reported: project configured, after purchase, outside window,
  channel, experiment allow/deny, currency, min revenue, identity.
* Currency: a project without `currency` gets the purchase revenue as is. Otherwise a purchase in the
  project currency is sent as is; another currency is converted with the rate FROM/TO, or, when only
  TO/FROM is configured, divided by that rate (the direct pair wins when both are configured), then
  quantized to 2 decimals ROUND_HALF_UP. Without a rate the project's exposures are rejected with
  CURRENCY: nothing is ever sent in the wrong currency. When the project sends no revenue and sets no
  min_revenue, no conversion is needed and a missing rate does not reject.
* min_revenue: inclusive (revenue equal to the minimum passes), compared with the revenue in the project
  currency as it would be sent (after quantizing).
* Identity: an empty or blank visitor id is no identity. Kameleoon with `use_mapping_identifier` uses the
  purchase's customer_id as a mapping value (Identity.MAPPING); Conductrics falls back to customer_id
  when the exposure's visitor id is empty.
* Keys hash a length-prefixed encoding of their parts (so ("ab", "c") and ("a", "bc") differ), always
  including the provider and the ORDER id, never the event id: a republished order gets the same keys.
  Kameleoon: 16 lowercase hex (the nonce); Convert and Conductrics: 32 lowercase hex.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import ROUND_HALF_UP, Context, Decimal
from types import MappingProxyType
from typing import Any

from consumer.config import Config, Rules
from consumer.durations import human
from consumer.model import (
    Conversion,
    Decision,
    Exposure,
    Identity,
    Provider,
    Purchase,
    Rejection,
    RejectReason,
)
from consumer.providers.base import chunk
from consumer.providers.conductrics import conductrics_key
from consumer.providers.convert import transaction_key
from consumer.providers.kameleoon import nonce_of, nonce_prefix

_CENT = Decimal("0.01")
# Explicit context: the result must not depend on whatever the process's global decimal context is.
_DECIMAL = Context(prec=34, rounding=ROUND_HALF_UP)


_UNSET: Any = object()
# Enum members as module constants: `Provider.KAMELEOON` is a metaclass lookup (~0.1 µs on Python 3.11),
# and the loop in `match` would pay it for every exposure.
_KAMELEOON, _CONVERT = Provider.KAMELEOON, Provider.CONVERT
_VISITOR = Identity.VISITOR
_UNKNOWN_PROJECT = RejectReason.UNKNOWN_PROJECT
_MAX_UNKNOWN = 256
_IDENTITY_CHUNKS = {i: chunk(i.value) for i in Identity}


def _ms(seconds: float) -> int:
    return round(seconds * 1000)


class _Project:
    """One configured provider project, prepared once for the per-exposure hot path."""

    __slots__ = ("allow", "channels", "deny", "goal_chunks", "mapping", "nonce_prefix", "plain", "rules",
                 "send_revenue", "transaction_goals", "window_ms")

    def __init__(self, provider: Provider, project: str, rules: Rules, mapping: bool,
                 transaction_goals: tuple[str, ...]) -> None:
        self.rules = rules
        self.window_ms = _ms(rules.attribution_window)
        self.channels = frozenset(rules.channels)
        self.allow = frozenset(rules.experiments_allow)
        self.deny = frozenset(rules.experiments_deny)
        # No conversion and no minimum: the purchase's revenue goes out as it is (or not at all).
        self.plain = rules.currency is None and rules.min_revenue is None
        self.send_revenue = rules.send_revenue
        self.mapping = mapping
        self.transaction_goals = transaction_goals
        self.nonce_prefix = nonce_prefix(project) if provider is Provider.KAMELEOON else b""
        self.goal_chunks = tuple((g, chunk(g)) for g in rules.goals)

    def experiment_ok(self, experiment_id: str) -> bool:
        return (not self.allow or experiment_id in self.allow) and experiment_id not in self.deny


@dataclass(frozen=True)
class MatchSettings:
    """Everything the matcher needs from the configuration, with durations in integer milliseconds."""

    clock_skew_ms: int
    max_age_ms: int
    rates: Mapping[tuple[str, str], Decimal]  # (FROM, TO) -> rate
    projects: Mapping[tuple[Provider, str], _Project]  # every configured project, prepared for the hot path
    # The rejection detail of projects seen in events but not configured, written once each.
    unknown_details: dict[tuple[Provider, str], str] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_config(cls, cfg: Config) -> MatchSettings:
        rules = cfg.rules()
        mapping = frozenset(k for k, p in cfg.kameleoon.projects.items() if p.use_mapping_identifier)
        transaction_goals = {k: p.transaction_goals for k, p in cfg.convert.projects.items()}
        projects = {
            (provider, project): _Project(
                provider, project, r, provider is Provider.KAMELEOON and project in mapping,
                transaction_goals.get(project, ()) if provider is Provider.CONVERT else (),
            )
            for (provider, project), r in rules.items()
        }
        return cls(
            clock_skew_ms=_ms(cfg.matcher.clock_skew),
            max_age_ms=_ms(cfg.matcher.max_age),
            rates=MappingProxyType(dict(cfg.matcher.rates)),
            projects=MappingProxyType(projects),
        )

    def currency_of(self, provider: Provider, project: str, purchase: Purchase) -> str:
        """The currency a conversion's revenue is in: the project's, or the purchase's when it sets none."""
        prepared = self.projects.get((provider, project))
        currency = prepared.rules.currency if prepared is not None else None
        return currency or purchase.currency.upper()


# --------------------------------------------------------------------------- keys


# The keys are the provider modules' own (one definition each): a changed key would re-send
# every conversion already delivered, so they are pinned by tests in tests/test_providers.py.

# --------------------------------------------------------------------------- checks


class _Reject(Exception):
    def __init__(self, reason: RejectReason, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def _project_revenue(purchase: Purchase, rules: Rules, rates: Mapping[tuple[str, str], Decimal]) -> Decimal | None:
    """The revenue in the project currency (None when it is not needed); raises _Reject(CURRENCY)."""
    if not rules.send_revenue and rules.min_revenue is None:
        return None
    source = purchase.currency.upper()
    target = rules.currency
    if target is None or source == target:
        return purchase.revenue
    if (source, target) in rates:
        converted = _DECIMAL.multiply(purchase.revenue, rates[(source, target)])
    elif (target, source) in rates:
        converted = _DECIMAL.divide(purchase.revenue, rates[(target, source)])
    else:
        raise _Reject(RejectReason.CURRENCY, f"no rate {source}/{target} (or {target}/{source}) configured")
    return converted.quantize(_CENT, rounding=ROUND_HALF_UP, context=_DECIMAL)


def _check_channel(purchase: Purchase, rules: Rules) -> None:
    if purchase.channel not in rules.channels:
        allowed = ",".join(c.value for c in rules.channels)
        raise _Reject(RejectReason.FILTERED_CHANNEL, f"channel {purchase.channel.value} not in [{allowed}]")


def _check_revenue(purchase: Purchase, rules: Rules, rates: Mapping[tuple[str, str], Decimal]) -> Decimal | None:
    """Currency and min_revenue, which depend on the purchase and project only; the revenue to send or None."""
    revenue = _project_revenue(purchase, rules, rates)
    if rules.min_revenue is not None and revenue is not None and revenue < rules.min_revenue:
        currency = rules.currency or purchase.currency.upper()
        raise _Reject(
            RejectReason.BELOW_MIN_REVENUE, f"revenue {revenue} {currency} below min_revenue {rules.min_revenue}"
        )
    return revenue if rules.send_revenue else None


def _check_experiment(exposure: Exposure, rules: Rules) -> None:
    if rules.experiments_allow and exposure.experiment_id not in rules.experiments_allow:
        raise _Reject(RejectReason.FILTERED_EXPERIMENT, f"experiment {exposure.experiment_id} not in experiments_allow")
    if exposure.experiment_id in rules.experiments_deny:
        raise _Reject(RejectReason.FILTERED_EXPERIMENT, f"experiment {exposure.experiment_id} in experiments_deny")


def _check_time(exposure: Exposure, purchase: Purchase, window_ms: int, skew_ms: int) -> None:
    ahead = exposure.exposed_at - purchase.occurred_at
    if ahead > skew_ms:
        raise _Reject(
            RejectReason.AFTER_PURCHASE,
            f"exposed {human(ahead)} after the purchase (clock skew tolerance {human(skew_ms)})",
        )
    if -ahead > window_ms:
        raise _Reject(
            RejectReason.OUTSIDE_WINDOW,
            f"exposed {human(-ahead)} before the purchase (attribution window {human(window_ms)})",
        )


def _identity(exposure: Exposure, purchase: Purchase, mapping: bool) -> tuple[Identity, str]:
    customer = purchase.customer_id if purchase.customer_id and purchase.customer_id.strip() else None
    if exposure.provider is Provider.KAMELEOON and mapping:
        if customer is None:
            raise _Reject(
                RejectReason.NO_IDENTITY, "project uses the mapping identifier; the purchase has no customer_id"
            )
        return Identity.MAPPING, customer
    if exposure.visitor_id.strip():
        return Identity.VISITOR, exposure.visitor_id
    if exposure.provider is Provider.CONDUCTRICS and customer is not None:
        return Identity.VISITOR, customer
    if exposure.provider is Provider.CONDUCTRICS:
        raise _Reject(RejectReason.NO_IDENTITY, "empty visitor id and no customer_id to fall back to")
    raise _Reject(RejectReason.NO_IDENTITY, "empty visitor id")


# --------------------------------------------------------------------------- match


def _exposure_order(e: Exposure) -> tuple[str, str, str, str, str, int]:
    return (e.provider, e.project, e.experiment_id, e.variation_id, e.visitor_id, e.exposed_at)


def _conversion_order(c: Conversion) -> tuple[str, ...]:
    return (
        c.provider,
        c.project,
        c.identity,
        c.visitor_id,
        c.experiment_id or "",
        c.variation_id or "",
        *c.goals,
        "\x00",
        c.key,
    )


def _rejection(purchase: Purchase, reason: RejectReason, detail: str) -> Decision:
    return Decision(conversions=(), rejections=(Rejection(reason, f"order {purchase.order_id}: {detail}"),))


def _rejected(exposure: Exposure, purchase: Purchase, project: _Project, skew_ms: int) -> Rejection:
    """The first check an exposure fails, in the documented order (the fast path only knew that one failed)."""
    try:
        _check_time(exposure, purchase, project.window_ms, skew_ms)
        _check_channel(purchase, project.rules)
        _check_experiment(exposure, project.rules)
    except _Reject as exc:
        return Rejection(exc.reason, exc.detail, exposure)
    raise AssertionError("an exposure rejected by the fast path passed every check")


Counts = dict[tuple[Provider | None, str], int]


def _count(counts: Counts, provider: Provider | None, reason: str) -> None:
    key = (provider, reason)
    counts[key] = counts.get(key, 0) + 1


def match(purchase: Purchase, settings: MatchSettings, now_ms: int, counts: Counts | None = None) -> Decision:
    """Decide which conversions a purchase produces in which provider projects, and why others do not.

    With `counts` (the service's hot path) the decision is counted instead of listed: every exposure adds
    one to counts[(provider, "matched" or its rejection reason)], a rejection of the whole purchase to
    counts[(None, reason)], and the Decision carries the conversions only. Listing is for `explain`, debug
    logs and tests; the conversions are the same either way (tests/test_matcher.py checks both).
    """
    occurred = purchase.occurred_at
    age = now_ms - occurred
    if age > settings.max_age_ms:
        if counts is not None:
            _count(counts, None, RejectReason.TOO_OLD)
            return Decision(())
        detail = f"purchase is {human(age)} old (max_age {human(settings.max_age_ms)})"
        return _rejection(purchase, RejectReason.TOO_OLD, detail)
    exposures = purchase.exposures
    if not exposures:
        if counts is not None:
            _count(counts, None, RejectReason.NO_EXPOSURES)
            return Decision(())
        return _rejection(purchase, RejectReason.NO_EXPOSURES, "purchase carries no exposures")

    # This runs for every event: checks are inlined for the common outcome and fall back to the
    # helpers above only to name the reason of a rejection.
    listing = counts is None
    projects = settings.projects
    unknown = settings.unknown_details
    skew = settings.clock_skew_ms
    channel = purchase.channel
    revenues: dict[tuple[Provider, str], Decimal | _Reject | None] = {}  # per project, computed once
    matched: list[Exposure] = []
    rejections: list[Rejection] = []
    units: dict[str, Conversion] = {}  # collapsing: a key names one provider delivery unit
    order_chunk = b""

    # Listed, they are sorted first, so that matched and rejections never depend on input order. Which of
    # several exposures builds a unit does not matter: they build the same conversion, and conversions
    # are sorted at the end.
    for exposure in sorted(exposures, key=_exposure_order) if listing and len(exposures) > 1 else exposures:
        provider = exposure.provider
        pk = (provider, exposure.project)
        project = projects.get(pk)
        if project is None:  # the common case for a buyer seen by several tools: no exception for it
            if counts is not None:
                key = (provider, _UNKNOWN_PROJECT)
                counts[key] = counts.get(key, 0) + 1
                continue
            said = unknown.get(pk)
            if said is None:
                said = f"{provider.slug} project {exposure.project} is not configured"
                if len(unknown) < _MAX_UNKNOWN:  # bounded: project names come from the events
                    unknown[pk] = said
            rejections.append(Rejection(_UNKNOWN_PROJECT, said, exposure))
            continue
        ahead = exposure.exposed_at - occurred
        if (ahead > skew or -ahead > project.window_ms or channel not in project.channels
                or ((project.allow or project.deny) and not project.experiment_ok(exposure.experiment_id))):
            _note(rejections, counts, _rejected(exposure, purchase, project, skew))
            continue
        if project.plain:
            revenue = purchase.revenue if project.send_revenue else None
        else:
            known = revenues.get(pk, _UNSET)
            if known is _UNSET:
                try:
                    known = revenues[pk] = _check_revenue(purchase, project.rules, settings.rates)
                except _Reject as exc:
                    known = revenues[pk] = exc
            if isinstance(known, _Reject):
                _note(rejections, counts, Rejection(known.reason, known.detail, exposure))
                continue
            revenue = known
        visitor = exposure.visitor_id
        if visitor and not project.mapping and not visitor.isspace():
            identity = _VISITOR
        else:
            try:
                identity, visitor = _identity(exposure, purchase, project.mapping)
            except _Reject as exc:
                _note(rejections, counts, Rejection(exc.reason, exc.detail, exposure))
                continue
        if counts is not None:
            hit = (provider, "matched")
            counts[hit] = counts.get(hit, 0) + 1
        else:
            matched.append(exposure)
        order = purchase.order_id
        if provider is _KAMELEOON:
            if not order_chunk:
                order_chunk = chunk(order)
            ident_chunk = _IDENTITY_CHUNKS[identity]
            visitor_chunk = chunk(visitor)
            for goal, goal_chunk in project.goal_chunks:
                nonce = nonce_of(project.nonce_prefix, order_chunk, goal_chunk, ident_chunk, visitor_chunk)
                if nonce not in units:
                    units[nonce] = Conversion(provider, exposure.project, visitor, (goal,), revenue, nonce,
                                              purchase.event_id, order, occurred, purchase.item_count, identity)
        elif provider is _CONVERT:
            exp, var = exposure.experiment_id, exposure.variation_id
            tkey = transaction_key(exposure.project, visitor, exp, var, order)
            if tkey not in units:
                units[tkey] = Conversion(provider, exposure.project, visitor, project.rules.goals, revenue, tkey,
                                         purchase.event_id, order, occurred, purchase.item_count, identity, exp, var,
                                         project.transaction_goals)
        else:
            ckey = conductrics_key(exposure.project, visitor, order)
            if ckey not in units:
                units[ckey] = Conversion(provider, exposure.project, visitor, project.rules.goals, revenue, ckey,
                                         purchase.event_id, order, occurred, purchase.item_count, identity)

    return Decision(
        tuple(sorted(units.values(), key=_conversion_order)) if len(units) > 1 else tuple(units.values()),
        tuple(matched),
        tuple(rejections),
    )


def _note(rejections: list[Rejection], counts: Counts | None, rejection: Rejection) -> None:
    """List a rejection, or count it (see `match`)."""
    if counts is None:
        rejections.append(rejection)
    else:
        _count(counts, rejection.exposure.provider if rejection.exposure is not None else None, rejection.reason)


def count(decision: Decision, counts: Counts) -> None:
    """Count a listed decision into `counts` as the counting mode of `match` does."""
    for exposure in decision.matched:
        _count(counts, exposure.provider, "matched")
    for rejection in decision.rejections:
        _note([], counts, rejection)
