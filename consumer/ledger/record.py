"""One ledger record (schemas/ledger_record.avsc): the dataclass, its keys, and its Avro encoding. Pure."""

from __future__ import annotations

import enum
import hashlib
import io
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import fastavro

from consumer.decoding import read_schema_json, strip_logical_types
from consumer.model import Conversion, Decision, Purchase

_SCHEMA_NAME = "ledger_record.avsc"


def _schema_path() -> Any:
    from consumer.config import PACKAGE_ROOT

    for p in (PACKAGE_ROOT / "schemas" / _SCHEMA_NAME, PACKAGE_ROOT.parent / "schemas" / _SCHEMA_NAME):
        if p.exists():
            return p
    return PACKAGE_ROOT.parent / "schemas" / _SCHEMA_NAME


SCHEMA_PATH = _schema_path()
# Timestamps travel as plain longs: the dataclass holds epoch milliseconds, never datetimes.
SCHEMA = fastavro.parse_schema(strip_logical_types(read_schema_json(SCHEMA_PATH)))

# A skip must never replace the conversion's own outcome in the compacted topic, so it has its own key.
SKIP_PREFIX = "dup:"
UNATTRIBUTED_PREFIX = "u:"


class Outcome(enum.StrEnum):
    """What happened to one conversion (or one unattributed purchase); the schema's enum, lower-cased."""

    UNKNOWN = "unknown"  # an outcome a newer writer added (issue 17's adjustments): never final here
    DELIVERED = "delivered"
    NOT_ACCEPTED = "not_accepted"
    DEAD_LETTERED = "dead_lettered"
    SKIPPED_DUPLICATE = "skipped_duplicate"
    UNATTRIBUTED = "unattributed"

    @property
    def final(self) -> bool:
        """The provider answered for good (or the DLQ holds it): recovery does not send it again."""
        return self in _FINAL


_FINAL = frozenset({Outcome.DELIVERED, Outcome.NOT_ACCEPTED, Outcome.DEAD_LETTERED})
_BY_SYMBOL = {o.name: o for o in Outcome}


class LedgerDecodeError(ValueError):
    """A ledger value that is not a LedgerRecord (written by something else, or truncated)."""


@dataclass(slots=True)
class LedgerRecord:
    """What one provider pipeline knew of one conversion (or unattributed purchase) when it had the answer."""

    key: str
    outcome: Outcome
    provider: str  # slug; "" for a purchase without an exposure of a known provider
    order_id: str
    project: str = ""
    group: str = ""
    event_id: str = ""
    occurred_at: int = 0
    goals: tuple[str, ...] = ()
    revenue: Decimal | None = None
    currency: str | None = None
    identity: str = "visitor"
    visitor_id: str = ""
    customer_hash: str | None = None
    experiment_id: str | None = None
    variation_id: str | None = None
    source_topic: str = ""
    source_partition: int = -1
    source_offset: int = -1
    time: int = 0
    attempts: int = 0
    http_status: int | None = None
    reasons: tuple[str, ...] = field(default=())


@dataclass(frozen=True, slots=True)
class Origin:
    """Where a record's event came from and who wrote it: the same for every record of one event."""

    group: str
    topic: str
    partition: int
    offset: int


def customer_hash(customer_id: str | None) -> str | None:
    """sha256 hex of a customer id (None or blank: None); the ledger never stores the id itself."""
    if customer_id is None or not customer_id.strip():
        return None
    return hashlib.sha256(customer_id.encode()).hexdigest()


def for_conversion(conversion: Conversion, outcome: Outcome, origin: Origin, *, now_ms: int,
                   currency: str | None, customer: str | None = None, attempts: int = 0,
                   http_status: int | None = None, reason: str | None = None) -> LedgerRecord:
    """The record of one conversion's result. `customer`: the purchase's customer id (stored hashed)."""
    key = conversion.key if outcome is not Outcome.SKIPPED_DUPLICATE else SKIP_PREFIX + conversion.key
    return LedgerRecord(
        key=key, outcome=outcome, provider=conversion.provider.slug, order_id=conversion.order_id,
        project=conversion.project, group=origin.group, event_id=conversion.event_id,
        occurred_at=conversion.occurred_at, goals=conversion.goals, revenue=conversion.revenue,
        currency=currency if conversion.revenue is not None else None, identity=conversion.identity.value,
        visitor_id=conversion.visitor_id, customer_hash=customer_hash(customer),
        experiment_id=conversion.experiment_id, variation_id=conversion.variation_id,
        source_topic=origin.topic, source_partition=origin.partition, source_offset=origin.offset,
        time=now_ms, attempts=attempts, http_status=http_status, reasons=(reason,) if reason else (),
    )


def unattributed_key(provider: str, project: str, order_id: str) -> str:
    """One key per purchase and provider project: a re-read purchase replaces its own record."""
    digest = hashlib.sha256(f"{len(provider)}:{provider}{len(project)}:{project}{order_id}".encode()).hexdigest()
    return UNATTRIBUTED_PREFIX + digest[:32]


def for_unattributed(purchase: Purchase, decision: Decision, origin: Origin, *, provider: str,
                     now_ms: int) -> list[LedgerRecord]:
    """The records of the provider projects a purchase names but gets no conversion for, with the reasons.

    `provider`: the pipeline's provider slug (its records only), or "" for every provider. A project
    with a conversion gets none (its other identities' NOT_CREDITED are not a failure to attribute).
    A purchase naming no known provider at all (no exposures, or only a newer writer's providers) gets
    one record with provider and project "" and the same key from every pipeline, so it counts once.
    """
    attributed = {(c.provider.slug, c.project) for c in decision.conversions}
    by_project: dict[tuple[str, str], set[str]] = {}

    def note(k: tuple[str, str], reasons: set[str]) -> None:
        if (not provider or k[0] == provider) and k not in attributed:
            by_project.setdefault(k, set()).update(reasons)

    # Reasons of the whole purchase (too_old; unknown_provider for a newer writer's exposures).
    whole = {r.reason.value for r in decision.rejections if r.exposure is None}
    for r in decision.rejections:
        if r.exposure is not None:
            note((r.exposure.provider.slug, r.exposure.project), {r.reason.value})
    if whole - {"unknown_provider"}:
        for e in purchase.exposures:
            note((e.provider.slug, e.project), whole)
    if not purchase.exposures and not decision.conversions:
        by_project[("", "")] = whole or {"no_exposures"}
    return [
        LedgerRecord(
            key=unattributed_key(p, project, purchase.order_id), outcome=Outcome.UNATTRIBUTED, provider=p,
            order_id=purchase.order_id, project=project, group=origin.group, event_id=purchase.event_id,
            occurred_at=purchase.occurred_at, customer_hash=customer_hash(purchase.customer_id),
            source_topic=origin.topic, source_partition=origin.partition, source_offset=origin.offset,
            time=now_ms, reasons=tuple(sorted(reasons)),
        )
        for (p, project), reasons in sorted(by_project.items())
    ]


# --------------------------------------------------------------------------- Avro


def to_avro(rec: LedgerRecord) -> dict[str, Any]:
    return {
        "key": rec.key, "outcome": rec.outcome.name, "provider": rec.provider, "project": rec.project,
        "group": rec.group, "order_id": rec.order_id, "event_id": rec.event_id, "occurred_at": rec.occurred_at,
        "goals": list(rec.goals), "revenue": None if rec.revenue is None else str(rec.revenue),
        "currency": rec.currency, "identity": rec.identity, "visitor_id": rec.visitor_id,
        "customer_hash": rec.customer_hash, "experiment_id": rec.experiment_id, "variation_id": rec.variation_id,
        "source_topic": rec.source_topic, "source_partition": rec.source_partition,
        "source_offset": rec.source_offset, "time": rec.time, "attempts": rec.attempts,
        "http_status": rec.http_status, "reasons": list(rec.reasons),
    }


def encode(rec: LedgerRecord) -> bytes:
    """Schemaless Avro of `rec` (the ledger topic's value)."""
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, SCHEMA, to_avro(rec))
    return buf.getvalue()


def from_avro(d: dict[str, Any]) -> LedgerRecord:
    revenue = d.get("revenue")
    return LedgerRecord(
        key=d["key"], outcome=_BY_SYMBOL.get(d["outcome"], Outcome.UNKNOWN), provider=d["provider"],
        order_id=d["order_id"], project=d["project"], group=d["group"], event_id=d["event_id"],
        occurred_at=d["occurred_at"], goals=tuple(d["goals"]), revenue=None if revenue is None else Decimal(revenue),
        currency=d["currency"], identity=d["identity"], visitor_id=d["visitor_id"],
        customer_hash=d["customer_hash"], experiment_id=d["experiment_id"], variation_id=d["variation_id"],
        source_topic=d["source_topic"], source_partition=d["source_partition"], source_offset=d["source_offset"],
        time=d["time"], attempts=d["attempts"], http_status=d["http_status"], reasons=tuple(d["reasons"]),
    )


def decode(value: bytes, writer_schema: Any = None) -> LedgerRecord:
    """A ledger value back; `writer_schema` (parsed) when it was written with another version of the schema."""
    try:
        d = fastavro.schemaless_reader(io.BytesIO(value), writer_schema or SCHEMA, SCHEMA)
    except Exception as exc:  # fastavro raises EOFError, ValueError, IndexError… for bad bytes
        raise LedgerDecodeError(f"not a ledger record: {type(exc).__name__}: {exc}") from None
    if not isinstance(d, dict):
        raise LedgerDecodeError("not a ledger record: not an Avro record")
    return from_avro(d)
