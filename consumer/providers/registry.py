"""One provider module per provider that has at least one configured project."""

from __future__ import annotations

from consumer.config import Config
from consumer.model import Provider
from consumer.providers.base import ProviderModule
from consumer.providers.conductrics import ConductricsModule
from consumer.providers.convert import ConvertModule
from consumer.providers.kameleoon import KameleoonModule


def modules(config: Config) -> dict[Provider, ProviderModule]:
    out: dict[Provider, ProviderModule] = {}
    if config.kameleoon.projects:
        out[Provider.KAMELEOON] = KameleoonModule(config.kameleoon)
    if config.convert.projects:
        out[Provider.CONVERT] = ConvertModule(config.convert)
    if config.conductrics.projects:
        out[Provider.CONDUCTRICS] = ConductricsModule(config.conductrics)
    return out
