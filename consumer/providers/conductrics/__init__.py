"""Conductrics (REST agent API, seed 003): config section, identity rule and key, requests, answers, emulator."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from consumer.providers.conductrics.config import CONDUCTRICS, parse
from consumer.providers.conductrics.keys import ConductricsMatching
from consumer.providers.conductrics.request import ConductricsModule
from consumer.providers.spec import ProviderSpec, Sample

if TYPE_CHECKING:
    from consumer.sandbox.emulator import EmulatorFactory


def _emulator() -> EmulatorFactory:
    from consumer.providers.conductrics.emulator import ConductricsEmulator

    return ConductricsEmulator


SAMPLE_PROJECT = "ac-xxx"  # seed 003's account
SAMPLE_API_KEY = "demo-api-key"


def _sample_section(sandbox_url: str) -> dict[str, Any]:
    return {
        "retry": {"base_delay": "20ms", "max_delay": "500ms"},
        "projects": {SAMPLE_PROJECT: {"agent_api_url": f"{sandbox_url}/{SAMPLE_PROJECT}/v3/agent-api",
                                      "api_key": SAMPLE_API_KEY, "goals": ["g-purchase"]}},
    }


PROVIDER = ProviderSpec(
    provider=CONDUCTRICS,
    parse=parse,
    module=ConductricsModule,
    matching=ConductricsMatching,
    emulator=_emulator,
    sample=Sample(SAMPLE_PROJECT, _sample_section, {"conductrics_keys": {SAMPLE_PROJECT: SAMPLE_API_KEY}}),
    description="Conductrics REST agent API: POST {agent_api_url}?vid=&session=&apikey=, one visitor per call",
)
