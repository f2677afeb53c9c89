"""Convert Experiences (seed 002's tracking GET, or the batched v1 POST): config, keys, requests, emulator."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from consumer.providers.convert.config import CONVERT, parse
from consumer.providers.convert.keys import ConvertMatching
from consumer.providers.convert.request import ConvertModule
from consumer.providers.spec import ProviderSpec, Sample

if TYPE_CHECKING:
    from consumer.sandbox.emulator import EmulatorFactory


def _emulator() -> EmulatorFactory:
    from consumer.providers.convert.emulator import ConvertEmulator

    return ConvertEmulator


SAMPLE_PROJECT = "1111_2222"  # seed 002's ID NUMBER


def _sample_section(sandbox_url: str) -> dict[str, Any]:
    return {
        "retry": {"base_delay": "20ms", "max_delay": "500ms"},
        "projects": {SAMPLE_PROJECT: {"base_url": sandbox_url, "goals": [100, 101], "transaction_goals": [100]}},
    }


PROVIDER = ProviderSpec(
    provider=CONVERT,
    parse=parse,
    module=ConvertModule,
    matching=ConvertMatching,
    emulator=_emulator,
    sample=Sample(SAMPLE_PROJECT, _sample_section),
    description="Convert Experiences: GET /track/ per conversion, or batched POST /v1/track/{account}/{project}",
)
