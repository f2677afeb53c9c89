"""What the sandbox records and how it is told to fail: records, request log entries, fault specs."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import random
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from consumer.sandbox.emulator import json_status_names, provider_names

ANY = "*"  # a fault or profile for every provider


def _json_default(obj: object) -> object:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    if isinstance(obj, frozenset | set):
        return sorted(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")


try:
    import orjson

    def _dumps(obj: Any) -> bytes:
        return orjson.dumps(obj, default=_json_default)

    def _loads(data: bytes | str) -> Any:
        return orjson.loads(data)

except ImportError:  # pragma: no cover - orjson is optional

    def _dumps(obj: Any) -> bytes:
        return json.dumps(obj, default=_json_default, separators=(",", ":")).encode()

    def _loads(data: bytes | str) -> Any:
        return json.loads(data)


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


_APIKEY = re.compile(r"(^|&)(apikey=)[^&]*")
REDACTED = "REDACTED"

def redact_query(query: str) -> str:
    """The query string with any `apikey` value replaced by REDACTED."""
    return _APIKEY.sub(rf"\g<1>\g<2>{REDACTED}", query) if "apikey" in query else query


# --------------------------------------------------------------------------- records


@dataclass(frozen=True, slots=True)
class Record:
    """One conversion a provider accepted (or, in `dropped` / `unrewarded`, answered 200 for but did not count)."""

    provider: str  # kameleoon | convert | conductrics
    api: str  # visit/events | track | v1/track | agent-api
    project: str  # Kameleoon siteCode, Convert "account_project", Conductrics account
    visitor: str  # visitorCode / mappingValue, Convert vi / visitorId, Conductrics vid ("" when not sent)
    identity: str  # "visitor", or "mapping" for a Kameleoon mappingValue
    goals: tuple[str, ...]
    revenue: float | None
    key: str  # what `duplicates()` groups by
    query: str  # the raw query string, apikey redacted
    time: float  # epoch seconds when accepted
    request_id: int  # index into `requests`: the records of one request share it
    nonce: str | None = None
    event_type: str | None = None
    negative: bool = False
    metadata: Any = None
    transaction_id: str | None = None
    transaction_goals: tuple[str, ...] = ()
    products_count: int | None = None
    experiment_id: str | None = None
    variation_id: str | None = None
    bucketing: tuple[tuple[str, str], ...] = ()
    session: str | None = None
    user_agent: str | None = None


@dataclass(frozen=True, slots=True)
class RequestEntry:
    """One request the sandbox received, faulted or not."""

    id: int
    provider: str
    method: str
    path: str
    query: str  # apikey redacted
    status: int  # HTTP status sent; 0 when the connection was reset or hung without an answer
    outcome: str  # accepted | dropped | rejected | fault:<kind>
    time: float
    error: str | None = None  # the field named in a 400, or what went wrong


# --------------------------------------------------------------------------- faults


FAULT_KINDS = frozenset({"status", "hang", "reset", "json_status"})


@dataclass(frozen=True, slots=True)
class Fault:
    """A transient failure for the next `times` requests to `provider` (None: until cleared).

    kinds: `status` answers HTTP `status` (with `Retry-After: retry_after` when set); `hang` holds the request
    `seconds` (default: the sandbox's hang_seconds) then closes the connection without an answer; `reset`
    closes the connection at once without an answer; `json_status` (an emulator with `json_status_faults`)
    answers HTTP 200 with a JSON `status` of `status`. With `probability` < 1 each request is faulted with
    that chance, drawn from a random generator seeded with `seed`. With `duration` the fault ends by itself
    that many seconds after it was added (an outage of a known length: `times=None, duration=5` is "down for
    5 s"), or after `times` requests, whichever comes first.
    """

    provider: str
    kind: str = "status"
    status: int = 503
    times: int | None = 1
    probability: float = 1.0
    retry_after: str | None = None
    seconds: float | None = None
    seed: int = 0
    duration: float | None = None

    def __post_init__(self) -> None:
        names = provider_names()
        if self.provider not in names and self.provider != ANY:
            raise ValueError(f"fault provider must be one of {', '.join(names)} or '*', got {self.provider!r}")
        if self.kind not in FAULT_KINDS:
            raise ValueError(f"fault kind must be one of {', '.join(sorted(FAULT_KINDS))}, got {self.kind!r}")
        if self.kind == "json_status" and self.provider not in json_status_names():
            raise ValueError(f"a json_status fault applies to {', '.join(json_status_names())} only")
        if not 0.0 <= self.probability <= 1.0:
            raise ValueError(f"fault probability must be between 0 and 1, got {self.probability}")
        if self.times is not None and self.times < 0:
            raise ValueError("fault times cannot be negative")
        if not 100 <= self.status <= 599:
            raise ValueError(f"fault status must be an HTTP status, got {self.status}")
        if self.duration is not None and not (math.isfinite(self.duration) and self.duration > 0):
            raise ValueError(f"fault duration must be a positive number of seconds, got {self.duration}")


class _ActiveFault:
    __slots__ = ("fault", "remaining", "rng", "until")

    def __init__(self, fault: Fault, now: float) -> None:
        self.fault = fault
        self.remaining = fault.times
        self.rng = random.Random(fault.seed)
        self.until = None if fault.duration is None else now + fault.duration  # on time.monotonic


class SpecError(ValueError):
    """A fault spec sent to the sandbox is invalid."""


# --------------------------------------------------------------------------- latency profiles

OVER_CAPACITY = frozenset({"reject", "queue"})
_Z99 = 2.3263478740408408  # the standard normal's 99th percentile


@dataclass(frozen=True, slots=True)
class Profile:
    """How one provider answers under load: log-normal latency, a capacity, and a random 5xx rate.

    Latency is drawn from the log-normal distribution with this `median` and `p99` (seconds; p99 None or
    equal to the median: always the median). At most `capacity` requests are served at once (None: no
    limit); a request beyond it is answered 429 with `Retry-After: retry_after` at once
    (`over_capacity="reject"`) or waits for a free place (`"queue"`: the provider slows down). A served
    request fails with `error_status` with probability `error_rate`. Draws come from a generator seeded
    with `seed`, so a run sees the same sequence of latencies and errors each time.
    """

    provider: str
    median: float = 0.12
    p99: float | None = None
    capacity: int | None = None
    over_capacity: str = "reject"
    retry_after: str | None = "1"
    error_rate: float = 0.0
    error_status: int = 503
    seed: int = 0

    def __post_init__(self) -> None:
        names = provider_names()
        if self.provider not in names:
            raise ValueError(f"profile provider must be one of {', '.join(names)}, got {self.provider!r}")
        if not (math.isfinite(self.median) and self.median >= 0):
            raise ValueError(f"profile median must be a non-negative number of seconds, got {self.median}")
        if self.p99 is not None and not (math.isfinite(self.p99) and self.p99 >= self.median):
            raise ValueError(f"profile p99 must be at least the median ({self.median}), got {self.p99}")
        if self.p99 is not None and self.p99 > self.median and self.median == 0:
            raise ValueError("a profile with a p99 needs a median above 0")
        if self.capacity is not None and self.capacity < 1:
            raise ValueError(f"profile capacity must be at least 1, got {self.capacity}")
        if self.over_capacity not in OVER_CAPACITY:
            raise ValueError(f"profile over_capacity must be 'reject' or 'queue', got {self.over_capacity!r}")
        if not 0.0 <= self.error_rate <= 1.0:
            raise ValueError(f"profile error_rate must be between 0 and 1, got {self.error_rate}")
        if not 500 <= self.error_status <= 599:
            raise ValueError(f"profile error_status must be a 5xx status, got {self.error_status}")

    @property
    def sigma(self) -> float:
        """The log-normal's shape: ln(p99 / median) / z(0.99)."""
        return 0.0 if self.p99 is None or self.median == 0 else math.log(self.p99 / self.median) / _Z99

    @property
    def mean(self) -> float:
        """The mean latency, median * exp(sigma^2 / 2): capacity / mean is the most requests per second."""
        return self.median * math.exp(self.sigma**2 / 2)

    def draw(self, rng: random.Random) -> float:
        sigma = self.sigma
        return self.median if sigma == 0 else self.median * math.exp(sigma * rng.gauss(0.0, 1.0))


class _ActiveProfile:
    __slots__ = ("profile", "rng")

    def __init__(self, profile: Profile) -> None:
        self.profile = profile
        self.rng = random.Random(f"{profile.seed}:{profile.provider}")


_DURATION = re.compile(r"(?P<n>[0-9]*\.?[0-9]+)(?P<unit>ms|s)?")


def _seconds(value: str, name: str) -> float:
    m = _DURATION.fullmatch(value.strip())
    if m is None:
        raise SpecError(f"profile {name}: expected seconds or a duration like 120ms, got {value!r}")
    n = float(m["n"])
    return n / 1000 if m["unit"] == "ms" else n


def parse_profile(text: str) -> list[dict[str, Any]]:
    """`PROVIDER:key=value,...` (the CLI's --profile) as profile specs for `apply_spec`.

    Keys: median, p99 (seconds, or 120ms), capacity, over (reject|queue), retry_after, errors (a rate
    from 0 to 1), error_status, seed. PROVIDER may be '*' for every provider.
    """
    provider, sep, rest = text.partition(":")
    if not sep or not provider:
        raise SpecError(f"a profile is PROVIDER:key=value,..., got {text!r}")
    spec: dict[str, Any] = {"kind": "profile", "provider": provider.strip()}
    names = {"median": "median", "p99": "p99", "capacity": "capacity", "over": "over_capacity",
             "retry_after": "retry_after", "errors": "error_rate", "error_status": "error_status", "seed": "seed"}
    for part in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, value = part.partition("=")
        if not eq or key.strip() not in names:
            raise SpecError(f"profile: unknown setting {part!r} (one of {', '.join(names)})")
        key, value = key.strip(), value.strip()
        try:
            if key in ("median", "p99"):
                spec[names[key]] = _seconds(value, key)
            elif key in ("capacity", "error_status", "seed"):
                spec[names[key]] = int(value)
            elif key == "errors":
                spec[names[key]] = float(value)
            else:
                spec[names[key]] = value
        except ValueError:
            raise SpecError(f"profile {key}: not a number: {value!r}") from None
    return [spec]


def _spec_str_list(spec: Mapping[str, Any], name: str) -> list[str]:
    v = spec.get(name, [])
    if not isinstance(v, list) or not all(isinstance(i, str | int) and not isinstance(i, bool) for i in v):
        raise SpecError(f"'{name}' must be a list of strings")
    return [str(i) for i in v]


class _Invalid(Exception):
    """A request violates the provider's contract: 400 naming `field`."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def _is_number(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


_REASONS = {400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 413: "Payload Too Large"}
