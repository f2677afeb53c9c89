"""The shape of one provider's emulator in the sandbox, and the names every registered emulator answers to.

A provider package's `ProviderSpec.emulator` loads its `Emulator` subclass. The sandbox makes one of each
registered provider's, hands it the shared state (faults, latency, profiles, records, the request log),
and lets it add its routes: the sandbox's router names no provider.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, ClassVar

from aiohttp import web

if TYPE_CHECKING:
    from consumer.sandbox.base import SandboxState


class Emulator:
    """One provider's API as the sandbox answers it.

    `names`: what its requests are logged, counted, faulted and profiled under; the first is the
    provider's slug (Kameleoon adds "token" for its OAuth endpoint). `options`: the keyword options of
    `Sandbox(...)` (and of `--options` files) it takes; `credentials`: those of them a console can change
    at runtime (`Sandbox.set_credentials`, POST /_sandbox/credentials). `json_status_faults`: it answers errors as a
    JSON `status` under HTTP 200, so `json_status` faults apply to it. Public attributes and methods of an
    emulator are reachable on the sandbox itself (`sandbox.expire_tokens()`).
    """

    names: ClassVar[tuple[str, ...]] = ()
    options: ClassVar[tuple[str, ...]] = ()
    json_status_faults: ClassVar[bool] = False
    credentials: ClassVar[tuple[str, ...]] = ()  # of its options, those `Sandbox.set_credentials` replaces
    max_body: int = 3_000_000  # the largest request body it reads (the server's own limit follows the largest)

    def __init__(self, sandbox: SandboxState, **options: Any) -> None:
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            raise TypeError(f"{type(self).__name__} takes no option {unknown[0]!r}")
        self.sandbox = sandbox

    @property
    def slug(self) -> str:
        return self.names[0]

    def add_routes(self, router: web.UrlDispatcher) -> None:
        """Add its endpoints (paths at the root: every provider's base URL is the sandbox URL)."""
        raise NotImplementedError

    def check_credentials(self, credentials: Mapping[str, Any]) -> Callable[[], None]:
        """Validate new values of its `credentials` (SpecError naming the bad one) and return what applies
        them: `Sandbox.set_credentials` checks every emulator's before applying any."""
        raise NotImplementedError

    def clear_faults(self) -> None:
        """Forget runtime rules it keeps itself (`Sandbox.clear_faults`)."""

    def reset(self) -> None:
        """Forget what it recorded itself (`Sandbox.reset`); faults are cleared separately."""

    def summary(self) -> dict[str, Any]:
        """Its entries in `Sandbox.summary()` (counts of what it keeps aside)."""
        return {}

    def records_json(self) -> dict[str, Any]:
        """Its entries in the control API's records answer (what it keeps aside, in full)."""
        return {}

    def parse_spec(self, item: dict[str, Any]) -> Any:
        """A control-API fault spec of a kind only it knows: a callable applying it, or None (not its kind)."""
        return None


EmulatorFactory = type[Emulator]


def emulator_classes(extra: tuple[str, ...] = ()) -> list[EmulatorFactory]:
    """The emulator classes of the built-in providers and of the provider modules in `extra`."""
    from consumer.providers import registry

    return [spec.emulator() for spec in registry.specs(extra) if spec.emulator is not None]


def provider_names() -> tuple[str, ...]:
    """Every name an emulator of a registered provider answers to (what a fault or profile may name, or '*')."""
    from consumer.providers import registry

    return names_of(emulator_classes(registry.loaded_modules()))


def names_of(classes: list[EmulatorFactory]) -> tuple[str, ...]:
    """The providers' slugs first, in registry order, then their other names (Kameleoon's "token")."""
    return tuple(cls.names[0] for cls in classes) + tuple(n for cls in classes for n in cls.names[1:])


def json_status_names() -> tuple[str, ...]:
    from consumer.providers import registry

    return tuple(cls.names[0] for cls in emulator_classes(registry.loaded_modules()) if cls.json_status_faults)
