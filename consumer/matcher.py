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
* Fan-out cap, first of all: an event with more than `max_exposures` exposures (those of providers
  this reader does not know included) raises TooManyExposures; the service dead-letters it whole.
* Exposures of a provider this reader does not know (the Avro enum's default UNKNOWN: a newer
  writer's symbol) are each rejected as UNKNOWN_PROVIDER, with no exposure attached.
* Checks per exposure, first failure reported: project configured, consent, after purchase, outside
  window, channel, experiment allow/deny, currency, min revenue, identity.
* Consent: a provider the event says the buyer declined is never sent to (NO_CONSENT), whatever the
  project's setting; a project with `require_consent` also rejects when the event states nothing for
  its provider. Only an explicit grant passes such a project.
* Attribution models, per project (docs/operations.md, "Attribution models"): the credit group is the
  project, or for Convert the project's experiment (a Convert conversion names its experiment-variation);
  an identity is (identity kind, visitor id), for Convert also the variation. `all` credits every
  identity; `last_touch` the one with the latest matched exposure, `first_touch` the one with the
  earliest; a tie goes to the smallest identity in code-point order. The other identities' exposures
  are rejected as NOT_CREDITED. `split` divides the revenue among a group's credited identities in
  exact cents: q, r = divmod(cents, n) (floored, so negative revenue works too); every identity gets q
  cents and the first r, in code-point order of (identity kind, visitor id, variation id), one more.
  The shares sum to the revenue exactly. Kameleoon's goals are each a group of their own: every goal
  carries the identity's whole share. min_revenue compares the whole revenue, not a share.
* Currency: a project without `currency` gets the purchase revenue as is. Otherwise a purchase in the
  project currency is sent as is; another currency is converted with the rate FROM/TO, or, when only
  TO/FROM is configured, divided by that rate (the direct pair wins when both are configured), then
  quantized to 2 decimals ROUND_HALF_UP. Without a rate the project's exposures are rejected with
  CURRENCY: nothing is ever sent in the wrong currency. When the project sends no revenue and sets no
  min_revenue, no conversion is needed and a missing rate does not reject.
* min_revenue: inclusive (revenue equal to the minimum passes), compared with the revenue in the project
  currency as it would be sent (after quantizing).
* Identity and keys are the provider's (its package's `Matching`, consumer/providers/spec.py), so this
  module names no provider. By default an empty or blank visitor id is no identity; Kameleoon with
  `use_mapping_identifier` uses the purchase's customer_id as a mapping value (Identity.MAPPING);
  Conductrics falls back to customer_id when the exposure's visitor id is empty.
* Keys hash a length-prefixed encoding of their parts (so ("ab", "c") and ("a", "bc") differ), always
  including the provider and the ORDER id, never the event id: a republished order gets the same keys.
  Kameleoon: 16 lowercase hex (the nonce); Convert and Conductrics: 32 lowercase hex.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from decimal import ROUND_HALF_UP, Context, Decimal
from operator import attrgetter
from types import MappingProxyType
from typing import Any

from consumer.config import Config, Rules
from consumer.durations import human
from consumer.model import (
    Attribution,
    Conversion,
    Credit,
    Decision,
    Exposure,
    Identity,
    Provider,
    Purchase,
    Rejection,
    RejectReason,
    RevenueShare,
    Touch,
)
from consumer.providers import registry
from consumer.providers.spec import Matching, NoIdentity

_CENT = Decimal("0.01")
# Explicit context: the result must not depend on whatever the process's global decimal context is.
_DECIMAL = Context(prec=34, rounding=ROUND_HALF_UP)


class TooManyExposures(Exception):
    """An event with more exposures than [matcher] max_exposures: dead-lettered whole, nothing of it sent."""

    reason = RejectReason.TOO_MANY_EXPOSURES

    def __init__(self, order_id: str, exposures: int, limit: int) -> None:
        super().__init__(f"order {order_id}: {exposures} exposures, more than max_exposures {limit}")
        self.exposures = exposures
        self.limit = limit


_UNSET: Any = object()
# Enum members as module constants: an enum member lookup costs ~0.1 µs on Python 3.11, and the loop in
# `match` would pay it for every exposure.
_VISITOR = Identity.VISITOR
_UNKNOWN_PROJECT = RejectReason.UNKNOWN_PROJECT
_UNKNOWN_PROVIDER_DETAIL = "an exposure of a provider this reader does not know (a newer writer's symbol): ignored"
_MAX_UNKNOWN = 256


def _ms(seconds: float) -> int:
    return round(seconds * 1000)


class _Project:
    """One configured provider project, prepared once for the per-exposure hot path.

    Its provider's rules for identities and keys come from the provider package (`Matching`), bound here
    once so that the hot path reads plain attributes and calls no look-up.
    """

    __slots__ = ("allow", "by_experiment", "channels", "deny", "emit", "identity", "own_identity", "plain",
                 "require_consent", "rules", "send_revenue", "split", "split_by_goal", "touch", "window_ms")

    def __init__(self, rules: Rules, matching: Matching) -> None:
        self.rules = rules
        self.window_ms = _ms(rules.attribution_window)
        self.channels = frozenset(rules.channels)
        self.allow = frozenset(rules.experiments_allow)
        self.deny = frozenset(rules.experiments_deny)
        # No conversion and no minimum: the purchase's revenue goes out as it is (or not at all).
        self.plain = rules.currency is None and rules.min_revenue is None
        self.send_revenue = rules.send_revenue
        self.require_consent = rules.require_consent
        # 0: every identity is credited (nothing to decide per event); 1: the latest, -1: the earliest.
        self.touch = {Attribution.ALL: 0, Attribution.LAST_TOUCH: 1, Attribution.FIRST_TOUCH: -1}[rules.attribution]
        self.split = rules.revenue_share is RevenueShare.SPLIT and rules.send_revenue
        self.own_identity = matching.own_identity  # False: a non-blank visitor id is the identity, no call
        self.identity = matching.identity
        self.emit = matching.emit
        self.by_experiment = matching.by_experiment  # its conversions name the experiment-variation
        self.split_by_goal = matching.split_by_goal

    def experiment_ok(self, experiment_id: str) -> bool:
        return (not self.allow or experiment_id in self.allow) and experiment_id not in self.deny


@dataclass(frozen=True)
class MatchSettings:
    """Everything the matcher needs from the configuration, with durations in integer milliseconds."""

    clock_skew_ms: int
    max_age_ms: int
    rates: Mapping[tuple[str, str], Decimal]  # (FROM, TO) -> rate
    projects: Mapping[tuple[Provider, str], _Project]  # every configured project, prepared for the hot path
    max_exposures: int = 100
    consent_required: bool = False  # some project has require_consent: consent is looked at for every event
    # The providers this matcher decides for (None: all). A provider pipeline (consumer/pipeline.py) sees the
    # other providers' exposures too and passes over them in silence: they are not its to count.
    providers: frozenset[Provider] | None = None
    # The rejection detail of projects seen in events but not configured, written once each.
    unknown_details: dict[tuple[Provider, str], str] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_config(cls, cfg: Config) -> MatchSettings:
        projects: dict[tuple[Provider, str], _Project] = {}
        for slug, section in cfg.providers.items():
            spec = registry.spec_of(slug)
            for name, p in section.projects.items():
                projects[(spec.provider, name)] = _Project(p.rules, spec.matching(spec.provider, name, p))
        return cls(
            clock_skew_ms=_ms(cfg.matcher.clock_skew),
            max_age_ms=_ms(cfg.matcher.max_age),
            rates=MappingProxyType(dict(cfg.matcher.rates)),
            projects=MappingProxyType(projects),
            max_exposures=cfg.matcher.max_exposures,
            consent_required=any(p.require_consent for p in projects.values()),
        )

    def only(self, providers: frozenset[Provider]) -> MatchSettings:
        """These settings restricted to `providers`' projects: the matcher of one provider's pipeline."""
        projects = {k: p for k, p in self.projects.items() if k[0] in providers}
        return replace(self, projects=MappingProxyType(projects), providers=providers,
                       consent_required=any(p.require_consent for p in projects.values()), unknown_details={})

    def currency_of(self, provider: Provider, project: str, purchase: Purchase) -> str:
        """The currency a conversion's revenue is in: the project's, or the purchase's when it sets none."""
        prepared = self.projects.get((provider, project))
        currency = prepared.rules.currency if prepared is not None else None
        return currency or purchase.currency.upper()


# --------------------------------------------------------------------------- keys


# The keys are the provider packages' own (`Matching.emit`, one definition each): a changed key would
# re-send every conversion already delivered, so they are pinned by tests in tests/test_providers.py.

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


def _identity(exposure: Exposure, purchase: Purchase, project: _Project) -> tuple[Identity, str]:
    """The provider's identity rule for this exposure; raises _Reject(NO_IDENTITY)."""
    try:
        return project.identity(exposure, purchase)
    except NoIdentity as exc:
        raise _Reject(RejectReason.NO_IDENTITY, exc.detail) from None


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


def count_one(counts: Counts, provider: Provider | None, reason: str) -> None:
    """Count one decision (a provider, or None for the event as a whole, and a reason) into `counts`."""
    key = (provider, reason)
    counts[key] = counts.get(key, 0) + 1


def match(purchase: Purchase, settings: MatchSettings, now_ms: int, counts: Counts | None = None) -> Decision:
    """Decide which conversions a purchase produces in which provider projects, and why others do not.

    With `counts` (the service's hot path) the decision is counted instead of listed: every exposure adds
    one to counts[(provider, "matched" or its rejection reason)], a rejection of the whole purchase (or an
    exposure of an unknown provider) to counts[(None, reason)], and the Decision carries the conversions
    only. Listing is for `explain`, debug logs and tests; the conversions are the same either way
    (tests/test_matcher.py checks both). Raises TooManyExposures above `max_exposures`, in both modes.
    """
    exposures = purchase.exposures
    unknown_providers = purchase.unknown_provider_exposures
    if len(exposures) + unknown_providers > settings.max_exposures:
        raise TooManyExposures(purchase.order_id, len(exposures) + unknown_providers, settings.max_exposures)
    occurred = purchase.occurred_at
    age = now_ms - occurred
    if age > settings.max_age_ms:
        if counts is not None:
            count_one(counts, None, RejectReason.TOO_OLD)
            return Decision(())
        detail = f"purchase is {human(age)} old (max_age {human(settings.max_age_ms)})"
        return _rejection(purchase, RejectReason.TOO_OLD, detail)
    listing = counts is None
    rejections: list[Rejection] = []
    if unknown_providers:
        if counts is not None:
            counts[(None, RejectReason.UNKNOWN_PROVIDER)] = (
                counts.get((None, RejectReason.UNKNOWN_PROVIDER), 0) + unknown_providers)
        else:
            rejections += [Rejection(RejectReason.UNKNOWN_PROVIDER, _UNKNOWN_PROVIDER_DETAIL)
                           for _ in range(unknown_providers)]
    if not exposures:
        if unknown_providers:
            return Decision((), (), tuple(rejections))
        if counts is not None:
            count_one(counts, None, RejectReason.NO_EXPOSURES)
            return Decision(())
        return _rejection(purchase, RejectReason.NO_EXPOSURES, "purchase carries no exposures")

    # This runs for every event: checks are inlined for the common outcome and fall back to the
    # helpers above only to name the reason of a rejection.
    projects = settings.projects
    unknown = settings.unknown_details
    mine = settings.providers
    skew = settings.clock_skew_ms
    channel = purchase.channel
    consent = purchase.consent
    gated = settings.consent_required or bool(consent)  # false for most events: no consent look-up at all
    multi = len(exposures) > 1  # a single exposure has no rival identity: no attribution decision
    revenues: dict[tuple[Provider, str], Decimal | _Reject | None] = {}  # per project, computed once
    matched: list[Exposure] = []
    units: dict[str, Conversion] = {}  # collapsing: a key names one provider delivery unit
    # Exposures of last_touch/first_touch projects wait here until every exposure is seen; the credited
    # ones then go through the loop once more (`resolving`), the others are NOT_CREDITED.
    deferred: list[tuple[Exposure, _Project, Identity, str]] | None = None
    resolving = False
    # Whether some revenue-splitting project may have matched twice (nothing to divide otherwise): the
    # first such project, whether another one was seen, and the verdict (conservative: two others).
    split_first: _Project | None = None
    split_other = split_twice = False

    # Listed, they are sorted first, so that matched and rejections never depend on input order. Which of
    # several exposures builds a unit does not matter: they build the same conversion, and conversions
    # are sorted at the end.
    todo = sorted(exposures, key=_exposure_order) if listing and multi else exposures
    while True:
        for exposure in todo:
            provider = exposure.provider
            pk = (provider, exposure.project)
            project = projects.get(pk)
            if project is None:  # the common case for a buyer seen by several tools: no exception for it
                if mine is not None and provider not in mine:
                    continue  # another provider pipeline's exposure
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
            if gated:
                granted = consent.get(provider)
                if granted is not True and (granted is False or project.require_consent):
                    _note(rejections, counts, _no_consent(exposure, granted))
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
            if visitor and not project.own_identity and not visitor.isspace():
                identity = _VISITOR
            else:
                try:
                    identity, visitor = _identity(exposure, purchase, project)
                except _Reject as exc:
                    _note(rejections, counts, Rejection(exc.reason, exc.detail, exposure))
                    continue
            if project.touch and multi and not resolving:
                if deferred is None:
                    deferred = []
                deferred.append((exposure, project, identity, visitor))
                continue
            if counts is not None:
                hit = (provider, "matched")
                counts[hit] = counts.get(hit, 0) + 1
            else:
                matched.append(exposure)
            if project.split and not split_twice:
                if split_first is None:
                    split_first = project
                elif split_first is project or split_other:
                    split_twice = True
                else:
                    split_other = True
            project.emit(units, exposure, purchase, identity, visitor, revenue)
        if deferred is None or resolving:
            break
        todo = _credited(deferred, rejections, counts)
        resolving = True

    if split_twice and len(units) > 1:
        _split(units, projects)
    conversions = tuple(sorted(units.values(), key=_conversion_order)) if len(units) > 1 else tuple(units.values())
    if not listing:
        return Decision(conversions)
    if deferred is not None:  # the credited came back in a second pass, the others were noted meanwhile
        matched.sort(key=_exposure_order)
        rejections.sort(key=_rejection_order)
    return Decision(conversions, tuple(matched), tuple(rejections),
                    _credits(purchase, settings, matched, rejections, conversions))


def _no_consent(exposure: Exposure, granted: bool | None) -> Rejection:
    slug = exposure.provider.slug
    if granted is False:
        return Rejection(RejectReason.NO_CONSENT, f"the buyer declined consent for {slug}", exposure)
    return Rejection(RejectReason.NO_CONSENT,
                     f"the event states no consent for {slug} and the project has require_consent", exposure)


def _rejection_order(r: Rejection) -> tuple[bool, tuple[str, str, str, str, str, int]]:
    e = r.exposure
    return (e is not None, _exposure_order(e) if e is not None else ("", "", "", "", "", 0))


# --------------------------------------------------------------------------- attribution models

_Member = tuple[Identity, str, str]  # (identity kind, visitor id, variation id for Convert else "")
_Group = tuple[Provider, str, str | None]  # (provider, project, experiment id for Convert else None)


def _group_of(exposure: Exposure, project: _Project) -> _Group:
    return exposure.provider, exposure.project, exposure.experiment_id if project.by_experiment else None


def _member_of(exposure: Exposure, project: _Project, identity: Identity, visitor: str) -> _Member:
    return identity, visitor, exposure.variation_id if project.by_experiment else ""


def _member_text(m: _Member) -> str:
    return f"{m[0].value} {m[1]}" + (f" in variation {m[2]}" if m[2] else "")


def _credited(deferred: list[tuple[Exposure, _Project, Identity, str]], rejections: list[Rejection],
              counts: Counts | None) -> list[Exposure]:
    """last_touch / first_touch: the exposures of each group's credited identity; the others are NOT_CREDITED."""
    if len(deferred) == 1:  # the common case: one exposure of such a project among others'
        return [deferred[0][0]]
    groups: dict[_Group, dict[_Member, list[Exposure]]] = {}
    touch: dict[_Group, int] = {}
    for exposure, project, identity, visitor in deferred:
        g = _group_of(exposure, project)
        groups.setdefault(g, {}).setdefault(_member_of(exposure, project, identity, visitor), []).append(exposure)
        touch[g] = project.touch
    credited: list[Exposure] = []
    for g, members in groups.items():
        if len(members) == 1:
            for es in members.values():
                credited += es
            continue
        last = touch[g] > 0
        # The latest (or earliest) matched exposure of each identity decides; a tie, the smaller identity.
        when = {m: (max if last else min)(e.exposed_at for e in es) for m, es in members.items()}
        winner = min(members, key=lambda m: (-when[m] if last else when[m], m))
        model = "last_touch" if last else "first_touch"
        for m, es in members.items():
            if m == winner:
                credited += es
                continue
            if counts is not None:  # counted, not listed: no detail to write
                key = (g[0], RejectReason.NOT_CREDITED)
                counts[key] = counts.get(key, 0) + len(es)
                continue
            gap = abs(when[winner] - when[m])
            relation = (f"exposed at the same time as {_member_text(m)} and first in code-point order" if gap == 0
                        else f"exposed {human(gap)} {'later' if last else 'earlier'} than {_member_text(m)}")
            where = "" if g[2] is None else f" in experiment {g[2]}"
            detail = f"{model} credits {_member_text(winner)}{where}, {relation}"
            rejections += [Rejection(RejectReason.NOT_CREDITED, detail, e) for e in es]
    return credited


# The remainder cents' order: (identity kind, visitor id, variation id). Within one group the variation is
# always a string (Convert) or always None (the others), so the tuples compare.
_split_order = attrgetter("identity", "visitor_id", "variation_id")


def _split(units: dict[str, Conversion], projects: Mapping[tuple[Provider, str], _Project]) -> None:
    """Divide the revenue among each splitting group's credited identities, in exact cents (see the module doc)."""
    groups: dict[tuple[Provider, str, str | None], list[Conversion]] = {}
    for c in units.values():
        # One group per goal where each conversion carries one goal (Kameleoon); else per experiment (Convert:
        # its conversions name one; the others' carry none, so the group is the project).
        g = (c.provider, c.project, c.goals[0] if projects[(c.provider, c.project)].split_by_goal else c.experiment_id)
        members = groups.get(g)
        if members is None:
            groups[g] = [c]
        else:
            members.append(c)
    for g, members in groups.items():
        n = len(members)
        if n == 1 or not projects[(g[0], g[1])].split:
            continue
        total = members[0].revenue
        if total is None:
            continue
        q, r = divmod(_cents(total), n)
        share = Decimal(q).scaleb(-2, _DECIMAL)
        if r:  # the first r in code-point order get a cent more; without a remainder the order does not matter
            members.sort(key=_split_order)
            more = Decimal(q + 1).scaleb(-2, _DECIMAL)
            for i, c in enumerate(members):
                c.revenue = more if i < r else share
        else:
            for c in members:
                c.revenue = share


def _cents(total: Decimal) -> int:
    scaled = total.scaleb(2, _DECIMAL)
    cents = int(scaled)
    if cents != scaled:  # more than two decimals (never from the contract): whole cents first
        cents = int(total.quantize(_CENT, rounding=ROUND_HALF_UP, context=_DECIMAL).scaleb(2, _DECIMAL))
    return cents


def shares(total: Decimal, n: int) -> list[Decimal]:
    """`total` in n shares of whole cents summing to it exactly, as `split` gives them: the first r get a cent more."""
    q, r = divmod(_cents(total), n)
    return [Decimal(q + 1 if i < r else q).scaleb(-2, _DECIMAL) for i in range(n)]


def _credits(purchase: Purchase, settings: MatchSettings, matched: list[Exposure], rejections: list[Rejection],
             conversions: tuple[Conversion, ...]) -> tuple[Credit, ...]:
    """Listing mode: the attribution model's choice in each group that has a conversion, for `explain`."""
    revenue_of: dict[tuple[Provider, str, Identity, str, str | None, str | None], Decimal | None] = {
        (c.provider, c.project, c.identity, c.visitor_id, c.experiment_id, c.variation_id): c.revenue
        for c in conversions
    }
    groups: dict[_Group, dict[_Member, list[Exposure]]] = {}
    credited: set[tuple[_Group, _Member]] = set()
    candidates = [(e, True) for e in matched] + [
        (r.exposure, False) for r in rejections if r.reason is RejectReason.NOT_CREDITED and r.exposure is not None]
    for e, ok in candidates:
        project = settings.projects[(e.provider, e.project)]
        identity, visitor = _identity(e, purchase, project)
        g, m = _group_of(e, project), _member_of(e, project, identity, visitor)
        groups.setdefault(g, {}).setdefault(m, []).append(e)
        if ok:
            credited.add((g, m))
    out: list[Credit] = []
    for g in sorted(groups, key=lambda g: (g[0].value, g[1], g[2] or "")):
        members = groups[g]
        rules = settings.projects[(g[0], g[1])].rules
        touches = []
        for m in sorted(members, key=lambda m: ((g, m) not in credited, m)):
            es = members[m]
            ok = (g, m) in credited
            key = (g[0], g[1], m[0], m[1], g[2], m[2] or None)
            touches.append(Touch(m[0], m[1], m[2] or None, min(e.exposed_at for e in es),
                                 max(e.exposed_at for e in es), len(es), ok, revenue_of.get(key) if ok else None))
        out.append(Credit(g[0], g[1], g[2], rules.attribution, rules.revenue_share, tuple(touches),
                          _credit_detail(rules.attribution, rules.revenue_share, touches,
                                         settings.currency_of(g[0], g[1], purchase))))
    return tuple(out)


def _credit_detail(attribution: Attribution, share: RevenueShare, touches: list[Touch], currency: str) -> str:
    won = [t for t in touches if t.credited]
    n = len(touches)
    if n == 1:
        return f"one identity, credited ({attribution.value}, {share.value}): nothing to choose"
    if attribution is Attribution.ALL:
        if won[0].revenue is None:
            return f"all: each of the {n} identities is credited (no revenue is sent)"
        if share is RevenueShare.FULL:
            return f"all: each of the {n} identities is credited with the whole revenue"
        parts = " + ".join(str(t.revenue) for t in won)
        return (f"all, split: {n} identities share the revenue, {parts} {currency}"
                " (the remainder cents go one each in code-point order of identity)")
    t = won[0]
    if attribution is Attribution.LAST_TOUCH:
        return f"last_touch: {t.identity.value} {t.visitor_id} was exposed last; {n - 1} other identities not credited"
    return f"first_touch: {t.identity.value} {t.visitor_id} was exposed first; {n - 1} other identities not credited"


def _note(rejections: list[Rejection], counts: Counts | None, rejection: Rejection) -> None:
    """List a rejection, or count it (see `match`)."""
    if counts is None:
        rejections.append(rejection)
    else:
        count_one(counts, rejection.exposure.provider if rejection.exposure is not None else None, rejection.reason)


def count(decision: Decision, counts: Counts) -> None:
    """Count a listed decision into `counts` as the counting mode of `match` does."""
    for exposure in decision.matched:
        count_one(counts, exposure.provider, "matched")
    for rejection in decision.rejections:
        _note([], counts, rejection)
