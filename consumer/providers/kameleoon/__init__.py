"""Kameleoon (Data API, seed 001): its config section, identity rule and nonce, requests, answers, emulator."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from consumer.providers.kameleoon.config import KAMELEOON, parse
from consumer.providers.kameleoon.keys import KameleoonMatching
from consumer.providers.kameleoon.request import KameleoonModule
from consumer.providers.spec import ProviderSpec, Sample

if TYPE_CHECKING:
    from consumer.sandbox.emulator import EmulatorFactory


def _emulator() -> EmulatorFactory:
    from consumer.providers.kameleoon.emulator import KameleoonEmulator

    return KameleoonEmulator


SAMPLE_SITE = "f17c21u1ag"  # seed 001's siteCode


def _sample_section(sandbox_url: str) -> dict[str, Any]:
    return {
        "user_agent": "offline-conversions-demo/1.0",
        "token_url": f"{sandbox_url}/oauth/token",
        "retry": {"base_delay": "20ms", "max_delay": "500ms"},
        "projects": {SAMPLE_SITE: {"base_url": sandbox_url, "goals": [36151]}},
    }


PROVIDER = ProviderSpec(
    provider=KAMELEOON,
    parse=parse,
    module=KameleoonModule,
    matching=KameleoonMatching,
    emulator=_emulator,
    sample=Sample(SAMPLE_SITE, _sample_section),
    description="Kameleoon Data API: POST /visit/events, batched CONVERSION events, OAuth optional",
)
