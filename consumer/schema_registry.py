"""An asynchronous Confluent Schema Registry client: auth, TLS, backoff, single-flight fetches, bounded caches."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import random
import ssl
import time
import urllib.parse
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp

from consumer.config import SchemaRegistryConfig
from consumer.egress import EnvProxies, tls_context

log = logging.getLogger(__name__)

_ACCEPT = "application/vnd.schemaregistry.v1+json, application/json"
_CONTENT_TYPE = "application/vnd.schemaregistry.v1+json"


class RegistryError(Exception):
    """A registry request failed; the message shows the URL without credentials, never a secret."""


class RegistryUnavailable(RegistryError):
    """No usable answer (unreachable, timed out, 5xx, 401/403, garbage): a later attempt may succeed."""


class SchemaNotFound(RegistryError):
    """The registry answered that it has no schema under this id."""


@dataclass(frozen=True, slots=True)
class RegisteredSchema:
    text: str  # the schema's JSON text as registered
    schema_type: str  # AVRO, PROTOBUF, JSON


class Backoff:
    """When the next request may go to a registry that failed: exponential, capped, half-jittered.

    Shared by every request to one registry, so an outage costs one request per interval however
    many events wait on it. Pure: the caller passes the time.
    """

    def __init__(self, base: float = 0.5, cap: float = 10.0, rng: Callable[[], float] = random.random) -> None:
        self.base, self.cap, self.rng = base, cap, rng
        self.failures = 0
        self.ready_at = 0.0

    def failed(self, now: float) -> float:
        """Count a failure; returns the delay before the next attempt."""
        self.failures += 1
        full = min(self.cap, self.base * 2.0 ** min(self.failures - 1, 30))
        delay = full / 2 + full / 2 * self.rng()
        self.ready_at = now + delay
        return delay

    def succeeded(self) -> None:
        self.failures = 0
        self.ready_at = 0.0

    def wait(self, now: float) -> float:
        """Seconds until the next attempt may start (0: now)."""
        return max(0.0, self.ready_at - now)


class NegativeCache:
    """Ids the registry does not have, each remembered `ttl` seconds, at most `size` of them (oldest dropped).

    A flood of messages with forged ids then reaches the registry once per id and ttl, and cannot
    grow memory without bound. Pure: the caller passes the time.
    """

    def __init__(self, size: int = 10_000, ttl: float = 60.0) -> None:
        if size < 1:
            raise ValueError("size must be positive")
        self.size, self.ttl = size, ttl
        self._added: OrderedDict[int, float] = OrderedDict()

    def add(self, key: int, now: float) -> None:
        self._added[key] = now
        self._added.move_to_end(key)
        while len(self._added) > self.size:
            self._added.popitem(last=False)

    def has(self, key: int, now: float) -> bool:
        added = self._added.get(key)
        if added is None:
            return False
        if now - added >= self.ttl:
            del self._added[key]
            return False
        return True

    def discard(self, key: int) -> None:
        self._added.pop(key, None)

    def __len__(self) -> int:
        return len(self._added)


def _redact(url: str) -> tuple[str, tuple[str, str] | None]:
    """The URL without userinfo, and the (user, password) it held."""
    parts = urllib.parse.urlsplit(url.rstrip("/"))
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("schema registry URL must be http(s)://host[:port][/path]")
    parts.port  # noqa: B018  # raises ValueError for a port that is not a number
    credentials = None
    if parts.username is not None:
        credentials = (urllib.parse.unquote(parts.username), urllib.parse.unquote(parts.password or ""))
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    netloc = host if parts.port is None else f"{host}:{parts.port}"
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "", "")), credentials


class SchemaRegistry:
    """Fetches each schema id once, without blocking the event loop.

    - One request per id at a time: every event waiting for the same id shares it.
    - Each request is bounded by `timeout`; after a failure, requests wait out a shared backoff.
    - Ids the registry does not have go to a bounded negative cache (`negative_size`, `negative_ttl`).
    - Auth: basic (`username`/`password`, or userinfo in the URL) or a bearer token; TLS with an
      optional CA bundle and client certificate (`ssl_context`). HTTPS_PROXY/HTTP_PROXY/NO_PROXY are honoured.
    Credentials travel only in the Authorization header: `url`, repr and every error omit them.
    """

    def __init__(
        self,
        url: str,
        *,
        timeout: float = 5.0,
        username: str | None = None,
        password: str | None = None,
        bearer_token: str | None = None,
        ssl_context: ssl.SSLContext | None = None,
        negative_ttl: float = 60.0,
        negative_size: int = 10_000,
        backoff: Backoff | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.url, in_url = _redact(url)
        if in_url is not None:
            if username is not None or bearer_token is not None:
                raise ValueError("schema registry credentials are in the URL and in the settings: use one")
            username, password = in_url
        if username is not None and bearer_token is not None:
            raise ValueError("use basic auth or a bearer token for the schema registry, not both")
        self._headers = {"Accept": _ACCEPT}
        if username is not None:
            pair = f"{username}:{password or ''}".encode()
            self._headers["Authorization"] = "Basic " + base64.b64encode(pair).decode("ascii")
        elif bearer_token is not None:
            self._headers["Authorization"] = f"Bearer {bearer_token}"
        self.timeout = timeout
        self._ssl: ssl.SSLContext | bool = ssl_context if ssl_context is not None else True
        self._proxies = EnvProxies()
        self.backoff = backoff or Backoff()
        self.clock = clock
        self._schemas: dict[int, RegisteredSchema] = {}
        self._missing = NegativeCache(negative_size, negative_ttl)
        self._fetches: dict[int, asyncio.Task[RegisteredSchema]] = {}
        self._session: aiohttp.ClientSession | None = None

    @classmethod
    def from_config(cls, url: str, cfg: SchemaRegistryConfig) -> SchemaRegistry:
        context = tls_context(cfg.tls)
        return cls(
            url,
            timeout=cfg.timeout,
            username=cfg.username.reveal() if cfg.username else None,
            password=cfg.password.reveal() if cfg.password else None,
            bearer_token=cfg.bearer_token.reveal() if cfg.bearer_token else None,
            ssl_context=context if isinstance(context, ssl.SSLContext) else None,
        )

    def __repr__(self) -> str:
        return f"SchemaRegistry({self.url!r})"

    # ------------------------------------------------------------------ the negative cache, for the hot path

    def known_missing(self, schema_id: int) -> bool:
        """True while the registry's "no such id" answer is remembered."""
        return self._missing.has(schema_id, self.clock())

    # ------------------------------------------------------------------ requests

    async def get_schema(self, schema_id: int) -> RegisteredSchema:
        """The schema registered under `schema_id`: raises SchemaNotFound or RegistryUnavailable.

        Makes at most one attempt (after the backoff, if the registry failed lately); concurrent
        callers for the same id share it. The caller decides whether to try again.
        """
        cached = self._schemas.get(schema_id)
        if cached is not None:
            return cached
        if self._missing.has(schema_id, self.clock()):
            raise SchemaNotFound(f"schema id {schema_id} is not in {self.url}")
        task = self._fetches.get(schema_id)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._fetch(schema_id))
            self._fetches[schema_id] = task
            task.add_done_callback(lambda t: self._fetched(schema_id, t))
        # Shielded: one waiter cancelled (its event revoked, say) must not cancel the others' request.
        return await asyncio.shield(task)

    def _fetched(self, schema_id: int, task: asyncio.Task[RegisteredSchema]) -> None:
        if self._fetches.get(schema_id) is task:
            del self._fetches[schema_id]
        if not task.cancelled():
            task.exception()  # retrieved here, so an outcome nobody awaited any more is not reported as lost

    async def _fetch(self, schema_id: int) -> RegisteredSchema:
        wait = self.backoff.wait(self.clock())
        if wait > 0:
            await asyncio.sleep(wait)
        try:
            payload = await self._request("GET", f"/schemas/ids/{schema_id}")
        except SchemaNotFound:
            self._missing.add(schema_id, self.clock())
            raise
        if not isinstance(payload, dict) or not isinstance(payload.get("schema"), str):
            raise self._failed(RegistryUnavailable(f"{self.url}: unexpected answer for schema id {schema_id}"))
        schema_type = payload.get("schemaType") or "AVRO"
        found = RegisteredSchema(payload["schema"], str(schema_type))
        self._missing.discard(schema_id)
        self._schemas[schema_id] = found
        return found

    async def register(self, subject: str, schema_str: str) -> int:
        """Register (or find) an Avro schema under `subject`; returns its id. For producers and demos."""
        path = "/subjects/" + urllib.parse.quote(subject, safe="") + "/versions"
        payload = await self._request("POST", path, {"schema": schema_str})
        if not isinstance(payload, dict) or type(payload.get("id")) is not int:
            raise RegistryUnavailable(f"{self.url}: unexpected answer registering {subject}")
        return int(payload["id"])

    def _open(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            # A few connections are plenty: each schema id is fetched once; a flood of forged ids queues here.
            connector = aiohttp.TCPConnector(limit=8, ssl=self._ssl)
            self._session = aiohttp.ClientSession(connector=connector, cookie_jar=aiohttp.DummyCookieJar())
        return self._session

    def _failed(self, exc: RegistryUnavailable) -> RegistryUnavailable:
        delay = self.backoff.failed(self.clock())
        log.warning("schema registry unavailable", extra={"registry": self.url, "error": str(exc),
                                                          "retry_in_s": round(delay, 2)})
        return exc

    async def _request(self, method: str, path: str, body: Mapping[str, Any] | None = None) -> Any:
        headers = dict(self._headers)
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = _CONTENT_TYPE
        where = f"{method} {self.url}{path}"
        proxy, proxy_headers = self._proxies.for_url(self.url)
        try:
            async with self._open().request(
                method, f"{self.url}{path}", data=data, headers=headers, allow_redirects=False,
                timeout=aiohttp.ClientTimeout(total=self.timeout), proxy=proxy, proxy_headers=proxy_headers,
            ) as resp:
                raw = await resp.read()
                status = resp.status
        except TimeoutError:
            raise self._failed(RegistryUnavailable(f"{where}: no answer within {self.timeout:g} s")) from None
        except aiohttp.ClientConnectorCertificateError as exc:
            reason = getattr(exc.certificate_error, "verify_message", None) or type(exc.certificate_error).__name__
            raise self._failed(RegistryUnavailable(f"{where}: TLS certificate not trusted ({reason}; "
                                                   "is ca_bundle the registry's CA?)")) from None
        except aiohttp.ClientError as exc:
            # aiohttp's messages can carry the request URL; the class says enough.
            raise self._failed(RegistryUnavailable(f"{where}: {type(exc).__name__}")) from None
        if status == 200:
            try:
                payload = json.loads(raw)
            except ValueError:
                raise self._failed(RegistryUnavailable(f"{where}: the answer is not JSON")) from None
            self.backoff.succeeded()
            return payload
        error_code = None
        with contextlib.suppress(ValueError, AttributeError):
            error_code = json.loads(raw).get("error_code")
        if status == 404 and error_code in (None, 40403):
            self.backoff.succeeded()  # the registry answered: it is up
            raise SchemaNotFound(f"{self.url}{path}: not found (error_code {error_code})")
        raise self._failed(RegistryUnavailable(f"{where}: HTTP {status} (error_code {error_code})"))

    async def close(self) -> None:
        for task in list(self._fetches.values()):
            task.cancel()
        if self._session is not None:
            await self._session.close()
            self._session = None
