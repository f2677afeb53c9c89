"""Load, interpolate and validate the TOML configuration; every error names its key."""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, TypeVar

from consumer.model import Channel, Provider

T = TypeVar("T")

PACKAGE_ROOT = Path(__file__).resolve().parent
# An installed wheel carries the contract as consumer/schemas (see pyproject); a checkout has it at the top.
_SCHEMA_NAME = "purchase_completed.avsc"
DEFAULT_SCHEMA = next(
    (p for p in (PACKAGE_ROOT / "schemas" / _SCHEMA_NAME, PACKAGE_ROOT.parent / "schemas" / _SCHEMA_NAME)
     if p.exists()),
    PACKAGE_ROOT.parent / "schemas" / _SCHEMA_NAME,
)


class ConfigError(ValueError):
    """A configuration value is missing or invalid; `key` is its dotted path."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"config key '{key}': {message}")
        self.key = key


class Secret:
    """A credential that never prints itself: repr, str and format all show ***."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    def __bool__(self) -> bool:
        return bool(self._value)


# --------------------------------------------------------------------------- values

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def parse_duration(value: object, key: str) -> float:
    """Seconds from `"250ms"`, `"5s"`, `"30m"`, `"72h"`, `"7d"` or a bare number of seconds."""
    if isinstance(value, bool):
        raise ConfigError(key, f"expected a duration like '5s' or '7d', got {value!r}")
    if isinstance(value, int | float):
        if value < 0:
            raise ConfigError(key, "a duration cannot be negative")
        return float(value)
    if isinstance(value, str):
        m = _DURATION.match(value)
        if m:
            return float(m.group(1)) * _UNIT_SECONDS[m.group(2)]
    raise ConfigError(key, f"expected a duration like '250ms', '5s', '30m', '72h' or '7d', got {value!r}")


_VAR = re.compile(r"\$\{([^}]*)\}")


def interpolate(value: str, key: str, env: Mapping[str, str]) -> str:
    """Replace `${VAR}` with the environment variable and `${file:PATH}` with a file's content."""

    def sub(m: re.Match[str]) -> str:
        ref = m.group(1)
        if ref.startswith("file:"):
            path = Path(ref[5:])
            try:
                return path.read_text().strip()
            except OSError as exc:
                raise ConfigError(key, f"cannot read secret file {str(path)!r}: {exc.strerror}") from None
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", ref):
            raise ConfigError(key, f"'${{{ref}}}' is not a valid variable reference")
        if ref not in env:
            raise ConfigError(key, f"environment variable {ref} is not set")
        return env[ref]

    return _VAR.sub(sub, value)


class _Table:
    """A TOML table being validated: typed getters that name the key, and no unknown keys."""

    def __init__(self, data: Mapping[str, Any], path: str, env: Mapping[str, str]) -> None:
        self.data = dict(data)
        self.path = path
        self.env = env
        self.used: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def has(self, name: str) -> bool:
        return name in self.data

    def raw(self, name: str) -> Any:
        self.used.add(name)
        value = self.data.get(name)
        if isinstance(value, str):
            value = interpolate(value, self.key(name), self.env)
        return value

    def _get(self, name: str, default: Any, required: bool) -> Any:
        if name not in self.data:
            if required:
                raise ConfigError(self.key(name), "is required")
            self.used.add(name)
            return default
        return self.raw(name)

    def get_str(self, name: str, default: str | None = None, *, required: bool = False) -> str:
        v = self._get(name, default, required)
        if not isinstance(v, str):
            raise ConfigError(self.key(name), f"expected a string, got {type(v).__name__}")
        return v

    def opt_str(self, name: str) -> str | None:
        v = self._get(name, None, False)
        if v is None:
            return None
        if not isinstance(v, str):
            raise ConfigError(self.key(name), f"expected a string, got {type(v).__name__}")
        return v or None

    def secret(self, name: str, *, required: bool = False) -> Secret | None:
        v = self.opt_str(name) if not required else self.get_str(name, required=True)
        if required and not v:
            raise ConfigError(self.key(name), "must not be empty")
        return Secret(v) if v else None

    def get_int(self, name: str, default: int, *, minimum: int | None = None, maximum: int | None = None) -> int:
        v = self._get(name, default, False)
        if isinstance(v, bool) or not isinstance(v, int):
            raise ConfigError(self.key(name), f"expected an integer, got {v!r}")
        if minimum is not None and v < minimum:
            raise ConfigError(self.key(name), f"must be at least {minimum}, got {v}")
        if maximum is not None and v > maximum:
            raise ConfigError(self.key(name), f"must be at most {maximum}, got {v}")
        return v

    def get_float(self, name: str, default: float | None, *, minimum: float = 0.0) -> float | None:
        v = self._get(name, default, False)
        if v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise ConfigError(self.key(name), f"expected a number, got {v!r}")
        if v < minimum:
            raise ConfigError(self.key(name), f"must be at least {minimum}, got {v}")
        return float(v)

    def get_bool(self, name: str, default: bool) -> bool:
        v = self._get(name, default, False)
        if not isinstance(v, bool):
            raise ConfigError(self.key(name), f"expected true or false, got {v!r}")
        return v

    def duration(self, name: str, default: float, *, positive: bool = False) -> float:
        v = parse_duration(self._get(name, default, False), self.key(name))
        if positive and v <= 0:
            raise ConfigError(self.key(name), "must be greater than zero")
        return v

    def decimal(self, name: str) -> Decimal | None:
        v = self._get(name, None, False)
        if v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, int | float | str):
            raise ConfigError(self.key(name), f"expected a decimal number, got {v!r}")
        return _to_decimal(v, self.key(name))

    def str_list(self, name: str, default: list[str] | None = None, *, required: bool = False) -> tuple[str, ...]:
        v = self._get(name, default if default is not None else [], required)
        if not isinstance(v, list):
            raise ConfigError(self.key(name), f"expected a list, got {type(v).__name__}")
        out = []
        for i, item in enumerate(v):
            if isinstance(item, bool) or not isinstance(item, str | int):
                raise ConfigError(f"{self.key(name)}[{i}]", f"expected a string or integer, got {item!r}")
            s = interpolate(item, self.key(name), self.env) if isinstance(item, str) else str(item)
            if not s:
                raise ConfigError(f"{self.key(name)}[{i}]", "must not be empty")
            out.append(s)
        return tuple(out)

    def table(self, name: str) -> _Table:
        self.used.add(name)
        v = self.data.get(name, {})
        if not isinstance(v, dict):
            raise ConfigError(self.key(name), f"expected a table, got {type(v).__name__}")
        return _Table(v, self.key(name), self.env)

    def passthrough(self, name: str) -> dict[str, str | int | float | bool]:
        """A table of librdkafka properties, passed on as they are (strings interpolated)."""
        t = self.table(name)
        out: dict[str, str | int | float | bool] = {}
        for k, v in t.data.items():
            if not isinstance(v, str | int | float | bool):
                raise ConfigError(t.key(k), f"expected a scalar librdkafka value, got {type(v).__name__}")
            out[k] = interpolate(v, t.key(k), self.env) if isinstance(v, str) else v
        return out

    def done(self) -> None:
        unknown = sorted(set(self.data) - self.used)
        if unknown:
            raise ConfigError(self.key(unknown[0]), "is not a known key (check its spelling)")


def _to_decimal(v: int | float | str, key: str) -> Decimal:
    try:
        d = Decimal(str(v))
    except InvalidOperation:
        raise ConfigError(key, f"expected a decimal number, got {v!r}") from None
    if not d.is_finite():
        raise ConfigError(key, f"expected a finite decimal number, got {v!r}")
    return d


# --------------------------------------------------------------------------- sections


@dataclass(frozen=True)
class KafkaConfig:
    bootstrap_servers: str
    topic: str
    group_id: str
    dlq_topic: str
    common: dict[str, str | int | float | bool] = field(default_factory=dict)
    consumer: dict[str, str | int | float | bool] = field(default_factory=dict)
    producer: dict[str, str | int | float | bool] = field(default_factory=dict)


@dataclass(frozen=True)
class DecodingConfig:
    format: str = "avro"
    schema: Path = DEFAULT_SCHEMA
    schema_registry_url: str = ""
    max_message_bytes: int = 1_048_576


@dataclass(frozen=True)
class MetricsConfig:
    host: str = "0.0.0.0"
    port: int = 9400


@dataclass(frozen=True)
class PipelineConfig:
    max_in_flight: int = 20_000
    poll_batch: int = 500
    commit_interval: float = 5.0
    shutdown_deadline: float = 30.0
    dlq_timeout: float = 30.0
    dedup_cache_size: int = 100_000
    gc_threshold: int = 50_000  # Python's gen-0 collection threshold while running; 0 keeps Python's own


@dataclass(frozen=True)
class LoggingConfig:
    level: str = "INFO"
    format: str = "json"


@dataclass(frozen=True)
class BatchConfig:
    max_events: int = 1000
    max_bytes: int = 2_621_440
    linger: float = 0.05


@dataclass(frozen=True)
class RetryConfig:
    max_attempts: int = 8
    max_elapsed: float = 300.0
    base_delay: float = 0.2
    max_delay: float = 30.0


@dataclass(frozen=True)
class FlowConfig:
    concurrency: int = 16  # the fixed limit, or the initial one when adaptive
    rate_limit: float | None = None  # requests per second
    timeout: float = 10.0
    breaker_failures: int = 5
    breaker_cooldown: float = 10.0
    adaptive: bool = False  # concurrency = "adaptive": the limit follows the provider (consumer/concurrency.py)
    min_concurrency: int = 1
    max_concurrency: int = 200


ADAPTIVE_INITIAL = 8  # where an adaptive limit starts unless initial_concurrency says otherwise


@dataclass(frozen=True)
class Rules:
    """What the matcher applies to one provider project."""

    goals: tuple[str, ...]
    attribution_window: float  # seconds
    currency: str | None = None
    channels: tuple[Channel, ...] = tuple(Channel)
    experiments_allow: tuple[str, ...] = ()
    experiments_deny: tuple[str, ...] = ()
    min_revenue: Decimal | None = None
    send_revenue: bool = True


@dataclass(frozen=True)
class KameleoonProject:
    site_code: str
    rules: Rules
    base_url: str = "https://eu-data.kameleoon.io"
    use_mapping_identifier: bool = False
    client_id: Secret | None = None
    client_secret: Secret | None = None
    flow: FlowConfig = FlowConfig()


@dataclass(frozen=True)
class ConvertProject:
    key: str  # "account_project"
    account_id: str
    project_id: str
    rules: Rules
    base_url: str
    api: str = "track"  # "track" (the seed's GET) or "v1" (batched POST)
    transaction_goals: tuple[str, ...] = ()
    flow: FlowConfig = FlowConfig()


@dataclass(frozen=True)
class ConductricsProject:
    key: str
    agent_api_url: str
    api_key: Secret
    rules: Rules
    session: str = "{vid}"  # template: {vid}, {order_id}, {event_id}
    flow: FlowConfig = FlowConfig()


@dataclass(frozen=True)
class KameleoonConfig:
    user_agent: str = "offline-conversions/1.0"
    token_url: str = "https://api.kameleoon.com/oauth/token"
    token_refresh_margin: float = 60.0
    batch: BatchConfig = BatchConfig()
    retry: RetryConfig = RetryConfig()
    projects: dict[str, KameleoonProject] = field(default_factory=dict)


@dataclass(frozen=True)
class ConvertConfig:
    user_agent: str = "ConvertAgent/1.0 (offline-conversions)"
    batch: BatchConfig = BatchConfig(max_events=100, max_bytes=1_000_000)
    retry: RetryConfig = RetryConfig()
    projects: dict[str, ConvertProject] = field(default_factory=dict)


@dataclass(frozen=True)
class ConductricsConfig:
    user_agent: str = "offline-conversions/1.0"
    retry: RetryConfig = RetryConfig()
    projects: dict[str, ConductricsProject] = field(default_factory=dict)


@dataclass(frozen=True)
class MatcherConfig:
    clock_skew: float = 300.0
    max_age: float = 90 * 86400.0
    rates: dict[tuple[str, str], Decimal] = field(default_factory=dict)  # (from, to) -> rate


@dataclass(frozen=True)
class Config:
    kafka: KafkaConfig
    decoding: DecodingConfig = DecodingConfig()
    metrics: MetricsConfig = MetricsConfig()
    pipeline: PipelineConfig = PipelineConfig()
    logging: LoggingConfig = LoggingConfig()
    matcher: MatcherConfig = MatcherConfig()
    kameleoon: KameleoonConfig = KameleoonConfig()
    convert: ConvertConfig = ConvertConfig()
    conductrics: ConductricsConfig = ConductricsConfig()

    def rules(self) -> dict[tuple[Provider, str], Rules]:
        """Every configured provider project's rules, keyed by (provider, exposure project)."""
        out: dict[tuple[Provider, str], Rules] = {}
        for k, kp in self.kameleoon.projects.items():
            out[(Provider.KAMELEOON, k)] = kp.rules
        for k, cp in self.convert.projects.items():
            out[(Provider.CONVERT, k)] = cp.rules
        for k, dp in self.conductrics.projects.items():
            out[(Provider.CONDUCTRICS, k)] = dp.rules
        return out

    def secrets(self) -> list[str]:
        """Every secret's value, so tests and log filters can look for leaks."""
        out: list[str] = []
        for kp in self.kameleoon.projects.values():
            out += [s.reveal() for s in (kp.client_id, kp.client_secret) if s]
        out += [dp.api_key.reveal() for dp in self.conductrics.projects.values()]
        return [s for s in out if s]


# --------------------------------------------------------------------------- parsing

DEFAULT_WINDOWS = {Provider.KAMELEOON: 7 * 86400.0, Provider.CONVERT: 30 * 86400.0, Provider.CONDUCTRICS: 72 * 3600.0}


def _url(t: _Table, name: str, default: str | None = None, *, required: bool = False) -> str:
    v = t.get_str(name, default, required=required)
    if not re.match(r"^https?://[^\s/?#]+", v):
        raise ConfigError(t.key(name), f"expected an http(s) URL, got {v!r}")
    return v.rstrip("/")


def _rules(t: _Table, provider: Provider) -> Rules:
    goals = t.str_list("goals", required=True)
    if not goals:
        raise ConfigError(t.key("goals"), "must name at least one goal")
    if provider is Provider.KAMELEOON or provider is Provider.CONVERT:
        for i, g in enumerate(goals):
            if not g.isdigit():
                raise ConfigError(f"{t.key('goals')}[{i}]", f"{provider.slug} goal ids are integers, got {g!r}")
    channels = t.str_list("channels", [c.value for c in Channel])
    for i, c in enumerate(channels):
        if c.upper() not in Channel.__members__:
            raise ConfigError(f"{t.key('channels')}[{i}]", f"unknown channel {c!r} (one of {', '.join(Channel)})")
    currency = t.opt_str("currency")
    if currency is not None and not re.fullmatch(r"[A-Z]{3}", currency):
        raise ConfigError(t.key("currency"), f"expected an ISO 4217 code like 'EUR', got {currency!r}")
    allow, deny = t.str_list("experiments_allow"), t.str_list("experiments_deny")
    if allow and deny:
        raise ConfigError(t.key("experiments_deny"), "set experiments_allow or experiments_deny, not both")
    return Rules(
        goals=goals,
        attribution_window=t.duration("attribution_window", DEFAULT_WINDOWS[provider], positive=True),
        currency=currency,
        channels=tuple(Channel(c.upper()) for c in channels),
        experiments_allow=allow,
        experiments_deny=deny,
        min_revenue=t.decimal("min_revenue"),
        send_revenue=t.get_bool("send_revenue", True),
    )


def _batch(t: _Table, default: BatchConfig) -> BatchConfig:
    return BatchConfig(
        max_events=t.get_int("max_events", default.max_events, minimum=1),
        max_bytes=t.get_int("max_bytes", default.max_bytes, minimum=1024, maximum=3_000_000),
        linger=t.duration("linger", default.linger),
    )


def _retry(t: _Table) -> RetryConfig:
    d = RetryConfig()
    r = RetryConfig(
        max_attempts=t.get_int("max_attempts", d.max_attempts, minimum=1),
        max_elapsed=t.duration("max_elapsed", d.max_elapsed, positive=True),
        base_delay=t.duration("base_delay", d.base_delay),
        max_delay=t.duration("max_delay", d.max_delay),
    )
    if r.max_delay < r.base_delay:
        raise ConfigError(t.key("max_delay"), "must not be below base_delay")
    t.done()
    return r


def _flow(t: _Table, default: FlowConfig) -> FlowConfig:
    adaptive, concurrency, low, high = default.adaptive, default.concurrency, default.min_concurrency, \
        default.max_concurrency
    value = t.data.get("concurrency")
    if value == "adaptive":
        t.raw("concurrency")
        if not adaptive:  # a fixed default says nothing about the bounds
            adaptive, concurrency, low, high = True, ADAPTIVE_INITIAL, FlowConfig.min_concurrency, \
                FlowConfig.max_concurrency
    elif isinstance(value, str):
        raise ConfigError(t.key("concurrency"), f'expected an integer or "adaptive", got {value!r}')
    elif value is not None:
        adaptive = False
        concurrency = t.get_int("concurrency", concurrency, minimum=1)
    if not adaptive:
        for name in ("min_concurrency", "max_concurrency", "initial_concurrency"):
            if t.has(name):
                raise ConfigError(t.key(name), 'applies only with concurrency = "adaptive"')
    else:
        low = t.get_int("min_concurrency", low, minimum=1)
        if not t.has("max_concurrency") and low > high:
            raise ConfigError(t.key("min_concurrency"), f"must be at most max_concurrency ({high}), got {low}")
        high = t.get_int("max_concurrency", high, minimum=low)
        concurrency = t.get_int("initial_concurrency", min(max(concurrency, low), high), minimum=low, maximum=high)
    f = FlowConfig(
        concurrency=concurrency,
        rate_limit=t.get_float("rate_limit", default.rate_limit, minimum=0.001),
        timeout=t.duration("timeout", default.timeout, positive=True),
        breaker_failures=t.get_int("breaker_failures", default.breaker_failures, minimum=1),
        breaker_cooldown=t.duration("breaker_cooldown", default.breaker_cooldown, positive=True),
        adaptive=adaptive,
        min_concurrency=low,
        max_concurrency=high,
    )
    t.done()
    return f


def _projects(t: _Table, build: Callable[[str, _Table], T]) -> dict[str, T]:
    projects = t.table("projects")
    out: dict[str, T] = {}
    for name in projects.data:
        out[name] = build(name, projects.table(name))
    projects.done()
    return out


def _kameleoon(t: _Table) -> KameleoonConfig:
    d = KameleoonConfig()
    flow = _flow(t.table("flow"), FlowConfig())

    def project(site_code: str, p: _Table) -> KameleoonProject:
        if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", site_code):
            raise ConfigError(p.path, "a Kameleoon siteCode is letters and digits")
        cid, csec = p.secret("client_id"), p.secret("client_secret")
        if bool(cid) != bool(csec):
            raise ConfigError(p.key("client_secret" if cid else "client_id"), "client_id and client_secret go together")
        kp = KameleoonProject(
            site_code=site_code,
            rules=_rules(p, Provider.KAMELEOON),
            base_url=_url(p, "base_url", "https://eu-data.kameleoon.io"),
            use_mapping_identifier=p.get_bool("use_mapping_identifier", False),
            client_id=cid,
            client_secret=csec,
            flow=_flow(p.table("flow"), flow),
        )
        p.done()
        return kp

    cfg = KameleoonConfig(
        user_agent=t.get_str("user_agent", d.user_agent),
        token_url=_url(t, "token_url", d.token_url),
        token_refresh_margin=t.duration("token_refresh_margin", d.token_refresh_margin),
        batch=_batch(t.table("batch"), d.batch),
        retry=_retry(t.table("retry")),
        projects=_projects(t, project),
    )
    if not cfg.user_agent.strip():
        raise ConfigError(t.key("user_agent"), "must not be empty: Kameleoon rejects requests without a User-Agent")
    t.done()
    return cfg


def _convert(t: _Table) -> ConvertConfig:
    d = ConvertConfig()
    # One request per conversion: throughput is concurrency / latency, so allow more requests at once.
    flow = _flow(t.table("flow"), FlowConfig(concurrency=64))

    def project(key: str, p: _Table) -> ConvertProject:
        m = re.fullmatch(r"(\d+)_(\d+)", key)
        if not m:
            raise ConfigError(p.path, "a Convert project key is the ID NUMBER 'accountid_projectid', e.g. '1111_2222'")
        account, proj = m.groups()
        api = p.get_str("api", "track")
        if api not in ("track", "v1"):
            raise ConfigError(p.key("api"), f"expected 'track' or 'v1', got {api!r}")
        host = "track" if api == "track" else "metrics"
        rules = _rules(p, Provider.CONVERT)
        tx = p.str_list("transaction_goals")
        for i, g in enumerate(tx):
            if g not in rules.goals:
                raise ConfigError(f"{p.key('transaction_goals')}[{i}]", f"goal {g} is not in goals")
        cp = ConvertProject(
            key=key,
            account_id=account,
            project_id=proj,
            rules=rules,
            base_url=_url(p, "base_url", f"https://{proj}.{host}.convertexperiments.com"),
            api=api,
            transaction_goals=tx,
            flow=_flow(p.table("flow"), flow),
        )
        p.done()
        return cp

    cfg = ConvertConfig(
        user_agent=t.get_str("user_agent", d.user_agent),
        batch=_batch(t.table("batch"), d.batch),
        retry=_retry(t.table("retry")),
        projects=_projects(t, project),
    )
    if any(p.api == "v1" for p in cfg.projects.values()) and not cfg.user_agent.startswith("ConvertAgent/"):
        raise ConfigError(t.key("user_agent"), "must start with 'ConvertAgent/': Convert silently drops other agents")
    t.done()
    return cfg


def _conductrics(t: _Table) -> ConductricsConfig:
    d = ConductricsConfig()
    flow = _flow(t.table("flow"), FlowConfig(concurrency=64))

    def project(key: str, p: _Table) -> ConductricsProject:
        session = p.get_str("session", "{vid}")
        try:
            session.format(vid="v", order_id="o", event_id="e")
        except (KeyError, IndexError, ValueError):
            raise ConfigError(p.key("session"), "a template using only {vid}, {order_id}, {event_id}") from None
        api_key = p.secret("api_key", required=True)
        assert api_key is not None
        dp = ConductricsProject(
            key=key,
            agent_api_url=_url(p, "agent_api_url", required=True),
            api_key=api_key,
            rules=_rules(p, Provider.CONDUCTRICS),
            session=session,
            flow=_flow(p.table("flow"), flow),
        )
        p.done()
        return dp

    cfg = ConductricsConfig(
        user_agent=t.get_str("user_agent", d.user_agent),
        retry=_retry(t.table("retry")),
        projects=_projects(t, project),
    )
    t.done()
    return cfg


def _matcher(t: _Table) -> MatcherConfig:
    d = MatcherConfig()
    rates_t = t.table("rates")
    rates: dict[tuple[str, str], Decimal] = {}
    for pair, v in rates_t.data.items():
        m = re.fullmatch(r"([A-Z]{3})[/_]([A-Z]{3})", pair)
        key = rates_t.key(pair)
        if not m:
            raise ConfigError(key, "a rate is named 'FROM/TO' with ISO 4217 codes, e.g. \"USD/EUR\" = 0.92")
        if isinstance(v, bool) or not isinstance(v, int | float | str):
            raise ConfigError(key, f"expected a decimal rate, got {v!r}")
        rate = _to_decimal(v, key)
        if rate <= 0:
            raise ConfigError(key, "a rate must be positive")
        rates[(m.group(1), m.group(2))] = rate
    cfg = MatcherConfig(
        clock_skew=t.duration("clock_skew", d.clock_skew),
        max_age=t.duration("max_age", d.max_age, positive=True),
        rates=rates,
    )
    t.done()
    return cfg


def parse(data: Mapping[str, Any], env: Mapping[str, str] | None = None, base_dir: Path | None = None) -> Config:
    """Validate a parsed TOML document into a Config."""
    root = _Table(data, "", os.environ if env is None else env)
    k = root.table("kafka")
    kafka = KafkaConfig(
        bootstrap_servers=k.get_str("bootstrap_servers", required=True),
        topic=k.get_str("topic", required=True),
        group_id=k.get_str("group_id", required=True),
        dlq_topic=k.get_str("dlq_topic", required=True),
        common=k.passthrough("common"),
        consumer=k.passthrough("consumer"),
        producer=k.passthrough("producer"),
    )
    if kafka.dlq_topic == kafka.topic:
        raise ConfigError("kafka.dlq_topic", "must differ from kafka.topic")
    for name in ("enable.auto.offset.store", "enable.auto.commit"):
        if name in kafka.consumer:
            raise ConfigError(f"kafka.consumer.{name}", "is managed by the service (offsets are stored only when done)")
    k.done()

    dt = root.table("decoding")
    fmt = dt.get_str("format", "avro")
    if fmt not in ("avro", "confluent"):
        raise ConfigError("decoding.format", f"expected 'avro' or 'confluent', got {fmt!r}")
    schema = Path(dt.get_str("schema", str(DEFAULT_SCHEMA)))
    if not schema.is_absolute():
        candidates = [(base_dir or Path.cwd()) / schema, Path.cwd() / schema, PACKAGE_ROOT.parent / schema]
        schema = next((c for c in candidates if c.exists()), candidates[0])
    if not schema.exists():
        schema = DEFAULT_SCHEMA if schema.name == DEFAULT_SCHEMA.name else schema
    if not schema.exists():
        raise ConfigError("decoding.schema", f"no such file: {str(schema)!r}")
    registry = dt.get_str("schema_registry_url", "")
    if fmt == "confluent" and not registry:
        raise ConfigError("decoding.schema_registry_url", "is required when format = \"confluent\"")
    decoding = DecodingConfig(
        format=fmt,
        schema=schema,
        schema_registry_url=registry.rstrip("/"),
        max_message_bytes=dt.get_int("max_message_bytes", DecodingConfig.max_message_bytes, minimum=64),
    )
    dt.done()

    mt = root.table("metrics")
    metrics = MetricsConfig(host=mt.get_str("host", "0.0.0.0"), port=mt.get_int("port", 9400, minimum=0, maximum=65535))
    mt.done()

    pt = root.table("pipeline")
    dp = PipelineConfig()
    pipeline = PipelineConfig(
        max_in_flight=pt.get_int("max_in_flight", dp.max_in_flight, minimum=1),
        poll_batch=pt.get_int("poll_batch", dp.poll_batch, minimum=1, maximum=100_000),
        commit_interval=pt.duration("commit_interval", dp.commit_interval, positive=True),
        shutdown_deadline=pt.duration("shutdown_deadline", dp.shutdown_deadline, positive=True),
        dlq_timeout=pt.duration("dlq_timeout", dp.dlq_timeout, positive=True),
        dedup_cache_size=pt.get_int("dedup_cache_size", dp.dedup_cache_size, minimum=0),
        gc_threshold=pt.get_int("gc_threshold", dp.gc_threshold, minimum=0),
    )
    pt.done()

    lt = root.table("logging")
    level = lt.get_str("level", "INFO").upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ConfigError("logging.level", f"expected DEBUG, INFO, WARNING or ERROR, got {level!r}")
    log_format = lt.get_str("format", "json")
    if log_format not in ("json", "text"):
        raise ConfigError("logging.format", f"expected 'json' or 'text', got {log_format!r}")
    lt.done()

    cfg = Config(
        kafka=kafka,
        decoding=decoding,
        metrics=metrics,
        pipeline=pipeline,
        logging=LoggingConfig(level=level, format=log_format),
        matcher=_matcher(root.table("matcher")),
        kameleoon=_kameleoon(root.table("kameleoon")),
        convert=_convert(root.table("convert")),
        conductrics=_conductrics(root.table("conductrics")),
    )
    root.done()
    if not (cfg.kameleoon.projects or cfg.convert.projects or cfg.conductrics.projects):
        raise ConfigError("kameleoon.projects", "no provider project is configured: nothing would ever be sent")
    return cfg


def load(path: str | Path, env: Mapping[str, str] | None = None) -> Config:
    """Read and validate a TOML config file."""
    p = Path(path)
    try:
        data = tomllib.loads(p.read_text())
    except OSError as exc:
        raise ConfigError("(file)", f"cannot read {str(p)!r}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("(file)", f"{str(p)!r} is not valid TOML: {exc}") from None
    return parse(data, env, base_dir=p.parent)
