"""Domain types shared by every stage: purchases and order adjustments in, conversions and decisions out."""

from __future__ import annotations

import enum
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from types import MappingProxyType
from typing import Any


class _ProviderType(type):
    """Looks registered providers up by symbol (`Provider.KAMELEOON`); lists the built-in ones (`list(Provider)`).

    A convenience for tests and interactive use; the service itself never names a provider. The first
    look-up loads the registry (consumer/providers/registry.py), which registers the built-in providers.
    """

    def __getattr__(cls, name: str) -> Provider:
        if name.startswith("_"):
            raise AttributeError(name)
        registered = _registered()
        try:
            return registered[name]
        except KeyError:
            raise AttributeError(f"no registered provider {name!r}") from None

    def __iter__(cls) -> Iterator[Provider]:
        # The built-in providers, as the enum this replaces listed them (and the published contract does):
        # one registered from some config in the same process does not change what this yields.
        from consumer.providers import registry

        return iter(tuple(spec.provider for spec in registry.specs()))

    def __len__(cls) -> int:
        return len(tuple(iter(cls)))


class Provider(str, metaclass=_ProviderType):
    """A registered provider: its Avro symbol (the string itself) and its slug, made once per provider.

    The pipeline treats it opaquely (a dict key, a label via `.slug`) and compares by identity; what a
    provider is lives in its package (consumer/providers/<slug>/), registered by `Provider.register`.
    `Provider("KAMELEOON")` looks a registered one up (ValueError if there is none), as an enum would.
    """

    slug: str  # the name used in config sections, metric labels and DLQ headers: a plain attribute (hot path)
    value: str  # the Avro symbol, as an enum member's value
    name: str

    def __new__(cls, symbol: str) -> Provider:
        found = _BY_SYMBOL.get(symbol)
        if found is None:
            raise ValueError(f"{symbol!r} is not a registered provider")
        return found

    @classmethod
    def register(cls, symbol: str) -> Provider:
        """The provider with this Avro symbol, made on first registration (the same object every time after)."""
        found = _BY_SYMBOL.get(symbol)
        if found is not None:
            return found
        if not _SYMBOL.fullmatch(symbol) or symbol == UNKNOWN_SYMBOL:
            raise ValueError(f"a provider symbol is an Avro enum symbol in capitals, not {UNKNOWN_SYMBOL}: {symbol!r}")
        made = str.__new__(cls, symbol)
        made.slug = symbol.lower()
        made.value = made.name = symbol
        _BY_SYMBOL[symbol] = made
        return made

    def __repr__(self) -> str:
        return f"<Provider {self.value}>"

    def __reduce__(self) -> tuple[Any, ...]:
        return (Provider, (self.value,))

    def __copy__(self) -> Provider:
        return self

    def __deepcopy__(self, memo: object) -> Provider:
        return self


# The Avro enum default: what a reader resolves a newer writer's provider symbol to; never registered.
UNKNOWN_SYMBOL = "UNKNOWN"
_SYMBOL = re.compile(r"[A-Z][A-Z0-9_]*")
_BY_SYMBOL: dict[str, Provider] = {}  # registration order: the reader schema's enum order


def registered_providers() -> Mapping[str, Provider]:
    """Every provider registered so far, by Avro symbol, in registration order (live: no copy)."""
    return _BY_SYMBOL


def _registered() -> Mapping[str, Provider]:
    import consumer.providers.registry  # noqa: F401  (registers the built-in providers on import)

    return _BY_SYMBOL


class Channel(enum.StrEnum):
    WEB = "WEB"
    STORE = "STORE"
    PHONE = "PHONE"
    APP = "APP"
    OTHER = "OTHER"


@dataclass(frozen=True, slots=True)
class Exposure:
    """One experiment exposure the order system stored with the buyer's profile."""

    provider: Provider
    project: str
    experiment_id: str
    variation_id: str
    visitor_id: str
    exposed_at: int  # epoch milliseconds


# What an event says about consent when it says nothing: one shared, read-only mapping, so that
# decoding an event without consent entries allocates nothing for them.
NO_CONSENT_STATED: Mapping[Provider, bool] = MappingProxyType({})


def _no_consent() -> Mapping[Provider, bool]:
    return NO_CONSENT_STATED


@dataclass(frozen=True, slots=True)
class Purchase:
    """A decoded "purchase completed" event (schemas/purchase_completed.avsc)."""

    event_id: str
    order_id: str
    occurred_at: int  # epoch milliseconds
    channel: Channel
    currency: str
    revenue: Decimal
    item_count: int
    customer_id: str | None = None
    exposures: tuple[Exposure, ...] = ()
    attributes: Mapping[str, str] = field(default_factory=dict)
    # Per provider, whether the buyer consented (the event's `consent` entries; a denial wins over a
    # grant for the same provider). A provider the event does not name is absent: consent not stated.
    consent: Mapping[Provider, bool] = field(default_factory=_no_consent)
    # Exposures naming a provider this reader does not know (a newer writer's symbol, read as the
    # enum default UNKNOWN): not in `exposures`, counted by the matcher as UNKNOWN_PROVIDER.
    unknown_provider_exposures: int = 0


class AdjustmentKind(enum.StrEnum):
    """What an order adjustment takes back (schemas/order_adjusted.avsc)."""

    FULL_REFUND = "FULL_REFUND"
    PARTIAL_REFUND = "PARTIAL_REFUND"
    CANCELLATION = "CANCELLATION"
    # The reader's stand-in for a newer writer's symbol: decoded, never acted on (dead-lettered by the planner).
    UNKNOWN = "UNKNOWN"


@dataclass(frozen=True, slots=True)
class OrderAdjusted:
    """A decoded "order adjusted" event: part or all of a paid order taken back (refund, cancellation)."""

    event_id: str
    order_id: str
    occurred_at: int  # epoch milliseconds
    kind: AdjustmentKind
    amount: Decimal  # this adjustment alone, in `currency` (FULL_REFUND/CANCELLATION: the order total, informational)
    currency: str
    items_returned: int = 0
    reason: str | None = None


class RefundPolicy(enum.StrEnum):
    """What a provider project does with an order adjustment (`refunds` per project)."""

    RETRACT = "retract"  # Kameleoon: cancel with `negative: true`, restate what a partial refund leaves
    SKIP = "skip"  # send nothing; counted (not_supported where the provider documents no retraction)


class Attribution(enum.StrEnum):
    """Which of a buyer's identities get credit when several match one provider project (or Convert experiment)."""

    ALL = "all"  # every identity that matched
    LAST_TOUCH = "last_touch"  # the identity exposed last before the purchase
    FIRST_TOUCH = "first_touch"  # the identity exposed first


class RevenueShare(enum.StrEnum):
    """How the purchase's revenue is shared among the credited identities of one project (or Convert experiment)."""

    FULL = "full"  # each credited identity gets the whole revenue
    SPLIT = "split"  # the revenue is divided among them, to the cent, summing to the whole


class Identity(enum.StrEnum):
    """How a conversion names its visitor at the provider."""

    VISITOR = "visitor"  # Kameleoon visitorCode, Convert visitor, Conductrics vid
    MAPPING = "mapping"  # Kameleoon mappingValue (cross-device customer id)


# Conversion, Rejection and Decision are made per event on the hot path and never changed after; they are
# not `frozen` because a frozen dataclass's __init__ costs about 2 µs more for Conversion's 14 fields.
@dataclass(slots=True)
class Conversion:
    """One unit of delivery to one provider project, as the matcher decided it.

    Kameleoon: one goal per conversion (one JSON event). Convert: all goals of one
    experiment-variation for one visitor (one tracking call). Conductrics: all goals
    for one visitor (one agent-API call, a command per goal).
    """

    provider: Provider
    project: str  # the config key: siteCode, "account_project", Conductrics project
    visitor_id: str
    goals: tuple[str, ...]
    revenue: Decimal | None  # in the project's currency, None when revenue is not sent
    key: str  # idempotency key: Kameleoon nonce, Convert transaction id, Conductrics key
    event_id: str
    order_id: str
    occurred_at: int
    item_count: int
    identity: Identity = Identity.VISITOR
    experiment_id: str | None = None
    variation_id: str | None = None
    transaction_goals: tuple[str, ...] = ()
    negative: bool = False  # Kameleoon: this event cancels a conversion (an order adjustment's retraction)


class RejectReason(enum.StrEnum):
    """Why an exposure (or a whole purchase) produced no conversion; a metric label."""

    NO_EXPOSURES = "no_exposures"
    UNKNOWN_PROJECT = "unknown_project"
    OUTSIDE_WINDOW = "outside_window"
    AFTER_PURCHASE = "after_purchase"
    TOO_OLD = "too_old"
    FILTERED_CHANNEL = "filtered_channel"
    FILTERED_EXPERIMENT = "filtered_experiment"
    BELOW_MIN_REVENUE = "below_min_revenue"
    CURRENCY = "currency"
    NO_IDENTITY = "no_identity"
    DUPLICATE = "duplicate"
    NO_CONSENT = "no_consent"  # the buyer declined this provider, or the project requires consent not stated
    NOT_CREDITED = "not_credited"  # matched, but the project's attribution model credited another identity
    UNKNOWN_PROVIDER = "unknown_provider"  # an exposure of a provider this reader does not know
    TOO_MANY_EXPOSURES = "too_many_exposures"  # the whole event: more than [matcher] max_exposures (dead-lettered)


@dataclass(slots=True)
class Rejection:
    reason: RejectReason
    detail: str
    exposure: Exposure | None = None


@dataclass(slots=True)
class Touch:
    """One identity of the buyer in a credit decision: when it was exposed, and what it got."""

    identity: Identity
    visitor_id: str
    variation_id: str | None  # Convert: credit goes to a visitor in a variation
    first_exposed_at: int
    last_exposed_at: int
    exposures: int  # matched exposures of this identity in the group
    credited: bool
    revenue: Decimal | None  # what each of its conversions carries (None: not credited, or no revenue sent)


@dataclass(slots=True)
class Credit:
    """How one project's attribution model shared one purchase among the buyer's identities (listing only).

    The group is a provider project, or for Convert one experiment of it (its conversions name the
    experiment). Touches: the credited ones first, in the order the remainder cent goes, then the others.
    """

    provider: Provider
    project: str
    experiment_id: str | None
    attribution: Attribution
    revenue_share: RevenueShare
    touches: tuple[Touch, ...]
    detail: str


@dataclass(slots=True)
class Decision:
    """What the matcher decided for one purchase, and why."""

    conversions: tuple[Conversion, ...]
    matched: tuple[Exposure, ...] = ()
    rejections: tuple[Rejection, ...] = ()
    credits: tuple[Credit, ...] = ()  # listing mode only: the attribution model's choice per group

    @property
    def attributed(self) -> bool:
        return bool(self.conversions)
