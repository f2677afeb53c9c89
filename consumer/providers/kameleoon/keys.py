"""Kameleoon's identity rule (visitorCode, or the customer id as a mappingValue) and its event nonces."""

from __future__ import annotations

from decimal import Decimal
from hashlib import sha256

from consumer.model import Conversion, Exposure, Identity, Provider, Purchase
from consumer.providers.base import chunk, digest
from consumer.providers.kameleoon.config import KameleoonProject
from consumer.providers.spec import Matching, NoIdentity, Units


def nonce(site_code: str, order_id: str, goal: str, visitor: str, identity: Identity = Identity.VISITOR) -> str:
    """The event nonce: 16 lowercase hex digits, the same for the same (site, order, goal, visitor).

    Kameleoon keeps a nonce across retries and de-duplicates on it, so a redelivered purchase
    cannot count twice. The identity kind is part of it: a visitorCode and a mappingValue that
    happen to be the same string are different visitors.
    """
    return nonce_of(nonce_prefix(site_code), chunk(order_id), chunk(goal), chunk(identity.value), chunk(visitor))


def nonce_prefix(site_code: str) -> bytes:
    """The part of every nonce of a site that does not change (computed once per project)."""
    return chunk("kameleoon") + chunk(site_code)


def nonce_of(prefix: bytes, order: bytes, goal: bytes, identity: bytes, visitor: bytes) -> str:
    """`nonce` from its parts already encoded with `chunk`, for the matcher's hot path."""
    return sha256(b"".join((prefix, order, goal, identity, visitor))).hexdigest()[:16]


def adjustment_nonce(site_code: str, adjustment_event_id: str, original_key: str, role: str) -> str:
    """The nonce of an event an order adjustment sends: 16 hex digits from (site, adjustment, original, role).

    `role` is "cancel" (the `negative: true` event) or "restate" (the conversion with the revenue a
    partial refund leaves). Derived from the adjustment's event id, never from a clock or a counter, so
    an adjustment read again (a redelivery, a restart after a crash) sends the same nonces, which
    Kameleoon de-duplicates. Its prefix differs from every purchase nonce's input (`nonce`).
    """
    return digest("kameleoon-adjustment", site_code, adjustment_event_id, original_key, role)[:16]


_IDENTITY_CHUNKS = {i: chunk(i.value) for i in Identity}
_VISITOR, _MAPPING = Identity.VISITOR, Identity.MAPPING


class KameleoonMatching(Matching):
    """One conversion per goal (one CONVERSION event each), keyed by its nonce; goals split revenue apart."""

    split_by_goal = True

    def __init__(self, provider: Provider, project: str, config: KameleoonProject) -> None:
        super().__init__(provider, project, config)
        self.own_identity = config.use_mapping_identifier
        self.prefix = nonce_prefix(project)
        self.goal_chunks = tuple((g, chunk(g)) for g in self.goals)
        # The order's encoded chunk, kept for the next exposure of the same purchase (the same str object).
        self._order: str | None = None
        self._order_chunk = b""

    def identity(self, exposure: Exposure, purchase: Purchase) -> tuple[Identity, str]:
        if self.own_identity:
            customer = purchase.customer_id
            if not customer or not customer.strip():
                raise NoIdentity("project uses the mapping identifier; the purchase has no customer_id")
            return _MAPPING, customer
        return super().identity(exposure, purchase)

    def key(self, exposure: Exposure, purchase: Purchase, identity: Identity, visitor: str) -> str:
        """The nonce of the project's first goal (a Kameleoon exposure makes one conversion per goal: see emit)."""
        return nonce(self.project, purchase.order_id, self.goals[0], visitor, identity)

    def emit(self, units: Units, exposure: Exposure, purchase: Purchase, identity: Identity, visitor: str,
             revenue: Decimal | None) -> None:
        order = purchase.order_id
        if order is not self._order:
            self._order, self._order_chunk = order, chunk(order)
        order_chunk = self._order_chunk
        ident_chunk = _IDENTITY_CHUNKS[identity]
        visitor_chunk = chunk(visitor)
        for goal, goal_chunk in self.goal_chunks:
            key = nonce_of(self.prefix, order_chunk, goal_chunk, ident_chunk, visitor_chunk)
            if key not in units:
                units[key] = Conversion(self.provider, exposure.project, visitor, (goal,), revenue, key,
                                        purchase.event_id, order, purchase.occurred_at, purchase.item_count, identity)
