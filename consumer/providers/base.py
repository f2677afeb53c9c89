"""The shape every provider module has: conversions in, HTTP requests out, responses classified.

A provider module is pure: it never opens a socket or reads a clock. The shared delivery layer
(`consumer.delivery`) batches conversions by `batch_key`, asks the module to `build` a request,
sends it, and asks the module to `classify` the answer. A provider's package (consumer/providers/<slug>/)
makes its module; consumer/providers/spec.py says what else a package gives.
"""

from __future__ import annotations

import email.utils
import enum
import hashlib
import json
import time
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Protocol
from urllib.parse import urlencode

import orjson

from consumer.config import BatchConfig, FlowConfig, RetryConfig, Secret
from consumer.model import Conversion, Provider


@dataclass(frozen=True, slots=True)
class HttpRequest:
    method: str
    url: str  # may carry a secret (Conductrics apikey): print `redacted_url` instead
    headers: Mapping[str, str]
    body: bytes | None = None
    redacted_url: str = ""

    def __repr__(self) -> str:
        return f"HttpRequest({self.method} {self.redacted_url or '<url>'}, {len(self.body or b'')} bytes)"


class Verdict(enum.StrEnum):
    DELIVERED = "delivered"  # the provider took it
    NOT_ACCEPTED = "not_accepted"  # answered well, but declined (e.g. no Conductrics agent took the reward)
    RETRY = "retry"  # transient: try again after a backoff
    PERMANENT = "permanent"  # will never succeed as sent: dead-letter
    SPLIT = "split"  # too large: split the batch and send the halves
    REAUTH = "reauth"  # the token was refused: drop it and try once more with a new one


@dataclass(frozen=True, slots=True)
class Outcome:
    verdict: Verdict
    reason: str  # short and bounded; never a secret, never a visitor id
    status: int | None = None
    retry_after: float | None = None  # seconds, from Retry-After


@dataclass(frozen=True, slots=True)
class TokenSpec:
    """OAuth client-credentials grant for a project that requires it."""

    token_url: str
    client_id: Secret
    client_secret: Secret
    refresh_margin: float = 60.0
    provider: Provider | None = None  # whose proxy and TLS settings the token request uses
    user_agent: str = "offline-conversions/1.0"  # the provider's: the token request is one of its requests


@dataclass(frozen=True, slots=True)
class Route:
    """Where a batch goes and under which limits; one per batch key."""

    key: Hashable
    project: str
    batch: BatchConfig
    flow: FlowConfig
    retry: RetryConfig
    token: TokenSpec | None = None
    extra: Mapping[str, str] = field(default_factory=dict)


def token_request(spec: TokenSpec, user_agent: str | None = None) -> HttpRequest:
    """The client-credentials grant for `spec`: a form POST whose body carries both credentials."""
    body = urlencode({
        "grant_type": "client_credentials",
        "client_id": spec.client_id.reveal(),
        "client_secret": spec.client_secret.reveal(),
    }).encode()
    headers = {"Content-Type": "application/x-www-form-urlencoded", "User-Agent": user_agent or spec.user_agent}
    return HttpRequest("POST", spec.token_url, headers, body, spec.token_url)


class ProviderModule(Protocol):
    provider: Provider

    def route(self, conversion: Conversion) -> Route:
        """Which conversions may share a request, and the limits that apply to it."""
        ...

    def item_bytes(self, conversion: Conversion) -> int:
        """How many body bytes this conversion adds to a request (for the size limit)."""
        ...

    def build(self, route: Route, conversions: Sequence[Conversion], token: str | None = None) -> HttpRequest:
        """One HTTP request carrying these conversions."""
        ...

    def classify(self, request: HttpRequest, status: int, headers: Mapping[str, str], body: bytes) -> Outcome:
        """What the answer means for every conversion in the request."""
        ...


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def classify_status(status: int, headers: Mapping[str, str], *, has_token: bool = False) -> Outcome:
    """The HTTP-level rule shared by every provider: 2xx ok, 408/429/5xx retry, 413 split, other 4xx permanent."""
    if 200 <= status < 300:
        return Outcome(Verdict.DELIVERED, "ok", status)
    if status == 413:
        return Outcome(Verdict.SPLIT, "payload too large", status)
    if status == 401 and has_token:
        return Outcome(Verdict.REAUTH, "token refused", status)
    if status in (408, 429) or status >= 500:
        ra = parse_retry_after(headers.get("Retry-After") or headers.get("retry-after"))
        return Outcome(Verdict.RETRY, f"http {status}", status, ra)
    return Outcome(Verdict.PERMANENT, f"http {status}", status)


def json_number(value: Decimal) -> str:
    """A JSON number token with the Decimal's exact digits: 23.50 -> "23.50", 1E+2 -> "100"."""
    text = str(value)
    if "E" not in text and "n" not in text and "N" not in text:
        return text  # plain notation already (every revenue the decoder makes): 4x cheaper than format()
    if not value.is_finite():
        raise ValueError(f"not a finite number: {value}")
    return format(value, "f")


def json_string(value: str) -> str:
    """A JSON string literal (UTF-8, compact); a lone surrogate is \\u-escaped instead of failing."""
    if value.isascii() and value.isprintable() and '"' not in value and "\\" not in value:
        return f'"{value}"'  # the usual ids need no escaping: quoted as they are, without an encoder call
    try:
        return orjson.dumps(value).decode()
    except orjson.JSONEncodeError:
        return json.dumps(value)


def chunk(part: str) -> bytes:
    """One length-prefixed UTF-8 part of a key's hash input (see `digest`)."""
    b = part.encode("utf-8", "surrogatepass")
    return b"%d:%b" % (len(b), b)


def digest(*parts: str) -> str:
    """sha256 hex of length-prefixed UTF-8 parts, so ("ab", "c") and ("a", "bc") differ.

    The same encoding as the matcher's keys, so a key computed here equals the one it computes.
    """
    return hashlib.sha256(b"".join([chunk(p) for p in parts])).hexdigest()
