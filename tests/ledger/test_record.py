"""The ledger record: Avro round trip, schema evolution both ways, keys, unattributed records; and LedgerMarks."""

from __future__ import annotations

import copy
import io
import json
from decimal import Decimal

import fastavro
import pytest

from consumer.decoding import strip_logical_types
from consumer.ledger.marks import LedgerMarks, MetadataError, decode_metadata, encode_metadata
from consumer.ledger.record import (
    SCHEMA_PATH,
    SKIP_PREFIX,
    LedgerDecodeError,
    Origin,
    Outcome,
    customer_hash,
    decode,
    encode,
    for_conversion,
    for_unattributed,
    unattributed_key,
)
from consumer.model import Conversion, Decision, Exposure, Identity, Provider, Purchase, Rejection, RejectReason

ORIGIN = Origin("oc.kameleoon", "purchases", 2, 41)


def conversion(**kw: object) -> Conversion:
    base: dict[str, object] = dict(
        provider=Provider.CONVERT, project="1111_2222", visitor_id="v1", goals=("g1", "g2"),
        revenue=Decimal("19.99"), key="a" * 32, event_id="e1", order_id="ORD-1", occurred_at=1_700_000_000_000,
        item_count=2, experiment_id="100001", variation_id="1000002")
    base.update(kw)
    return Conversion(**base)  # type: ignore[arg-type]


def purchase(*exposures: Exposure, customer: str | None = "cust-42") -> Purchase:
    from consumer.model import Channel

    return Purchase("e1", "ORD-1", 1_700_000_000_000, Channel.STORE, "EUR", Decimal("19.99"), 2, customer, exposures)


def exposure(provider: Provider, project: str, visitor: str = "v1") -> Exposure:
    return Exposure(provider, project, "100001", "1000002", visitor, 1_699_999_000_000)


def test_a_conversion_record_round_trips_exactly() -> None:
    rec = for_conversion(conversion(), Outcome.DELIVERED, ORIGIN, now_ms=1_700_000_001_000, currency="EUR",
                         customer="cust-42", attempts=2, http_status=200)
    back = decode(encode(rec))
    assert back == rec
    assert back.revenue == Decimal("19.99") and back.currency == "EUR"
    assert back.customer_hash == customer_hash("cust-42") and "cust-42" not in encode(rec).decode("latin-1")
    assert (back.group, back.source_topic, back.source_partition, back.source_offset) == ("oc.kameleoon", "purchases",
                                                                                          2, 41)


def test_a_skip_has_its_own_key_so_it_never_replaces_the_outcome() -> None:
    rec = for_conversion(conversion(), Outcome.SKIPPED_DUPLICATE, ORIGIN, now_ms=1, currency="EUR")
    assert rec.key == SKIP_PREFIX + "a" * 32
    assert not rec.outcome.final
    assert {o for o in Outcome if o.final} == {Outcome.DELIVERED, Outcome.NOT_ACCEPTED, Outcome.DEAD_LETTERED}


def test_no_revenue_means_no_currency_and_a_mapping_identity_is_kept() -> None:
    rec = for_conversion(conversion(revenue=None, identity=Identity.MAPPING), Outcome.NOT_ACCEPTED, ORIGIN, now_ms=1,
                         currency="EUR", reason="visitor unknown")
    back = decode(encode(rec))
    assert back.revenue is None and back.currency is None
    assert back.identity == "mapping" and back.reasons == ("visitor unknown",)


def _schema() -> dict[str, object]:
    data = json.loads(SCHEMA_PATH.read_text())
    assert isinstance(data, dict)
    return data


def test_a_newer_writer_with_a_new_field_and_outcome_is_read_as_unknown() -> None:
    newer = copy.deepcopy(_schema())
    fields = newer["fields"]
    assert isinstance(fields, list)
    fields.append({"name": "adjustment", "type": ["null", "string"], "default": None})
    outcome = next(f for f in fields if f["name"] == "outcome")
    outcome["type"]["symbols"] = [*outcome["type"]["symbols"], "RETRACTED"]
    parsed = fastavro.parse_schema(strip_logical_types(newer))
    rec = for_conversion(conversion(), Outcome.DELIVERED, ORIGIN, now_ms=5, currency="EUR")
    from consumer.ledger.record import to_avro

    d = {**to_avro(rec), "outcome": "RETRACTED", "adjustment": "partial_refund"}
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, parsed, d)
    back = decode(buf.getvalue(), writer_schema=parsed)
    assert back.outcome is Outcome.UNKNOWN and not back.outcome.final
    assert back.key == rec.key and back.revenue == rec.revenue


def test_an_older_reader_without_the_optional_fields_reads_todays_records() -> None:
    older = copy.deepcopy(_schema())
    keep = {"key", "outcome", "provider", "order_id"}
    older["fields"] = [f for f in older["fields"] if f["name"] in keep]  # type: ignore[union-attr]
    reader = fastavro.parse_schema(strip_logical_types(older))
    from consumer.ledger.record import SCHEMA

    rec = for_conversion(conversion(), Outcome.DEAD_LETTERED, ORIGIN, now_ms=5, currency="EUR")
    d = fastavro.schemaless_reader(io.BytesIO(encode(rec)), SCHEMA, reader)
    assert d == {"key": rec.key, "outcome": "DEAD_LETTERED", "provider": "convert", "order_id": "ORD-1"}


def test_bytes_that_are_not_a_record_raise_a_typed_error() -> None:
    with pytest.raises(LedgerDecodeError):
        decode(b"\x02")


def test_unattributed_records_per_project_with_their_reasons() -> None:
    p = purchase(exposure(Provider.KAMELEOON, "site-a"), exposure(Provider.KAMELEOON, "site-b"),
                 exposure(Provider.CONVERT, "1111_2222"))
    decision = Decision(
        conversions=(conversion(provider=Provider.KAMELEOON, project="site-b"),),
        rejections=(
            Rejection(RejectReason.OUTSIDE_WINDOW, "", p.exposures[0]),
            Rejection(RejectReason.CURRENCY, "", p.exposures[0]),
            Rejection(RejectReason.NOT_CREDITED, "", p.exposures[1]),  # site-b is attributed: not a failure
            Rejection(RejectReason.UNKNOWN_PROJECT, "", p.exposures[2]),
        ))
    every = for_unattributed(p, decision, ORIGIN, provider="", now_ms=9)
    assert [(r.provider, r.project, r.reasons) for r in every] == [
        ("convert", "1111_2222", ("unknown_project",)),
        ("kameleoon", "site-a", ("currency", "outside_window")),
    ]
    only = for_unattributed(p, decision, ORIGIN, provider="kameleoon", now_ms=9)
    assert [(r.provider, r.project) for r in only] == [("kameleoon", "site-a")]
    assert only[0].key == unattributed_key("kameleoon", "site-a", "ORD-1") and only[0].outcome is Outcome.UNATTRIBUTED
    assert decode(encode(only[0])) == only[0]


def test_a_purchase_without_exposures_gets_one_record_with_the_same_key_from_every_pipeline() -> None:
    p = purchase(customer=None)
    decision = Decision((), rejections=(Rejection(RejectReason.NO_EXPOSURES, "none"),))
    a = for_unattributed(p, decision, ORIGIN, provider="kameleoon", now_ms=9)
    b = for_unattributed(p, decision, Origin("oc.convert", "purchases", 2, 41), provider="convert", now_ms=9)
    assert [(r.provider, r.project, r.reasons) for r in a] == [("", "", ("no_exposures",))]
    assert a[0].key == b[0].key


def test_a_too_old_purchase_names_every_project_it_was_exposed_in() -> None:
    p = purchase(exposure(Provider.KAMELEOON, "site-a"), exposure(Provider.CONDUCTRICS, "ac-xxx"))
    decision = Decision((), rejections=(Rejection(RejectReason.TOO_OLD, "old"),))
    recs = for_unattributed(p, decision, ORIGIN, provider="", now_ms=9)
    assert [(r.provider, r.project, r.reasons) for r in recs] == [("conductrics", "ac-xxx", ("too_old",)),
                                                                   ("kameleoon", "site-a", ("too_old",))]


def test_customer_hash_of_nothing_is_nothing() -> None:
    assert customer_hash(None) is None and customer_hash("  ") is None
    assert customer_hash("c") == customer_hash("c") != customer_hash("d")


# --------------------------------------------------------------------------- marks


def test_metadata_round_trip_and_foreign_metadata() -> None:
    assert decode_metadata(encode_metadata(1234)) == 1234
    assert decode_metadata(None) is None and decode_metadata("") is None
    for bad in ("something else", "ledger:v1:x", "ledger:v1:-3"):
        with pytest.raises(MetadataError):
            decode_metadata(bad)


def test_marks_point_at_the_lowest_ledger_offset_of_an_uncommitted_event() -> None:
    marks = LedgerMarks()
    marks.assign(0, ledger_end=100)
    assert marks.metadata_offset(0, 10) == 100  # nothing written yet: where recovery stopped
    # Events finish out of order: 15 first (ledger 100, 101), then 10 (ledger 102), then 12 (ledger 103).
    for src, led in ((15, 100), (15, 101), (10, 102), (12, 103)):
        marks.acked(0, src, led)
    # Committing 10 (event 10 not done would keep it at 10; here all are done up to 12, 13, 14 missing):
    assert marks.metadata_offset(0, 10) == 100
    # The ledger's end (104) would skip event 15's records at 100 and 101.
    assert marks.metadata_offset(0, 13) == 100
    assert marks.metadata_offset(0, 16) == 104  # everything below is committed: past the last ack
    assert marks.held(0) == 0


def test_recovered_records_stay_marked_until_committed() -> None:
    marks = LedgerMarks()
    marks.assign(1, ledger_end=500, recovered=[(40, 310), (42, 320)])
    assert marks.metadata_offset(1, 40) == 310
    assert marks.metadata_offset(1, 41) == 320
    assert marks.metadata_offset(1, 43) == 500
    assert marks.metadata(7, 0) is None  # not ours


def test_acks_of_a_revoked_partition_are_ignored() -> None:
    marks = LedgerMarks()
    marks.acked(3, 1, 1)
    assert marks.metadata_offset(3, 0) is None
