"""A fourth provider that exists only in the tests: registered through `[providers] modules`, like any other.

Its own request format (a JSON POST with an API key header), its own config section and defaults, its
own key, and its own emulator in the sandbox; nothing outside this package names it.
"""

from __future__ import annotations

from consumer.providers.spec import ProviderSpec
from consumer.sandbox.emulator import EmulatorFactory

from .config import ACME, parse
from .keys import AcmeMatching
from .request import AcmeModule


def _emulator() -> EmulatorFactory:
    from .emulator import AcmeEmulator

    return AcmeEmulator


PROVIDER = ProviderSpec(
    provider=ACME,
    parse=parse,
    module=AcmeModule,
    matching=AcmeMatching,
    emulator=_emulator,
    description="Acme (tests only): POST /acme/v1/conversions, JSON, X-Api-Key",
)
