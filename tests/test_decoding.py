"""The event contract and the decoder: round trips, schema evolution, the registry, and hostile input."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import time
import tracemalloc
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import fastavro
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

# tests/registry_server.py: pytest's default "prepend" import mode puts tests/ on sys.path.
from registry_server import RegistryServer

from consumer.config import DecodingConfig
from consumer.decoding import (
    MAX_TIMESTAMP_MS,
    REASONS,
    ConfluentDecoder,
    DecodeError,
    RawAvroDecoder,
    SchemaNotLoaded,
    encode_confluent,
    encode_raw,
    load_schema,
    make_decoder,
    purchase_from_record,
    purchase_to_record,
    read_schema_json,
    strip_logical_types,
)
from consumer.model import Channel, Exposure, Provider, Purchase
from consumer.schema_registry import Backoff, RegistryUnavailable, SchemaRegistry

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = ROOT / "schemas" / "purchase_completed.avsc"
V0 = Path(__file__).resolve().parent / "schemas" / "purchase_completed_v0.avsc"
V1 = ROOT / "schemas" / "purchase_completed.v1.avsc"  # the contract before consent, shipped to pin (raw Avro)
V2 = Path(__file__).resolve().parent / "schemas" / "purchase_completed_v2.avsc"
CAP = 64 * 1024
SUBJECT = "purchases-value"

PURCHASE = Purchase(
    event_id="evt-1",
    order_id="ord-1",
    occurred_at=1_700_000_000_123,
    channel=Channel.STORE,
    currency="EUR",
    revenue=Decimal("1234.50"),
    item_count=3,
    customer_id="cust-9",
    exposures=(
        Exposure(Provider.KAMELEOON, "site1", "101", "202", "visitor-a", 1_699_999_000_000),
        Exposure(Provider.CONDUCTRICS, "proj", "exp-x", "B", "vid-z", 1_699_000_000_000),
    ),
    attributes={"store": "42", "ключ": "значение ✓"},
)
MINIMAL = Purchase("e", "o", 0, Channel.OTHER, "USD", Decimal("0.00"), 0)


@pytest.fixture(scope="module")
def schema() -> Any:
    return load_schema(SCHEMA)


@pytest.fixture(scope="module")
def stripped() -> Any:
    """The contract without logical types: lets a test write any bytes as revenue and any long as a timestamp."""
    return fastavro.parse_schema(strip_logical_types(read_schema_json(SCHEMA)))


@pytest.fixture
def raw() -> RawAvroDecoder:
    return RawAvroDecoder(SCHEMA, SCHEMA, CAP)


@pytest.fixture
def registry() -> Iterator[RegistryServer]:
    with RegistryServer() as reg:
        yield reg


@pytest.fixture
async def confluent(registry: RegistryServer) -> AsyncIterator[ConfluentDecoder]:
    decoder = ConfluentDecoder(SchemaRegistry(registry.url, timeout=2.0), SCHEMA, CAP)
    yield decoder
    await decoder.close()


def schema_text(path: Path) -> str:
    return path.read_text()


def write(schema: Any, record: dict[str, Any]) -> bytes:
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, schema, record)
    return buf.getvalue()


def raw_record(**overrides: Any) -> dict[str, Any]:
    """PURCHASE as a record for the stripped schema (revenue as unscaled big-endian bytes)."""
    rec = purchase_to_record(PURCHASE)
    rec["revenue"] = (123450).to_bytes(3, "big", signed=True)
    rec.update(overrides)
    return rec


def zigzag(n: int) -> bytes:
    """Avro's varint encoding of a long, also for values beyond 64 bits (hostile prefixes)."""
    n = 2 * n if n >= 0 else -2 * n - 1  # zigzag, without the 64-bit wrap-around
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def reason_of(fn: Callable[[], object]) -> str:
    with pytest.raises(DecodeError) as info:
        fn()
    assert info.value.reason in REASONS
    return info.value.reason


async def reason_of_async(decoding: Awaitable[object]) -> str:
    with pytest.raises(DecodeError) as info:
        await decoding
    assert info.value.reason in REASONS
    return info.value.reason


# --------------------------------------------------------------------------- contract and round trips


def test_schema_file_is_the_contract() -> None:
    s = read_schema_json(SCHEMA)
    assert (s["name"], s["namespace"]) == ("PurchaseCompleted", "offline_conversions.v1")
    names = [f["name"] for f in s["fields"]]
    assert names == [
        "event_id",
        "order_id",
        "occurred_at",
        "channel",
        "currency",
        "revenue",
        "item_count",
        "customer_id",
        "exposures",
        "attributes",
        "consent",
    ]
    fields = {f["name"]: f for f in s["fields"]}
    assert all(f.get("doc") for f in s["fields"])
    assert fields["channel"]["default"] == "OTHER" and fields["channel"]["type"]["default"] == "OTHER"
    assert fields["channel"]["type"]["symbols"] == [c.value for c in Channel]
    assert fields["revenue"]["type"] == {"type": "bytes", "logicalType": "decimal", "precision": 12, "scale": 2}
    assert fields["customer_id"]["type"] == ["null", "string"] and fields["customer_id"]["default"] is None
    assert fields["exposures"]["default"] == [] and fields["attributes"]["default"] == {}
    exposure = fields["exposures"]["type"]["items"]
    assert [f["name"] for f in exposure["fields"]] == [
        "provider",
        "project",
        "experiment_id",
        "variation_id",
        "visitor_id",
        "exposed_at",
    ]
    # UNKNOWN last, so the indexes of the symbols written before it stayed; it is the enum's default.
    assert exposure["fields"][0]["type"]["symbols"] == [p.value for p in Provider] + ["UNKNOWN"]
    assert exposure["fields"][0]["type"]["default"] == "UNKNOWN"
    assert exposure["fields"][5]["type"] == {"type": "long", "logicalType": "timestamp-millis"}
    assert fields["consent"]["default"] == []
    consent = fields["consent"]["type"]["items"]
    assert [(f["name"], f["type"]) for f in consent["fields"]] == [("provider", "Provider"), ("granted", "boolean")]


@pytest.mark.parametrize("purchase", [PURCHASE, MINIMAL], ids=["full", "minimal"])
def test_raw_round_trip(raw: RawAvroDecoder, schema: Any, purchase: Purchase) -> None:
    decoded = raw.decode(encode_raw(purchase, schema))
    assert decoded == purchase
    assert decoded.revenue.as_tuple().exponent == -2
    assert isinstance(decoded.occurred_at, int)


async def test_confluent_round_trip_fetches_each_schema_once(
    registry: RegistryServer, confluent: ConfluentDecoder, schema: Any
) -> None:
    schema_id = registry.register(SUBJECT, schema_text(SCHEMA))
    for i in range(3):
        p = Purchase(f"e{i}", "o", 1, Channel.WEB, "EUR", Decimal("-0.01"), i)
        assert await confluent.decode_async(encode_confluent(p, schema_id, schema)) == p
        assert confluent.decode(encode_confluent(p, schema_id, schema)) == p
    assert registry.requests.count(("GET", f"/schemas/ids/{schema_id}")) == 1


async def test_synchronous_decode_never_asks_the_registry(
    registry: RegistryServer, confluent: ConfluentDecoder, schema: Any
) -> None:
    # The service decodes from its poll loop: an id not cached yet is handed back, never fetched there.
    schema_id = registry.register(SUBJECT, schema_text(SCHEMA))
    msg = encode_confluent(PURCHASE, schema_id, schema)
    with pytest.raises(SchemaNotLoaded) as info:
        confluent.decode(msg)
    assert info.value.schema_id == schema_id and registry.requests == []
    assert await confluent.decode_async(msg) == PURCHASE
    assert confluent.decode(msg) == PURCHASE


def test_decoder_agrees_with_fastavro_logical_types(raw: RawAvroDecoder, schema: Any) -> None:
    """Our own decimal/timestamp conversion gives what fastavro's logical readers would."""
    body = encode_raw(PURCHASE, schema)
    logical = fastavro.schemaless_reader(io.BytesIO(body), schema, None)
    assert isinstance(logical, dict) and isinstance(logical["revenue"], Decimal)
    assert purchase_from_record(logical) == raw.decode(body) == PURCHASE


def test_record_round_trip_through_dicts() -> None:
    assert purchase_from_record(purchase_to_record(PURCHASE)) == PURCHASE


async def test_make_decoder_picks_the_format(registry: RegistryServer, schema: Any) -> None:
    avro = make_decoder(DecodingConfig(format="avro", schema=SCHEMA, max_message_bytes=CAP))
    assert isinstance(avro, RawAvroDecoder)
    assert avro.decode(encode_raw(PURCHASE, schema)) == PURCHASE
    assert await avro.decode_async(encode_raw(PURCHASE, schema)) == PURCHASE
    conf = make_decoder(DecodingConfig(format="confluent", schema=SCHEMA, schema_registry_url=registry.url))
    assert isinstance(conf, ConfluentDecoder)
    schema_id = registry.register(SUBJECT, schema_text(SCHEMA))
    assert await conf.decode_async(encode_confluent(PURCHASE, schema_id, schema)) == PURCHASE
    await conf.close()
    with pytest.raises(ValueError, match="protobuf"):
        make_decoder(DecodingConfig(format="protobuf"))


# --------------------------------------------------------------------------- schema evolution


def _old_record() -> dict[str, Any]:
    rec = purchase_to_record(PURCHASE)
    del rec["customer_id"], rec["attributes"]
    return rec


def _new_record() -> dict[str, Any]:
    return {
        **purchase_to_record(PURCHASE),
        "channel": "MARKETPLACE",
        "loyalty_tier": "gold",
        "coupons": ["SPRING", "VIP"],
        "discount": Decimal("5.00"),
    }


def test_raw_older_writer_gets_reader_defaults() -> None:
    decoder = RawAvroDecoder(V0, SCHEMA, CAP)
    decoded = decoder.decode(write(load_schema(V0), _old_record()))
    assert decoded.customer_id is None and decoded.attributes == {}
    assert decoded.exposures == PURCHASE.exposures and decoded.revenue == PURCHASE.revenue


def test_raw_newer_writer_is_read_by_current_reader() -> None:
    decoder = RawAvroDecoder(V2, SCHEMA, CAP)
    decoded = decoder.decode(write(load_schema(V2), _new_record()))
    # An unknown channel falls back to the enum default; extra fields are skipped.
    assert decoded == Purchase(**{**_fields(PURCHASE), "channel": Channel.OTHER})


async def test_confluent_older_and_newer_writers(registry: RegistryServer, confluent: ConfluentDecoder) -> None:
    old_id = registry.register(SUBJECT, schema_text(V0))
    new_id = registry.register(SUBJECT, schema_text(V2))
    assert old_id != new_id
    old = await confluent.decode_async(b"\x00" + old_id.to_bytes(4, "big") + write(load_schema(V0), _old_record()))
    assert old.customer_id is None and old.attributes == {} and old.order_id == PURCHASE.order_id
    new = await confluent.decode_async(b"\x00" + new_id.to_bytes(4, "big") + write(load_schema(V2), _new_record()))
    assert new.channel is Channel.OTHER and new.revenue == Decimal("1234.50") and new.exposures == PURCHASE.exposures


def _fields(p: Purchase) -> dict[str, Any]:
    return {name: getattr(p, name) for name in Purchase.__dataclass_fields__}


async def test_newer_writer_reusing_a_named_type_by_short_name(
    registry: RegistryServer, confluent: ConfluentDecoder
) -> None:
    s = read_schema_json(SCHEMA)
    s["fields"].append({"name": "earlier", "type": {"type": "array", "items": "Exposure"}, "default": []})
    schema_id = registry.register(SUBJECT, json.dumps(s))
    body = write(
        fastavro.parse_schema(s), {**purchase_to_record(PURCHASE), "earlier": purchase_to_record(PURCHASE)["exposures"]}
    )
    assert await confluent.decode_async(b"\x00" + schema_id.to_bytes(4, "big") + body) == PURCHASE


# ----------------------------------------------------- consent and the Provider enum's default (v1 -> now -> v2)

CONSENTING = Purchase(**{**{n: getattr(PURCHASE, n) for n in Purchase.__dataclass_fields__},
                         "consent": {Provider.KAMELEOON: True, Provider.CONVERT: False}})


def _frame(schema_id: int, body: bytes) -> bytes:
    return b"\x00" + schema_id.to_bytes(4, "big") + body


def _v1_record() -> dict[str, Any]:
    rec = purchase_to_record(PURCHASE)
    del rec["consent"]
    return rec


def _v2_record() -> dict[str, Any]:
    """A newer writer: a provider this reader does not know, in an exposure and in a consent entry."""
    rec = _new_record()
    rec["exposures"] = [*rec["exposures"], {**rec["exposures"][0], "provider": "OPTIMIZELY", "visitor_id": "opt-1"}]
    rec["consent"] = [{"provider": "OPTIMIZELY", "granted": True}, {"provider": "KAMELEOON", "granted": True},
                      {"provider": "CONDUCTRICS", "granted": False}]
    return rec


def test_raw_v1_writer_is_read_as_stating_no_consent() -> None:
    decoded = RawAvroDecoder(V1, SCHEMA, CAP).decode(write(load_schema(V1), _v1_record()))
    assert decoded == PURCHASE
    assert decoded.consent == {} and decoded.unknown_provider_exposures == 0


def test_raw_current_writer_with_consent_is_read_by_a_v1_reader() -> None:
    body = encode_raw(CONSENTING, load_schema(SCHEMA))
    assert RawAvroDecoder(SCHEMA, SCHEMA, CAP).decode(body) == CONSENTING  # and by the current one, exactly
    old = RawAvroDecoder(SCHEMA, V1, CAP).decode(body)  # a reader deployed before consent existed
    assert old == PURCHASE and old.consent == {}  # the field is skipped; everything else is the same


def test_raw_v2_writer_with_an_unknown_provider_decodes() -> None:
    decoded = RawAvroDecoder(V2, SCHEMA, CAP).decode(write(load_schema(V2), _v2_record()))
    # OPTIMIZELY resolves to the enum default UNKNOWN: the exposure is left out and counted, its consent ignored.
    assert decoded.exposures == PURCHASE.exposures
    assert decoded.unknown_provider_exposures == 1
    assert decoded.consent == {Provider.KAMELEOON: True, Provider.CONDUCTRICS: False}


def test_without_the_enum_default_a_v2_writer_would_not_decode() -> None:
    # What the default buys: the v1 reader (no UNKNOWN, no default) cannot resolve OPTIMIZELY.
    body = write(load_schema(V2), _v2_record())
    assert reason_of(lambda: RawAvroDecoder(V2, V1, CAP).decode(body)) == "incompatible_schema"
    # The same writer naming only providers v1 knows is fine: it is the unknown symbol that fails.
    known_only = write(load_schema(V2), {**_v2_record(), "exposures": _new_record()["exposures"]})
    assert RawAvroDecoder(V2, V1, CAP).decode(known_only).exposures == PURCHASE.exposures


async def test_confluent_consent_and_unknown_provider_both_ways(registry: RegistryServer) -> None:
    v1_id = registry.register(SUBJECT, schema_text(V1))
    now_id = registry.register(SUBJECT, schema_text(SCHEMA))
    v2_id = registry.register(SUBJECT, schema_text(V2))
    current = ConfluentDecoder(SchemaRegistry(registry.url, timeout=2.0), SCHEMA, CAP)
    v1_reader = ConfluentDecoder(SchemaRegistry(registry.url, timeout=2.0), V1, CAP)
    try:
        # Old writer, new reader.
        old = await current.decode_async(_frame(v1_id, write(load_schema(V1), _v1_record())))
        assert old == PURCHASE and old.consent == {}
        # New writer, old reader.
        framed = encode_confluent(CONSENTING, now_id, load_schema(SCHEMA))
        assert await current.decode_async(framed) == CONSENTING
        assert await v1_reader.decode_async(framed) == PURCHASE
        # Newer writer with a provider symbol the current reader does not know.
        newer = _frame(v2_id, write(load_schema(V2), _v2_record()))
        decoded = await current.decode_async(newer)
        assert decoded.exposures == PURCHASE.exposures and decoded.unknown_provider_exposures == 1
        assert decoded.consent == {Provider.KAMELEOON: True, Provider.CONDUCTRICS: False}
        assert await reason_of_async(v1_reader.decode_async(newer)) == "incompatible_schema"
    finally:
        await current.close()
        await v1_reader.close()


def test_the_shipped_v1_is_the_contract_without_consent_and_the_enum_default() -> None:
    now, v1 = read_schema_json(SCHEMA), read_schema_json(V1)
    same = [f for f in v1["fields"] if f["name"] != "exposures"]
    assert same == [f for f in now["fields"] if f["name"] not in ("exposures", "consent")]
    assert [f["name"] for f in v1["fields"]] == [f["name"] for f in now["fields"] if f["name"] != "consent"]
    provider_v1 = next(f for f in v1["fields"] if f["name"] == "exposures")["type"]["items"]["fields"][0]["type"]
    assert provider_v1["symbols"] == [p.value for p in Provider] and "default" not in provider_v1


def test_a_raw_avro_deployment_pins_the_previous_contract_until_its_producers_switch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Raw Avro carries no writer schema: [decoding] schema is the writer's too. Producers still on v1 are
    # read with the shipped v1 (found in the package even where no checkout is at hand).
    import consumer.config as config_module

    monkeypatch.setattr(config_module, "PACKAGE_ROOT", tmp_path / "site-packages" / "consumer")
    monkeypatch.chdir(tmp_path)
    cfg = config_module.parse({
        "kafka": {"bootstrap_servers": "b:9092", "topic": "t", "group_id": "g", "dlq_topic": "t.dlq"},
        "decoding": {"format": "avro", "schema": "schemas/purchase_completed.v1.avsc"},
        "kameleoon": {"projects": {"site1": {"goals": [1]}}},
    }, env={}, base_dir=tmp_path)
    assert cfg.decoding.schema == V1
    decoded = make_decoder(cfg.decoding).decode(write(load_schema(V1), _v1_record()))
    assert decoded == PURCHASE and decoded.consent == {}
    # Read with the new contract instead, the same bytes end where the consent array should begin.
    assert reason_of(lambda: RawAvroDecoder(SCHEMA, SCHEMA, CAP).decode(write(load_schema(V1), _v1_record()))) \
        == "truncated"


def test_a_denial_wins_over_a_grant_for_the_same_provider() -> None:
    rec = purchase_to_record(PURCHASE)
    rec["consent"] = [{"provider": "CONVERT", "granted": True}, {"provider": "CONVERT", "granted": False},
                      {"provider": "CONVERT", "granted": True}]
    assert purchase_from_record(rec).consent == {Provider.CONVERT: False}


def test_only_exposures_of_unknown_providers() -> None:
    rec = purchase_to_record(PURCHASE)
    rec["exposures"] = [{**e, "provider": "UNKNOWN"} for e in rec["exposures"]]
    decoded = purchase_from_record(rec)
    assert decoded.exposures == () and decoded.unknown_provider_exposures == 2


async def test_incompatible_writer_is_rejected(registry: RegistryServer, confluent: ConfluentDecoder) -> None:
    s = read_schema_json(SCHEMA)
    s["fields"] = [f for f in s["fields"] if f["name"] != "currency"]  # required by the reader, no default
    schema_id = registry.register(SUBJECT, json.dumps(s))
    rec = purchase_to_record(PURCHASE)
    del rec["currency"]
    body = write(fastavro.parse_schema(s), rec)
    msg = b"\x00" + schema_id.to_bytes(4, "big") + body
    assert await reason_of_async(confluent.decode_async(msg)) == "incompatible_schema"


def _variant(mutate: Callable[[dict[str, Any]], None]) -> str:
    s = copy.deepcopy(read_schema_json(SCHEMA))
    mutate(s)
    return json.dumps(s)


def _field(s: dict[str, Any], name: str) -> dict[str, Any]:
    return next(f for f in s["fields"] if f["name"] == name)


@pytest.mark.parametrize(
    "mutate",
    [
        lambda s: _field(s, "occurred_at").update(type={"type": "long", "logicalType": "timestamp-micros"}),
        lambda s: _field(s, "revenue")["type"].update(scale=3),
        lambda s: _field(s, "revenue").update(type="bytes"),
        lambda s: _field(s, "exposures")["type"]["items"]["fields"][5]["type"].update(logicalType="timestamp-micros"),
        lambda s: s["fields"].append({"name": "next", "type": ["null", "PurchaseCompleted"], "default": None}),
        lambda s: s["fields"].append({"name": "nulls", "type": {"type": "array", "items": "null"}, "default": []}),
    ],
    ids=["micros", "scale3", "plain_bytes", "exposure_micros", "recursive", "zero_size_items"],
)
async def test_unsafe_writer_schemas_are_refused_once(
    registry: RegistryServer, confluent: ConfluentDecoder, mutate: Callable[[dict[str, Any]], None]
) -> None:
    schema_id = registry.register(SUBJECT, _variant(mutate))
    msg = b"\x00" + schema_id.to_bytes(4, "big") + b"\x00" * 20
    assert await reason_of_async(confluent.decode_async(msg)) == "unsupported_schema"
    assert await reason_of_async(confluent.decode_async(msg)) == "unsupported_schema"
    assert reason_of(lambda: confluent.decode(msg)) == "unsupported_schema"  # the verdict is remembered
    assert registry.requests.count(("GET", f"/schemas/ids/{schema_id}")) == 1


async def test_zero_size_array_cannot_spin(registry: RegistryServer, confluent: ConfluentDecoder) -> None:
    """Why zero-size items are refused: a block count of 2**62 would loop without reading a byte."""
    schema_id = registry.register(
        SUBJECT, _variant(lambda s: s["fields"].append({"name": "n", "type": {"type": "array", "items": "null"}}))
    )
    msg = b"\x00" + schema_id.to_bytes(4, "big") + zigzag(2**62)
    started = time.monotonic()
    assert await reason_of_async(confluent.decode_async(msg)) == "unsupported_schema"
    assert time.monotonic() - started < 2


async def test_writer_schema_that_does_not_parse(registry: RegistryServer, confluent: ConfluentDecoder) -> None:
    bad_json = registry.register(SUBJECT, "{not json")
    bad_avro = registry.register(SUBJECT, json.dumps({"type": "record", "name": "X", "fields": [{"name": "a"}]}))
    for schema_id in (bad_json, bad_avro):
        msg = b"\x00" + schema_id.to_bytes(4, "big") + b"\x00"
        assert await reason_of_async(confluent.decode_async(msg)) == "unsupported_schema"


async def test_non_avro_schema_type(registry: RegistryServer, confluent: ConfluentDecoder) -> None:
    schema_id = registry.register(SUBJECT, 'syntax = "proto3";', schema_type="PROTOBUF")
    msg = b"\x00" + schema_id.to_bytes(4, "big") + b"\x00"
    assert await reason_of_async(confluent.decode_async(msg)) == "unsupported_schema"


# --------------------------------------------------------------------------- registry client


async def test_unknown_schema_id_is_permanent_and_remembered(
    registry: RegistryServer, confluent: ConfluentDecoder
) -> None:
    msg = b"\x00" + (4242).to_bytes(4, "big") + encode_raw(PURCHASE, load_schema(SCHEMA))
    with pytest.raises(DecodeError) as info:
        await confluent.decode_async(msg)
    assert info.value.reason == "unknown_schema_id" and not info.value.transient
    assert await reason_of_async(confluent.decode_async(msg)) == "unknown_schema_id"
    assert reason_of(lambda: confluent.decode(msg)) == "unknown_schema_id"  # known missing: no task needed
    # A flood of messages with a forged id reaches the registry once per negative_ttl, not once per message.
    assert registry.requests.count(("GET", "/schemas/ids/4242")) == 1


async def test_unknown_id_is_retried_after_the_negative_ttl(registry: RegistryServer, schema: Any) -> None:
    reg = SchemaRegistry(registry.url, negative_ttl=0.0)
    decoder = ConfluentDecoder(reg, SCHEMA, CAP)
    msg = encode_confluent(PURCHASE, 1, schema)
    assert await reason_of_async(decoder.decode_async(msg)) == "unknown_schema_id"
    assert registry.register(SUBJECT, schema_text(SCHEMA)) == 1
    assert await decoder.decode_async(msg) == PURCHASE
    await decoder.close()


async def test_registry_outage_is_transient_and_not_cached(registry: RegistryServer, schema: Any) -> None:
    decoder = ConfluentDecoder(SchemaRegistry(registry.url, backoff=Backoff(base=0.01)), SCHEMA, CAP)
    schema_id = registry.register(SUBJECT, schema_text(SCHEMA))
    msg = encode_confluent(PURCHASE, schema_id, schema)
    registry.fail_with(503)
    with pytest.raises(DecodeError) as info:
        await decoder.decode_async(msg)
    assert info.value.reason == "registry_unavailable" and info.value.transient
    with pytest.raises(SchemaNotLoaded):  # not remembered as missing: the next try asks again
        decoder.decode(msg)
    registry.fail_with(None)
    assert await decoder.decode_async(msg) == PURCHASE
    await decoder.close()


async def test_registry_unreachable() -> None:
    with RegistryServer() as reg:
        url = reg.url  # the port is free again once the server stops
    decoder = ConfluentDecoder(SchemaRegistry(url, timeout=1.0), SCHEMA, CAP)
    with pytest.raises(DecodeError) as info:
        await decoder.decode_async(b"\x00\x00\x00\x00\x01\x00")
    assert info.value.reason == "registry_unavailable" and info.value.transient
    await decoder.close()


async def test_basic_auth_from_url_never_shows_the_password(schema: Any) -> None:
    with RegistryServer(username="svc", password="s3cr=t/pw") as reg:
        host = reg.url.removeprefix("http://")
        good = SchemaRegistry(f"http://svc:s3cr%3Dt%2Fpw@{host}")
        schema_id = await good.register(SUBJECT, schema_text(SCHEMA))
        decoder = ConfluentDecoder(good, SCHEMA, CAP)
        assert await decoder.decode_async(encode_confluent(PURCHASE, schema_id, schema)) == PURCHASE
        assert "s3cr" not in repr(good) and "s3cr" not in good.url
        bad = SchemaRegistry(f"http://svc:wrong-pa55@{host}")
        with pytest.raises(RegistryUnavailable) as info:
            await bad.get_schema(schema_id)
        assert "wrong-pa55" not in str(info.value) and "wrong-pa55" not in repr(info.value)
        assert "401" in str(info.value)
        await decoder.close()
        await bad.close()


async def test_register_same_schema_same_id(registry: RegistryServer) -> None:
    client = SchemaRegistry(registry.url)
    first = await client.register(SUBJECT, schema_text(SCHEMA))
    again = await client.register(SUBJECT, json.dumps(read_schema_json(SCHEMA)))  # same schema, other whitespace
    other = await client.register("other-value", schema_text(V2))
    assert first == again != other
    assert json.loads((await client.get_schema(first)).text) == read_schema_json(SCHEMA)
    assert registry_get(registry.url + "/subjects") == sorted([SUBJECT, "other-value"])
    await client.close()


def registry_get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=2) as resp:
        return json.loads(resp.read())


def test_registry_url_must_be_http() -> None:
    with pytest.raises(ValueError):
        SchemaRegistry("registry:8081")


def test_encode_confluent_rejects_ids_beyond_four_bytes(schema: Any) -> None:
    with pytest.raises(ValueError):
        encode_confluent(PURCHASE, 2**32, schema)
    assert encode_confluent(PURCHASE, 2**32 - 1, schema)[:5] == b"\x00\xff\xff\xff\xff"


async def test_confluent_serializer_interoperates(registry: RegistryServer, confluent: ConfluentDecoder) -> None:
    """An independent producer-side client (confluent-kafka's AvroSerializer) against our server and decoder."""
    from confluent_kafka.schema_registry import SchemaRegistryClient, avro
    from confluent_kafka.serialization import MessageField, SerializationContext

    client = SchemaRegistryClient({"url": registry.url})
    serializer = avro.AvroSerializer(client, schema_text(SCHEMA))
    value = serializer(purchase_to_record(PURCHASE), SerializationContext("purchases", MessageField.VALUE))
    assert value is not None and value[0] == 0
    assert await confluent.decode_async(value) == PURCHASE
    assert SUBJECT in client.get_subjects()


# --------------------------------------------------------------------------- hostile input


def test_tombstone_and_empty(raw: RawAvroDecoder, confluent: ConfluentDecoder) -> None:
    for decoder in (raw, confluent):
        assert reason_of(lambda d=decoder: d.decode(None)) == "null_value"
        assert reason_of(lambda d=decoder: d.decode(b"")) == "truncated"


def test_too_large_is_refused_before_decoding(schema: Any) -> None:
    body = encode_raw(PURCHASE, schema)
    decoder = RawAvroDecoder(SCHEMA, SCHEMA, len(body))
    assert decoder.decode(body) == PURCHASE
    assert reason_of(lambda: decoder.decode(body + b"\x00")) == "too_large"
    assert reason_of(lambda: decoder.decode(b"\x00" * 10_000_000)) == "too_large"


def test_confluent_framing_errors(registry: RegistryServer, confluent: ConfluentDecoder, schema: Any) -> None:
    body = encode_raw(PURCHASE, schema)
    assert reason_of(lambda: confluent.decode(b"\x01\x00\x00\x00\x01" + body)) == "bad_magic_byte"
    assert reason_of(lambda: confluent.decode(body)) == "bad_magic_byte"  # a raw event on a confluent topic
    assert reason_of(lambda: confluent.decode(b"\x00\x00\x00")) == "truncated"
    assert registry.requests == []  # none of these needed the registry


def test_every_truncation_is_an_error(raw: RawAvroDecoder, confluent: ConfluentDecoder, schema: Any) -> None:
    body = encode_raw(PURCHASE, schema)
    for n in range(len(body)):
        assert reason_of(lambda n=n: raw.decode(body[:n])) in ("truncated", "invalid_avro", "invalid_utf8")
    assert reason_of(lambda: raw.decode(body[:-1])) == "truncated"


async def test_trailing_garbage(raw: RawAvroDecoder, registry: RegistryServer, confluent: ConfluentDecoder) -> None:
    body = encode_raw(PURCHASE, load_schema(SCHEMA))
    assert reason_of(lambda: raw.decode(body + b"\x00")) == "trailing_bytes"
    schema_id = registry.register(SUBJECT, schema_text(SCHEMA))
    framed = b"\x00" + schema_id.to_bytes(4, "big") + body
    assert await confluent.decode_async(framed) == PURCHASE
    assert reason_of(lambda: confluent.decode(framed + b"garbage")) == "trailing_bytes"


def _peak_bytes(fn: Callable[[], object]) -> int:
    tracemalloc.start()
    try:
        with contextlib.suppress(DecodeError):
            fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize(
    "msg",
    [
        zigzag(2**31) + b"abcde",  # event_id claims 2 GiB: 10 bytes in all
        zigzag(2**62) + b"x",
        zigzag(2**200) + b"x",  # a varint far beyond 64 bits
        zigzag(-5) + b"abc",  # a negative length
        b"\x02a\x02b\x00\x02\x06EUR" + zigzag(2**40) + b"\x01",  # revenue bytes claims a terabyte
        b"\x02a\x02b\x00\x02\x06EUR\x02\x01\x00\x00" + zigzag(2**60) + b"\x00" * 8,  # exposures count 2**60
        b"\x02a\x02b\x00\x02\x06EUR\x02\x01\x00\x00" + zigzag(-(2**60)) + zigzag(2**60),  # negative count, huge size
        b"\x02a\x02b\x00\x02\x06EUR\x02\x01\x00\x00\x00" + zigzag(2**60) + b"\x02k",  # attributes count 2**60
    ],
    ids=["string_2gb", "string_2e62", "varint_200bit", "negative_len", "bytes_1tb", "array", "array_neg", "map"],
)
def test_forged_lengths_neither_allocate_nor_spin(raw: RawAvroDecoder, msg: bytes) -> None:
    started = time.monotonic()
    assert reason_of(lambda: raw.decode(msg)) in ("truncated", "invalid_avro")
    assert _peak_bytes(lambda: raw.decode(msg)) < 1_000_000
    assert time.monotonic() - started < 2


def test_skipped_field_with_forged_block_size(raw: RawAvroDecoder) -> None:
    """A newer writer's array that the reader skips by block size: a huge size must not seek past the end quietly."""
    decoder = RawAvroDecoder(V2, SCHEMA, CAP)
    good = write(load_schema(V2), _new_record())
    assert decoder.decode(good) == Purchase(**{**_fields(PURCHASE), "channel": Channel.OTHER})
    rec = {**_new_record(), "coupons": [], "discount": None}
    head = write(load_schema(V2), rec)[:-2]  # everything before the coupons count and the discount union index
    for forged in (zigzag(-1) + zigzag(2**40) + b"\x00", zigzag(2**40) + b"\x00"):
        assert reason_of(lambda f=forged: decoder.decode(head + f)) in ("truncated", "trailing_bytes", "invalid_avro")


def test_invalid_utf8(raw: RawAvroDecoder, stripped: Any) -> None:
    body = write(stripped, raw_record(event_id="ok"))
    bad = body.replace(b"\x04ok", b"\x04\xff\xfe", 1)
    assert reason_of(lambda: raw.decode(bad)) == "invalid_utf8"
    bad_attr = write(stripped, raw_record(attributes={"k": "v"})).replace(b"\x02v", b"\x02\x80")
    assert reason_of(lambda: raw.decode(bad_attr)) == "invalid_utf8"


def test_bad_enum_and_union_indexes(raw: RawAvroDecoder, stripped: Any) -> None:
    head = b"\x02a\x02b\x00"
    assert reason_of(lambda: raw.decode(head + zigzag(99) + b"\x06EUR\x02\x01\x00\x00\x00\x00")) == "invalid_avro"
    assert reason_of(lambda: raw.decode(head + b"\x02\x06EUR\x02\x01\x00" + zigzag(7) + b"\x00\x00")) == "invalid_avro"


@pytest.mark.parametrize(
    ("unscaled", "expected"),
    [
        (999_999_999_999, Decimal("9999999999.99")),
        (-999_999_999_999, Decimal("-9999999999.99")),
        (-1, Decimal("-0.01")),
        (-100, Decimal("-1.00")),
        (0, Decimal("0.00")),
        (128, Decimal("1.28")),  # needs a leading 0x00 sign byte
        (-129, Decimal("-1.29")),
    ],
)
def test_decimal_conversion(raw: RawAvroDecoder, stripped: Any, unscaled: int, expected: Decimal) -> None:
    size = (unscaled.bit_length() + 8) // 8
    got = raw.decode(write(stripped, raw_record(revenue=unscaled.to_bytes(size, "big", signed=True)))).revenue
    assert got == expected and got.as_tuple() == expected.as_tuple()
    # Sign-extended padding (legal two's complement) decodes the same.
    padded = unscaled.to_bytes(size + 3, "big", signed=True)
    assert raw.decode(write(stripped, raw_record(revenue=padded))).revenue == expected


@pytest.mark.parametrize(
    "revenue",
    [
        (10**12).to_bytes(6, "big", signed=True),
        (-(10**12)).to_bytes(6, "big", signed=True),
        (2**127 - 1).to_bytes(16, "big", signed=True),
        b"\x00" * 17,
        b"",
    ],
    ids=["1e12", "-1e12", "128bit", "17_bytes", "empty"],
)
def test_decimal_beyond_precision_12(raw: RawAvroDecoder, stripped: Any, revenue: bytes) -> None:
    assert reason_of(lambda: raw.decode(write(stripped, raw_record(revenue=revenue)))) == "invalid_decimal"


def test_decimal_from_records() -> None:
    rec = purchase_to_record(PURCHASE)
    for bad in (Decimal("1.001"), Decimal("NaN"), Decimal("1e10"), Decimal("Infinity"), 12.5, "1.00"):
        assert reason_of(lambda b=bad: purchase_from_record({**rec, "revenue": b})) == "invalid_decimal"
    assert purchase_from_record({**rec, "revenue": Decimal("7.5")}).revenue.as_tuple() == Decimal("7.50").as_tuple()


@pytest.mark.parametrize("ts", [-1, MAX_TIMESTAMP_MS + 1, 2**62])
def test_timestamps_out_of_range(raw: RawAvroDecoder, stripped: Any, ts: int) -> None:
    assert reason_of(lambda: raw.decode(write(stripped, raw_record(occurred_at=ts)))) == "invalid_timestamp"
    exposures = purchase_to_record(PURCHASE)["exposures"]
    exposures[1]["exposed_at"] = ts
    assert reason_of(lambda: raw.decode(write(stripped, raw_record(exposures=exposures)))) == "invalid_timestamp"
    assert raw.decode(write(stripped, raw_record(occurred_at=MAX_TIMESTAMP_MS))).occurred_at == MAX_TIMESTAMP_MS


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (lambda r: r.pop("event_id"), "invalid_field"),
        (lambda r: r.update(event_id=5), "invalid_field"),
        (lambda r: r.update(channel="TELEPATHY"), "invalid_field"),
        (lambda r: r.update(item_count=True), "invalid_field"),
        (lambda r: r.update(item_count=2**31), "invalid_field"),
        (lambda r: r.update(customer_id=7), "invalid_field"),
        (lambda r: r.update(attributes={"k": 1}), "invalid_field"),
        (lambda r: r.update(attributes=[("k", "v")]), "invalid_field"),
        (lambda r: r["exposures"][0].update(provider="OPTIMIZELY"), "invalid_field"),  # only Avro resolution maps
        (lambda r: r.update(consent=[{"provider": "OPTIMIZELY", "granted": True}]), "invalid_field"),  # to UNKNOWN
        (lambda r: r.update(consent=[{"provider": "CONVERT", "granted": "yes"}]), "invalid_field"),
        (lambda r: r.update(consent=[{"provider": "CONVERT"}]), "invalid_field"),
        (lambda r: r["exposures"][0].update(visitor_id=None), "invalid_field"),
        (lambda r: r["exposures"][0].pop("project"), "invalid_field"),
        (lambda r: r.update(exposures=[1]), "invalid_field"),
        (lambda r: r.update(occurred_at="yesterday"), "invalid_timestamp"),
        (lambda r: r.update(occurred_at=1.5), "invalid_timestamp"),
    ],
)
def test_purchase_from_record_rejects(change: Callable[[dict[str, Any]], object], reason: str) -> None:
    rec = purchase_to_record(PURCHASE)
    change(rec)
    assert reason_of(lambda: purchase_from_record(rec)) == reason


def test_record_defaults_for_optional_fields() -> None:
    rec = purchase_to_record(MINIMAL)
    for name in ("channel", "customer_id", "exposures", "attributes"):
        del rec[name]
    assert purchase_from_record(rec) == MINIMAL


# --------------------------------------------------------------------------- properties

_BODY = encode_raw(PURCHASE, load_schema(SCHEMA))
_RAW = RawAvroDecoder(SCHEMA, SCHEMA, CAP)


def _only_purchase_or_decode_error(decoder: RawAvroDecoder | ConfluentDecoder, data: bytes) -> None:
    started = time.monotonic()
    try:
        assert isinstance(decoder.decode(data), Purchase)
    except DecodeError as exc:
        assert exc.reason in REASONS and not exc.transient
    assert time.monotonic() - started < 0.5


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=200))
def test_random_bytes(data: bytes) -> None:
    _only_purchase_or_decode_error(_RAW, data)


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    body = bytearray(_BODY)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "set", "insert", "delete", "varint"]))
        i = draw(st.integers(0, len(body) - 1)) if body else 0
        if kind == "flip" and body:
            body[i] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set" and body:
            body[i] = draw(st.integers(0, 255))
        elif kind == "insert":
            body[i:i] = draw(st.binary(min_size=1, max_size=4))
        elif kind == "delete" and body:
            del body[i : i + draw(st.integers(1, 4))]
        elif kind == "varint":
            body[i : i + 1] = zigzag(draw(st.integers(-(2**64), 2**64)))
    return bytes(body)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated())
def test_mutated_messages(data: bytes) -> None:
    _only_purchase_or_decode_error(_RAW, data)


@settings(max_examples=60, deadline=None)
@given(mutated())
def test_mutated_messages_stay_small(data: bytes) -> None:
    assert _peak_bytes(lambda: _RAW.decode(data)) < 1_000_000


async def test_mutated_confluent_messages(registry: RegistryServer, confluent: ConfluentDecoder) -> None:
    schema_id = registry.register(SUBJECT, schema_text(V2))
    await confluent.load(schema_id)
    body = write(load_schema(V2), _new_record())
    header = b"\x00" + schema_id.to_bytes(4, "big")
    decoder_v2 = confluent

    @settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(st.integers(0, len(body) - 1), st.integers(0, 255), st.binary(max_size=3))
    def check(i: int, byte: int, extra: bytes) -> None:
        data = header + body[:i] + bytes([byte]) + extra + body[i + 1 :]
        _only_purchase_or_decode_error(decoder_v2, data)

    check()
    assert decoder_v2.decode(header + body).channel is Channel.OTHER
