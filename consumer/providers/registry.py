"""The registered providers: the built-in packages, plus modules named in `[providers] modules`.

Registration is by import: a provider module's `PROVIDER` is its `ProviderSpec`. The registry is
process-wide (as Vector's component inventory is), so a provider registered from one config is known to
the decoder (its Avro symbol), the sandbox and the command line alike.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable, Mapping

from consumer.config import Config
from consumer.model import Provider, registered_providers
from consumer.providers.base import ProviderModule
from consumer.providers.spec import ProviderSpec

BUILTIN = ("consumer.providers.kameleoon", "consumer.providers.convert", "consumer.providers.conductrics")


class ProviderModuleError(Exception):
    """A module named as a provider cannot be used: it does not import, or has no PROVIDER spec."""

    def __init__(self, module: str, message: str) -> None:
        super().__init__(f"provider module {module!r}: {message}")
        self.module = module
        self.message = message


_SPECS: dict[str, ProviderSpec] = {}  # slug -> spec, in registration order
_MODULES: dict[str, ProviderSpec] = {}  # module name -> its spec


# Names a provider's slug cannot take: the config's other top-level tables, and the labels the pipeline
# uses for "no provider" (metrics, DLQ headers) and for the shared pipeline of every provider.
RESERVED = frozenset({"providers", "kafka", "decoding", "metrics", "pipeline", "logging", "matcher", "control",
                      "adjustments", "ledger", "none", "all"})


def register(spec: ProviderSpec) -> ProviderSpec:
    """Add `spec`; registering it again is a no-op, another spec under a taken slug (or a reserved one) an error."""
    if spec.slug in RESERVED:
        raise ValueError(f"{spec.slug!r} cannot name a provider: it is a config table or a reserved label")
    known = _SPECS.setdefault(spec.slug, spec)
    if known is not spec:
        raise ValueError(f"provider {spec.slug!r} is registered already, by another module")
    return spec


def load(module: str) -> ProviderSpec:
    """Import `module` and register its PROVIDER; raises ProviderModuleError saying what is wrong."""
    found = _MODULES.get(module)
    if found is not None:
        return found
    try:
        mod = importlib.import_module(module)
    except Exception as exc:  # any import failure: the message names the module, the cause is kept
        raise ProviderModuleError(module, f"cannot be imported ({type(exc).__name__}: {exc})") from exc
    spec = getattr(mod, "PROVIDER", None)
    if not isinstance(spec, ProviderSpec):
        raise ProviderModuleError(module, "has no PROVIDER (a consumer.providers.spec.ProviderSpec)")
    try:
        spec = register(spec)
    except ValueError as exc:
        raise ProviderModuleError(module, str(exc)) from None
    _MODULES[module] = spec
    return spec


def load_all(modules: Iterable[str]) -> list[ProviderSpec]:
    return [load(m) for m in modules]


def specs(modules: Iterable[str] = ()) -> tuple[ProviderSpec, ...]:
    """The built-in providers, then those of `modules` (registered if need be), each once.

    What one config (or one sandbox) works with: another config's modules, registered in the same
    process, are not among them, so a config's sections and a sandbox's emulators never depend on what
    else ran before.
    """
    out = {spec.slug: spec for spec in load_all(BUILTIN)}
    for spec in load_all(modules):
        out.setdefault(spec.slug, spec)
    return tuple(out.values())


def spec_of(provider: Provider | str) -> ProviderSpec:
    """The spec of a provider (or of its slug)."""
    slug = provider.slug if isinstance(provider, Provider) else provider
    try:
        return _SPECS[slug]
    except KeyError:
        raise KeyError(f"no registered provider {slug!r}") from None


def loaded_modules() -> tuple[str, ...]:
    """Every provider module registered in this process, built-in ones included."""
    return tuple(_MODULES)


def by_symbol() -> Mapping[str, Provider]:
    """Every registered provider by its Avro symbol, in registration order (a live view: no copy)."""
    return registered_providers()


def slugs() -> tuple[str, ...]:
    """Every provider registered in this process (the built-in ones and any loaded since)."""
    return tuple(_SPECS)


def modules(config: Config) -> dict[Provider, ProviderModule]:
    """One delivery module per provider that has at least one configured project."""
    out: dict[Provider, ProviderModule] = {}
    for slug, section in config.providers.items():
        if section.projects:
            spec = _SPECS[slug]
            out[spec.provider] = spec.module(section)
    return out


load_all(BUILTIN)
