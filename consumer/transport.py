"""HTTP I/O to the providers: one keep-alive session, each provider's proxy and TLS, OAuth client-credentials tokens."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import aiohttp

from consumer.config import Config
from consumer.egress import Egress, EnvProxies
from consumer.model import Provider
from consumer.providers import registry
from consumer.providers.base import HttpRequest, TokenSpec, token_request


@dataclass(frozen=True, slots=True)
class HttpResponse:
    status: int
    headers: Mapping[str, str]
    body: bytes


class TransportError(Exception):
    """A request got no HTTP answer (connection refused or reset, timeout); its text names no secret.

    `refused`: what was refused is ours to fix, not the provider's to recover from (the egress proxy
    refused its credentials, or TLS refused a certificate): the delivery layer pauses the project
    instead of retrying it as an outage.
    """

    def __init__(self, kind: str, url: str, *, refused: bool = False) -> None:
        super().__init__(f"{kind} on {url}")
        self.kind = kind
        self.refused = refused


class Transport:
    """Sends provider requests over one pooled aiohttp session (keep-alive, TLS verified by default).

    Each provider's requests use its Egress (proxy, CA bundle, client certificate); without an
    explicit proxy the standard HTTPS_PROXY / HTTP_PROXY / NO_PROXY variables apply.
    """

    def __init__(self, *, limit: int = 256, verify_tls: bool = True,
                 egress: Mapping[Provider, Egress] | None = None) -> None:
        self._limit = limit
        self._verify = verify_tls
        self._egress = dict(egress or {})
        self._default = Egress(ssl=verify_tls, env=EnvProxies())
        self._session: aiohttp.ClientSession | None = None

    @classmethod
    def for_config(cls, cfg: Config) -> Transport:
        """A transport with every provider's [<provider>.http] settings."""
        env = EnvProxies()
        return cls(egress={registry.spec_of(slug).provider: Egress.from_config(section.http, env)
                           for slug, section in cfg.providers.items()})

    def _open(self) -> aiohttp.ClientSession:
        if self._session is None:
            # ssl=True verifies certificates (the default); False is only for a test endpoint, by choice.
            connector = aiohttp.TCPConnector(limit=self._limit, ssl=self._verify, keepalive_timeout=30)
            # Cookies are never part of these APIs; a shared jar would only cost time.
            self._session = aiohttp.ClientSession(connector=connector, cookie_jar=aiohttp.DummyCookieJar(),
                                                  skip_auto_headers=("User-Agent",))
        return self._session

    async def send(self, request: HttpRequest, timeout: float, provider: Provider | None = None) -> HttpResponse:
        session = self._open()
        egress = self._egress.get(provider, self._default) if provider is not None else self._default
        proxy, proxy_headers = egress.proxy_for(request.url)
        safe_url = request.redacted_url or request.url.split("?", 1)[0]
        try:
            async with session.request(
                request.method, request.url, data=request.body, headers=dict(request.headers),
                timeout=aiohttp.ClientTimeout(total=timeout), allow_redirects=False,
                ssl=egress.ssl, proxy=proxy, proxy_headers=proxy_headers,
            ) as resp:
                body = await resp.read()
                return HttpResponse(resp.status, resp.headers, body)
        except TimeoutError:
            raise TransportError("timeout", safe_url) from None
        except aiohttp.ClientHttpProxyError as exc:
            # The proxy refused the tunnel (407: its credentials; 403: its policy): say so, not just the class.
            raise TransportError(f"proxy answered {exc.status}", safe_url,
                                 refused=exc.status in (401, 403, 407)) from None
        except aiohttp.ClientSSLError as exc:  # a certificate refused, by us or by the provider
            raise TransportError(type(exc).__name__, safe_url, refused=True) from None
        except aiohttp.ClientError as exc:
            # aiohttp's own messages can include the full URL, query string and all: keep the class only.
            raise TransportError(type(exc).__name__, safe_url) from None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


class TokenError(Exception):
    """No token could be obtained (the grant was refused or the token endpoint failed)."""

    def __init__(self, message: str, *, permanent: bool, status: int | None = None) -> None:
        super().__init__(message)
        self.permanent = permanent
        self.status = status


class TokenCache:
    """Client-credentials tokens per spec: fetched once, shared, refreshed `refresh_margin` before expiry."""

    def __init__(self, transport: Transport, user_agent: str | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 on_grant: Callable[[str, str], None] | None = None) -> None:
        self.transport = transport
        self.user_agent = user_agent  # None: each spec's own (its provider's user agent)
        self.clock = clock
        self.on_grant = on_grant
        self._tokens: dict[TokenSpec, tuple[str, float]] = {}
        self._locks: dict[TokenSpec, asyncio.Lock] = {}

    async def get(self, spec: TokenSpec, timeout: float) -> str:
        cached = self._tokens.get(spec)
        if cached and cached[1] - spec.refresh_margin > self.clock():
            return cached[0]
        lock = self._locks.setdefault(spec, asyncio.Lock())
        async with lock:
            cached = self._tokens.get(spec)
            if cached and cached[1] - spec.refresh_margin > self.clock():
                return cached[0]
            token, expires_in = await self._grant(spec, timeout)
            self._tokens[spec] = (token, self.clock() + expires_in)
            return token

    def invalidate(self, spec: TokenSpec, token: str) -> None:
        """Drop a token the provider refused, unless another request already replaced it."""
        cached = self._tokens.get(spec)
        if cached and cached[0] == token:
            del self._tokens[spec]

    async def _grant(self, spec: TokenSpec, timeout: float) -> tuple[str, float]:
        request = token_request(spec, self.user_agent)
        try:
            resp = await self.transport.send(request, timeout, spec.provider)
        except TransportError as exc:
            self._count(spec, "error")
            # Refused by the proxy or TLS: no retry will get a token until that is fixed.
            raise TokenError(f"token endpoint unreachable ({exc.kind})", permanent=exc.refused) from None
        if resp.status != 200:
            self._count(spec, "refused" if resp.status in (400, 401, 403) else "error")
            permanent = resp.status in (400, 401, 403)
            raise TokenError(f"token endpoint answered {resp.status}", permanent=permanent, status=resp.status)
        try:
            data = json.loads(resp.body)
            token = str(data["access_token"])
            expires_in = float(data.get("expires_in", 3600))
        except (ValueError, KeyError, TypeError):
            self._count(spec, "error")
            raise TokenError("token endpoint answered without an access_token", permanent=False) from None
        self._count(spec, "ok")
        return token, expires_in

    def _count(self, spec: TokenSpec, result: str) -> None:
        """Tell `on_grant` (provider slug, result) how a grant went."""
        if self.on_grant is not None:
            self.on_grant(spec.provider.slug if spec.provider is not None else "none", result)
