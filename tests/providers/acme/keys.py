"""The test-only provider's identity rule (the default: the visitor id) and its idempotency key."""

from __future__ import annotations

from consumer.model import Exposure, Identity, Purchase
from consumer.providers.base import digest
from consumer.providers.spec import Matching


def acme_key(project: str, visitor: str, order_id: str) -> str:
    return digest("acme", project, visitor, order_id)[:32]


class AcmeMatching(Matching):
    """One conversion per visitor and order, carrying every goal of the project."""

    def key(self, exposure: Exposure, purchase: Purchase, identity: Identity, visitor: str) -> str:
        return acme_key(exposure.project, visitor, purchase.order_id)
