"""Provider calls through an egress proxy (a real tinyproxy on loopback) and with custom TLS, as configured.

The sandbox serves TLS with a certificate from a throw-away CA (tests/pki.py), so a provider is
reachable only with that CA as its ca_bundle; through the proxy HTTPS is tunnelled with CONNECT.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import re
import socket
import subprocess
import time
import tomllib
from collections.abc import AsyncIterator, Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from pki import Pki, make_pki
from registry_server import RegistryServer

from consumer.config import Config, ConfigError, parse
from consumer.delivery import Dispatcher, ProjectStatus, Result, Status, each
from consumer.egress import EnvProxies
from consumer.embedded import EmbeddedBroker
from consumer.metrics import Metrics
from consumer.model import Conversion, Identity, Provider
from consumer.producer import encoded, produce_values
from consumer.providers.kameleoon.keys import nonce
from consumer.providers.registry import modules
from consumer.samples import purchases
from consumer.sandbox import Sandbox
from consumer.schema_registry import SchemaRegistry
from consumer.transport import TokenCache, Transport
from tests.conftest import config_dict, run_until_done
from tests.reliability.harness import wait_for
from tests.test_pipeline import expected_conversions, sandbox_view, view_of

EXAMPLE = Path(__file__).resolve().parent.parent / "deploy" / "config.example.toml"
PROXY_USER = "egress"
PROXY_PASSWORD = "pr0xy-s3cret-pw"
SITE = "f17c21u1ag"


class Tinyproxy:
    """Debian's tinyproxy in the foreground on a free loopback port, logging every request it forwards."""

    def __init__(self, directory: Path, *, user: str | None = None, password: str | None = None) -> None:
        self.directory = directory
        self.log_file = directory / "tinyproxy.log"
        self.user, self.password = user, password
        self.port = 0
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Tinyproxy:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        # MaxClients: every kept-alive tunnel holds a slot, and each provider may open `concurrency` of them
        # (64 for Convert and Conductrics): a smaller limit queues connections until requests time out.
        lines = [f"Port {self.port}", "Listen 127.0.0.1", "Timeout 30", f'LogFile "{self.log_file}"',
                 "LogLevel Connect", "MaxClients 512", "Allow 127.0.0.1", "DisableViaHeader Yes"]
        if self.user is not None:
            lines.append(f"BasicAuth {self.user} {self.password}")
        conf = self.directory / "tinyproxy.conf"
        conf.write_text("\n".join(lines) + "\n")
        self._process = subprocess.Popen(["tinyproxy", "-d", "-c", str(conf)],
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return self
            except OSError:
                if self._process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"tinyproxy did not start: {self.log()}") from None
                time.sleep(0.02)

    def stop(self) -> None:
        if self._process is not None:
            self._process.terminate()
            self._process.wait(10)
            self._process = None

    def log(self) -> str:
        return self.log_file.read_text() if self.log_file.exists() else ""

    def requests(self) -> list[str]:
        """Each request line the proxy read: 'CONNECT host:port' for HTTPS, 'POST http://…' for plain HTTP."""
        return re.findall(r"Request \(file descriptor \d+\): (\S+ \S+) HTTP/1\.[01]", self.log())

    async def wait_for_requests(self, predicate: Callable[[list[str]], bool], timeout: float = 10.0) -> list[str]:
        deadline = time.monotonic() + timeout
        while not predicate(seen := self.requests()):
            if time.monotonic() > deadline:
                raise AssertionError(f"the proxy saw {seen}")
            await asyncio.sleep(0.02)
        return seen


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def proxy(tmp_path: Path) -> Iterator[Tinyproxy]:
    """A proxy demanding credentials (tinyproxy's BasicAuth)."""
    (tmp_path / "proxy").mkdir()
    p = Tinyproxy(tmp_path / "proxy", user=PROXY_USER, password=PROXY_PASSWORD).start()
    yield p
    p.stop()


@pytest.fixture
def open_proxy(tmp_path: Path) -> Iterator[Tinyproxy]:
    """A proxy open to loopback clients."""
    (tmp_path / "open-proxy").mkdir()
    p = Tinyproxy(tmp_path / "open-proxy").start()
    yield p
    p.stop()


@pytest.fixture
async def tls_sandbox(pki: Pki) -> AsyncIterator[Sandbox]:
    sb = Sandbox(conductrics_keys={"ac-xxx": "api-1234567890"}, kameleoon_clients={"client-1": "secret-1"})
    await sb.start(ssl_context=pki.server_context())
    yield sb
    await sb.stop()


@pytest.fixture(autouse=True)
def no_proxy_from_the_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)


def http_table(pki: Pki, **extra: Any) -> dict[str, Any]:
    return {"ca_bundle": str(pki.ca), **extra}


# --------------------------------------------------------------------------- the service, end to end


async def test_the_service_delivers_through_the_configured_proxy_to_tls_providers(
    broker: EmbeddedBroker, topics: dict[str, str], tls_sandbox: Sandbox, proxy: Tinyproxy, pki: Pki,
    caplog: pytest.LogCaptureFixture,
) -> None:
    data = config_dict(broker.bootstrap, topics, tls_sandbox.url)
    for provider in ("kameleoon", "convert", "conductrics"):
        data[provider]["http"] = http_table(pki, proxy=proxy.url, proxy_username=PROXY_USER,
                                            proxy_password="${PROXY_PASSWORD}")
    cfg = parse(data, env={"PROXY_PASSWORD": PROXY_PASSWORD})
    items = list(purchases(60, now_ms=int(time.time() * 1000), seed=11))
    expected = expected_conversions(cfg, items)
    assert all(expected[p] for p in ("kameleoon", "convert", "conductrics"))
    produce_values(broker.bootstrap, topics["topic"], encoded(items))

    with caplog.at_level(logging.DEBUG):
        app = await run_until_done(cfg, len(items))

    got = sandbox_view(tls_sandbox)
    for provider in ("kameleoon", "convert", "conductrics"):
        assert got[provider] == view_of([c for _, c in expected[provider]], provider), provider
    # Every request went through the proxy, as a CONNECT tunnel to the sandbox (the proxy saw no URL).
    sandbox_origin = tls_sandbox.url.removeprefix("https://")
    seen = proxy.requests()
    assert seen and set(seen) == {f"CONNECT {sandbox_origin}"}, seen
    assert set(tls_sandbox.status_counts()) <= {200, 204}
    retried = [s for m in app.metrics.retries.collect() for s in m.samples if s.name.endswith("_total") and s.value]
    assert retried == []  # nothing timed out or failed on the way
    assert PROXY_PASSWORD not in caplog.text and PROXY_PASSWORD not in repr(cfg)
    assert PROXY_PASSWORD in cfg.secrets()  # so the log redactor masks it wherever it might appear


# --------------------------------------------------------------------------- the delivery layer, without Kafka


def kameleoon_config(url: str, http: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "kafka": {"bootstrap_servers": "unused:1", "topic": "t", "group_id": "g", "dlq_topic": "t.dlq"},
        "kameleoon": {
            "user_agent": "tests/1.0",
            "token_url": f"{url}/oauth/token",
            "batch": {"linger": "10ms"},
            "retry": {"base_delay": "5ms", "max_delay": "20ms", "max_attempts": 2},
            "flow": {"timeout": "3s", "breaker_failures": 50},
            "projects": {SITE: {"base_url": url, "goals": [36151], "client_id": "client-1",
                                "client_secret": "secret-1"}},
            **({"http": http} if http is not None else {}),
        },
    }


def conversion(i: int) -> Conversion:
    v = f"visitor-{i}"
    return Conversion(Provider.KAMELEOON, SITE, v, ("36151",), Decimal("10.00"), nonce(SITE, f"o{i}", "36151", v),
                      f"e{i}", f"o{i}", 0, 1, Identity.VISITOR)


async def deliver(cfg: Config, conversions: list[Conversion]) -> dict[str, Result]:
    """What the service's dispatcher makes of these conversions, sent with the transport the service builds."""
    results, stalled = await deliver_or_stall(cfg, conversions)
    assert stalled is None, stalled
    return results


async def deliver_or_stall(cfg: Config, conversions: list[Conversion],
                           ) -> tuple[dict[str, Result], ProjectStatus | None]:
    """The results once all are in; or those so far and the project's status once it stalls: paused
    (refused credentials or certificates wait for a fix) or failed (its circuit open: the failure looks
    transient, so its conversions wait and are retried instead of failing)."""
    transport = Transport.for_config(cfg)
    results: dict[str, Result] = {}
    dispatcher = Dispatcher(modules(cfg), transport, TokenCache(transport, "tests/1.0"), Metrics(),
                            each(lambda _t, c, r: results.__setitem__(c.key, r)))

    def stalled() -> ProjectStatus | None:
        return next((s for s in dispatcher.statuses() if s.state != "running"), None)

    try:
        for c in conversions:
            dispatcher.submit(c, None)
        await wait_for(lambda: dispatcher.outstanding == 0 or stalled() is not None, 30, "every result or a stall")
        return results, stalled()
    finally:
        await dispatcher.close()
        await transport.close()


async def test_https_proxy_from_the_environment_then_no_proxy(
    tls_sandbox: Sandbox, open_proxy: Tinyproxy, pki: Pki, monkeypatch: pytest.MonkeyPatch,
) -> None:
    cfg = parse(kameleoon_config(tls_sandbox.url, http_table(pki)), env={})
    monkeypatch.setenv("HTTPS_PROXY", open_proxy.url)
    results = await deliver(cfg, [conversion(i) for i in range(5)])
    assert {r.status for r in results.values()} == {Status.DELIVERED}
    assert tls_sandbox.counts()["kameleoon"] == 5
    # The token request and the events request, tunnelled (one kept-alive tunnel may carry both).
    tunnelled = open_proxy.requests()
    assert tunnelled and set(tunnelled) == {f"CONNECT {tls_sandbox.url.removeprefix('https://')}"}
    assert len(tls_sandbox.requests) == 2

    monkeypatch.setenv("NO_PROXY", "localhost,127.0.0.1")
    results = await deliver(cfg, [conversion(i) for i in range(5, 8)])
    assert {r.status for r in results.values()} == {Status.DELIVERED}
    assert tls_sandbox.counts()["kameleoon"] == 8 and len(tls_sandbox.requests) == 4
    assert open_proxy.requests() == tunnelled  # bypassed: the proxy saw nothing more


async def test_http_proxy_from_the_environment_forwards_plain_http(
    sandbox: Sandbox, open_proxy: Tinyproxy, monkeypatch: pytest.MonkeyPatch,
) -> None:
    cfg = parse(kameleoon_config(sandbox.url), env={})
    monkeypatch.setenv("http_proxy", open_proxy.url)
    results = await deliver(cfg, [conversion(i) for i in range(3)])
    assert {r.status for r in results.values()} == {Status.DELIVERED}
    assert sandbox.counts()["kameleoon"] == 3
    assert open_proxy.requests() == [f"POST {sandbox.url}/oauth/token",
                                     f"POST {sandbox.url}/visit/events?siteCode={SITE}&json=true"]


async def test_the_configured_proxy_wins_over_the_environment(
    tls_sandbox: Sandbox, proxy: Tinyproxy, open_proxy: Tinyproxy, pki: Pki, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HTTPS_PROXY", open_proxy.url)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")  # NO_PROXY governs the environment's proxy only
    cfg = parse(kameleoon_config(tls_sandbox.url, http_table(
        pki, proxy=f"http://{PROXY_USER}:{PROXY_PASSWORD}@127.0.0.1:{proxy.port}")), env={})
    assert cfg.providers["kameleoon"].http.proxy == proxy.url and PROXY_PASSWORD not in repr(cfg)
    results = await deliver(cfg, [conversion(1)])
    assert {r.status for r in results.values()} == {Status.DELIVERED}
    assert proxy.requests() and open_proxy.requests() == []


async def test_wrong_proxy_credentials_pause_the_project_saying_why(
    tls_sandbox: Sandbox, proxy: Tinyproxy, pki: Pki, caplog: pytest.LogCaptureFixture,
) -> None:
    cfg = parse(kameleoon_config(tls_sandbox.url, http_table(
        pki, proxy=proxy.url, proxy_username=PROXY_USER, proxy_password="not-the-pr0xy-pw")), env={})
    with caplog.at_level(logging.DEBUG):
        results, stalled = await deliver_or_stall(cfg, [conversion(1)])
    # tinyproxy refuses a CONNECT with bad credentials with 401 (407 for a plain request without any): the
    # project pauses (nothing dead-lettered, it waits for the fix) saying why.
    assert results == {} and stalled is not None and stalled.paused_by == "credentials"
    assert stalled.reason == "credentials refused: token endpoint unreachable (proxy answered 401)"
    assert tls_sandbox.counts()["kameleoon"] == 0
    assert "not-the-pr0xy-pw" not in caplog.text


async def test_without_the_ca_bundle_the_provider_certificate_is_refused_and_the_project_paused(
    tls_sandbox: Sandbox,
) -> None:
    cfg = parse(kameleoon_config(tls_sandbox.url), env={})
    results, stalled = await deliver_or_stall(cfg, [conversion(1)])
    assert results == {} and stalled is not None and stalled.paused_by == "credentials"
    assert stalled.reason is not None and "ClientConnectorCertificateError" in stalled.reason
    assert tls_sandbox.requests == []


async def test_a_provider_requiring_a_client_certificate(pki: Pki) -> None:
    sb = Sandbox(kameleoon_clients={"client-1": "secret-1"})
    await sb.start(ssl_context=pki.server_context(require_client_cert=True))
    try:
        with_cert = parse(kameleoon_config(sb.url, http_table(
            pki, client_cert=str(pki.client_cert), client_key=str(pki.client_key_encrypted),
            client_key_password="${KEY_PASSWORD}")), env={"KEY_PASSWORD": pki.passphrase})
        results = await deliver(with_cert, [conversion(i) for i in range(4)])
        assert {r.status for r in results.values()} == {Status.DELIVERED}
        assert sb.counts()["kameleoon"] == 4

        without = parse(kameleoon_config(sb.url, http_table(pki)), env={})
        results, stalled = await deliver_or_stall(without, [conversion(9)])
        # TLS 1.3 refuses the missing certificate after the handshake: the client sees a connection reset,
        # as in an outage, so the conversion waits behind the open circuit instead of failing.
        assert results == {} and stalled is not None and sb.counts()["kameleoon"] == 4
        assert (stalled.state, stalled.in_flight, stalled.last_error) == (
            "failed", 1, "token endpoint unreachable (ClientOSError)")
    finally:
        await sb.stop()


async def test_the_schema_registry_honours_the_environment_proxy(
    open_proxy: Tinyproxy, monkeypatch: pytest.MonkeyPatch,
) -> None:
    with RegistryServer() as reg:
        schema_id = reg.register("purchases-value", '"string"')
        monkeypatch.setenv("HTTP_PROXY", open_proxy.url)
        registry = SchemaRegistry(reg.url)
        try:
            assert (await registry.get_schema(schema_id)).text == '"string"'
        finally:
            await registry.close()
        assert open_proxy.requests() == [f"GET {reg.url}/schemas/ids/{schema_id}"]


def test_environment_proxies_are_read_once_and_follow_no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTPS_PROXY", f"http://u:{PROXY_PASSWORD}@proxy.corp:3128")
    monkeypatch.setenv("NO_PROXY", ".internal,10.1.2.3")
    env = EnvProxies()
    monkeypatch.setenv("HTTPS_PROXY", "http://other:1")  # read at start-up: later changes do not apply
    proxy, headers = env.for_url("https://eu-data.kameleoon.io/visit/events?x=1")
    assert proxy == "http://proxy.corp:3128"
    assert headers == {"Proxy-Authorization": "Basic " + base64.b64encode(f"u:{PROXY_PASSWORD}".encode()).decode()}
    assert env.for_url("https://registry.internal:8081/schemas/ids/1") == (None, None)
    assert env.for_url("https://10.1.2.3/x") == (None, None)
    assert env.for_url("http://eu-data.kameleoon.io/") == (None, None)  # no HTTP_PROXY set
    assert PROXY_PASSWORD not in repr(env)


# --------------------------------------------------------------------------- configuration


def _error(http: dict[str, Any], env: dict[str, str] | None = None, provider: str = "kameleoon") -> str:
    data = kameleoon_config("https://eu-data.kameleoon.io")
    data.setdefault(provider, {})["http"] = http
    with pytest.raises(ConfigError) as info:
        parse(data, env=env or {})
    return str(info.value)


def test_provider_tls_files_are_checked_at_load_naming_the_key(pki: Pki, tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN NOTHING-----")
    missing = str(tmp_path / "nope.pem")
    assert "config key 'kameleoon.http.ca_bundle': no such file" in _error({"ca_bundle": missing})
    assert "config key 'convert.http.ca_bundle': holds no PEM" in _error({"ca_bundle": str(garbage)},
                                                                         provider="convert").replace(
        f"{str(garbage)!r} ", "")
    assert "'conductrics.http.client_cert'" in _error({"client_cert": missing}, provider="conductrics")
    assert "'kameleoon.http.client_key'" in _error({"client_cert": str(pki.client_cert), "client_key": missing})
    assert "'kameleoon.http.client_key'" in _error({"client_cert": str(pki.server_cert),
                                                    "client_key": str(pki.client_key)})
    assert "'kameleoon.http.client_key_password'" in _error({"client_cert": str(pki.client_cert),
                                                             "client_key": str(pki.client_key_encrypted)})
    # The key may live in the certificate's file.
    both = tmp_path / "both.pem"
    both.write_bytes(pki.client_cert.read_bytes() + pki.client_key.read_bytes())
    data = kameleoon_config("https://eu-data.kameleoon.io")
    data["kameleoon"]["http"] = {"client_cert": str(both)}
    assert parse(data, env={}).providers["kameleoon"].http.tls.client_cert == both


def test_proxy_keys_are_checked_at_load_and_never_echoed() -> None:
    for bad in ("proxy.corp:3128", "https://proxy.corp:3128", "http://proxy.corp", f"http://u:{PROXY_PASSWORD}@",
                f"http://u:{PROXY_PASSWORD}@proxy corp:3128", "http://proxy.corp:3128/path",
                f"http://u:{PROXY_PASSWORD}@proxy.corp:99999"):
        message = _error({"proxy": bad})
        assert "config key 'kameleoon.http.proxy': expected http://host:port" in message, bad
        assert PROXY_PASSWORD not in message, bad
    assert "'kameleoon.http.proxy_password': is set without proxy" in _error({"proxy_password": "x"})
    assert "'kameleoon.http.proxy_password': is set without proxy_username" in _error(
        {"proxy": "http://proxy.corp:3128", "proxy_password": "x"})
    assert "use one" in _error({"proxy": "http://a:b@proxy.corp:3128", "proxy_username": "c"})
    assert "'kameleoon.http.proxyy'" in _error({"proxyy": "http://proxy.corp:3128"})


def test_the_examples_commented_http_and_registry_keys_are_real(pki: Pki) -> None:
    """Uncommented (with real files), deploy/config.example.toml's [kameleoon.http] and registry keys load."""
    files = {"ca_bundle": pki.ca, "client_cert": pki.client_cert, "client_key": pki.client_key_encrypted}
    out, table = [], ""
    for line in EXAMPLE.read_text().splitlines():
        if line.startswith("["):
            table = line.split("]")[0] + "]"
        m = re.match(r'^# (\w+) = ("[^"]*")', line)
        if m and table in ("[kameleoon.http]", "[decoding.schema_registry]") and m.group(1) != "bearer_token":
            value = f'"{files[m.group(1)]}"' if m.group(1) in files else m.group(2)
            line = f"{m.group(1)} = {value}"
        out.append(line)
    env = {"CONDUCTRICS_API_KEY": "k", "PROXY_USER": PROXY_USER, "PROXY_PASSWORD": PROXY_PASSWORD,
           "SCHEMA_REGISTRY_USER": "svc", "SCHEMA_REGISTRY_PASSWORD": "reg-pw", "TLS_KEY_PASSWORD": pki.passphrase}
    cfg = parse(tomllib.loads("\n".join(out)), env=env)
    http, registry = cfg.providers["kameleoon"].http, cfg.decoding.schema_registry
    assert http.proxy == "http://proxy.corp.example:3128" and http.tls.client_key == pki.client_key_encrypted
    assert http.proxy_password is not None and http.proxy_password.reveal() == PROXY_PASSWORD
    assert registry.username is not None and registry.tls.ca_bundle == pki.ca and registry.timeout == 5.0
    # untouched tables keep the defaults
    assert cfg.providers["convert"].http == cfg.providers["conductrics"].http == type(http)()
