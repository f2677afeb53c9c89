"""How the service reaches an HTTPS endpoint: a TLS context, and a proxy (configured, or HTTPS_PROXY/NO_PROXY)."""

from __future__ import annotations

import ssl
import urllib.parse
import urllib.request
from dataclasses import dataclass, field

import aiohttp

from consumer.config import HttpConfig, TlsConfig
from consumer.tls import client_context

# (proxy URL without credentials, the Proxy-Authorization header for it); (None, None): connect directly.
Proxy = tuple[str | None, dict[str, str] | None]
_DIRECT: Proxy = (None, None)


def _proxy_headers(user: str, password: str) -> dict[str, str]:
    return {"Proxy-Authorization": aiohttp.encode_basic_auth(user, password)}


def tls_context(tls: TlsConfig) -> ssl.SSLContext | bool:
    """The configured TLS client context, or True (verify against the system's CAs) when nothing is set."""
    if not (tls.ca_bundle or tls.client_cert):
        return True
    password = tls.client_key_password.reveal() if tls.client_key_password else None
    return client_context(tls.ca_bundle, tls.client_cert, tls.client_key, password)


def _split_credentials(proxy: str) -> Proxy:
    parts = urllib.parse.urlsplit(proxy)
    if parts.username is None:
        return proxy, None
    headers = _proxy_headers(urllib.parse.unquote(parts.username), urllib.parse.unquote(parts.password or ""))
    netloc = parts.netloc.rsplit("@", 1)[1]
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "", "")), headers


class EnvProxies:
    """HTTPS_PROXY / HTTP_PROXY / NO_PROXY (either case) as they were at start-up, decided once per origin.

    Python's own rules (urllib's getproxies_environment / proxy_bypass_environment), read once:
    aiohttp's `trust_env` would consult the environment and ~/.netrc in a thread on every request,
    and a netrc entry would clash with the providers' own Authorization headers.
    """

    def __init__(self) -> None:
        self._proxies = urllib.request.getproxies_environment()
        self._decided: dict[str, Proxy] = {}

    def __repr__(self) -> str:  # a proxy URL may carry credentials
        return f"EnvProxies(schemes={sorted(k for k in self._proxies if k != 'no')})"

    def for_url(self, url: str) -> Proxy:
        """The proxy for a request to `url` (scheme and host:port decide), or (None, None)."""
        slash = url.find("/", url.find("//") + 2)
        origin = url if slash < 0 else url[:slash]
        decided = self._decided.get(origin)
        if decided is None:
            decided = self._decided[origin] = self._decide(origin)
        return decided

    def _decide(self, origin: str) -> Proxy:
        parts = urllib.parse.urlsplit(origin)
        proxy = self._proxies.get(parts.scheme) or self._proxies.get("all")
        if not proxy or not parts.hostname:
            return _DIRECT
        host = parts.netloc.rsplit("@", 1)[-1]
        # Python's own NO_PROXY matching (what urllib and requests apply); typeshed does not list it.
        if urllib.request.proxy_bypass_environment(host, self._proxies):  # type: ignore[attr-defined]
            return _DIRECT
        if "://" not in proxy:
            proxy = "http://" + proxy
        return _split_credentials(proxy)


@dataclass(frozen=True)
class Egress:
    """How one provider (or the registry) is reached: its TLS context and its proxy.

    An explicit proxy wins; otherwise the environment's HTTPS_PROXY / HTTP_PROXY / NO_PROXY decide.
    """

    ssl: ssl.SSLContext | bool = True
    proxy: str | None = None
    proxy_headers: dict[str, str] | None = None  # Proxy-Authorization: a secret
    env: EnvProxies = field(default_factory=EnvProxies)

    def __repr__(self) -> str:  # the dataclass repr would show the proxy's credentials
        return f"Egress(proxy={self.proxy!r}, custom_tls={isinstance(self.ssl, ssl.SSLContext)})"

    @classmethod
    def from_config(cls, http: HttpConfig, env: EnvProxies | None = None) -> Egress:
        headers = None
        if http.proxy_username:
            password = http.proxy_password.reveal() if http.proxy_password else ""
            headers = _proxy_headers(http.proxy_username.reveal(), password)
        return cls(tls_context(http.tls), http.proxy, headers, env or EnvProxies())

    def proxy_for(self, url: str) -> Proxy:
        if self.proxy is not None:
            return self.proxy, self.proxy_headers
        return self.env.for_url(url)
