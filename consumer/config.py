"""Load, interpolate and validate the TOML configuration; every error names its key."""

from __future__ import annotations

import difflib
import ipaddress
import json
import os
import re
import tomllib
import urllib.parse
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from consumer import group_protocol
from consumer.model import Attribution, Channel, Provider, RefundPolicy, RevenueShare
from consumer.tls import TlsFileError, client_context

T = TypeVar("T")

PACKAGE_ROOT = Path(__file__).resolve().parent
# An installed wheel carries the contract as consumer/schemas (see pyproject); a checkout has it at the top.
_SCHEMA_NAME = "purchase_completed.avsc"
DEFAULT_SCHEMA = next(
    (p for p in (PACKAGE_ROOT / "schemas" / _SCHEMA_NAME, PACKAGE_ROOT.parent / "schemas" / _SCHEMA_NAME)
     if p.exists()),
    PACKAGE_ROOT.parent / "schemas" / _SCHEMA_NAME,
)
DEFAULT_ADJUSTMENT_SCHEMA = DEFAULT_SCHEMA.parent / "order_adjusted.avsc"


class ConfigError(ValueError):
    """A configuration value is missing or invalid; `key` is its dotted path."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"config key '{key}': {message}")
        self.key = key
        self.message = message


class ConfigErrors(ConfigError):
    """Every problem found in one config, in the order they were met; `key` is the first one's."""

    def __init__(self, errors: Sequence[ConfigError]) -> None:
        ValueError.__init__(self, "\n".join(str(e) for e in errors))
        self.key = errors[0].key
        self.message = errors[0].message
        self.errors = tuple(errors)


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
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
PLACEHOLDER = "placeholder"


def dotted(path: str, name: str) -> str:
    """`path.name` as TOML writes it: a name with a dot or a slash is quoted (`kafka.consumer."linger.ms"`)."""
    part = name if _BARE_KEY.fullmatch(name) else json.dumps(name)
    return f"{path}.{part}" if path else part


class _Problems:
    """The errors found so far (the first per key), and what `${…}` put into values so no error shows it."""

    def __init__(self, env: Mapping[str, str], *, placeholders: bool = False) -> None:
        self.env = env
        self.placeholders = placeholders
        self.errors: dict[str, ConfigError] = {}
        self.substituted: dict[str, str] = {}  # a value that came from ${…} -> the reference, to show instead
        self.unjudged: set[str] = set()  # keys whose value is a placeholder (--no-env): not validated
        self.notes: list[ConfigError] = []  # warnings: the config is valid, but a key does not do what it did

    def add(self, err: ConfigError) -> None:
        if err.key.split("[", 1)[0] in self.unjudged:
            return  # a placeholder stands for a value we have not seen: nothing to say about it
        self.errors.setdefault(err.key, err)

    def discard(self, key: str) -> None:
        self.errors.pop(key, None)

    def under(self, prefix: str) -> bool:
        return any(k == prefix or k.startswith(prefix + ".") for k in self.errors)

    def interpolate(self, value: str, key: str) -> str:
        """Replace `${VAR}` with the environment variable and `${file:PATH}` with a file's content."""
        if "${" not in value:
            return value
        if self.placeholders:
            self.unjudged.add(key)

        def sub(m: re.Match[str]) -> str:
            ref = m.group(1)
            if self.placeholders:
                return PLACEHOLDER
            if ref.startswith("file:"):
                path = Path(ref[5:])
                try:
                    out = path.read_text().strip()
                except OSError as exc:
                    raise ConfigError(key, f"cannot read secret file {str(path)!r}: {exc.strerror}") from None
            elif not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", ref):
                raise ConfigError(key, f"'${{{ref}}}' is not a valid variable reference")
            elif ref not in self.env:
                raise ConfigError(key, f"environment variable {ref} is not set "
                                       "(check-config --no-env checks a file without its secrets)")
            else:
                out = self.env[ref]
            if out:
                self.substituted[out] = m.group(0)
            return out

        out = _VAR.sub(sub, value)
        if out and out != value:
            self.substituted[out] = value
        return out

    def scrub(self, text: str) -> str:
        """`text` with every value that came from `${…}` replaced by where it came from."""
        for value in sorted(self.substituted, key=len, reverse=True):
            ref = self.substituted[value]
            for quoted in (repr(value), json.dumps(value), f"'{value}'", f'"{value}"', f"`{value}`"):
                text = text.replace(quoted, f"the value from {ref}")
            if len(value) >= 4:  # shorter ones would match inside ordinary words; they are always quoted
                text = text.replace(value, ref)
        return text

    def clean(self, errors: Iterable[ConfigError]) -> list[ConfigError]:
        return [ConfigError(e.key, self.scrub(e.message)) for e in errors]

    def raise_if_any(self) -> None:
        if self.errors:
            raise ConfigErrors(self.clean(self.errors.values()))


class Table:
    """A TOML table being validated: typed getters that name the key, and no unknown keys.

    A getter that meets a bad value records the error and returns the default (or an empty value), so
    one pass finds every error; the config is never used when there is one.
    """

    def __init__(self, data: Mapping[str, Any], path: str, problems: _Problems) -> None:
        self.data = dict(data)
        self.path = path
        self.problems = problems
        self.used: set[str] = set()
        self.missing: set[str] = set()  # required keys that are absent

    def key(self, name: str) -> str:
        return dotted(self.path, name)

    def has(self, name: str) -> bool:
        return name in self.data

    def problem(self, key: str, message: str) -> None:
        self.problems.add(ConfigError(key, message))

    def note(self, key: str, message: str) -> None:
        """A warning about a valid key (`parse(..., warnings=)` and check-config show it)."""
        self.problems.notes.append(ConfigError(key, message))

    def failed(self, name: str) -> bool:
        """Whether `name` (or an item of it) has an error already."""
        key = self.key(name)
        return any(k == key or k.startswith(key + "[") for k in self.problems.errors)

    def _failed(self, exc: ConfigError, fallback: T) -> T:
        self.problems.add(exc)
        return fallback

    def interpolate(self, value: str, key: str) -> str:
        return self.problems.interpolate(value, key)

    def raw(self, name: str) -> Any:
        self.used.add(name)
        value = self.data.get(name)
        if isinstance(value, str):
            value = self.interpolate(value, self.key(name))
        return value

    def _get(self, name: str, default: Any, required: bool) -> Any:
        if name not in self.data:
            self.used.add(name)
            if required:
                self.missing.add(name)
                raise ConfigError(self.key(name), "is required")
            return default
        return self.raw(name)

    def get_str(self, name: str, default: str | None = None, *, required: bool = False) -> str:
        try:
            v = self._get(name, default, required)
            if not isinstance(v, str):
                raise ConfigError(self.key(name), f"expected a string, got {type(v).__name__}")
            return v
        except ConfigError as exc:
            return self._failed(exc, default or "")

    def opt_str(self, name: str) -> str | None:
        try:
            v = self._get(name, None, False)
            if v is None:
                return None
            if not isinstance(v, str):
                raise ConfigError(self.key(name), f"expected a string, got {type(v).__name__}")
            return v or None
        except ConfigError as exc:
            return self._failed(exc, None)

    def secret(self, name: str, *, required: bool = False) -> Secret | None:
        v = self.opt_str(name) if not required else self.get_str(name, required=True)
        if required and not v:
            self.problem(self.key(name), "must not be empty")
        return Secret(v) if v else None

    def get_int(self, name: str, default: int, *, minimum: int | None = None, maximum: int | None = None) -> int:
        try:
            v = self._get(name, default, False)
            if isinstance(v, bool) or not isinstance(v, int):
                raise ConfigError(self.key(name), f"expected an integer, got {v!r}")
            if minimum is not None and v < minimum:
                raise ConfigError(self.key(name), f"must be at least {minimum}, got {v}")
            if maximum is not None and v > maximum:
                raise ConfigError(self.key(name), f"must be at most {maximum}, got {v}")
            return v
        except ConfigError as exc:
            return self._failed(exc, default)

    def get_float(self, name: str, default: float | None, *, minimum: float = 0.0) -> float | None:
        try:
            v = self._get(name, default, False)
            if v is None:
                return None
            if isinstance(v, bool) or not isinstance(v, int | float):
                raise ConfigError(self.key(name), f"expected a number, got {v!r}")
            if v < minimum:
                raise ConfigError(self.key(name), f"must be at least {minimum}, got {v}")
            return float(v)
        except ConfigError as exc:
            return self._failed(exc, default)

    def get_bool(self, name: str, default: bool) -> bool:
        try:
            v = self._get(name, default, False)
            if not isinstance(v, bool):
                raise ConfigError(self.key(name), f"expected true or false, got {v!r}")
            return v
        except ConfigError as exc:
            return self._failed(exc, default)

    def duration(self, name: str, default: float, *, positive: bool = False) -> float:
        try:
            v = parse_duration(self._get(name, default, False), self.key(name))
            if positive and v <= 0:
                raise ConfigError(self.key(name), "must be greater than zero")
            return v
        except ConfigError as exc:
            return self._failed(exc, default)

    def decimal(self, name: str) -> Decimal | None:
        try:
            v = self._get(name, None, False)
            if v is None:
                return None
            if isinstance(v, bool) or not isinstance(v, int | float | str):
                raise ConfigError(self.key(name), f"expected a decimal number, got {v!r}")
            return _to_decimal(v, self.key(name))
        except ConfigError as exc:
            return self._failed(exc, None)

    def str_list(self, name: str, default: list[str] | None = None, *, required: bool = False) -> tuple[str, ...]:
        try:
            v = self._get(name, default if default is not None else [], required)
        except ConfigError as exc:
            return self._failed(exc, ())
        if not isinstance(v, list):
            return self._failed(ConfigError(self.key(name), f"expected a list, got {type(v).__name__}"), ())
        out = []
        for i, item in enumerate(v):
            key = f"{self.key(name)}[{i}]"
            if isinstance(item, bool) or not isinstance(item, str | int):
                self.problem(key, f"expected a string or integer, got {item!r}")
                continue
            try:
                s = self.interpolate(item, self.key(name)) if isinstance(item, str) else str(item)
            except ConfigError as exc:
                self.problems.add(exc)
                continue
            if not s:
                self.problem(key, "must not be empty")
                continue
            out.append(s)
        return tuple(out)

    def table(self, name: str) -> Table:
        self.used.add(name)
        v = self.data.get(name, {})
        if not isinstance(v, dict):
            self.problem(self.key(name), f"expected a table, got {type(v).__name__}")
            v = {}
        return Table(v, self.key(name), self.problems)

    def passthrough(self, name: str) -> dict[str, str | int | float | bool]:
        """A table of librdkafka properties, passed on as they are (strings interpolated)."""
        t = self.table(name)
        out: dict[str, str | int | float | bool] = {}
        for k, v in t.data.items():
            if not isinstance(v, str | int | float | bool):
                t.problem(t.key(k), f"expected a scalar librdkafka value, got {type(v).__name__}")
                continue
            if k in _CALLBACKS:
                t.problem(t.key(k), "is a confluent-kafka callback, set by the service itself")
                continue
            try:
                out[k] = self.interpolate(v, t.key(k)) if isinstance(v, str) else v
            except ConfigError as exc:
                self.problems.add(exc)
        return out

    def done(self) -> None:
        """Every key left unread is unknown: name it, with the known key it is closest to."""
        known = sorted(self.used)
        for name in self.data:
            if name in self.used:
                continue
            guess = difflib.get_close_matches(name, known, n=1, cutoff=0.7)
            if guess:
                message = f"unknown key {name!r} (did you mean {guess[0]!r}?)"
                # `groupid` for a missing `group_id`: the suggestion says it all, "is required" would mislead.
                if guess[0] in self.missing:
                    self.problems.discard(self.key(guess[0]))
            elif known and len(known) <= 16:
                message = f"unknown key {name!r} (the keys here: {', '.join(known)})"
            else:
                message = f"unknown key {name!r}"
            self.problem(self.key(name), message)


# confluent-kafka's Python-level settings: the service sets the ones it uses, and a TOML value cannot be one.
_CALLBACKS = frozenset({"logger", "error_cb", "stats_cb", "throttle_cb", "oauth_cb", "on_commit", "on_delivery",
                        "dr_cb", "dr_msg_cb", "default.topic.config"})


def _to_decimal(v: int | float | str, key: str) -> Decimal:
    try:
        d = Decimal(str(v))
    except InvalidOperation:
        raise ConfigError(key, f"expected a decimal number, got {v!r}") from None
    if not d.is_finite():
        raise ConfigError(key, f"expected a finite decimal number, got {v!r}")
    return d


# --------------------------------------------------------------------------- sections


ISOLATIONS = ("provider", "shared")


@dataclass(frozen=True)
class KafkaConfig:
    bootstrap_servers: str
    topic: str
    group_id: str
    dlq_topic: str
    common: dict[str, str | int | float | bool] = field(default_factory=dict)
    consumer: dict[str, str | int | float | bool] = field(default_factory=dict)
    producer: dict[str, str | int | float | bool] = field(default_factory=dict)
    # auto | consumer (KIP-848) | cooperative-sticky | eager: consumer/group_protocol.py
    group_protocol: str = "auto"
    # provider: a consumer group per provider, `<group_id>.<provider>` (consumer/groups.py); shared: one group,
    # `group_id`, for every provider (the layout before isolation: one provider's outage holds up the others).
    isolation: str = "provider"


@dataclass(frozen=True)
class TlsConfig:
    """Files of an HTTPS client: a CA bundle trusted instead of the system's, a client certificate and key."""

    ca_bundle: Path | None = None
    client_cert: Path | None = None
    client_key: Path | None = None  # None: the key is in client_cert's file
    client_key_password: Secret | None = None


@dataclass(frozen=True)
class HttpConfig:
    """[<provider>.http]: how one provider is reached. Without `proxy`, HTTPS_PROXY/HTTP_PROXY/NO_PROXY apply."""

    proxy: str | None = None  # http://host:port, without credentials (they are in proxy_username/password)
    proxy_username: Secret | None = None
    proxy_password: Secret | None = None
    tls: TlsConfig = TlsConfig()


@dataclass(frozen=True)
class SchemaRegistryConfig:
    """[decoding.schema_registry]: the registry client's auth, TLS and request timeout."""

    username: Secret | None = None
    password: Secret | None = None
    bearer_token: Secret | None = None
    timeout: float = 5.0
    tls: TlsConfig = TlsConfig()


@dataclass(frozen=True)
class DecodingConfig:
    format: str = "avro"
    schema: Path = DEFAULT_SCHEMA
    schema_registry_url: str = ""
    max_message_bytes: int = 1_048_576
    schema_registry: SchemaRegistryConfig = SchemaRegistryConfig()
    # The Avro symbols of the providers this config registers (built-in and [providers] modules): the
    # reader schema's Provider enum gets each one it lacks (consumer.decoding.with_providers).
    providers: tuple[str, ...] = ()


@dataclass(frozen=True)
class MetricsConfig:
    host: str = "0.0.0.0"
    port: int = 9400


@dataclass(frozen=True)
class ControlConfig:
    """[control]: the control plane (consumer/ops/): its compacted Kafka topic and its HTTP API."""

    enabled: bool = True  # false: no control topic, no API (pauses only by credentials, none by an operator)
    topic: str | None = None  # None: "<kafka.group_id>.control" (Config.control_topic)
    replication_factor: int | None = None  # of the topic when the service creates it; None: the broker's default
    host: str = "127.0.0.1"  # loopback: reach it with kubectl port-forward / exec, or set a token to bind wider
    port: int = 8083  # Kafka Connect's REST port; 0: any free port
    token: Secret | None = None  # a bearer token every request must carry when set
    start_timeout: float = 30.0  # reading the topic to its end at start-up


CONTROL_TOKEN_MIN = 16  # characters: a shorter bearer token is guessable


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
    """How transient failures are retried (consumer/retry.py), and how a project paused on refused
    credentials is probed (consumer/delivery.py)."""

    max_attempts: int = 8  # accepted from older configs, no longer ends retries (docs/operations.md)
    max_elapsed: float = 300.0  # accepted from older configs, no longer ends retries: see give_up_after
    base_delay: float = 0.2
    max_delay: float = 30.0
    give_up_after: float = 0.0  # seconds of transient failure before the DLQ; 0: never, wait for the provider
    auth_probe_interval: float = 30.0  # a project paused on refused credentials retries one request this often


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
    attribution: Attribution = Attribution.ALL  # the provider's default: its package's DEFAULT_MODEL
    revenue_share: RevenueShare = RevenueShare.FULL
    require_consent: bool = False  # send only when the event says the buyer consented to this provider
    # Order adjustments (consumer/adjustments.py); parse_rules gives each provider its default (its REFUNDS).
    refunds: RefundPolicy = RefundPolicy.SKIP


@dataclass(frozen=True)
class MatcherConfig:
    clock_skew: float = 300.0
    max_age: float = 90 * 86400.0
    rates: dict[tuple[str, str], Decimal] = field(default_factory=dict)  # (from, to) -> rate
    max_exposures: int = 100  # an event with more is dead-lettered whole (too_many_exposures)


@dataclass(frozen=True)
class LedgerConfig:
    """[ledger]: the conversion ledger (consumer/ledger/, docs/operations.md "The ledger")."""

    enabled: bool = True
    topic: str = ""  # "" until parsed: "<kafka.topic>.ledger"
    create: bool = True  # create the topic at start when missing (compacted, the source's partition count)
    replication_factor: int = -1  # at creation; -1: the broker's default.replication.factor
    topic_config: dict[str, str | int | float | bool] = field(default_factory=dict)  # at creation only
    write_timeout: float = 30.0  # librdkafka's message.timeout.ms for a record: then the service stops
    unattributed: bool = True  # also a record per purchase and project that got no conversion (the report's reasons)
    recovery_fallback: float = 3600.0  # read back this far when a commit carries no ledger offset
    max_recovery_records: int = 1_000_000
    recovery_timeout: float = 60.0
    verify_fraction: float = 0.0  # of delivered Kameleoon conversions checked with GET /visit/visitor; 0: off
    verify_delay: float = 2700.0  # after delivery; Kameleoon shows a conversion once the visit is processed (~30 min)
    verify_max_pending: int = 10_000  # checks waiting at once; more are not sampled (counted as "dropped")


@dataclass(frozen=True)
class AdjustmentsConfig:
    """[adjustments]: order adjustments (refunds, cancellations) and where they are read from."""

    enabled: bool = False
    topic: str = ""  # a topic of their own; "" = on the purchases topic, beside the purchases
    # Raw Avro on the purchases topic: the header naming the record type (Schema Registry: the writer's name).
    event_type_header: str = "event_type"
    orphan_wait: float = 600.0  # seconds an adjustment waits for its purchase before it is dead-lettered
    schema: Path = DEFAULT_ADJUSTMENT_SCHEMA


@dataclass(frozen=True)
class Config:
    kafka: KafkaConfig
    decoding: DecodingConfig = DecodingConfig()
    metrics: MetricsConfig = MetricsConfig()
    pipeline: PipelineConfig = PipelineConfig()
    logging: LoggingConfig = LoggingConfig()
    matcher: MatcherConfig = MatcherConfig()
    # slug -> that provider's parsed [<slug>] section (its package's config type), every registered provider
    providers: Mapping[str, Any] = field(default_factory=dict)
    provider_modules: tuple[str, ...] = ()  # [providers] modules: registered besides the built-in ones
    ledger: LedgerConfig = LedgerConfig()
    control: ControlConfig = ControlConfig()
    adjustments: AdjustmentsConfig = AdjustmentsConfig()

    def control_topic(self) -> str:
        """The control plane's compacted topic: `[control] topic`, by default `<kafka.group_id>.control`."""
        return self.control.topic or f"{self.kafka.group_id}.control"

    def rules(self) -> dict[tuple[Provider, str], Rules]:
        """Every configured provider project's rules, keyed by (provider, exposure project)."""
        from consumer.providers import registry  # the provider packages import this module

        return {(registry.spec_of(slug).provider, name): p.rules for slug, section in self.providers.items()
                for name, p in section.projects.items()}

    def secrets(self) -> list[str]:
        """Every secret's value, so tests and log filters can look for leaks."""
        out: list[str] = []
        for section in self.providers.values():
            out += section.secrets()
            http = section.http
            for s in (http.proxy_username, http.proxy_password, http.tls.client_key_password):
                out += [s.reveal()] if s else []
        # librdkafka's credentials: its log lines go through the same redacting logger.
        k = self.kafka
        out += [str(v) for section in (k.common, k.consumer, k.producer) for name, v in section.items()
                if _KAFKA_SECRET.search(name)]
        reg = self.decoding.schema_registry
        for s in (reg.username, reg.password, reg.bearer_token, reg.tls.client_key_password):
            out += [s.reveal()] if s else []
        if self.control.token:
            out.append(self.control.token.reveal())
        return [s for s in out if s]


_KAFKA_SECRET = re.compile(r"password|secret|ssl\.key\.pem|ssl_key|private\.key|sasl\.oauthbearer\.config")


# --------------------------------------------------------------------------- parsing

_HOST_LABEL = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_-]*[A-Za-z0-9_])?")


def url_problem(url: str) -> str | None:
    """What is wrong with an http(s) URL, or None: a space anywhere, no host, a bad host or port."""
    if any(c.isspace() or ord(c) < 32 for c in url):
        return "contains a space or a control character"
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        return f"is not a valid URL ({exc})"
    if parts.scheme not in ("http", "https") or not parts.netloc:
        return "expected an http(s) URL like 'https://host/path'"
    host = parts.hostname or ""
    if not host:
        return "has no host"
    if ":" in host:  # a bracketed IPv6 literal
        try:
            ipaddress.IPv6Address(host.split("%", 1)[0])
        except ValueError:
            return f"has an invalid IPv6 host {host!r}"
    elif not all(_HOST_LABEL.fullmatch(label) for label in host.rstrip(".").split(".")):
        return f"has an invalid host {host!r}"
    if port == 0:
        return "has port 0"
    return None


def shown_url(url: str) -> str:
    """`url` as an error may print it: no credentials from its user-info part."""
    scheme, sep, rest = url.partition("://")
    netloc, slash, path = rest.partition("/")
    if sep and "@" in netloc:
        netloc = "***@" + netloc.rsplit("@", 1)[1]
    return repr(f"{scheme}{sep}{netloc}{slash}{path}")


def parse_url(t: Table, name: str, default: str | None = None, *, required: bool = False,
         optional: bool = False) -> str:
    """An http(s) URL without its trailing slash; `optional`: the empty string is allowed (not set)."""
    v = t.get_str(name, default, required=required)
    if t.failed(name) or (optional and not v):
        return v
    problem = url_problem(v)
    if problem:
        t.problem(t.key(name), f"{problem}: {shown_url(v)}")
    return v.rstrip("/")


def parse_rules(t: Table, window: float, attribution: Attribution = Attribution.ALL,
                revenue_share: RevenueShare = RevenueShare.FULL,
                refunds: tuple[RefundPolicy, ...] = (RefundPolicy.SKIP,)) -> Rules:
    """The matcher's rules of one project table; `window`, `attribution`, `revenue_share`: the provider's defaults.

    `refunds`: the policies the provider can apply to an order adjustment, its default first (a provider
    that documents no way to take a conversion back has only `skip`).
    """
    goals = t.str_list("goals", required=True)
    if not goals and not t.failed("goals"):
        t.problem(t.key("goals"), "must name at least one goal")
    channels = t.str_list("channels", [c.value for c in Channel])
    for i, c in enumerate(channels):
        if c.upper() not in Channel.__members__:
            t.problem(f"{t.key('channels')}[{i}]", f"unknown channel {c!r} (one of {', '.join(Channel)})")
    currency = t.opt_str("currency")
    if currency is not None and not re.fullmatch(r"[A-Z]{3}", currency):
        t.problem(t.key("currency"), f"expected an ISO 4217 code like 'EUR', got {currency!r}")
    allow, deny = t.str_list("experiments_allow"), t.str_list("experiments_deny")
    if allow and deny:
        t.problem(t.key("experiments_deny"), "set experiments_allow or experiments_deny, not both")
    return Rules(
        goals=goals,
        attribution_window=t.duration("attribution_window", window, positive=True),
        currency=currency,
        channels=tuple(Channel(c.upper()) for c in channels if c.upper() in Channel.__members__),
        experiments_allow=allow,
        experiments_deny=deny,
        min_revenue=t.decimal("min_revenue"),
        send_revenue=t.get_bool("send_revenue", True),
        attribution=_choice(t, "attribution", Attribution, attribution),
        revenue_share=_choice(t, "revenue_share", RevenueShare, revenue_share),
        require_consent=t.get_bool("require_consent", False),
        refunds=_refunds(t, refunds),
    )


def _refunds(t: Table, allowed: tuple[RefundPolicy, ...]) -> RefundPolicy:
    """`refunds` of a project: one of the provider's `allowed` policies (the first is its default)."""
    v = t.get_str("refunds", allowed[0].value)
    if v in (p.value for p in allowed):
        return RefundPolicy(v)
    if not t.failed("refunds"):
        if v in (p.value for p in RefundPolicy):
            section = t.path.split(".", 1)[0]  # the provider's [<slug>] section
            t.problem(t.key("refunds"), f"{section} documents no way to take a conversion back: "
                                        f"only {', '.join(repr(p.value) for p in allowed)}")
        else:
            t.problem(t.key("refunds"), f"expected one of {', '.join(repr(p.value) for p in allowed)}, got {v!r}")
    return allowed[0]


def integer_goals(t: Table, rules: Rules, slug: str) -> None:
    """For a provider whose goal ids are integers (Kameleoon, Convert): name each one that is not."""
    for i, g in enumerate(rules.goals):
        if not g.isdigit():
            t.problem(f"{t.key('goals')}[{i}]", f"{slug} goal ids are integers, got {g!r}")


E = TypeVar("E", Attribution, RevenueShare)


def _choice(t: Table, name: str, kind: type[E], default: E) -> E:
    """One of a string enum's values, exactly as written (`"last_touch"`)."""
    v = t.get_str(name, default.value)
    try:
        return kind(v)
    except ValueError:
        if not t.failed(name):
            t.problem(t.key(name), f"expected one of {', '.join(repr(c.value) for c in kind)}, got {v!r}")
        return default


def parse_batch(t: Table, default: BatchConfig) -> BatchConfig:
    b = BatchConfig(
        max_events=t.get_int("max_events", default.max_events, minimum=1),
        max_bytes=t.get_int("max_bytes", default.max_bytes, minimum=1024, maximum=3_000_000),
        linger=t.duration("linger", default.linger),
    )
    t.done()
    return b


def parse_retry(t: Table) -> RetryConfig:
    d = RetryConfig()
    r = RetryConfig(
        max_attempts=t.get_int("max_attempts", d.max_attempts, minimum=1),
        max_elapsed=t.duration("max_elapsed", d.max_elapsed, positive=True),
        base_delay=t.duration("base_delay", d.base_delay),
        max_delay=t.duration("max_delay", d.max_delay),
        give_up_after=t.duration("give_up_after", d.give_up_after),
        auth_probe_interval=t.duration("auth_probe_interval", d.auth_probe_interval, positive=True),
    )
    if r.max_delay < r.base_delay:
        t.problem(t.key("max_delay"), "must not be below base_delay")
    if 0 < r.give_up_after < r.base_delay and not t.failed("give_up_after"):
        t.problem(t.key("give_up_after"), f"must be 0s (never give up) or at least base_delay "
                                          f"({r.base_delay:g}s), got {r.give_up_after:g}s")
    for legacy in ("max_attempts", "max_elapsed"):
        if t.has(legacy) and not t.failed(legacy):
            # A config written when these ended retries still loads; say what it now means instead.
            t.note(t.key(legacy), "no longer dead-letters a conversion: transient failures are retried until "
                                  "the provider answers, or for give_up_after when set (docs/operations.md)")
    t.done()
    return r


def parse_flow(t: Table, default: FlowConfig) -> FlowConfig:
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


def _tls(t: Table) -> TlsConfig:
    """ca_bundle, client_cert, client_key, client_key_password: each file checked (exists, readable, PEM)."""

    def path(name: str) -> Path | None:
        v = t.opt_str(name)
        return None if v is None else Path(v)

    tls = TlsConfig(path("ca_bundle"), path("client_cert"), path("client_key"), t.secret("client_key_password"))
    if tls == TlsConfig():
        return tls
    try:
        password = tls.client_key_password.reveal() if tls.client_key_password else None
        client_context(tls.ca_bundle, tls.client_cert, tls.client_key, password)
    except TlsFileError as exc:
        raise ConfigError(t.key(exc.field), exc.message) from None
    return tls


def parse_http(t: Table) -> HttpConfig:
    """[<provider>.http]: an explicit egress proxy (its credentials kept secret) and TLS files."""
    user, password = t.secret("proxy_username"), t.secret("proxy_password")
    proxy = t.opt_str("proxy")
    if proxy is None:
        if user or password:
            raise ConfigError(t.key("proxy_username" if user else "proxy_password"), "is set without proxy")
    else:
        # The value may hold credentials: no message below shows it.
        try:
            parts = urllib.parse.urlsplit(proxy)
            port = parts.port
        except ValueError:
            parts, port = None, None
        if parts is None or parts.scheme != "http" or not parts.hostname or not port or parts.path not in ("", "/") \
                or parts.query or parts.fragment or re.search(r"\s", proxy):
            raise ConfigError(t.key("proxy"), "expected http://host:port (an HTTPS target is tunnelled with CONNECT); "
                                              "the value is not shown as it may hold credentials")
        if parts.username is not None:
            if user or password:
                raise ConfigError(t.key("proxy"), "has credentials and so do proxy_username/proxy_password: use one")
            user = Secret(urllib.parse.unquote(parts.username))
            password = Secret(urllib.parse.unquote(parts.password or ""))
        elif password and not user:
            raise ConfigError(t.key("proxy_password"), "is set without proxy_username")
        host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
        proxy = f"http://{host}:{port}"
    http = HttpConfig(proxy=proxy, proxy_username=user, proxy_password=password, tls=_tls(t))
    t.done()
    return http


def _schema_registry(t: Table, url: str) -> SchemaRegistryConfig:
    """[decoding.schema_registry]: basic auth or a bearer token (not both), TLS files, the request timeout."""
    user, password, token = t.secret("username"), t.secret("password"), t.secret("bearer_token")
    try:
        in_url = urllib.parse.urlsplit(url).username is not None
    except ValueError:  # a malformed URL is reported by the registry client, naming schema_registry_url
        in_url = False
    if password and not user:
        raise ConfigError(t.key("password"), "is set without username")
    if user and in_url:
        raise ConfigError(t.key("username"), "the schema_registry_url has credentials too: use one")
    if token and (user or in_url):
        raise ConfigError(t.key("bearer_token"), "set a bearer_token or basic auth credentials, not both")
    cfg = SchemaRegistryConfig(username=user, password=password, bearer_token=token,
                               timeout=t.duration("timeout", SchemaRegistryConfig.timeout, positive=True), tls=_tls(t))
    t.done()
    return cfg


def parse_projects(t: Table, build: Callable[[str, Table], T]) -> dict[str, T]:
    projects = t.table("projects")
    out: dict[str, T] = {}
    for name in projects.data:
        out[name] = build(name, projects.table(name))
    projects.done()
    return out


def _matcher(t: Table) -> MatcherConfig:
    d = MatcherConfig()
    rates_t = t.table("rates")
    rates: dict[tuple[str, str], Decimal] = {}
    for pair in rates_t.data:
        m = re.fullmatch(r"([A-Z]{3})[/_]([A-Z]{3})", pair)
        key = rates_t.key(pair)
        v = rates_t.raw(pair)  # a string may be ${VAR}, as everywhere
        if not m:
            rates_t.problem(key, "a rate is named 'FROM/TO' with ISO 4217 codes, e.g. \"USD/EUR\" = 0.92")
        elif isinstance(v, bool) or not isinstance(v, int | float | str):
            rates_t.problem(key, f"expected a decimal rate, got {v!r}")
        else:
            try:
                rate = _to_decimal(v, key)
            except ConfigError as exc:
                rates_t.problems.add(exc)
                continue
            if rate <= 0:
                rates_t.problem(key, "a rate must be positive")
            rates[(m.group(1), m.group(2))] = rate
    cfg = MatcherConfig(
        clock_skew=t.duration("clock_skew", d.clock_skew),
        max_age=t.duration("max_age", d.max_age, positive=True),
        rates=rates,
        max_exposures=t.get_int("max_exposures", d.max_exposures, minimum=1),
    )
    t.done()
    return cfg


def _kafka(k: Table) -> KafkaConfig:
    kafka = KafkaConfig(
        bootstrap_servers=k.get_str("bootstrap_servers", required=True),
        topic=k.get_str("topic", required=True),
        group_id=k.get_str("group_id", required=True),
        dlq_topic=k.get_str("dlq_topic", required=True),
        common=k.passthrough("common"),
        consumer=k.passthrough("consumer"),
        producer=k.passthrough("producer"),
        group_protocol=k.get_str("group_protocol", "auto"),
        isolation=k.get_str("isolation", "provider"),
    )
    if kafka.isolation not in ISOLATIONS:
        k.problem(k.key("isolation"), f"expected one of {', '.join(ISOLATIONS)}, got {kafka.isolation!r}")
    if kafka.group_protocol not in group_protocol.CHOICES:
        k.problem(k.key("group_protocol"), f"expected one of {', '.join(group_protocol.CHOICES)}, "
                                           f"got {kafka.group_protocol!r}")
    else:
        try:
            group_protocol.check(kafka.group_protocol, kafka.consumer)
        except group_protocol.GroupProtocolError as exc:
            k.problem(dotted(k.key("consumer"), exc.key), str(exc))
    if kafka.dlq_topic == kafka.topic:
        k.problem(k.key("dlq_topic"), "must differ from kafka.topic")
    for name in ("enable.auto.offset.store", "enable.auto.commit"):
        if name in kafka.consumer:
            k.problem(dotted(k.key("consumer"), name), "is managed by the service (offsets are stored only when done)")
    k.done()
    return kafka


def _ledger(t: Table, kafka: KafkaConfig) -> LedgerConfig:
    d = LedgerConfig()
    ledger = LedgerConfig(
        enabled=t.get_bool("enabled", d.enabled),
        topic=t.get_str("topic", f"{kafka.topic}.ledger"),
        create=t.get_bool("create", d.create),
        replication_factor=t.get_int("replication_factor", d.replication_factor, minimum=-1),
        topic_config=t.passthrough("topic_config"),
        write_timeout=t.duration("write_timeout", d.write_timeout, positive=True),
        unattributed=t.get_bool("unattributed", d.unattributed),
        recovery_fallback=t.duration("recovery_fallback", d.recovery_fallback),
        max_recovery_records=t.get_int("max_recovery_records", d.max_recovery_records, minimum=1),
        recovery_timeout=t.duration("recovery_timeout", d.recovery_timeout, positive=True),
        verify_fraction=t.get_float("verify_fraction", d.verify_fraction) or 0.0,
        verify_delay=t.duration("verify_delay", d.verify_delay),
        verify_max_pending=t.get_int("verify_max_pending", d.verify_max_pending, minimum=1),
    )
    if ledger.topic in (kafka.topic, kafka.dlq_topic):
        t.problem(t.key("topic"), "must differ from kafka.topic and kafka.dlq_topic")
    if not 0.0 <= ledger.verify_fraction <= 1.0:
        t.problem(t.key("verify_fraction"), f"must be between 0 and 1, got {ledger.verify_fraction}")
    if ledger.replication_factor == 0:
        t.problem(t.key("replication_factor"), "must be at least 1, or -1 for the broker's default")
    policy = str(ledger.topic_config.get("cleanup.policy", "compact"))
    if "compact" not in policy:
        t.problem(dotted(t.key("topic_config"), "cleanup.policy"),
                  "must include compact: the ledger keeps the latest outcome per conversion key")
    t.done()
    return ledger


def _adjustments(t: Table, kafka: KafkaConfig, base_dir: Path | None) -> AdjustmentsConfig:
    d = AdjustmentsConfig()
    schema = Path(t.get_str("schema", str(d.schema)))
    if not schema.is_absolute():
        candidates = [(base_dir or Path.cwd()) / schema, Path.cwd() / schema, PACKAGE_ROOT.parent / schema]
        schema = next((c for c in candidates if c.exists()), candidates[0])
    if not schema.exists() and not t.failed("schema"):
        t.problem(t.key("schema"), f"no such file: {str(schema)!r}")
    cfg = AdjustmentsConfig(
        enabled=t.get_bool("enabled", d.enabled),
        topic=t.get_str("topic", d.topic),
        event_type_header=t.get_str("event_type_header", d.event_type_header),
        orphan_wait=t.duration("orphan_wait", d.orphan_wait),
        schema=schema,
    )
    if cfg.topic and cfg.topic in (kafka.topic, kafka.dlq_topic):
        t.problem(t.key("topic"), "must differ from kafka.topic and kafka.dlq_topic (leave it out to read "
                                  "adjustments from the purchases topic)")
    if not cfg.event_type_header.strip() and not t.failed("event_type_header"):
        t.problem(t.key("event_type_header"), "must not be empty")
    t.done()
    return cfg


_TOPIC_NAME = re.compile(r"[A-Za-z0-9._-]{1,249}")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _control(t: Table, kafka: KafkaConfig, metrics: MetricsConfig) -> ControlConfig:
    """[control]: the topic (a legal Kafka name, not the source or the DLQ), where the API listens, its token."""
    d = ControlConfig()
    topic = t.opt_str("topic")
    if topic is not None and (not _TOPIC_NAME.fullmatch(topic) or topic in (".", "..")):
        t.problem(t.key("topic"), f"{topic!r} is not a Kafka topic name (letters, digits, '.', '_', '-'; "
                                  "at most 249)")
    for other, key in ((kafka.topic, "kafka.topic"), (kafka.dlq_topic, "kafka.dlq_topic")):
        if other and (topic or f"{kafka.group_id}.control") == other:
            t.problem(t.key("topic"), f"must differ from {key}")
    rf: int | None = None
    if t.has("replication_factor"):
        rf = t.get_int("replication_factor", 1, minimum=1, maximum=32767)
    host = t.get_str("host", d.host)
    if not host.strip() and not t.failed("host"):
        t.problem(t.key("host"), "must not be empty (127.0.0.1 keeps the API on this machine)")
    port = t.get_int("port", d.port, minimum=0, maximum=65535)
    if port and port == metrics.port and not t.failed("port"):
        t.problem(t.key("port"), f"must differ from metrics.port ({metrics.port})")
    token = t.secret("token")
    if token is not None and len(token.reveal()) < CONTROL_TOKEN_MIN:
        t.problem(t.key("token"), f"must be at least {CONTROL_TOKEN_MIN} characters (the value is not shown)")
    if host.strip() and not _is_loopback(host) and token is None and not t.failed("token"):
        t.problem(t.key("token"), f"is required when control.host ({host!r}) is not a loopback address: "
                                  "anyone who reaches the port could pause deliveries")
    cfg = ControlConfig(enabled=t.get_bool("enabled", d.enabled), topic=topic, replication_factor=rf, host=host,
                        port=port, token=token,
                        start_timeout=t.duration("start_timeout", d.start_timeout, positive=True))
    t.done()
    return cfg


def _parse(root: Table, base_dir: Path | None) -> Config:
    kafka = _kafka(root.table("kafka"))

    dt = root.table("decoding")
    fmt = dt.get_str("format", "avro")
    if fmt not in ("avro", "confluent"):
        dt.problem(dt.key("format"), f"expected 'avro' or 'confluent', got {fmt!r}")
    schema = Path(dt.get_str("schema", str(DEFAULT_SCHEMA)))
    if not schema.is_absolute():
        candidates = [(base_dir or Path.cwd()) / schema, Path.cwd() / schema, PACKAGE_ROOT.parent / schema]
        schema = next((c for c in candidates if c.exists()), candidates[0])
    if not schema.exists() and (DEFAULT_SCHEMA.parent / schema.name).exists():
        # A contract the package ships (the current one, or an earlier one to pin for raw Avro producers).
        schema = DEFAULT_SCHEMA.parent / schema.name
    if not schema.exists() and not dt.failed("schema"):
        dt.problem(dt.key("schema"), f"no such file: {str(schema)!r}")
    registry = parse_url(dt, "schema_registry_url", "", optional=True)
    if fmt == "confluent" and not registry and not dt.failed("schema_registry_url"):
        dt.problem(dt.key("schema_registry_url"), "is required when format = \"confluent\"")
    decoding = DecodingConfig(
        format=fmt,
        schema=schema,
        schema_registry_url=registry.rstrip("/"),
        max_message_bytes=dt.get_int("max_message_bytes", DecodingConfig.max_message_bytes, minimum=64),
        schema_registry=_schema_registry(dt.table("schema_registry"), registry),
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
        lt.problem(lt.key("level"), f"expected DEBUG, INFO, WARNING or ERROR, got {level!r}")
    log_format = lt.get_str("format", "json")
    if log_format not in ("json", "text"):
        lt.problem(lt.key("format"), f"expected 'json' or 'text', got {log_format!r}")
    lt.done()

    ledger = _ledger(root.table("ledger"), kafka)
    adjustments = _adjustments(root.table("adjustments"), kafka, base_dir)
    extra, sections = _providers(root)
    cfg = Config(
        kafka=kafka,
        decoding=replace(decoding, providers=tuple(s.provider.value for s in _specs(extra))),
        metrics=metrics,
        pipeline=pipeline,
        logging=LoggingConfig(level=level, format=log_format),
        matcher=_matcher(root.table("matcher")),
        providers=sections,
        provider_modules=extra,
        ledger=ledger,
        control=_control(root.table("control"), kafka, metrics),
        adjustments=adjustments,
    )
    root.done()
    if not any(section.projects for section in sections.values()):
        first = next(iter(sections), "providers")
        root.problem(dotted(first, "projects"), "no provider project is configured: nothing would ever be sent")
    return cfg


def _specs(extra: Sequence[str]) -> tuple[Any, ...]:
    from consumer.providers import registry

    return registry.specs(extra)


def _providers(root: Table) -> tuple[tuple[str, ...], dict[str, Any]]:
    """[providers] modules (registered first), then every registered provider's [<slug>] section."""
    # Imported here: the provider packages import this module for Table, Rules and the shared parsers.
    from consumer.providers import registry

    pt = root.table("providers")
    extra = pt.str_list("modules")
    loaded = []
    for i, module in enumerate(extra):
        try:
            registry.load(module)
            loaded.append(module)
        except registry.ProviderModuleError as exc:
            pt.problem(f"{pt.key('modules')}[{i}]", exc.message)
    pt.done()
    extra = tuple(loaded)
    sections: dict[str, Any] = {}
    for spec in registry.specs(extra):
        t = root.table(spec.slug)
        sections[spec.slug] = spec.parse(t)
    return extra, sections


# Builds the Kafka clients from a parsed config without connecting: (errors, warnings), each naming a key.
ClientCheck = Callable[[Config], tuple[Sequence[ConfigError], Sequence[ConfigError]]]


def parse(data: Mapping[str, Any], env: Mapping[str, str] | None = None, base_dir: Path | None = None, *,
          placeholders: bool = False, check: ClientCheck | None = None,
          warnings: list[ConfigError] | None = None) -> Config:
    """Validate a parsed TOML document into a Config; raises ConfigErrors naming every bad key at once.

    `placeholders`: `${…}` are not read but replaced by a placeholder, and the values they stand for are
    not judged (checking a file before its secrets exist). `check` also validates the Kafka clients'
    settings; its warnings are appended to `warnings`. No message ever shows a value that came from `${…}`.
    """
    problems = _Problems(os.environ if env is None else env, placeholders=placeholders)
    cfg = _parse(Table(data, "", problems), base_dir)
    # The clients are built from the librdkafka tables: not on top of an error in one of them.
    if check is not None and not any(problems.under(f"kafka.{t}") for t in ("common", "consumer", "producer")):
        errors, notes = check(cfg)
        for err in errors:
            problems.add(err)
        if warnings is not None:
            warnings.extend(problems.clean(notes))
    problems.raise_if_any()
    if warnings is not None:
        warnings.extend(problems.clean(problems.notes))
    return cfg


def load(path: str | Path, env: Mapping[str, str] | None = None, *, placeholders: bool = False,
         check: ClientCheck | None = None, warnings: list[ConfigError] | None = None) -> Config:
    """Read and validate a TOML config file (see `parse`)."""
    p = Path(path)
    try:
        data = tomllib.loads(p.read_text())
    except OSError as exc:
        raise ConfigError("(file)", f"cannot read {str(p)!r}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("(file)", f"{str(p)!r} is not valid TOML: {exc}") from None
    return parse(data, env, base_dir=p.parent, placeholders=placeholders, check=check, warnings=warnings)
