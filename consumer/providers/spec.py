"""What a provider package gives the service: one `ProviderSpec` (its `PROVIDER`), and the roles it names.

A provider is a package, `consumer/providers/<slug>/` (or any importable module named in
`[providers] modules`), whose `PROVIDER` is a `ProviderSpec`. The spec is all the service knows of it:

- `parse`: its `[<slug>]` config section, validated, with its own defaults (attribution window and
  model, user agent, batch limits); returns its config object (a `ProviderConfig`).
- `matching`: per configured project, its identity rule and idempotency keys (a `Matching`), prepared
  once; the matcher calls them for each exposure of that project.
- `module`: the delivery module (`ProviderModule`: route, item_bytes, build, classify) for its config.
- `emulator`: the sandbox's emulation of its API (consumer/sandbox/), loaded only by the sandbox.
- `sample`: an example project for the demo and the sample purchases (optional).

The pipeline (app, delivery, matcher, decoding, dlq, metrics, cli) never names a provider: it iterates
the registry (consumer/providers/registry.py) and treats `Provider` values opaquely.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import TYPE_CHECKING, Any, Protocol

from consumer.config import HttpConfig, Rules, Table
from consumer.model import Conversion, Exposure, Identity, Provider, Purchase
from consumer.providers.base import ProviderModule

if TYPE_CHECKING:
    from consumer.sandbox.emulator import EmulatorFactory


class ProjectConfig(Protocol):
    """One configured project of a provider: what the shared matcher applies to it."""

    @property
    def rules(self) -> Rules: ...


class ProviderConfig(Protocol):
    """A provider's parsed `[<slug>]` section: its projects, how it is reached, its secrets."""

    @property
    def projects(self) -> Mapping[str, ProjectConfig]: ...

    @property
    def http(self) -> HttpConfig: ...

    def secrets(self) -> list[str]:
        """Every credential's value, so logs and tests can look for leaks."""
        ...


class NoIdentity(Exception):
    """An exposure names no visitor the provider could be told about (the matcher rejects it as NO_IDENTITY)."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


# The conversions one exposure makes are collected here, keyed by idempotency key (a key names one unit).
Units = dict[str, Conversion]


class Matching:
    """One project's identity rule and keys, prepared once per project; called per exposure (hot path).

    The default: the exposure's visitor id is the identity (an empty one is NO_IDENTITY), and one
    conversion per exposure carries every goal of the project under `key`. A provider overrides what
    differs. Attributes are plain (read for every exposure):

    - `own_identity`: the identity is not simply a non-blank visitor id, so `identity` is asked for every
      exposure (False: asked only when the visitor id is blank).
    - `by_experiment`: the credit group is the project's experiment, not the project (its conversions
      name the experiment-variation), and an identity is also its variation.
    - `split_by_goal`: each goal is a credit group of its own when revenue is split (one goal a conversion).
    """

    own_identity: bool = False
    by_experiment: bool = False
    split_by_goal: bool = False

    def __init__(self, provider: Provider, project: str, config: Any) -> None:
        self.provider = provider
        self.project = project
        self.goals: tuple[str, ...] = config.rules.goals

    def identity(self, exposure: Exposure, purchase: Purchase) -> tuple[Identity, str]:
        """Who the conversion names at the provider; raises NoIdentity."""
        if exposure.visitor_id.strip():
            return Identity.VISITOR, exposure.visitor_id
        raise NoIdentity("empty visitor id")

    def key(self, exposure: Exposure, purchase: Purchase, identity: Identity, visitor: str) -> str:
        """The idempotency key of this exposure's conversion: the same for a republished order."""
        raise NotImplementedError

    def emit(self, units: Units, exposure: Exposure, purchase: Purchase, identity: Identity, visitor: str,
             revenue: Decimal | None) -> None:
        """Add this exposure's conversions to `units` (a key already there is the same conversion: skipped)."""
        key = self.key(exposure, purchase, identity, visitor)
        if key not in units:
            units[key] = Conversion(self.provider, exposure.project, visitor, self.goals, revenue, key,
                                    purchase.event_id, purchase.order_id, purchase.occurred_at, purchase.item_count,
                                    identity)


@dataclass(frozen=True)
class Sample:
    """A provider's example project, for the demo, the sample purchases, tests and benchmarks."""

    project: str  # the exposure project of the sample purchases
    section: Callable[[str], dict[str, Any]]  # the sandbox URL -> its [<slug>] section, pointed at the sandbox
    sandbox_options: Mapping[str, Any] = field(default_factory=dict)  # what its emulator needs to accept it


@dataclass(frozen=True)
class ProviderSpec:
    """A provider, as its package registers it (see the module docstring)."""

    provider: Provider  # its Avro symbol and slug: `Provider.register("EXAMPLE")`
    parse: Callable[[Table], Any]  # [<slug>] -> its config (a ProviderConfig); errors recorded on the table
    module: Callable[[Any], ProviderModule]  # its config (with projects) -> the delivery module
    matching: Callable[[Provider, str, Any], Matching]  # (provider, project name, project config) -> Matching
    emulator: Callable[[], EmulatorFactory] | None = None  # the sandbox's emulator, imported on demand
    sample: Sample | None = None  # in the demo's sample purchases and config (None: not part of the demo)
    description: str = ""  # one line for `--help` and docs: what API it speaks

    @property
    def slug(self) -> str:
        return self.provider.slug

    @property
    def symbol(self) -> str:
        return self.provider.value
