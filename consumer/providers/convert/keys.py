"""Convert's identity rule (the visitor in one experiment-variation) and its transaction key."""

from __future__ import annotations

from decimal import Decimal

from consumer.model import Conversion, Exposure, Identity, Provider, Purchase
from consumer.providers.base import digest
from consumer.providers.convert.config import ConvertProject
from consumer.providers.spec import Matching, Units


def transaction_key(project: str, visitor: str, experiment_id: str, variation_id: str, order_id: str) -> str:
    """The idempotency key of one Convert conversion: 32 lowercase hex, deterministic."""
    return digest("convert", project, visitor, experiment_id, variation_id, order_id)[:32]


class ConvertMatching(Matching):
    """One conversion per visitor and experiment-variation (every goal of the project); credit per experiment."""

    by_experiment = True

    def __init__(self, provider: Provider, project: str, config: ConvertProject) -> None:
        super().__init__(provider, project, config)
        self.transaction_goals = config.transaction_goals

    def key(self, exposure: Exposure, purchase: Purchase, identity: Identity, visitor: str) -> str:
        return transaction_key(exposure.project, visitor, exposure.experiment_id, exposure.variation_id,
                               purchase.order_id)

    def emit(self, units: Units, exposure: Exposure, purchase: Purchase, identity: Identity, visitor: str,
             revenue: Decimal | None) -> None:
        exp, var = exposure.experiment_id, exposure.variation_id
        key = transaction_key(exposure.project, visitor, exp, var, purchase.order_id)
        if key not in units:
            units[key] = Conversion(self.provider, exposure.project, visitor, self.goals, revenue, key,
                                    purchase.event_id, purchase.order_id, purchase.occurred_at, purchase.item_count,
                                    identity, exp, var, self.transaction_goals)
