"""The Schema Registry client: TLS, basic and bearer auth, client certificates, a hanging registry, backoff, caches.

The registry is tests/registry_server.py on loopback, behind real TLS (certificates made with openssl).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from loopwatch import LoopWatch
from pki import Pki, make_pki
from registry_server import RegistryServer

from consumer.config import ConfigError, parse
from consumer.decoding import ConfluentDecoder, DecodeError, encode_confluent, load_schema, make_decoder
from consumer.model import Channel, Purchase
from consumer.schema_registry import Backoff, NegativeCache, RegistryUnavailable, SchemaNotFound, SchemaRegistry

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = ROOT / "schemas" / "purchase_completed.avsc"
SUBJECT = "purchases-value"
PASSWORD = "reg-pa55-w0rd"
TOKEN = "reg-bearer-t0ken"
PURCHASE = Purchase("e1", "o1", 1_700_000_000_000, Channel.WEB, "EUR", Decimal("9.99"), 1)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def schema() -> Any:
    return load_schema(SCHEMA)


def config(registry_url: str, **registry: Any) -> dict[str, Any]:
    return {
        "kafka": {"bootstrap_servers": "unused:1", "topic": "t", "group_id": "g", "dlq_topic": "t.dlq"},
        "decoding": {"format": "confluent", "schema_registry_url": registry_url, "schema_registry": registry},
        "kameleoon": {"projects": {"site1": {"goals": [1]}}},
    }


def decoder_for(registry_url: str, env: dict[str, str] | None = None, **registry: Any) -> ConfluentDecoder:
    decoder = make_decoder(parse(config(registry_url, **registry), env=env or {}).decoding)
    assert isinstance(decoder, ConfluentDecoder)
    return decoder


@pytest.fixture
def tls_basic(pki: Pki) -> Iterator[RegistryServer]:
    with RegistryServer(username="svc", password=PASSWORD, tls=pki.server_context()) as reg:
        yield reg


# --------------------------------------------------------------------------- TLS and auth


async def test_tls_registry_with_basic_auth_from_the_config(tls_basic: RegistryServer, pki: Pki, schema: Any) -> None:
    schema_id = tls_basic.register(SUBJECT, SCHEMA.read_text())
    msg = encode_confluent(PURCHASE, schema_id, schema)
    decoder = decoder_for(tls_basic.url, {"REGISTRY_PASSWORD": PASSWORD}, username="svc",
                          password="${REGISTRY_PASSWORD}", ca_bundle=str(pki.ca))
    try:
        assert tls_basic.url.startswith("https://")
        assert await decoder.decode_async(msg) == PURCHASE
        assert PASSWORD not in repr(decoder.registry)
    finally:
        await decoder.close()


async def test_a_wrong_password_is_refused_and_never_shown(tls_basic: RegistryServer, pki: Pki) -> None:
    schema_id = tls_basic.register(SUBJECT, SCHEMA.read_text())
    decoder = decoder_for(tls_basic.url, username="svc", password="not-the-pa55", ca_bundle=str(pki.ca))
    try:
        with pytest.raises(DecodeError) as info:
            await decoder.load(schema_id)
        assert info.value.reason == "registry_unavailable" and info.value.transient
        assert "401" in str(info.value)
        assert "not-the-pa55" not in str(info.value) and "not-the-pa55" not in repr(info.value)
    finally:
        await decoder.close()


@pytest.mark.parametrize("trust", ["system", "other_ca"])
async def test_a_registry_certificate_not_from_the_ca_bundle_is_refused(
    tls_basic: RegistryServer, pki: Pki, trust: str
) -> None:
    schema_id = tls_basic.register(SUBJECT, SCHEMA.read_text())
    extra = {} if trust == "system" else {"ca_bundle": str(pki.other_ca)}
    decoder = decoder_for(tls_basic.url, username="svc", password=PASSWORD, **extra)
    try:
        with pytest.raises(DecodeError) as info:
            await decoder.load(schema_id)
        assert info.value.reason == "registry_unavailable"
        assert "TLS certificate not trusted (unable to get local issuer certificate" in str(info.value)
        assert tls_basic.requests == []  # refused during the handshake: no request was ever sent
    finally:
        await decoder.close()


async def test_bearer_token(pki: Pki, schema: Any) -> None:
    with RegistryServer(token=TOKEN, tls=pki.server_context()) as reg:
        schema_id = reg.register(SUBJECT, SCHEMA.read_text())
        msg = encode_confluent(PURCHASE, schema_id, schema)
        good = decoder_for(reg.url, {"REGISTRY_TOKEN": TOKEN}, bearer_token="${REGISTRY_TOKEN}", ca_bundle=str(pki.ca))
        bad = decoder_for(reg.url, bearer_token="stale-token", ca_bundle=str(pki.ca))
        try:
            assert await good.decode_async(msg) == PURCHASE
            with pytest.raises(DecodeError, match="401"):
                await bad.decode_async(msg)
        finally:
            await good.close()
            await bad.close()


@pytest.mark.parametrize("key", ["plain", "encrypted"])
async def test_a_registry_requiring_a_client_certificate(pki: Pki, schema: Any, key: str) -> None:
    with RegistryServer(tls=pki.server_context(require_client_cert=True)) as reg:
        schema_id = reg.register(SUBJECT, SCHEMA.read_text())
        msg = encode_confluent(PURCHASE, schema_id, schema)
        cert: dict[str, str] = {"client_cert": str(pki.client_cert), "client_key": str(pki.client_key)}
        if key == "encrypted":
            cert = {**cert, "client_key": str(pki.client_key_encrypted), "client_key_password": "${KEY_PASSWORD}"}
        with_cert = decoder_for(reg.url, {"KEY_PASSWORD": pki.passphrase}, ca_bundle=str(pki.ca), **cert)
        without = decoder_for(reg.url, ca_bundle=str(pki.ca))
        try:
            assert await with_cert.decode_async(msg) == PURCHASE
            with pytest.raises(DecodeError) as info:
                await without.decode_async(msg)
            assert info.value.reason == "registry_unavailable" and info.value.transient
            assert reg.requests == [("GET", f"/schemas/ids/{schema_id}")]  # only the one with a certificate
        finally:
            await with_cert.close()
            await without.close()


# --------------------------------------------------------------------------- configuration


def _config_error(registry: dict[str, Any], env: dict[str, str] | None = None, url: str = "https://reg:8081") -> str:
    with pytest.raises(ConfigError) as info:
        parse(config(url, **registry), env=env or {})
    return str(info.value)


def test_registry_tls_files_are_checked_at_load_naming_the_key(pki: Pki, tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate")
    key = "decoding.schema_registry"
    assert f"'{key}.ca_bundle'" in _config_error({"ca_bundle": str(tmp_path / "missing.pem")})
    assert "no such file" in _config_error({"ca_bundle": str(tmp_path / "missing.pem")})
    assert "not a regular file" in _config_error({"ca_bundle": str(tmp_path)})
    assert "holds no PEM certificate" in _config_error({"ca_bundle": str(garbage)})
    assert f"'{key}.client_cert'" in _config_error({"client_cert": str(garbage), "client_key": str(pki.client_key)})
    assert f"'{key}.client_key'" in _config_error({"client_cert": str(pki.client_cert), "client_key": str(garbage)})
    mismatch = _config_error({"client_cert": str(pki.client_cert), "client_key": str(pki.server_key)})
    assert f"'{key}.client_key'" in mismatch and "does not match" in mismatch
    no_password = _config_error({"client_cert": str(pki.client_cert), "client_key": str(pki.client_key_encrypted)})
    assert f"'{key}.client_key_password'" in no_password and "encrypted" in no_password
    wrong = _config_error({"client_cert": str(pki.client_cert), "client_key": str(pki.client_key_encrypted),
                           "client_key_password": "${KEY_PASSWORD}"}, {"KEY_PASSWORD": "wr0ng-passphrase"})
    assert f"'{key}.client_key_password'" in wrong and "wr0ng-passphrase" not in wrong
    assert f"'{key}.client_key'" in _config_error({"client_key": str(pki.client_key)})  # without client_cert


def test_registry_auth_keys_are_checked_at_load() -> None:
    key = "decoding.schema_registry"
    assert f"'{key}.password'" in _config_error({"password": "x"})
    assert f"'{key}.bearer_token'" in _config_error({"username": "u", "password": "p", "bearer_token": "t"})
    assert f"'{key}.username'" in _config_error({"username": "u"}, url="https://a:b@reg:8081")
    assert f"'{key}.timeout'" in _config_error({"timeout": "0s"})
    assert f"'{key}.usrname'" in _config_error({"usrname": "u"})
    secret = _config_error({"password": "${REGISTRY_PASSWORD}"}, {"REGISTRY_PASSWORD": PASSWORD})
    assert PASSWORD not in secret


def test_registry_secrets_are_listed_for_the_log_redactor() -> None:
    cfg = parse(config("https://reg:8081", username="svc", password="${P}"), env={"P": PASSWORD})
    assert PASSWORD in cfg.secrets()
    assert cfg.decoding.schema_registry.timeout == 5.0
    assert PASSWORD not in repr(cfg)


# --------------------------------------------------------------------------- a registry that hangs


@pytest.fixture
async def hanging() -> AsyncIterator[RegistryServer]:
    with RegistryServer() as reg:
        yield reg


async def test_a_hanging_registry_never_blocks_the_event_loop(hanging: RegistryServer, schema: Any) -> None:
    cached_id = hanging.register(SUBJECT, SCHEMA.read_text())
    other_id = hanging.register("other-value", (Path(__file__).parent / "schemas" / "purchase_completed_v2.avsc")
                                .read_text())
    decoder = ConfluentDecoder(SchemaRegistry(hanging.url, timeout=1.0), SCHEMA, 64 * 1024)
    try:
        await decoder.load(cached_id)
        hanging.hang()
        watch = LoopWatch().start()
        started = time.monotonic()
        waiting = asyncio.create_task(decoder.load(other_id))
        decoded = 0
        while not waiting.done():
            # Meanwhile an event whose schema id is cached decodes at once, on the loop itself.
            assert decoder.decode(encode_confluent(PURCHASE, cached_id, schema)) == PURCHASE
            decoded += 1
            await asyncio.sleep(0.005)
        watch.stop()
        with pytest.raises(DecodeError) as info:
            waiting.result()
        elapsed = time.monotonic() - started
        assert info.value.reason == "registry_unavailable" and "no answer within 1 s" in str(info.value)
        assert 0.9 < elapsed < 2.0, elapsed  # bounded by the request timeout
        assert decoded > 50 and watch.longest < 0.25, (decoded, watch.longest)
        assert hanging.requests[-1] == ("GET", f"/schemas/ids/{other_id}")
    finally:
        await decoder.close()


# --------------------------------------------------------------------------- backoff, single flight, negative cache


def test_backoff_doubles_up_to_its_cap_with_half_jitter() -> None:
    lowest = Backoff(base=0.5, cap=4.0, rng=lambda: 0.0)
    highest = Backoff(base=0.5, cap=4.0, rng=lambda: 1.0)
    assert [lowest.failed(100.0) for _ in range(6)] == [0.25, 0.5, 1.0, 2.0, 2.0, 2.0]
    assert [highest.failed(100.0) for _ in range(6)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    assert highest.wait(101.0) == 3.0 and highest.wait(200.0) == 0.0
    highest.succeeded()
    assert highest.wait(100.0) == 0.0 and highest.failed(100.0) == 0.5


async def test_a_failing_registry_is_asked_once_per_backoff_not_once_per_event(
    hanging: RegistryServer, schema: Any
) -> None:
    schema_id = hanging.register(SUBJECT, SCHEMA.read_text())
    hanging.fail_with(503)
    decoder = ConfluentDecoder(SchemaRegistry(hanging.url, backoff=Backoff(base=0.2, cap=0.4)), SCHEMA, 64 * 1024)
    msg = encode_confluent(PURCHASE, schema_id, schema)
    try:
        started = time.monotonic()
        failures = 0
        # 100 events retrying as the service does (each again as soon as its attempt failed), for 1.2 s.
        async def event() -> None:
            nonlocal failures
            while time.monotonic() - started < 1.2:
                try:
                    await decoder.decode_async(msg)
                except DecodeError:
                    failures += 1

        await asyncio.gather(*(event() for _ in range(100)))
        asked = hanging.requests.count(("GET", f"/schemas/ids/{schema_id}"))
        # One attempt at 0, then one after each backoff (0.1-0.2 s, then 0.2-0.4 s): 5 to 8 in 1.2 s (the last
        # may start just after), for 100 events; without the shared backoff it would be one per event and loop.
        assert 3 <= asked <= 8, asked
        assert failures >= 100 * asked * 0.9
        hanging.fail_with(None)
        assert await decoder.decode_async(msg) == PURCHASE
        assert decoder.registry.backoff.failures == 0
    finally:
        await decoder.close()


async def test_events_waiting_for_one_schema_id_share_one_request(hanging: RegistryServer, schema: Any) -> None:
    schema_id = hanging.register(SUBJECT, SCHEMA.read_text())
    decoder = ConfluentDecoder(SchemaRegistry(hanging.url), SCHEMA, 64 * 1024)
    try:
        msg = encode_confluent(PURCHASE, schema_id, schema)
        results = await asyncio.gather(*(decoder.decode_async(msg) for _ in range(50)))
        assert results == [PURCHASE] * 50
        assert hanging.requests == [("GET", f"/schemas/ids/{schema_id}")]
    finally:
        await decoder.close()


def test_negative_cache_is_bounded_and_expires() -> None:
    cache = NegativeCache(size=3, ttl=60.0)
    for i in range(5):
        cache.add(i, now=float(i))
    assert len(cache) == 3
    assert [cache.has(i, now=10.0) for i in range(5)] == [False, False, True, True, True]
    assert not cache.has(4, now=64.0) and len(cache) == 2  # expired entries leave on lookup
    cache.add(2, now=65.0)  # refreshed: it is the newest now
    cache.add(7, now=65.0)
    cache.add(8, now=65.0)
    assert cache.has(2, now=66.0) and not cache.has(3, now=66.0)


async def test_forged_ids_beyond_the_negative_cache_are_asked_again(hanging: RegistryServer) -> None:
    registry = SchemaRegistry(hanging.url, negative_size=2)
    try:
        for forged in (9001, 9002, 9003, 9001):
            with pytest.raises(SchemaNotFound):
                await registry.get_schema(forged)
        # 9001 was pushed out by 9003 (the cache holds two), so the fourth lookup asked again.
        assert [p for _, p in hanging.requests] == [f"/schemas/ids/{i}" for i in (9001, 9002, 9003, 9001)]
        assert registry.known_missing(9003) and registry.known_missing(9001) and not registry.known_missing(9002)
    finally:
        await registry.close()


async def test_a_404_from_a_wrong_url_is_a_failure_not_a_missing_id(hanging: RegistryServer) -> None:
    # Only the registry's own "schema not found" (error_code 40403) dead-letters an event as an unknown id;
    # a URL with a wrong path prefix answers 404 for everything, and must not dead-letter every event at once.
    registry = SchemaRegistry(hanging.url + "/no-such-prefix")
    try:
        with pytest.raises(RegistryUnavailable, match="HTTP 404"):
            await registry.get_schema(1)
        assert not registry.known_missing(1)
    finally:
        await registry.close()
