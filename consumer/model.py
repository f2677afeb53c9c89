"""Domain types shared by every stage: purchases in, conversions and decisions out."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal


class Provider(enum.StrEnum):
    KAMELEOON = "KAMELEOON"
    CONVERT = "CONVERT"
    CONDUCTRICS = "CONDUCTRICS"

    def __init__(self, value: str) -> None:
        # A plain attribute, not a property: read for every exposure and conversion on the hot path.
        self.slug: str = value.lower()  # the name used in config sections, metric labels and DLQ headers


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


@dataclass(slots=True)
class Rejection:
    reason: RejectReason
    detail: str
    exposure: Exposure | None = None


@dataclass(slots=True)
class Decision:
    """What the matcher decided for one purchase, and why."""

    conversions: tuple[Conversion, ...]
    matched: tuple[Exposure, ...] = ()
    rejections: tuple[Rejection, ...] = ()

    @property
    def attributed(self) -> bool:
        return bool(self.conversions)
