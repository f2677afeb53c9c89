"""Decode "purchase completed" and "order adjusted" Avro events (schemaless or Confluent-framed), safely and fast."""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Callable, Mapping, Sequence
from decimal import Context, Decimal
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

import fastavro
from fastavro.types import Schema

from consumer.config import AdjustmentsConfig, DecodingConfig
from consumer.model import (
    NO_CONSENT_STATED,
    UNKNOWN_SYMBOL,
    AdjustmentKind,
    Channel,
    Exposure,
    OrderAdjusted,
    Provider,
    Purchase,
)
from consumer.providers import registry
from consumer.schema_registry import RegistryUnavailable, SchemaNotFound, SchemaRegistry

# Every DecodeError.reason is one of these, so the reason can be used as a metric label as it is.
REASONS: frozenset[str] = frozenset(
    {
        "null_value",
        "too_large",
        "truncated",
        "bad_magic_byte",
        "unknown_schema_id",
        "unsupported_schema",
        "incompatible_schema",
        "registry_unavailable",
        "invalid_avro",
        "invalid_utf8",
        "trailing_bytes",
        "invalid_decimal",
        "invalid_timestamp",
        "invalid_field",
        "unknown_event_type",
    }
)

MAGIC_BYTE = 0
HEADER_SIZE = 5  # magic byte + 4-byte big-endian schema id
REVENUE_PRECISION = 12
REVENUE_SCALE = 2
_MAX_UNSCALED = 10**REVENUE_PRECISION  # exclusive bound of |unscaled revenue|
_MAX_REVENUE = Decimal(_MAX_UNSCALED).scaleb(-REVENUE_SCALE)
_QUANTUM = Decimal(1).scaleb(-REVENUE_SCALE)
_REVENUE_CONTEXT = Context(prec=34)  # explicit: the process's global context must not matter
# Longer than any two's complement encoding of a 12-digit value even with sign padding; bounds int.from_bytes.
_MAX_DECIMAL_BYTES = 16
# datetime's range ends at 9999-12-31; a purchase before 1970 is a corrupted clock, not a customer.
MIN_TIMESTAMP_MS = 0
MAX_TIMESTAMP_MS = 253_402_300_799_999



class RevenueError(ValueError):
    """A revenue the contract's decimal(12,2) cannot carry exactly: more than two decimals, or too large."""

    def __init__(self, value: Decimal, detail: str) -> None:
        super().__init__(f"revenue {value} {detail}")
        self.value = value
        self.detail = detail  # what is wrong, without the value: "has more than 2 decimals, ..."


def contract_revenue(value: Decimal) -> Decimal:
    """`value` at scale 2 when that is exact (23.5 and 23.500 -> 23.50); RevenueError otherwise, never a rounding."""
    if not value.is_finite():
        raise RevenueError(value, "is not a finite number")
    if abs(value) >= _MAX_REVENUE:
        raise RevenueError(value, f"does not fit decimal({REVENUE_PRECISION},{REVENUE_SCALE}): "
                                  f"at most {REVENUE_PRECISION - REVENUE_SCALE} digits before the point")
    scaled = value.quantize(_QUANTUM, context=_REVENUE_CONTEXT)  # at most 12 digits: never raises
    if scaled != value:
        raise RevenueError(value, f"has more than {REVENUE_SCALE} decimals, which decimal({REVENUE_PRECISION},"
                                  f"{REVENUE_SCALE}) cannot carry; round it where it is made (it is never "
                                  "rounded here)")
    return scaled


_CHANNELS: dict[str, Channel] = {c.value: c for c in Channel}
# Every registered provider by Avro symbol: the registry's own live mapping, so a provider registered from
# config ([providers] modules) is known here without a copy to refresh.
_PROVIDERS: Mapping[str, Provider] = registry.by_symbol()
# The reader schema's Provider enum default: what Avro resolution gives for a newer writer's provider symbol.
UNKNOWN_PROVIDER = UNKNOWN_SYMBOL


class DecodeError(Exception):
    """A message that cannot become a Purchase; `reason` is a short metric-label-safe code.

    `transient` is true only when retrying the same bytes later may succeed (the registry
    was unreachable): the caller retries those and dead-letters everything else.
    """

    def __init__(self, reason: str, message: str, *, transient: bool = False) -> None:
        assert reason in REASONS, reason
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.transient = transient

    def __repr__(self) -> str:
        return f"DecodeError({self.reason!r}, {self.message!r}, transient={self.transient})"


class SchemaNotLoaded(Exception):
    """The message's writer schema is not cached yet: `decode_async` fetches it (nothing is wrong with the message).

    `decode` never waits for the registry, so the poll loop never blocks on it: the caller hands
    such a message to a task that awaits `decode_async`, and goes on with the next one.
    """

    def __init__(self, schema_id: int) -> None:
        super().__init__(f"writer schema {schema_id} is not loaded yet")
        self.schema_id = schema_id


# What confluent-kafka's Message.headers() returns. A decoder of one record type ignores them.
Headers = Sequence[tuple[str, bytes | str | None]] | Mapping[str, bytes | str | None] | None


class Decoder(Protocol):
    """Turns one Kafka message value into a Purchase or raises DecodeError."""

    # Whether `decode` reads the message's headers (the caller fetches them only then: not free per message).
    needs_headers: bool

    def decode(self, value: bytes | None, headers: Headers = None) -> Purchase:
        """Decode with what is at hand; raises SchemaNotLoaded when the registry must be asked first."""
        ...

    async def decode_async(self, value: bytes | None, headers: Headers = None) -> Purchase:
        """Decode, first fetching the writer schema if it is not cached."""
        ...

    async def close(self) -> None:
        """Release connections (the registry's)."""
        ...


# --------------------------------------------------------------------------- schemas

_COMPLEX = frozenset({"record", "error", "enum", "array", "map", "fixed"})
_PRIMITIVE_MIN_SIZE = {"null": 0, "boolean": 1, "int": 1, "long": 1, "float": 4, "double": 8, "bytes": 1, "string": 1}


def read_schema_json(path: str | Path) -> dict[str, Any]:
    """The schema file as plain JSON (logical types included), e.g. to register it."""
    data = json.loads(Path(path).read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{path}: an Avro schema file must hold a JSON object")
    return data


def with_providers(schema: Any, symbols: Sequence[str]) -> Any:
    """The reader schema with every registered provider's symbol in its `Provider` enum.

    schemas/purchase_completed.avsc is the published contract and lists the built-in providers; a reader
    extends it from the registry, so an event naming a provider registered from config decodes. A symbol
    it lacks goes before UNKNOWN, which becomes the default if it was not. Nothing lacking: unchanged (the
    same JSON, so a writer with the contract's schema still skips resolution).
    """
    def walk(t: Any) -> Any:
        if isinstance(t, list):
            return [walk(x) for x in t]
        if not isinstance(t, dict):
            return t
        out = dict(t)
        kind = out.get("type")
        if kind == "enum" and str(out.get("name", "")).rsplit(".", 1)[-1] == "Provider":
            have = list(out.get("symbols", ()))
            missing = [s for s in symbols if s not in have]
            if missing:
                known = [s for s in have if s != UNKNOWN_SYMBOL]
                out["symbols"] = [*known, *missing, UNKNOWN_SYMBOL]
                out["default"] = UNKNOWN_SYMBOL
            return out
        if kind in ("record", "error"):
            out["fields"] = [{**f, "type": walk(f["type"])} for f in out.get("fields", [])]
        elif kind == "array":
            out["items"] = walk(out["items"])
        elif kind == "map":
            out["values"] = walk(out["values"])
        elif isinstance(kind, dict | list):
            out["type"] = walk(kind)
        return out

    return walk(schema)


def load_schema(path: str | Path) -> Schema:
    """The fastavro-parsed schema with its logical types, for the encode helpers."""
    return fastavro.parse_schema(read_schema_json(path))


def strip_logical_types(schema: Any) -> Any:
    """A copy of a JSON schema without logical types, so fastavro hands back raw longs and bytes.

    Only schema positions are walked: default values are data and stay untouched.
    """
    if isinstance(schema, list):
        return [strip_logical_types(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    if "logicalType" in out:
        for key in ("logicalType", "precision", "scale"):
            out.pop(key, None)
    kind = out.get("type")
    if kind in ("record", "error"):
        out["fields"] = [{**f, "type": strip_logical_types(f["type"])} for f in out.get("fields", [])]
    elif kind == "array":
        out["items"] = strip_logical_types(out["items"])
    elif kind == "map":
        out["values"] = strip_logical_types(out["values"])
    elif isinstance(kind, dict | list):
        out["type"] = strip_logical_types(kind)
    return out


class _SchemaWalker:
    """Checks a writer schema against what the decoder can read safely and correctly.

    Rejected: recursive types (fastavro recurses in C once per nesting level, so a deep message
    could overflow the stack), arrays whose items encode to zero bytes (a forged block count of 2**62
    would loop without consuming input), and logical types that differ from the reader's (the decoder
    strips logical types, so a writer's timestamp-micros or decimal scale 3 would be misread silently).
    """

    def __init__(self, named: Mapping[str, Any]) -> None:
        self.named = named

    def resolve(self, t: Any) -> Any:
        while isinstance(t, str) and t in self.named:
            t = self.named[t]
        return t

    def min_size(self, t: Any, stack: tuple[str, ...] = ()) -> int:
        if isinstance(t, str):
            if t in _PRIMITIVE_MIN_SIZE:
                return _PRIMITIVE_MIN_SIZE[t]
            if t in stack:
                raise DecodeError("unsupported_schema", f"writer schema type {t} is recursive")
            if t not in self.named:
                raise DecodeError("unsupported_schema", f"writer schema names unknown type {t}")
            return self.min_size(self.named[t], (*stack, t))
        if isinstance(t, list):
            for branch in t:
                self.min_size(branch, stack)
            return 1
        if not isinstance(t, dict):
            raise DecodeError("unsupported_schema", "writer schema has a malformed type")
        kind = t.get("type")
        name = t.get("name")
        if kind in ("record", "error"):
            inner = (*stack, name) if isinstance(name, str) else stack
            return sum(self.min_size(f["type"], inner) for f in t.get("fields", []))
        if kind == "enum":
            return 1
        if kind == "fixed":
            return int(t.get("size", 0))
        if kind == "array":
            if self.min_size(t["items"], stack) == 0:
                raise DecodeError("unsupported_schema", "writer schema has an array of zero-size items")
            return 1
        if kind == "map":
            self.min_size(t["values"], stack)
            return 1
        return self.min_size(kind, stack)

    @staticmethod
    def logical(t: Any) -> tuple[str | None, Any]:
        if isinstance(t, dict) and isinstance(t.get("logicalType"), str):
            return t["logicalType"], t.get("scale", 0)
        return None, None

    def check_logical(self, writer: Any, reader: Any, reader_named: Mapping[str, Any], path: str) -> None:
        w = self.resolve(writer)
        r = reader
        while isinstance(r, str) and r in reader_named:
            r = reader_named[r]
        r_logical, r_scale = self.logical(r)
        w_logical, w_scale = self.logical(w)
        if r_logical == "decimal" and (w_logical != "decimal" or w_scale != r_scale):
            raise DecodeError("unsupported_schema", f"writer field {path} is not decimal with scale {r_scale}")
        if r_logical is not None and w_logical not in (None, r_logical):
            raise DecodeError("unsupported_schema", f"writer field {path} is {w_logical}, expected {r_logical}")
        if not (isinstance(w, dict) and isinstance(r, dict)):
            return
        kind = r.get("type")
        if kind in ("record", "error") and w.get("type") in ("record", "error"):
            w_fields = {f["name"]: f["type"] for f in w.get("fields", [])}
            for f in r.get("fields", []):
                if f["name"] in w_fields:
                    self.check_logical(w_fields[f["name"]], f["type"], reader_named, f"{path}.{f['name']}")
        elif kind == "array" and w.get("type") == "array":
            self.check_logical(w["items"], r["items"], reader_named, f"{path}[]")
        elif kind == "map" and w.get("type") == "map":
            self.check_logical(w["values"], r["values"], reader_named, f"{path}{{}}")


def _parse_with_names(schema_json: Any) -> tuple[Schema, dict[str, Any]]:
    named: dict[str, Any] = {}
    parsed = fastavro.parse_schema(schema_json, named_schemas=named)
    return parsed, named


class _Compiled:
    """A writer schema prepared once: logical types stripped, parsed, and checked against the reader."""

    __slots__ = ("schema",)

    def __init__(self, schema: Schema | None) -> None:
        self.schema = schema


# --------------------------------------------------------------------------- records


def _decimal(value: Any) -> Decimal:
    if isinstance(value, bytes):
        if not value or len(value) > _MAX_DECIMAL_BYTES:
            raise DecodeError("invalid_decimal", f"revenue has {len(value)} bytes")
        unscaled = int.from_bytes(value, "big", signed=True)
        if not -_MAX_UNSCALED < unscaled < _MAX_UNSCALED:
            raise DecodeError("invalid_decimal", f"revenue does not fit decimal({REVENUE_PRECISION},{REVENUE_SCALE})")
        return Decimal(unscaled).scaleb(-REVENUE_SCALE)
    if isinstance(value, Decimal):
        try:
            return contract_revenue(value)
        except RevenueError as exc:
            raise DecodeError("invalid_decimal", str(exc)) from None
    raise DecodeError("invalid_decimal", f"revenue is a {type(value).__name__}, not bytes or Decimal")


def _timestamp(value: Any, name: str) -> int:
    if type(value) is not int:
        if hasattr(value, "timestamp") and hasattr(value, "tzinfo") and value.tzinfo is not None:
            # fastavro's own timestamp-millis reader yields aware datetimes; accept them for records made that way.
            value = round(value.timestamp() * 1000)
        else:
            raise DecodeError("invalid_timestamp", f"{name} is a {type(value).__name__}, not epoch milliseconds")
    if not MIN_TIMESTAMP_MS <= value <= MAX_TIMESTAMP_MS:
        raise DecodeError("invalid_timestamp", f"{name} {value} is outside 1970..9999")
    return int(value)


def _str(value: Any, name: str) -> str:
    if type(value) is not str:
        raise DecodeError("invalid_field", f"{name} is a {type(value).__name__}, not a string")
    return value


def _strs(values: tuple[Any, ...], names: tuple[str, ...]) -> None:
    for value, name in zip(values, names, strict=True):
        _str(value, name)


_EXPOSURE_STRS = (
    "exposures[].project",
    "exposures[].experiment_id",
    "exposures[].variation_id",
    "exposures[].visitor_id",
)


class _UnknownProvider(Exception):
    """An exposure whose provider resolved to the enum default UNKNOWN: skipped (and counted), not an error."""


def _exposure(e: Mapping[str, Any]) -> Exposure:
    # The checks are inlined with a slow path for the message: this runs for every exposure of every event.
    provider = _PROVIDERS.get(e["provider"])
    if provider is None:
        if e["provider"] == UNKNOWN_PROVIDER:
            raise _UnknownProvider
        raise DecodeError("invalid_field", "exposures[].provider is not a known provider")
    project, experiment_id, variation_id, visitor_id = (
        e["project"],
        e["experiment_id"],
        e["variation_id"],
        e["visitor_id"],
    )
    if not (type(project) is type(experiment_id) is type(variation_id) is type(visitor_id) is str):
        _strs((project, experiment_id, variation_id, visitor_id), _EXPOSURE_STRS)
    exposed_at = e["exposed_at"]
    if type(exposed_at) is not int or not MIN_TIMESTAMP_MS <= exposed_at <= MAX_TIMESTAMP_MS:
        exposed_at = _timestamp(exposed_at, "exposures[].exposed_at")
    return Exposure(provider, project, experiment_id, variation_id, visitor_id, exposed_at)


def _known_exposures(exposures: Any) -> tuple[tuple[Exposure, ...], int]:
    """The exposures of known providers, and how many named a provider this reader does not know."""
    known: list[Exposure] = []
    for e in exposures:
        with contextlib.suppress(_UnknownProvider):
            known.append(_exposure(e))
    return tuple(known), len(exposures) - len(known)


def _consent(entries: Any) -> dict[Provider, bool]:
    """Per provider, granted or declined; a denial wins over a grant for the same provider (never send in doubt)."""
    out: dict[Provider, bool] = {}
    for entry in entries:
        name, granted = entry["provider"], entry["granted"]
        if type(granted) is not bool:
            raise DecodeError("invalid_field", "consent[].granted is not a boolean")
        provider = _PROVIDERS.get(name)
        if provider is None:
            if name == UNKNOWN_PROVIDER:
                continue  # consent for a provider this reader does not know: nothing here is sent to it
            raise DecodeError("invalid_field", "consent[].provider is not a known provider")
        out[provider] = out.get(provider, True) and granted
    return out


def purchase_from_record(record: Mapping[str, Any]) -> Purchase:
    """The Purchase for a decoded record; raises DecodeError for a record that breaks the contract.

    Accepts both what the decoder reads (revenue as unscaled bytes, timestamps as int ms) and what
    fastavro's logical readers or a hand-made dict give (Decimal revenue, aware datetimes).
    """
    try:
        channel = _CHANNELS.get(record.get("channel", "OTHER"))
        if channel is None:
            raise DecodeError("invalid_field", "channel is not a known channel")
        event_id, order_id, currency = record["event_id"], record["order_id"], record["currency"]
        if not (type(event_id) is type(order_id) is type(currency) is str):
            _strs((event_id, order_id, currency), ("event_id", "order_id", "currency"))
        customer_id = record.get("customer_id")
        if customer_id is not None and type(customer_id) is not str:
            _str(customer_id, "customer_id")
        occurred_at = record["occurred_at"]
        if type(occurred_at) is not int or not MIN_TIMESTAMP_MS <= occurred_at <= MAX_TIMESTAMP_MS:
            occurred_at = _timestamp(occurred_at, "occurred_at")
        item_count = record["item_count"]
        if type(item_count) is not int or not -(2**31) <= item_count < 2**31:
            raise DecodeError("invalid_field", "item_count is not a 32-bit integer")
        attributes = record.get("attributes") or {}
        if type(attributes) is not dict:
            raise DecodeError("invalid_field", "attributes is not a map of strings")
        for k, v in attributes.items():
            if type(k) is not str or type(v) is not str:
                raise DecodeError("invalid_field", "attributes is not a map of strings")
        exposures = record.get("exposures") or ()
        try:
            known = tuple([_exposure(e) for e in exposures]) if exposures else ()
            unknown = 0
        except _UnknownProvider:  # rare: a newer writer's provider; the fast path above stays as it was
            known, unknown = _known_exposures(exposures)
        consent = record.get("consent")
        return Purchase(
            event_id,
            order_id,
            occurred_at,
            channel,
            currency,
            _decimal(record["revenue"]),
            item_count,
            customer_id,
            known,
            attributes,
            _consent(consent) if consent else NO_CONSENT_STATED,
            unknown,
        )
    except DecodeError:
        raise
    except KeyError as exc:
        raise DecodeError("invalid_field", f"record has no field {exc.args[0]!r}") from None
    except (TypeError, AttributeError, ValueError) as exc:
        raise DecodeError("invalid_field", f"record is malformed: {type(exc).__name__}") from None


def purchase_to_record(p: Purchase) -> dict[str, Any]:
    """The record for a Purchase, in the shape fastavro writes with the contract schema (logical types on)."""
    return {
        "event_id": p.event_id,
        "order_id": p.order_id,
        "occurred_at": p.occurred_at,
        "channel": p.channel.value,
        "currency": p.currency,
        # fastavro refuses any other scale, even an exact 23.500, with a message naming no field.
        "revenue": contract_revenue(p.revenue),
        "item_count": p.item_count,
        "customer_id": p.customer_id,
        "exposures": [
            {
                "provider": e.provider.value,
                "project": e.project,
                "experiment_id": e.experiment_id,
                "variation_id": e.variation_id,
                "visitor_id": e.visitor_id,
                "exposed_at": e.exposed_at,
            }
            for e in p.exposures
        ],
        "attributes": dict(p.attributes),
        "consent": [{"provider": provider.value, "granted": granted} for provider, granted in p.consent.items()],
    }


_KINDS: dict[str, AdjustmentKind] = {k.value: k for k in AdjustmentKind}


def adjustment_from_record(record: Mapping[str, Any]) -> OrderAdjusted:
    """The OrderAdjusted for a decoded record (schemas/order_adjusted.avsc); DecodeError if it breaks the contract.

    A kind this reader does not know reads as UNKNOWN (the enum default): decoded, and left to the planner.
    """
    try:
        event_id, order_id, currency = record["event_id"], record["order_id"], record["currency"]
        _strs((event_id, order_id, currency), ("event_id", "order_id", "currency"))
        kind = _KINDS.get(record["kind"])
        if kind is None:
            raise DecodeError("invalid_field", "kind is not a known adjustment kind")
        items = record.get("items_returned", 0)
        if type(items) is not int or not -(2**31) <= items < 2**31:
            raise DecodeError("invalid_field", "items_returned is not a 32-bit integer")
        reason = record.get("reason")
        if reason is not None:
            _str(reason, "reason")
        occurred_at = record["occurred_at"]
        if type(occurred_at) is not int or not MIN_TIMESTAMP_MS <= occurred_at <= MAX_TIMESTAMP_MS:
            occurred_at = _timestamp(occurred_at, "occurred_at")
        return OrderAdjusted(event_id, order_id, occurred_at, kind, _decimal(record["amount"]), currency, items,
                             reason)
    except DecodeError:
        raise
    except KeyError as exc:
        raise DecodeError("invalid_field", f"record has no field {exc.args[0]!r}") from None
    except (TypeError, AttributeError, ValueError) as exc:
        raise DecodeError("invalid_field", f"record is malformed: {type(exc).__name__}") from None


def adjustment_to_record(a: OrderAdjusted) -> dict[str, Any]:
    """The record for an OrderAdjusted, in the shape fastavro writes with its schema (logical types on)."""
    return {
        "event_id": a.event_id,
        "order_id": a.order_id,
        "occurred_at": a.occurred_at,
        "kind": a.kind.value,
        "amount": contract_revenue(a.amount),
        "currency": a.currency,
        "items_returned": a.items_returned,
        "reason": a.reason,
    }


def encode_adjustment_raw(adjustment: OrderAdjusted, schema: Schema) -> bytes:
    """Schemaless Avro bytes of an OrderAdjusted; `schema` is schemas/order_adjusted.avsc parsed by load_schema."""
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, schema, adjustment_to_record(adjustment))
    return buf.getvalue()


def encode_raw(purchase: Purchase, schema: Schema) -> bytes:
    """Schemaless Avro bytes of a Purchase; `schema` is the contract with logical types (see load_schema)."""
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, schema, purchase_to_record(purchase))
    return buf.getvalue()


def encode_confluent(purchase: Purchase, schema_id: int, schema: Schema) -> bytes:
    """Confluent wire format: magic byte 0, the 4-byte big-endian schema id, then the Avro body."""
    if not 0 <= schema_id < 2**32:
        raise ValueError(f"schema id {schema_id} does not fit 4 bytes")
    return bytes([MAGIC_BYTE]) + schema_id.to_bytes(4, "big") + encode_raw(purchase, schema)


# --------------------------------------------------------------------------- decoders


T = TypeVar("T")  # the record type a decoder makes: Purchase or OrderAdjusted


class _AvroDecoder(Generic[T]):
    """Shared reading: the local reader schema, size cap, error mapping, and the trailing-bytes check.

    `from_record` makes the domain object of a decoded record: one reader schema, one record type.
    """

    needs_headers = False

    def __init__(self, reader_schema_path: str | Path, max_message_bytes: int,
                 from_record: Callable[[Mapping[str, Any]], T], providers: Sequence[str] = ()) -> None:
        if max_message_bytes < 1:
            raise ValueError("max_message_bytes must be positive")
        self.max_message_bytes = max_message_bytes
        self._from_record: Callable[[Mapping[str, Any]], T] = from_record
        # The contract's Provider enum, extended with the config's providers (see with_providers).
        self._reader_json = with_providers(read_schema_json(reader_schema_path), providers)
        stripped = strip_logical_types(self._reader_json)
        self._reader, _ = _parse_with_names(stripped)
        self._reader_stripped_json = stripped
        # Parsed (fully-qualified names) with logical types: what writer schemas are checked against.
        self._reader_logical, self._reader_named = _parse_with_names(self._reader_json)

    def _compile(self, writer_json: Any) -> _Compiled:
        """Prepare a writer schema; _Compiled(None) means "same as the reader" (fastavro skips resolution)."""
        try:
            # Walk the parsed form: fastavro has resolved every type name to its fully-qualified one.
            parsed_logical, named = _parse_with_names(writer_json)
            walker = _SchemaWalker(named)
            walker.min_size(parsed_logical)
            walker.check_logical(parsed_logical, self._reader_logical, self._reader_named, "")
            stripped = strip_logical_types(writer_json)
            if stripped == self._reader_stripped_json:
                return _Compiled(None)
            parsed, _ = _parse_with_names(stripped)
        except DecodeError:
            raise
        except Exception as exc:  # fastavro raises assorted types for a malformed schema
            raise DecodeError("unsupported_schema", f"writer schema does not parse: {type(exc).__name__}") from None
        return _Compiled(parsed)

    def _read(self, value: bytes, offset: int, writer: _Compiled) -> T:
        fo = io.BytesIO(value)
        if offset:
            fo.seek(offset)
        try:
            # BytesIO.read(n) returns at most what is left, so a forged length prefix never allocates n bytes.
            if writer.schema is None:
                record = fastavro.schemaless_reader(fo, self._reader, None)
            else:
                record = fastavro.schemaless_reader(fo, writer.schema, self._reader)
        except EOFError:
            raise DecodeError("truncated", "message ends inside the record") from None
        except UnicodeDecodeError:
            raise DecodeError("invalid_utf8", "a string is not valid UTF-8") from None
        except fastavro.read.SchemaResolutionError as exc:
            raise DecodeError("incompatible_schema", f"writer and reader schemas do not resolve: {exc}") from None
        except MemoryError:
            raise DecodeError("too_large", "record needs more memory than is available") from None
        except Exception as exc:  # garbage makes fastavro raise IndexError, ValueError, OverflowError, ...
            raise DecodeError("invalid_avro", f"not a valid record: {type(exc).__name__}") from None
        end = fo.tell()
        if end != len(value):
            raise DecodeError("trailing_bytes", f"{len(value) - end} bytes after the record")
        if not isinstance(record, dict):
            raise DecodeError("invalid_avro", "the writer schema is not a record")
        return self._from_record(record)

    def _check_size(self, value: bytes | None) -> bytes:
        if value is None:
            raise DecodeError("null_value", "message has no value (tombstone)")
        if len(value) > self.max_message_bytes:
            raise DecodeError("too_large", f"{len(value)} bytes exceeds the {self.max_message_bytes}-byte limit")
        if not value:
            raise DecodeError("truncated", "message is empty")
        return value


class _RawDecoder(_AvroDecoder[T]):
    """Schemaless Avro: every message is written with the same known writer schema."""

    def __init__(self, writer_schema_path: str | Path, reader_schema_path: str | Path, max_message_bytes: int,
                 from_record: Callable[[Mapping[str, Any]], T], providers: Sequence[str] = ()) -> None:
        super().__init__(reader_schema_path, max_message_bytes, from_record, providers)
        # Raw Avro's writers write the configured contract; one that sends a provider registered from config
        # writes it with that provider's symbol added the same way (K, C, D keep their indexes).
        self._writer = self._compile(with_providers(read_schema_json(writer_schema_path), providers))

    def decode(self, value: bytes | None, headers: Headers = None) -> T:
        return self._read(self._check_size(value), 0, self._writer)

    async def decode_async(self, value: bytes | None, headers: Headers = None) -> T:
        return self.decode(value)

    async def close(self) -> None:
        pass


class RawAvroDecoder(_RawDecoder[Purchase]):
    """Schemaless Avro purchases: every message is written with the same known writer schema."""

    def __init__(self, writer_schema_path: str | Path, reader_schema_path: str | Path, max_message_bytes: int,
                 providers: Sequence[str] = ()) -> None:
        super().__init__(writer_schema_path, reader_schema_path, max_message_bytes, purchase_from_record, providers)


class RawAdjustmentDecoder(_RawDecoder[OrderAdjusted]):
    """Schemaless Avro order adjustments (schemas/order_adjusted.avsc as the reader)."""

    def __init__(self, writer_schema_path: str | Path, reader_schema_path: str | Path, max_message_bytes: int) -> None:
        super().__init__(writer_schema_path, reader_schema_path, max_message_bytes, adjustment_from_record)


class _ConfluentDecoder(_AvroDecoder[T]):
    """Confluent wire format: magic byte 0, 4-byte big-endian schema id, Avro body; writer schemas from the registry."""

    def __init__(self, registry: SchemaRegistry, reader_schema_path: str | Path, max_message_bytes: int,
                 from_record: Callable[[Mapping[str, Any]], T], providers: Sequence[str] = ()) -> None:
        super().__init__(reader_schema_path, max_message_bytes, from_record, providers)
        self.registry = registry
        self._writers: dict[int, _Compiled] = {}
        # A schema id whose content is unusable stays unusable (ids are immutable): remember the verdict.
        self._rejected: dict[int, DecodeError] = {}

    def writer_for(self, schema_id: int) -> _Compiled:
        """The prepared writer schema from the caches; raises SchemaNotLoaded if the registry must be asked."""
        writer = self._writers.get(schema_id)
        if writer is not None:
            return writer
        rejected = self._rejected.get(schema_id)
        if rejected is not None:
            raise DecodeError(rejected.reason, rejected.message)
        if self.registry.known_missing(schema_id):
            raise DecodeError("unknown_schema_id", f"schema id {schema_id} is not in {self.registry.url}")
        raise SchemaNotLoaded(schema_id)

    async def load(self, schema_id: int) -> _Compiled:
        """The prepared writer schema, fetched from the registry if need be (one attempt; see SchemaRegistry)."""
        try:
            return self.writer_for(schema_id)
        except SchemaNotLoaded:
            pass
        try:
            registered = await self.registry.get_schema(schema_id)
        except SchemaNotFound as exc:
            raise DecodeError("unknown_schema_id", str(exc)) from None
        except RegistryUnavailable as exc:
            raise DecodeError("registry_unavailable", str(exc), transient=True) from None
        writer = self._writers.get(schema_id)  # prepared by another event's task meanwhile
        if writer is not None:
            return writer
        try:
            if registered.schema_type != "AVRO":
                raise DecodeError("unsupported_schema", f"it is {registered.schema_type}, not AVRO")
            try:
                writer_json = json.loads(registered.text)
            except ValueError:
                raise DecodeError("unsupported_schema", "it is not JSON") from None
            writer = self._compile(writer_json)
        except DecodeError as exc:
            rejected = self._rejected[schema_id] = DecodeError(exc.reason, f"schema id {schema_id}: {exc.message}")
            raise DecodeError(rejected.reason, rejected.message) from None
        self._writers[schema_id] = writer
        return writer

    def _schema_id(self, value: bytes) -> int:
        if value[0] != MAGIC_BYTE:
            raise DecodeError("bad_magic_byte", f"first byte is {value[0]}, not the Confluent magic byte 0")
        if len(value) < HEADER_SIZE:
            raise DecodeError("truncated", "message is shorter than the Confluent header")
        return int.from_bytes(value[1:HEADER_SIZE], "big")

    def decode(self, value: bytes | None, headers: Headers = None) -> T:
        value = self._check_size(value)
        return self._read(value, HEADER_SIZE, self.writer_for(self._schema_id(value)))

    async def decode_async(self, value: bytes | None, headers: Headers = None) -> T:
        value = self._check_size(value)
        return self._read(value, HEADER_SIZE, await self.load(self._schema_id(value)))

    async def close(self) -> None:
        await self.registry.close()


class ConfluentDecoder(_ConfluentDecoder[Purchase]):
    """Confluent-framed purchases; writer schemas from the registry, the contract as the reader."""

    def __init__(self, registry: SchemaRegistry, reader_schema_path: str | Path, max_message_bytes: int,
                 providers: Sequence[str] = ()) -> None:
        super().__init__(registry, reader_schema_path, max_message_bytes, purchase_from_record, providers)


class ConfluentAdjustmentDecoder(_ConfluentDecoder[OrderAdjusted]):
    """Confluent-framed order adjustments (schemas/order_adjusted.avsc as the reader)."""

    def __init__(self, registry: SchemaRegistry, reader_schema_path: str | Path, max_message_bytes: int) -> None:
        super().__init__(registry, reader_schema_path, max_message_bytes, adjustment_from_record)


def make_decoder(cfg: DecodingConfig) -> Decoder:
    """The decoder the configuration asks for; the local schema is always the reader schema."""
    if cfg.format == "avro":
        return RawAvroDecoder(cfg.schema, cfg.schema, cfg.max_message_bytes, cfg.providers)
    if cfg.format == "confluent":
        registry = SchemaRegistry.from_config(cfg.schema_registry_url, cfg.schema_registry)
        return ConfluentDecoder(registry, cfg.schema, cfg.max_message_bytes, cfg.providers)
    raise ValueError(f"unknown decoding format {cfg.format!r}")


# --------------------------------------------------------------------------- purchases and adjustments on one topic

# One topic may carry both record types (docs/operations.md, "Refunds and cancellations"). With the Schema
# Registry framing the writer schema's name tells them apart (producers use TopicRecordNameStrategy or
# RecordNameStrategy, so both schemas live under their own subjects); with raw Avro a header does
# (`[adjustments] event_type_header`, value `OrderAdjusted`; no header: a purchase, as before adjustments).
PURCHASE_RECORD = "PurchaseCompleted"
ADJUSTMENT_RECORD = "OrderAdjusted"
Event = Purchase | OrderAdjusted


def record_name(full_name: str) -> str:
    """The unqualified record name: Avro resolution matches records by it, whatever the namespace."""
    return full_name.rsplit(".", 1)[-1]


def header_value(headers: Headers, name: str) -> str | None:
    """The last value of header `name` (Kafka allows repeats; the last wins, as in Kafka's lastHeader).

    None: no such header; a header without a value is "" (it names no type this reader knows).
    """
    found: str | None = None
    for key, value in (headers.items() if isinstance(headers, Mapping) else headers or ()):
        if key == name:
            found = value.decode("utf-8", "replace") if isinstance(value, bytes) else (value or "")
    return found


class EventDecoder(Protocol):
    """Turns one Kafka message (value and headers) into a Purchase or an OrderAdjusted, or raises DecodeError."""

    needs_headers: bool

    def decode(self, value: bytes | None, headers: Headers = None) -> Event:
        """Decode with what is at hand; raises SchemaNotLoaded when the registry must be asked first."""
        ...

    async def decode_async(self, value: bytes | None, headers: Headers = None) -> Event:
        """Decode, first fetching the writer schema if it is not cached."""
        ...

    async def close(self) -> None:
        ...


def _unknown_type(name: str, carried: Sequence[str]) -> DecodeError:
    shown = name if name.isprintable() and len(name) <= 80 else repr(name[:80])
    return DecodeError("unknown_event_type", f"record type {shown} is not one this topic carries "
                                             f"({', '.join(carried)})")


class RawEventDecoder:
    """Raw Avro: the record type from a header; without the header, the topic's first type (a purchase)."""

    def __init__(self, purchases: RawAvroDecoder | None, adjustments: RawAdjustmentDecoder | None,
                 header: str = "event_type") -> None:
        if purchases is None and adjustments is None:
            raise ValueError("a topic carries purchases, adjustments or both")
        self._purchases = purchases
        self._adjustments = adjustments
        self.header = header
        self.needs_headers = True
        self._carried = [n for n, d in ((PURCHASE_RECORD, purchases), (ADJUSTMENT_RECORD, adjustments)) if d]

    def decode(self, value: bytes | None, headers: Headers = None) -> Event:
        name = header_value(headers, self.header) if headers else None
        if name is None:
            return (self._purchases or self._adjustments).decode(value)  # type: ignore[union-attr]
        short = record_name(name)
        if short == PURCHASE_RECORD and self._purchases is not None:
            return self._purchases.decode(value)
        if short == ADJUSTMENT_RECORD and self._adjustments is not None:
            return self._adjustments.decode(value)
        raise _unknown_type(name, self._carried)

    async def decode_async(self, value: bytes | None, headers: Headers = None) -> Event:
        return self.decode(value, headers)

    async def close(self) -> None:
        pass


class ConfluentEventDecoder:
    """Schema Registry framing: the writer schema's record name (cached per id) picks the reader."""

    def __init__(self, registry: SchemaRegistry, purchase_schema: str | Path | None,
                 adjustment_schema: str | Path | None, max_message_bytes: int, providers: Sequence[str] = ()) -> None:
        if purchase_schema is None and adjustment_schema is None:
            raise ValueError("a topic carries purchases, adjustments or both")
        self.registry = registry
        self.needs_headers = False  # the writer schema's name says it
        self._by_name: dict[str, ConfluentDecoder | ConfluentAdjustmentDecoder] = {}
        if purchase_schema is not None:
            self._by_name[PURCHASE_RECORD] = ConfluentDecoder(registry, purchase_schema, max_message_bytes, providers)
        if adjustment_schema is not None:
            self._by_name[ADJUSTMENT_RECORD] = ConfluentAdjustmentDecoder(registry, adjustment_schema,
                                                                          max_message_bytes)
        self._first = next(iter(self._by_name.values()))
        self._types: dict[int, ConfluentDecoder | ConfluentAdjustmentDecoder] = {}
        self._rejected: dict[int, DecodeError] = {}

    def _decoder(self, value: bytes) -> ConfluentDecoder | ConfluentAdjustmentDecoder:
        schema_id = self._first._schema_id(value)
        decoder = self._types.get(schema_id)
        if decoder is not None:
            return decoder
        rejected = self._rejected.get(schema_id)
        if rejected is not None:
            raise DecodeError(rejected.reason, rejected.message)
        if self.registry.known_missing(schema_id):
            raise DecodeError("unknown_schema_id", f"schema id {schema_id} is not in {self.registry.url}")
        raise SchemaNotLoaded(schema_id)

    async def _load(self, value: bytes) -> ConfluentDecoder | ConfluentAdjustmentDecoder:
        try:
            return self._decoder(value)
        except SchemaNotLoaded as exc:
            schema_id = exc.schema_id
        try:
            registered = await self.registry.get_schema(schema_id)
        except SchemaNotFound as exc:
            raise DecodeError("unknown_schema_id", str(exc)) from None
        except RegistryUnavailable as exc:
            raise DecodeError("registry_unavailable", str(exc), transient=True) from None
        try:
            writer = json.loads(registered.text) if registered.schema_type == "AVRO" else None
        except ValueError:
            writer = None
        name = writer.get("name") if isinstance(writer, dict) else None
        if not isinstance(name, str):
            # Not an Avro record: the type's own decoder says why, in its words (unsupported_schema).
            return self._first
        decoder = self._by_name.get(record_name(name))
        if decoder is None:
            self._rejected[schema_id] = _unknown_type(name, list(self._by_name))
            raise DecodeError(self._rejected[schema_id].reason, self._rejected[schema_id].message)
        self._types[schema_id] = decoder
        return decoder

    def decode(self, value: bytes | None, headers: Headers = None) -> Event:
        value = self._first._check_size(value)
        return self._decoder(value).decode(value)

    async def decode_async(self, value: bytes | None, headers: Headers = None) -> Event:
        value = self._first._check_size(value)
        return await (await self._load(value)).decode_async(value)

    async def close(self) -> None:
        await self.registry.close()


def make_event_decoder(cfg: DecodingConfig, adjustments: AdjustmentsConfig, *, adjustments_topic: bool = False
                       ) -> EventDecoder:
    """The decoder for the purchases topic, or (`adjustments_topic`) for `[adjustments] topic`.

    Adjustments disabled, or on a topic of their own: the purchases topic's decoder is `make_decoder`'s,
    exactly as before (headers ignored, nothing added per message). Enabled without a topic of their
    own: both types on the purchases topic.
    """
    carries_purchases = not adjustments_topic
    carries_adjustments = adjustments.enabled and (adjustments_topic or not adjustments.topic)
    if adjustments_topic and not adjustments.enabled:
        raise ValueError("adjustments are not enabled: there is no adjustments topic to decode")
    if not carries_adjustments:
        return make_decoder(cfg)
    if cfg.format == "avro":
        return RawEventDecoder(
            RawAvroDecoder(cfg.schema, cfg.schema, cfg.max_message_bytes, cfg.providers) if carries_purchases else None,
            RawAdjustmentDecoder(adjustments.schema, adjustments.schema, cfg.max_message_bytes)
            if carries_adjustments else None,
            adjustments.event_type_header,
        )
    if cfg.format == "confluent":
        registry = SchemaRegistry.from_config(cfg.schema_registry_url, cfg.schema_registry)
        return ConfluentEventDecoder(registry, cfg.schema if carries_purchases else None,
                                     adjustments.schema if carries_adjustments else None, cfg.max_message_bytes,
                                     cfg.providers)
    raise ValueError(f"unknown decoding format {cfg.format!r}")
