"""Provider sandbox: emulates Kameleoon, Convert and Conductrics endpoints, records what they accept, injects faults.

The real providers cannot be reached from the test machines, so this server answers like their documented
APIs (seeds 001-003 and shared/providers.md): it validates every request, records every accepted conversion
(never de-duplicating, so tests can see duplicates), logs every request with its status, and can be told to
fail: an HTTP status for the next N requests or with a seeded probability, latency, hangs, connection
resets, Conductrics' JSON status 500 under HTTP 200, and permanent 400s for chosen visitors or goals.

Paths are served at the root, so every provider's base URL is the sandbox URL. Secrets (Conductrics
API keys, OAuth client secrets, bearer tokens) are kept only as SHA-256 digests and never recorded.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import hmac
import json
import math
import random
import re
import secrets
import signal
import socket
import struct
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

KAMELEOON = "kameleoon"
CONVERT = "convert"
CONDUCTRICS = "conductrics"
TOKEN = "token"
PROVIDERS = (KAMELEOON, CONVERT, CONDUCTRICS, TOKEN)
ANY = "*"


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


_NONCE = re.compile(r"[0-9a-fA-F]{16}")
_DIGITS = re.compile(r"[0-9]+")
_EXP_VAR = re.compile(r"([0-9]+)-([0-9]+)")
_TWO_DECIMALS = re.compile(r"-?[0-9]+\.[0-9]{2}")
_APIKEY = re.compile(r"(^|&)(apikey=)[^&]*")
REDACTED = "REDACTED"

# Event types the Data API knows; only CONVERSION is recorded as a conversion.
KAMELEOON_EVENT_TYPES = frozenset(
    {"CONVERSION", "CUSTOM_DATA", "PAGE", "STATIC_DATA", "EXPERIMENT", "PERSONALIZATION", "ACTIVITY", "GEOLOCATION",
     "DEVICE", "BROWSER", "WEATHER", "TARGETING_SEGMENT", "PRODUCT", "EVENT"}
)
CONVERT_GOAL_DATA_KEYS = frozenset({"amount", "productsCount", "transactionId"})
# A 1x1 transparent GIF, the body of a browser tracking pixel.
TRACKING_PIXEL = bytes.fromhex("47494638396101000100800000000000ffffff21f90401000000002c00000000010001000002024401003b")


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
    closes the connection at once without an answer; `json_status` (Conductrics) answers HTTP 200 with a
    JSON `status` of `status`. With `probability` < 1 each request is faulted with that chance, drawn from a
    random generator seeded with `seed`.
    """

    provider: str
    kind: str = "status"
    status: int = 503
    times: int | None = 1
    probability: float = 1.0
    retry_after: str | None = None
    seconds: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.provider not in PROVIDERS and self.provider != ANY:
            raise ValueError(f"fault provider must be one of {', '.join(PROVIDERS)} or '*', got {self.provider!r}")
        if self.kind not in FAULT_KINDS:
            raise ValueError(f"fault kind must be one of {', '.join(sorted(FAULT_KINDS))}, got {self.kind!r}")
        if self.kind == "json_status" and self.provider != CONDUCTRICS:
            raise ValueError("a json_status fault applies to conductrics only")
        if not 0.0 <= self.probability <= 1.0:
            raise ValueError(f"fault probability must be between 0 and 1, got {self.probability}")
        if self.times is not None and self.times < 0:
            raise ValueError("fault times cannot be negative")
        if not 100 <= self.status <= 599:
            raise ValueError(f"fault status must be an HTTP status, got {self.status}")


class _ActiveFault:
    __slots__ = ("fault", "remaining", "rng")

    def __init__(self, fault: Fault) -> None:
        self.fault = fault
        self.remaining = fault.times
        self.rng = random.Random(fault.seed)


class SpecError(ValueError):
    """A fault spec sent to the sandbox is invalid."""


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


# --------------------------------------------------------------------------- the sandbox


class Sandbox:
    """An aiohttp server emulating the three providers; see the module docstring."""

    def __init__(
        self,
        *,
        kameleoon_auth_sites: Iterable[str] = (),
        kameleoon_clients: Mapping[str, str] | None = None,
        token_lifetime: float = 3600.0,
        kameleoon_max_body: int = 3_000_000,
        conductrics_keys: Mapping[str, str | Iterable[str]] | None = None,
        conductrics_no_selection: Iterable[str] = (),
        conductrics_no_selection_all: bool = False,
        hang_seconds: float = 3600.0,
        request_log: bool = True,
    ) -> None:
        """
        kameleoon_auth_sites: siteCodes whose /visit endpoints need `Authorization: Bearer <token>`.
        kameleoon_clients: client_id -> client_secret accepted by POST /oauth/token.
        conductrics_keys: account -> API key(s); None accepts any non-empty apikey for any account.
        conductrics_no_selection(_all): vids (or every vid) for which no agent accepts the goal (empty `rs`).
        request_log: keep every RequestEntry in `requests` (False for long benchmarks: statuses are still counted).
        """
        self.auth_sites = frozenset(kameleoon_auth_sites)
        self._clients = {cid: _digest(sec) for cid, sec in (kameleoon_clients or {}).items()}
        self.token_lifetime = float(token_lifetime)
        self.max_body = int(kameleoon_max_body)
        self._conductrics_keys: dict[str, list[bytes]] | None = None
        if conductrics_keys is not None:
            self._conductrics_keys = {
                acc: [_digest(k)] if isinstance(k, str) else [_digest(x) for x in k]
                for acc, k in conductrics_keys.items()
            }
        self._base_no_selection = frozenset(conductrics_no_selection)
        self._base_no_selection_all = bool(conductrics_no_selection_all)
        self.hang_seconds = float(hang_seconds)

        self.records: list[Record] = []
        self.dropped: list[Record] = []  # Convert v1 events with a non-ConvertAgent User-Agent (answered 200)
        self.unrewarded: list[Record] = []  # Conductrics goals no agent accepted (answered with an empty rs)
        self.requests: list[RequestEntry] = []
        self.keep_request_log = bool(request_log)
        self._seq = 0  # requests seen, and the id of the next one
        self._statuses: Counter[tuple[str, int]] = Counter()
        self.token_grants = 0
        self._tokens: dict[bytes, float] = {}  # digest -> monotonic expiry
        self._counts: Counter[str] = Counter()
        self._waiters: list[tuple[Callable[[Sandbox], bool], asyncio.Future[None]]] = []
        self._closing = asyncio.Event()
        self._app: web.Application | None = None
        self._runner: web.AppRunner | None = None
        self.url = ""
        self._faults: list[_ActiveFault] = []
        self._latency: dict[str, float] = {}
        self._reject_visitors: dict[str, set[str]] = {}
        self._reject_goals: dict[str, set[str]] = {}
        self._no_selection: set[str] = set()
        self._no_selection_all = False
        self.clear_faults()

    # ------------------------------------------------------------------ lifecycle

    def app(self) -> web.Application:
        if self._app is None:
            app = web.Application(client_max_size=max(self.max_body, 1 << 20) + (1 << 20))
            r = app.router
            r.add_post("/visit/events", self._kameleoon_events)
            r.add_get("/visit/visitor", self._kameleoon_visitor)
            r.add_post("/oauth/token", self._oauth_token)
            r.add_get("/track/", self._convert_track)
            r.add_get("/track", self._convert_track)
            r.add_post("/v1/track/{account_id}/{project_id}", self._convert_v1)
            r.add_get("/_sandbox/records", self._ctl_records)
            r.add_post("/_sandbox/faults", self._ctl_add_faults)
            r.add_delete("/_sandbox/faults", self._ctl_clear_faults)
            r.add_post("/_sandbox/reset", self._ctl_reset)
            r.add_post("/_sandbox/tokens/expire", self._ctl_expire_tokens)
            r.add_post("/_sandbox/tokens/revoke", self._ctl_revoke_tokens)
            r.add_post("/{account}/v3/agent-api", self._conductrics)
            self._app = app
        return self._app

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Serve on host:port (0: any free port); returns the base URL."""
        self._closing = asyncio.Event()
        self._runner = web.AppRunner(self.app(), access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        sock_port = port
        for address in self._runner.addresses:
            if isinstance(address, tuple) and address[0] == host:
                sock_port = address[1]
        self.url = f"http://{host}:{sock_port}"
        return self.url

    async def stop(self) -> None:
        self._closing.set()  # ends hangs and latency at once
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        for _, fut in self._waiters:
            if not fut.done():
                fut.cancel()
        self._waiters.clear()

    async def __aenter__(self) -> Sandbox:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # ------------------------------------------------------------------ faults

    def add_fault(self, fault: Fault) -> None:
        self._faults.append(_ActiveFault(fault))

    def fail(
        self,
        provider: str,
        status: int = 503,
        times: int | None = 1,
        *,
        retry_after: str | float | None = None,
        probability: float = 1.0,
        seed: int = 0,
    ) -> Fault:
        """Answer `status` for the next `times` requests (None: until cleared), optionally with a probability."""
        ra = retry_after
        if isinstance(ra, int | float):
            ra = str(int(ra))
        f = Fault(provider, "status", status, times, probability, ra, None, seed)
        self.add_fault(f)
        return f

    def hang(self, provider: str, times: int | None = 1, seconds: float | None = None) -> Fault:
        f = Fault(provider, "hang", 503, times, seconds=seconds)
        self.add_fault(f)
        return f

    def reset_connections(
        self, provider: str, times: int | None = 1, *, probability: float = 1.0, seed: int = 0
    ) -> Fault:
        f = Fault(provider, "reset", 503, times, probability, seed=seed)
        self.add_fault(f)
        return f

    def json_status(self, status: int = 500, times: int | None = 1) -> Fault:
        """Conductrics answers HTTP 200 with a JSON `status` of `status`."""
        f = Fault(CONDUCTRICS, "json_status", status, times)
        self.add_fault(f)
        return f

    def set_latency(self, provider: str, seconds: float) -> None:
        """Delay every request to `provider` ('*': all) by `seconds` before answering."""
        if provider not in PROVIDERS and provider != ANY:
            raise ValueError(f"unknown provider {provider!r}")
        for p in PROVIDERS if provider == ANY else (provider,):
            self._latency[p] = float(seconds)

    def reject(self, provider: str, *, visitors: Iterable[str] = (), goals: Iterable[str | int] = ()) -> None:
        """Answer 400 for every request carrying one of these visitors or goals, until cleared."""
        if provider not in (KAMELEOON, CONVERT, CONDUCTRICS):
            raise ValueError(f"reject applies to kameleoon, convert or conductrics, got {provider!r}")
        self._reject_visitors.setdefault(provider, set()).update(visitors)
        self._reject_goals.setdefault(provider, set()).update(str(g) for g in goals)

    def no_selection(self, vids: Iterable[str] = (), *, all_vids: bool = False) -> None:
        """Conductrics: no agent accepts goals for these vids (or every vid): the answer has an empty `rs`."""
        self._no_selection.update(vids)
        self._no_selection_all = self._no_selection_all or all_vids

    def clear_faults(self) -> None:
        """Remove every fault, latency, reject rule and runtime no-selection rule."""
        self._faults = []
        self._latency = {}
        self._reject_visitors = {}
        self._reject_goals = {}
        self._no_selection = set(self._base_no_selection)
        self._no_selection_all = self._base_no_selection_all

    def apply_spec(self, spec: Mapping[str, Any] | list[Mapping[str, Any]]) -> int:
        """Apply a JSON fault spec (one object or a list); returns how many rules were added.

        {"kind": "status", "provider": "kameleoon", "status": 503, "times": 2, "retry_after": "1",
         "probability": 1.0, "seed": 0}          # also "hang" (+ "seconds"), "reset", "json_status"
        {"kind": "latency", "provider": "convert", "seconds": 0.05}
        {"kind": "reject", "provider": "kameleoon", "visitors": ["v1"], "goals": [36151]}
        {"kind": "no_selection", "vids": ["lana-123"]}  or  {"kind": "no_selection", "all": true}
        """
        items = spec if isinstance(spec, list) else [spec]
        parsed: list[Callable[[], None]] = []
        for item in items:
            parsed.append(self._parse_spec(item))
        for apply in parsed:  # all or nothing
            apply()
        return len(parsed)

    def _parse_spec(self, item: Any) -> Callable[[], None]:
        if not isinstance(item, Mapping):
            raise SpecError("a fault spec is an object or a list of objects")
        kind = item.get("kind", "status")
        provider = item.get("provider", CONDUCTRICS if kind in ("json_status", "no_selection") else None)
        if not isinstance(provider, str):
            raise SpecError("'provider' is required")
        known = {"kind", "provider", "status", "times", "probability", "retry_after", "seconds", "seed",
                 "visitors", "goals", "vids", "all"}
        unknown = sorted(set(item) - known)
        if unknown:
            raise SpecError(f"unknown key {unknown[0]!r}")
        try:
            if kind == "latency":
                latency = float(item.get("seconds", 0.0))
                self._check_provider(provider)
                return lambda: self.set_latency(provider, latency)
            if kind == "reject":
                visitors = _spec_str_list(item, "visitors")
                goals = _spec_str_list(item, "goals")
                if provider not in (KAMELEOON, CONVERT, CONDUCTRICS):
                    raise SpecError(f"reject applies to kameleoon, convert or conductrics, got {provider!r}")
                return lambda: self.reject(provider, visitors=visitors, goals=goals)
            if kind == "no_selection":
                vids = _spec_str_list(item, "vids")
                every = item.get("all", False)
                if not isinstance(every, bool):
                    raise SpecError("'all' must be true or false")
                return lambda: self.no_selection(vids, all_vids=every)
            ra = item.get("retry_after")
            times = item.get("times", 1)
            seconds = item.get("seconds")
            fault = Fault(
                provider=provider,
                kind=str(kind),
                status=int(item.get("status", 500 if kind == "json_status" else 503)),
                times=None if times is None else int(times),
                probability=float(item.get("probability", 1.0)),
                retry_after=None if ra is None else str(ra),
                seconds=None if seconds is None else float(seconds),
                seed=int(item.get("seed", 0)),
            )
        except (TypeError, ValueError) as exc:
            raise SpecError(str(exc)) from None
        return lambda: self.add_fault(fault)

    @staticmethod
    def _check_provider(provider: str) -> None:
        if provider not in PROVIDERS and provider != ANY:
            raise SpecError(f"unknown provider {provider!r}")

    def _take_fault(self, provider: str) -> Fault | None:
        for af in self._faults:
            f = af.fault
            if f.provider != provider and f.provider != ANY:
                continue
            if af.remaining == 0:
                continue
            if f.probability < 1.0 and af.rng.random() >= f.probability:
                continue
            if af.remaining is not None:
                af.remaining -= 1
            if af.remaining == 0:
                self._faults = [x for x in self._faults if x.remaining != 0]
            return f
        return None

    async def _pause(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._closing.wait(), seconds)

    async def _enter(self, request: web.Request, provider: str) -> web.StreamResponse | None:
        """Latency, then any fault due: the response to send instead of handling the request, or None."""
        latency = self._latency.get(provider)
        if latency:
            await self._pause(latency)
        if not self._faults:
            return None
        fault = self._take_fault(provider)
        if fault is None:
            return None
        if fault.kind == "status":
            headers = {"Retry-After": fault.retry_after} if fault.retry_after is not None else None
            body = {"status": fault.status, "error": "fault injected by the sandbox"}
            self._log(request, provider, fault.status, "fault:status")
            return web.Response(
                status=fault.status, body=_dumps(body), content_type="application/json", headers=headers
            )
        if fault.kind == "json_status":
            self._log(request, provider, 200, "fault:json_status")
            body = {"status": fault.status, "error": "internal error (fault injected by the sandbox)"}
            return web.Response(status=200, body=_dumps(body), content_type="application/json")
        if fault.kind == "hang":
            self._log(request, provider, 0, "fault:hang")
            await self._pause(self.hang_seconds if fault.seconds is None else fault.seconds)
        else:
            self._log(request, provider, 0, "fault:reset")
        self._abort(request)
        raise asyncio.CancelledError  # nothing more to write on this connection

    @staticmethod
    def _abort(request: web.Request) -> None:
        """Close the connection without an answer, with a TCP RST where the socket allows it."""
        transport = request.transport
        if transport is None:
            return
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abort()

    # ------------------------------------------------------------------ bookkeeping

    def _log(self, request: web.Request, provider: str, status: int, outcome: str, error: str | None = None) -> int:
        rid = self._seq
        self._seq = rid + 1
        self._statuses[provider, status] += 1
        if self.keep_request_log:
            self.requests.append(
                RequestEntry(rid, provider, request.method, request.path, redact_query(request.query_string), status,
                             outcome, time.time(), error)
            )
        if self._waiters:
            self._wake()
        return rid

    def _accept(self, records: list[Record], provider: str) -> None:
        self.records.extend(records)
        self._counts[provider] += len(records)

    def _error(self, request: web.Request, provider: str, status: int, fld: str, message: str) -> web.Response:
        self._log(request, provider, status, "rejected", fld)
        body = {"status": status, "error": _REASONS.get(status, "Error"), "field": fld, "message": message}
        return web.Response(status=status, body=_dumps(body), content_type="application/json")

    async def _read(self, request: web.Request, provider: str, limit: int) -> bytes | web.Response:
        if request.content_length is not None and request.content_length > limit:
            return self._error(request, provider, 413, "body", f"larger than {limit} bytes")
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return self._error(request, provider, 413, "body", f"larger than {limit} bytes")
        if len(body) > limit:
            return self._error(request, provider, 413, "body", f"larger than {limit} bytes")
        return body

    def _rejected(self, provider: str, visitor: str, goals: Iterable[str], where: str) -> None:
        rv = self._reject_visitors.get(provider)
        if rv and visitor in rv:
            raise _Invalid(f"{where}visitor", "rejected by a sandbox rule")
        rg = self._reject_goals.get(provider)
        if rg:
            for g in goals:
                if g in rg:
                    raise _Invalid(f"{where}goal", f"goal {g} rejected by a sandbox rule")

    # ------------------------------------------------------------------ Kameleoon

    def _token_ok(self, request: web.Request) -> bool:
        auth = request.headers.get("Authorization", "")
        if not auth.startswith("Bearer "):
            return False
        expiry = self._tokens.get(_digest(auth[7:].strip()))
        return expiry is not None and expiry > time.monotonic()

    def _kameleoon_gate(self, request: web.Request, site: str) -> web.Response | None:
        if not site:
            return self._error(request, KAMELEOON, 400, "siteCode", "is required")
        if not request.headers.get("User-Agent", "").strip():
            return self._error(request, KAMELEOON, 403, "User-Agent", "a User-Agent header is required")
        if site in self.auth_sites and not self._token_ok(request):
            return self._error(request, KAMELEOON, 401, "Authorization", "missing, invalid or expired bearer token")
        return None

    async def _kameleoon_events(self, request: web.Request) -> web.StreamResponse:
        early = await self._enter(request, KAMELEOON)
        if early is not None:
            return early
        q = request.query
        site = q.get("siteCode", "")
        refused = self._kameleoon_gate(request, site)
        if refused is not None:
            return refused
        body = await self._read(request, KAMELEOON, self.max_body)
        if isinstance(body, web.Response):
            return body
        rid = self._seq
        try:
            if q.get("json") != "true":
                raise _Invalid("json", "must be 'true' for a JSON array body")
            try:
                events = _loads(body)
            except ValueError:
                raise _Invalid("body", "is not valid JSON") from None
            records = self._kameleoon_parse(events, site, q.get("visitorCode"), request, rid)
        except _Invalid as exc:
            return self._error(request, KAMELEOON, 400, exc.field, exc.message)
        self._accept(records, KAMELEOON)
        self._log(request, KAMELEOON, 204, "accepted")
        return web.Response(status=204)

    def _kameleoon_parse(
        self, events: Any, site: str, query_visitor: str | None, request: web.Request, rid: int
    ) -> list[Record]:
        if query_visitor is not None and not 0 < len(query_visitor) <= 100:
            raise _Invalid("visitorCode", "must be 1 to 100 characters")
        if not isinstance(events, list):
            raise _Invalid("body", "must be a JSON array of events")
        if not events:
            raise _Invalid("body", "must hold at least one event")
        now = time.time()
        qs = request.query_string
        ua = request.headers.get("User-Agent")
        out: list[Record] = []
        for i, ev in enumerate(events):
            at = f"[{i}]."
            if not isinstance(ev, dict):
                raise _Invalid(f"[{i}]", "an event must be a JSON object")
            nonce = ev.get("nonce")
            if not isinstance(nonce, str) or not _NONCE.fullmatch(nonce):
                raise _Invalid(at + "nonce", "must be 16 hexadecimal characters")
            etype = ev.get("eventType")
            if not isinstance(etype, str):
                raise _Invalid(at + "eventType", "is required")
            if etype not in KAMELEOON_EVENT_TYPES:
                raise _Invalid(at + "eventType", f"unknown event type {etype!r}")
            vc = ev.get("visitorCode")
            mv = ev.get("mappingValue")
            if vc is not None and (not isinstance(vc, str) or not 0 < len(vc) <= 100):
                raise _Invalid(at + "visitorCode", "must be a string of 1 to 100 characters")
            if mv is not None and (not isinstance(mv, str) or not mv):
                raise _Invalid(at + "mappingValue", "must be a non-empty string")
            if vc is not None:
                visitor, identity = vc, "visitor"
            elif mv is not None:
                visitor, identity = mv, "mapping"
            elif query_visitor is not None:
                visitor, identity = query_visitor, "visitor"
            else:
                raise _Invalid(at + "visitorCode", "a visitorCode (query or event) or mappingValue is required")
            if etype != "CONVERSION":
                continue
            goal = ev.get("goalId")
            if not isinstance(goal, int) or isinstance(goal, bool):
                raise _Invalid(at + "goalId", "must be an integer")
            revenue = ev.get("revenue")
            if revenue is not None and not _is_number(revenue):
                raise _Invalid(at + "revenue", "must be a number")
            negative = ev.get("negative", False)
            if not isinstance(negative, bool):
                raise _Invalid(at + "negative", "must be a boolean")
            metadata = ev.get("metadata")
            if metadata is not None and not isinstance(metadata, dict | list):
                raise _Invalid(at + "metadata", "must be an object or an array")
            self._rejected(KAMELEOON, visitor, (str(goal),), at)
            out.append(
                Record(KAMELEOON, "visit/events", site, visitor, identity, (str(goal),),
                       None if revenue is None else float(revenue), f"kameleoon|{site}|{nonce}", qs, now, rid,
                       nonce=nonce, event_type=etype, negative=negative, metadata=metadata, user_agent=ua)
            )
        return out

    async def _kameleoon_visitor(self, request: web.Request) -> web.StreamResponse:
        q = request.query
        site = q.get("siteCode", "")
        refused = self._kameleoon_gate(request, site)
        if refused is not None:
            return refused
        visitor = q.get("visitorCode", "")
        if not visitor:
            return self._error(request, KAMELEOON, 400, "visitorCode", "is required")
        max_visits = q.get("maxNumberPreviousVisits", "1")
        if not _DIGITS.fullmatch(max_visits):
            return self._error(request, KAMELEOON, 400, "maxNumberPreviousVisits", "must be an integer")
        with_conversions = q.get("conversion") == "true"
        visits: dict[int, list[Record]] = {}
        for r in self.records:
            if r.provider == KAMELEOON and r.project == site and r.visitor == visitor and r.identity == "visitor":
                visits.setdefault(r.request_id, []).append(r)
        out = []
        for recs in sorted(visits.values(), key=lambda rs: -rs[0].time)[: int(max_visits)]:
            visit: dict[str, Any] = {"siteCode": site, "visitorCode": visitor, "timeStarted": int(recs[0].time * 1000)}
            if with_conversions:
                visit["conversionEvents"] = [
                    {"itp": False, "time": int(r.time * 1000),
                     "data": {"goalId": int(r.goals[0]), "revenue": r.revenue if r.revenue is not None else 0.0,
                              "negative": r.negative, "metadata": r.metadata if r.metadata is not None else {}}}
                    for r in recs
                ]
            out.append(visit)
        self._log(request, KAMELEOON, 200, "accepted")
        return web.Response(body=_dumps({"previousVisits": out}), content_type="application/json")

    async def _oauth_token(self, request: web.Request) -> web.StreamResponse:
        early = await self._enter(request, TOKEN)
        if early is not None:
            return early
        form = await request.post()
        if form.get("grant_type") != "client_credentials":
            self._log(request, TOKEN, 400, "rejected", "grant_type")
            return web.Response(status=400, body=_dumps({"error": "unsupported_grant_type"}),
                                content_type="application/json")
        cid, sec = form.get("client_id"), form.get("client_secret")
        expected = self._clients.get(cid) if isinstance(cid, str) else None
        if expected is None or not isinstance(sec, str) or not hmac.compare_digest(expected, _digest(sec)):
            self._log(request, TOKEN, 401, "rejected", "client")
            return web.Response(status=401, body=_dumps({"error": "invalid_client"}), content_type="application/json")
        token = secrets.token_urlsafe(24)
        self._tokens[_digest(token)] = time.monotonic() + self.token_lifetime
        self.token_grants += 1
        self._log(request, TOKEN, 200, "accepted")
        body = {"access_token": token, "token_type": "Bearer", "expires_in": int(self.token_lifetime)}
        return web.Response(body=_dumps(body), content_type="application/json")

    def expire_tokens(self) -> None:
        """Every token issued so far is now expired (a request with one gets 401)."""
        for k in self._tokens:
            self._tokens[k] = 0.0

    def revoke_tokens(self) -> None:
        """Forget every token issued so far (a request with one gets 401)."""
        self._tokens.clear()

    # ------------------------------------------------------------------ Convert

    async def _convert_track(self, request: web.Request) -> web.StreamResponse:
        early = await self._enter(request, CONVERT)
        if early is not None:
            return early
        try:
            record = self._convert_track_parse(request)
        except _Invalid as exc:
            return self._error(request, CONVERT, 400, exc.field, exc.message)
        self._accept([record], CONVERT)
        self._log(request, CONVERT, 200, "accepted")
        return web.Response(body=TRACKING_PIXEL, content_type="image/gif")

    def _convert_track_parse(self, request: web.Request) -> Record:
        q = request.query
        c, p = q.get("c", ""), q.get("p", "")
        if not _DIGITS.fullmatch(c):
            raise _Invalid("c", "the account id is required, digits only")
        if not _DIGITS.fullmatch(p):
            raise _Invalid("p", "the project id is required, digits only")
        m = _EXP_VAR.fullmatch(q.get("e", ""))
        if m is None:
            raise _Invalid("e", "must be experiment_id-variation_id, digits")
        g, ga, t = q.get("g"), q.get("ga"), q.get("t")
        if g is None and t is None:
            raise _Invalid("g", "at least one of g (goals) or t (transaction) is required")
        goals: tuple[str, ...] = ()
        if g is not None:
            goals = tuple(g.split(","))
            if not all(_DIGITS.fullmatch(x) for x in goals):
                raise _Invalid("g", "must be a comma-separated list of goal ids")
            if ga is None or not _DIGITS.fullmatch(ga) or int(ga) != len(goals):
                raise _Invalid("ga", f"must be the number of goals in g ({len(goals)})")
        elif ga is not None:
            raise _Invalid("ga", "given without g")
        tx_goals: tuple[str, ...] = ()
        tx = revenue = count = None
        if t is not None:
            parts = t.split("|")
            if len(parts) != 4:
                raise _Invalid("t", "must be goal_ids|transaction_id|value|products_count")
            tx_goals = tuple(parts[0].split("."))
            if not all(_DIGITS.fullmatch(x) for x in tx_goals):
                raise _Invalid("t", "goal ids must be dot-separated digits")
            if not parts[1]:
                raise _Invalid("t", "the transaction id is empty")
            if not _TWO_DECIMALS.fullmatch(parts[2]):
                raise _Invalid("t", "the value must have exactly two decimals")
            if not _DIGITS.fullmatch(parts[3]):
                raise _Invalid("t", "products_count must be an integer")
            tx, revenue, count = parts[1], float(parts[2]), int(parts[3])
        visitor = q.get("vi", "")
        project = f"{c}_{p}"
        self._rejected(CONVERT, visitor, goals + tx_goals, "")
        e = m.group(0)
        key = f"convert|{project}|{visitor}|{e}|" + (f"t:{tx}" if tx is not None else "g:" + ",".join(sorted(goals)))
        return Record(CONVERT, "track", project, visitor, "visitor", goals, revenue, key, request.query_string,
                      time.time(), self._seq, transaction_id=tx, transaction_goals=tx_goals,
                      products_count=count, experiment_id=m.group(1), variation_id=m.group(2),
                      bucketing=((m.group(1), m.group(2)),), user_agent=request.headers.get("User-Agent"))

    async def _convert_v1(self, request: web.Request) -> web.StreamResponse:
        early = await self._enter(request, CONVERT)
        if early is not None:
            return early
        body = await self._read(request, CONVERT, self.max_body)
        if isinstance(body, web.Response):
            return body
        try:
            records = self._convert_v1_parse(request, body)
        except _Invalid as exc:
            return self._error(request, CONVERT, 400, exc.field, exc.message)
        ua = request.headers.get("User-Agent", "")
        if not ua.startswith("ConvertAgent/"):
            self.dropped.extend(records)  # the bot filter: answered 200, never counted
            self._log(request, CONVERT, 200, "dropped", "User-Agent")
        else:
            self._accept(records, CONVERT)
            self._log(request, CONVERT, 200, "accepted")
        return web.Response(body=_dumps({"status": "ok"}), content_type="application/json")

    def _convert_v1_parse(self, request: web.Request, raw: bytes) -> list[Record]:
        account, project_id = request.match_info["account_id"], request.match_info["project_id"]
        if not _DIGITS.fullmatch(account):
            raise _Invalid("account_id", "must be digits")
        if not _DIGITS.fullmatch(project_id):
            raise _Invalid("project_id", "must be digits")
        try:
            body = _loads(raw)
        except ValueError:
            raise _Invalid("body", "is not valid JSON") from None
        if not isinstance(body, dict):
            raise _Invalid("body", "must be a JSON object")
        for name, want in (("accountId", account), ("projectId", project_id)):
            v = body.get(name)
            if isinstance(v, bool) or not isinstance(v, str | int) or str(v) != want:
                raise _Invalid(name, f"must equal the id in the path ({want})")
        visitors = body.get("visitors")
        if not isinstance(visitors, list) or not visitors:
            raise _Invalid("visitors", "must be a non-empty array")
        project = f"{account}_{project_id}"
        now, rid, qs = time.time(), self._seq, request.query_string
        ua = request.headers.get("User-Agent")
        out: list[Record] = []
        for i, vis in enumerate(visitors):
            at = f"visitors[{i}]"
            if not isinstance(vis, dict):
                raise _Invalid(at, "must be an object")
            vid = vis.get("visitorId")
            if not isinstance(vid, str) or not vid:
                raise _Invalid(f"{at}.visitorId", "must be a non-empty string")
            events = vis.get("events")
            if not isinstance(events, list) or not events:
                raise _Invalid(f"{at}.events", "must be a non-empty array")
            for j, ev in enumerate(events):
                eat = f"{at}.events[{j}]"
                if not isinstance(ev, dict):
                    raise _Invalid(eat, "must be an object")
                etype = ev.get("eventType")
                data = ev.get("data")
                if etype not in ("conversion", "bucketing"):
                    raise _Invalid(f"{eat}.eventType", "must be 'conversion' or 'bucketing'")
                if not isinstance(data, dict):
                    raise _Invalid(f"{eat}.data", "must be an object")
                if etype == "conversion":
                    out.append(self._convert_v1_event(data, eat, project, vid, qs, now, rid, ua))
        return out

    def _convert_v1_event(
        self, data: dict[str, Any], eat: str, project: str, vid: str, qs: str, now: float, rid: int, ua: str | None
    ) -> Record:
        goal = data.get("goalId")
        if isinstance(goal, bool) or not (isinstance(goal, int) or (isinstance(goal, str) and _DIGITS.fullmatch(goal))):
            raise _Invalid(f"{eat}.data.goalId", "must be a goal id (integer)")
        goal_s = str(goal)
        amount: float | None = None
        count: int | None = None
        tx: str | None = None
        goal_data = data.get("goalData", [])
        if not isinstance(goal_data, list):
            raise _Invalid(f"{eat}.data.goalData", "must be an array")
        for k, item in enumerate(goal_data):
            gat = f"{eat}.data.goalData[{k}]"
            if not isinstance(item, dict) or item.get("key") not in CONVERT_GOAL_DATA_KEYS or "value" not in item:
                raise _Invalid(gat, "must be {key: amount|productsCount|transactionId, value}")
            key, value = item["key"], item["value"]
            if key == "amount":
                if not _is_number(value):
                    raise _Invalid(f"{gat}.value", "amount must be a number")
                amount = float(value)
            elif key == "productsCount":
                if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                    raise _Invalid(f"{gat}.value", "productsCount must be a non-negative integer")
                count = value
            else:
                if isinstance(value, bool) or not isinstance(value, str | int) or value == "":
                    raise _Invalid(f"{gat}.value", "transactionId must be a non-empty string")
                tx = str(value)
        bd = data.get("bucketingData", {})
        if not isinstance(bd, dict):
            raise _Invalid(f"{eat}.data.bucketingData", "must be an object {experienceId: variationId}")
        pairs: list[tuple[str, str]] = []
        for exp, var in bd.items():
            if not _DIGITS.fullmatch(exp) or isinstance(var, bool) or not _DIGITS.fullmatch(str(var)):
                raise _Invalid(f"{eat}.data.bucketingData", "keys and values must be numeric ids")
            pairs.append((exp, str(var)))
        self._rejected(CONVERT, vid, (goal_s,), eat + ".")
        bucketing = tuple(sorted(pairs))
        key = f"convert|{project}|{vid}|{bucketing}|t:{tx}|{goal_s}"
        return Record(CONVERT, "v1/track", project, vid, "visitor", (goal_s,), amount, key, qs, now, rid,
                      event_type="conversion", transaction_id=tx, products_count=count,
                      experiment_id=bucketing[0][0] if bucketing else None,
                      variation_id=bucketing[0][1] if bucketing else None, bucketing=bucketing, user_agent=ua)

    # ------------------------------------------------------------------ Conductrics

    def _key_ok(self, account: str, apikey: str) -> bool:
        if not apikey:
            return False
        if self._conductrics_keys is None:
            return True
        digest = _digest(apikey)
        return any(hmac.compare_digest(digest, k) for k in self._conductrics_keys.get(account, ()))

    def _conductrics_error(self, request: web.Request, status: int, fld: str, message: str) -> web.Response:
        self._log(request, CONDUCTRICS, status, "rejected", fld)
        body = {"status": status, "error": message, "field": fld}
        return web.Response(status=status, body=_dumps(body), content_type="application/json")

    async def _conductrics(self, request: web.Request) -> web.StreamResponse:
        early = await self._enter(request, CONDUCTRICS)
        if early is not None:
            return early
        q = request.query
        account = request.match_info["account"]
        if not self._key_ok(account, q.get("apikey", "")):
            return self._conductrics_error(request, 401, "apikey", "missing or invalid API key")
        vid, session = q.get("vid", ""), q.get("session", "")
        if not vid:
            return self._conductrics_error(request, 400, "vid", "is required")
        if not session:
            return self._conductrics_error(request, 400, "session", "is required")
        body = await self._read(request, CONDUCTRICS, self.max_body)
        if isinstance(body, web.Response):
            return body
        try:
            try:
                payload = _loads(body)
            except ValueError:
                raise _Invalid("body", "is not valid JSON") from None
            commands = payload.get("commands") if isinstance(payload, dict) else None
            if not isinstance(commands, list) or not commands:
                raise _Invalid("commands", "must be a non-empty array")
            goals: list[tuple[str, float | None]] = []
            for i, cmd in enumerate(commands):
                if not isinstance(cmd, dict) or not isinstance(cmd.get("g"), str) or not cmd["g"]:
                    raise _Invalid(f"commands[{i}].g", "a goal command needs a goal code 'g'")
                v = cmd.get("v")
                if v is not None and not _is_number(v):
                    raise _Invalid(f"commands[{i}].v", "must be a number")
                goals.append((cmd["g"], None if v is None else float(v)))
            self._rejected(CONDUCTRICS, vid, (g for g, _ in goals), "")
        except _Invalid as exc:
            return self._conductrics_error(request, 400, exc.field, exc.message)
        rewarded = not (self._no_selection_all or vid in self._no_selection)
        now, rid, qs = time.time(), self._seq, redact_query(request.query_string)
        ua = request.headers.get("User-Agent")
        records = [
            Record(CONDUCTRICS, "agent-api", account, vid, "visitor", (g,), v,
                   f"conductrics|{account}|{vid}|{session}|{g}", qs, now, rid, session=session, user_agent=ua)
            for g, v in goals
        ]
        if rewarded:
            self._accept(records, CONDUCTRICS)
            items = [{"g": g, "rs": [{"a": "a-agent", "v": 1 if v is None else v}]} for g, v in goals]
        else:
            self.unrewarded.extend(records)
            items = [{"g": g, "rs": []} for g, _ in goals]
        self._log(request, CONDUCTRICS, 200, "accepted" if rewarded else "unrewarded")
        return web.Response(body=_dumps({"status": 200, "data": {"items": items}}), content_type="application/json")

    # ------------------------------------------------------------------ queries

    def kameleoon_nonces(self) -> list[str]:
        """Every nonce Kameleoon accepted, in arrival order, repeats included."""
        return [r.nonce for r in self.records if r.provider == KAMELEOON and r.nonce is not None]

    def duplicates(self) -> dict[str, int]:
        """Keys accepted more than once -> how many times (same nonce; same Convert transaction, visitor and
        experiment-variation; same Conductrics account, vid, session and goal)."""
        c = Counter(r.key for r in self.records)
        return {k: n for k, n in c.items() if n > 1}

    def counts(self) -> dict[str, int]:
        """Accepted conversions per provider."""
        return {p: self._counts[p] for p in (KAMELEOON, CONVERT, CONDUCTRICS)}

    def records_for(self, provider: str) -> list[Record]:
        return [r for r in self.records if r.provider == provider]

    def status_counts(self, provider: str | None = None) -> dict[int, int]:
        """HTTP statuses answered (0: no answer), over the request log."""
        out: Counter[int] = Counter()
        for (p, status), n in self._statuses.items():
            if provider is None or p == provider:
                out[status] += n
        return dict(out)

    def summary(self) -> dict[str, Any]:
        return {
            "counts": self.counts(),
            "requests": self._seq,
            "statuses": {p: {str(s): n for s, n in self.status_counts(p).items()} for p in PROVIDERS},
            "duplicates": self.duplicates(),
            "dropped": len(self.dropped),
            "unrewarded": len(self.unrewarded),
            "token_grants": self.token_grants,
        }

    def reset(self) -> None:
        """Forget records, the request log, tokens, counters and every fault."""
        self.records.clear()
        self.dropped.clear()
        self.unrewarded.clear()
        self.requests.clear()
        self._seq = 0
        self._statuses.clear()
        self._counts.clear()
        self._tokens.clear()
        self.token_grants = 0
        self.clear_faults()

    async def wait_until(self, predicate: Callable[[Sandbox], bool], timeout: float = 10.0) -> None:
        """Return once `predicate(sandbox)` holds, re-checked after every request; TimeoutError after `timeout`."""
        if predicate(self):
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (predicate, fut)
        self._waiters.append(entry)
        try:
            await asyncio.wait_for(fut, timeout)
        finally:
            if entry in self._waiters:
                self._waiters.remove(entry)

    async def wait_for_records(self, count: int, provider: str | None = None, timeout: float = 10.0) -> None:
        """Return once `count` conversions were accepted (for `provider`, or in all)."""
        if provider is None:
            await self.wait_until(lambda s: len(s.records) >= count, timeout)
        else:
            await self.wait_until(lambda s: s._counts[provider] >= count, timeout)

    def _wake(self) -> None:
        for pred, fut in list(self._waiters):
            if not fut.done() and pred(self):
                fut.set_result(None)

    # ------------------------------------------------------------------ control over HTTP

    async def _ctl_records(self, request: web.Request) -> web.StreamResponse:
        q = request.query
        out = self.summary()
        if q.get("records", "true") != "false":
            out["records"] = self.records
            out["dropped_records"] = self.dropped
            out["unrewarded_records"] = self.unrewarded
        if q.get("requests") == "true":
            out["request_log"] = self.requests
        return web.Response(body=_dumps(out), content_type="application/json")

    async def _ctl_add_faults(self, request: web.Request) -> web.StreamResponse:
        try:
            spec = _loads(await request.read())
            n = self.apply_spec(spec)
        except ValueError as exc:  # SpecError and JSON errors
            return web.Response(status=400, body=_dumps({"error": str(exc)}), content_type="application/json")
        return web.Response(body=_dumps({"added": n, "active": len(self._faults)}), content_type="application/json")

    async def _ctl_clear_faults(self, request: web.Request) -> web.StreamResponse:
        self.clear_faults()
        return web.Response(status=204)

    async def _ctl_reset(self, request: web.Request) -> web.StreamResponse:
        self.reset()
        return web.Response(status=204)

    async def _ctl_expire_tokens(self, request: web.Request) -> web.StreamResponse:
        self.expire_tokens()
        return web.Response(status=204)

    async def _ctl_revoke_tokens(self, request: web.Request) -> web.StreamResponse:
        self.revoke_tokens()
        return web.Response(status=204)


_REASONS = {400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 413: "Payload Too Large"}

OPTION_NAMES = (
    "kameleoon_auth_sites", "kameleoon_clients", "token_lifetime", "kameleoon_max_body", "conductrics_keys",
    "conductrics_no_selection", "conductrics_no_selection_all", "hang_seconds", "request_log",
)


def load_options(path: str | Path) -> dict[str, Any]:
    """Sandbox constructor options from a JSON file (keys: OPTION_NAMES)."""
    data = json.loads(Path(path).read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object of sandbox options")
    unknown = sorted(set(data) - set(OPTION_NAMES))
    if unknown:
        raise ValueError(f"{path}: unknown sandbox option {unknown[0]!r}")
    return data


def serve(host: str = "127.0.0.1", port: int = 8900, **options: Any) -> None:
    """Run the sandbox until SIGTERM or SIGINT; prints one line with its URL when listening."""

    async def main() -> None:
        sandbox = Sandbox(**options)
        url = await sandbox.start(host, port)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        print(f"provider sandbox listening on {url}", flush=True)
        try:
            await stop.wait()
        finally:
            await sandbox.stop()

    asyncio.run(main())
