"""The order-adjustment contract and the decoders of a topic with two record types: evolution, framing, headers."""

from __future__ import annotations

import dataclasses
import io
import json
from collections.abc import AsyncIterator, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import fastavro
import pytest

# tests/registry_server.py: pytest's default "prepend" import mode puts tests/ on sys.path.
from registry_server import RegistryServer

from consumer.config import AdjustmentsConfig, DecodingConfig
from consumer.decoding import (
    REASONS,
    ConfluentEventDecoder,
    DecodeError,
    RawAdjustmentDecoder,
    RawAvroDecoder,
    RawEventDecoder,
    SchemaNotLoaded,
    adjustment_from_record,
    adjustment_to_record,
    encode_adjustment_raw,
    encode_raw,
    load_schema,
    make_event_decoder,
    read_schema_json,
)
from consumer.model import AdjustmentKind, Channel, OrderAdjusted, Purchase
from consumer.schema_registry import SchemaRegistry

ROOT = Path(__file__).resolve().parent.parent
PURCHASES = ROOT / "schemas" / "purchase_completed.avsc"
SCHEMA = ROOT / "schemas" / "order_adjusted.avsc"
V0 = Path(__file__).resolve().parent / "schemas" / "order_adjusted_v0.avsc"  # before items_returned and reason
V2 = Path(__file__).resolve().parent / "schemas" / "order_adjusted_v2.avsc"  # a new kind and a new field
CAP = 64 * 1024

REFUND = OrderAdjusted("adj-1", "ord-1", 1_700_000_500_000, AdjustmentKind.PARTIAL_REFUND, Decimal("19.90"), "EUR",
                       2, "returned in store")
PURCHASE = Purchase("evt-1", "ord-1", 1_700_000_000_000, Channel.STORE, "EUR", Decimal("99.90"), 3)


def confluent(schema_id: int, body: bytes) -> bytes:
    return b"\x00" + schema_id.to_bytes(4, "big") + body


def reason_of(fn: Any, *args: Any) -> str:
    with pytest.raises(DecodeError) as info:
        fn(*args)
    assert info.value.reason in REASONS
    return info.value.reason


# --------------------------------------------------------------------------- the contract


def test_the_schema_is_the_contract() -> None:
    s = read_schema_json(SCHEMA)
    assert (s["namespace"], s["name"]) == ("offline_conversions.v1", "OrderAdjusted")
    fields = {f["name"]: f for f in s["fields"]}
    assert list(fields) == ["event_id", "order_id", "occurred_at", "kind", "amount", "currency", "items_returned",
                            "reason"]
    assert fields["occurred_at"]["type"] == {"type": "long", "logicalType": "timestamp-millis"}
    # The amount is a decimal exactly as the purchase's revenue is.
    revenue = next(f for f in read_schema_json(PURCHASES)["fields"] if f["name"] == "revenue")
    assert fields["amount"]["type"] == revenue["type"]
    kind = fields["kind"]["type"]
    assert kind["symbols"] == [k.value for k in AdjustmentKind] and kind["default"] == "UNKNOWN"
    # Beyond the required fields, every field has a default (so older events still decode).
    assert {n for n, f in fields.items() if "default" in f} == {"items_returned", "reason"}


def test_raw_round_trip() -> None:
    d = RawAdjustmentDecoder(SCHEMA, SCHEMA, CAP)
    assert d.decode(encode_adjustment_raw(REFUND, load_schema(SCHEMA))) == REFUND
    assert adjustment_from_record(adjustment_to_record(REFUND)) == REFUND


# --------------------------------------------------------------------------- evolution, both ways


def _v0_record() -> dict[str, Any]:
    rec = adjustment_to_record(REFUND)
    del rec["items_returned"], rec["reason"]
    return rec


def test_an_older_writer_is_read_with_the_defaults() -> None:
    d = RawAdjustmentDecoder(V0, SCHEMA, CAP)
    got = d.decode(encode_adjustment_raw(dataclasses.replace(REFUND, items_returned=0, reason=None),
                                         load_schema(V0)))
    assert got == dataclasses.replace(REFUND, items_returned=0, reason=None)


def test_the_current_writer_is_read_by_an_older_reader() -> None:
    d = RawAdjustmentDecoder(SCHEMA, V0, CAP)
    got = d.decode(encode_adjustment_raw(REFUND, load_schema(SCHEMA)))
    assert got == dataclasses.replace(REFUND, items_returned=0, reason=None)  # the newer fields are skipped


def test_a_newer_writer_with_a_new_kind_reads_as_unknown() -> None:
    d = RawAdjustmentDecoder(V2, SCHEMA, CAP)
    schema = load_schema(V2)
    newer = {**adjustment_to_record(REFUND), "kind": "CHARGEBACK", "refund_method": "voucher"}
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, schema, newer)
    got = d.decode(buf.getvalue())
    assert got == dataclasses.replace(REFUND, kind=AdjustmentKind.UNKNOWN)
    same_kind = {**newer, "kind": "FULL_REFUND"}
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, schema, same_kind)
    assert d.decode(buf.getvalue()).kind is AdjustmentKind.FULL_REFUND


def test_the_current_writer_is_read_by_a_newer_reader() -> None:
    d = RawAdjustmentDecoder(SCHEMA, V2, CAP)
    assert d.decode(encode_adjustment_raw(REFUND, load_schema(SCHEMA))) == REFUND


@pytest.mark.parametrize(("change", "reason"), [
    ({"event_id": 1}, "invalid_field"),
    ({"kind": "REFUNDED"}, "invalid_field"),
    ({"items_returned": 2**31}, "invalid_field"),
    ({"reason": 5}, "invalid_field"),
    ({"occurred_at": -1}, "invalid_timestamp"),
    ({"amount": Decimal("1.005")}, "invalid_decimal"),
])
def test_a_record_that_breaks_the_contract(change: dict[str, Any], reason: str) -> None:
    assert reason_of(adjustment_from_record, {**adjustment_to_record(REFUND), **change}) == reason


def test_a_record_without_a_required_field() -> None:
    rec = adjustment_to_record(REFUND)
    del rec["amount"]
    assert reason_of(adjustment_from_record, rec) == "invalid_field"


# --------------------------------------------------------------------------- raw Avro: the header tells


def raw_topic() -> RawEventDecoder:
    return RawEventDecoder(RawAvroDecoder(PURCHASES, PURCHASES, CAP), RawAdjustmentDecoder(SCHEMA, SCHEMA, CAP))


PURCHASE_BYTES = encode_raw(PURCHASE, load_schema(PURCHASES))
REFUND_BYTES = encode_adjustment_raw(REFUND, load_schema(SCHEMA))


@pytest.mark.parametrize(("headers", "value", "expected"), [
    (None, PURCHASE_BYTES, PURCHASE),  # as before adjustments: no header, a purchase
    ([], PURCHASE_BYTES, PURCHASE),
    ([("other", b"x")], PURCHASE_BYTES, PURCHASE),
    ([("event_type", b"PurchaseCompleted")], PURCHASE_BYTES, PURCHASE),
    ([("event_type", b"OrderAdjusted")], REFUND_BYTES, REFUND),
    ([("event_type", "offline_conversions.v1.OrderAdjusted")], REFUND_BYTES, REFUND),  # a str and the full name
    ([("event_type", b"PurchaseCompleted"), ("event_type", b"OrderAdjusted")], REFUND_BYTES, REFUND),  # last wins
])
def test_raw_avro_reads_the_record_type_from_the_header(headers: Any, value: bytes, expected: object) -> None:
    assert raw_topic().decode(value, headers) == expected


def test_raw_avro_refuses_an_unknown_record_type() -> None:
    d = raw_topic()
    assert reason_of(d.decode, REFUND_BYTES, [("event_type", b"OrderShipped")]) == "unknown_event_type"
    assert reason_of(d.decode, REFUND_BYTES, [("event_type", None)]) == "unknown_event_type"


def test_a_topic_of_its_own_needs_no_header_and_carries_nothing_else() -> None:
    d = RawEventDecoder(None, RawAdjustmentDecoder(SCHEMA, SCHEMA, CAP))
    assert d.decode(REFUND_BYTES) == REFUND
    assert reason_of(d.decode, PURCHASE_BYTES, [("event_type", b"PurchaseCompleted")]) == "unknown_event_type"


def test_without_adjustments_the_purchases_decoder_is_as_before() -> None:
    d = make_event_decoder(DecodingConfig(), AdjustmentsConfig())
    assert isinstance(d, RawAvroDecoder) and d.needs_headers is False  # nothing added per message
    assert d.decode(PURCHASE_BYTES, [("event_type", b"OrderAdjusted")]) == PURCHASE  # headers are not read


def test_make_event_decoder_follows_the_config() -> None:
    both = make_event_decoder(DecodingConfig(), AdjustmentsConfig(enabled=True, event_type_header="type"))
    assert both.needs_headers is True
    assert both.decode(REFUND_BYTES, [("type", b"OrderAdjusted")]) == REFUND
    own = AdjustmentsConfig(enabled=True, topic="orders.adjustments")
    assert isinstance(make_event_decoder(DecodingConfig(), own), RawAvroDecoder)
    assert make_event_decoder(DecodingConfig(), own, adjustments_topic=True).decode(REFUND_BYTES) == REFUND
    with pytest.raises(ValueError, match="not enabled"):
        make_event_decoder(DecodingConfig(), AdjustmentsConfig(), adjustments_topic=True)


# --------------------------------------------------------------------------- Schema Registry: the writer's name tells


@pytest.fixture
def registry() -> Iterator[RegistryServer]:
    with RegistryServer() as reg:
        yield reg


@pytest.fixture
async def both(registry: RegistryServer) -> AsyncIterator[ConfluentEventDecoder]:
    d = ConfluentEventDecoder(SchemaRegistry(registry.url, timeout=2.0), PURCHASES, SCHEMA, CAP)
    yield d
    await d.close()


async def test_record_name_strategy_puts_both_types_on_one_topic(registry: RegistryServer,
                                                                 both: ConfluentEventDecoder) -> None:
    # TopicRecordNameStrategy: one subject per record type on the topic.
    pid = registry.register("purchases-offline_conversions.v1.PurchaseCompleted", PURCHASES.read_text())
    aid = registry.register("purchases-offline_conversions.v1.OrderAdjusted", SCHEMA.read_text())
    purchase, refund = confluent(pid, PURCHASE_BYTES), confluent(aid, REFUND_BYTES)
    with pytest.raises(SchemaNotLoaded):
        both.decode(refund)  # never waits for the registry on the poll loop
    assert await both.decode_async(refund) == REFUND
    assert await both.decode_async(purchase, [("event_type", b"OrderAdjusted")]) == PURCHASE  # the name wins
    assert both.decode(refund) == REFUND and both.decode(purchase) == PURCHASE  # cached now


async def test_confluent_evolution_of_the_adjustment_both_ways(registry: RegistryServer,
                                                               both: ConfluentEventDecoder) -> None:
    old = registry.register("a-OrderAdjusted", V0.read_text())
    new = registry.register("a-OrderAdjusted", V2.read_text())
    old_bytes = encode_adjustment_raw(dataclasses.replace(REFUND, items_returned=0, reason=None), load_schema(V0))
    got = await both.decode_async(confluent(old, old_bytes))
    assert got == dataclasses.replace(REFUND, items_returned=0, reason=None)
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, load_schema(V2), {**adjustment_to_record(REFUND), "kind": "CHARGEBACK",
                                                     "refund_method": "voucher"})
    assert await both.decode_async(confluent(new, buf.getvalue())) == dataclasses.replace(
        REFUND, kind=AdjustmentKind.UNKNOWN)


async def test_confluent_refuses_a_record_type_the_topic_does_not_carry(registry: RegistryServer,
                                                                       both: ConfluentEventDecoder) -> None:
    other = read_schema_json(SCHEMA)
    other["name"] = "OrderShipped"
    sid = registry.register("purchases-OrderShipped", json.dumps(other))
    with pytest.raises(DecodeError) as info:
        await both.decode_async(confluent(sid, REFUND_BYTES))
    assert info.value.reason == "unknown_event_type" and "OrderShipped" in str(info.value)
    fetched = len(registry.state.requests)
    assert reason_of(both.decode, confluent(sid, REFUND_BYTES)) == "unknown_event_type"  # remembered
    assert len(registry.state.requests) == fetched


async def test_confluent_adjustments_topic_of_its_own(registry: RegistryServer) -> None:
    d = ConfluentEventDecoder(SchemaRegistry(registry.url, timeout=2.0), None, SCHEMA, CAP)
    try:
        pid = registry.register("p", PURCHASES.read_text())
        aid = registry.register("a", SCHEMA.read_text())
        assert await d.decode_async(confluent(aid, REFUND_BYTES)) == REFUND
        with pytest.raises(DecodeError) as info:
            await d.decode_async(confluent(pid, PURCHASE_BYTES))
        assert info.value.reason == "unknown_event_type"
    finally:
        await d.close()


async def test_confluent_framing_errors_are_the_usual_ones(registry: RegistryServer,
                                                          both: ConfluentEventDecoder) -> None:
    assert reason_of(both.decode, None) == "null_value"
    assert reason_of(both.decode, b"\x01\x00\x00\x00\x01x") == "bad_magic_byte"
    with pytest.raises(DecodeError) as info:
        await both.decode_async(confluent(4242, REFUND_BYTES))
    assert info.value.reason == "unknown_schema_id"
