"""Explain what the service would do with one purchase given as JSON: matches, rejections, the HTTP requests.

The requests are built by the provider modules and batched as the delivery layer batches them, then
redacted: every configured secret (API keys, OAuth client ids and secrets), the credentials of
`Authorization`-like headers and URL passwords are shown as `***`. The event's JSON shape is in
docs/operations.md ("Explaining one event"); docs/examples/purchase.json is a complete one.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal, InvalidOperation
from typing import Any
from urllib.parse import quote, quote_plus, urlsplit, urlunsplit

from consumer.batching import Batch, Batcher
from consumer.config import Config, Secret
from consumer.decoding import RevenueError, contract_revenue
from consumer.durations import human
from consumer.matcher import MatchSettings, TooManyExposures, match
from consumer.model import Channel, Conversion, Credit, Decision, Exposure, Provider, Purchase, Rejection
from consumer.providers import registry
from consumer.providers.base import HttpRequest, ProviderModule, json_string, token_request
from consumer.providers.registry import modules

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MS = timedelta(milliseconds=1)

PURCHASE_FIELDS = (
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
)
EXPOSURE_FIELDS = ("provider", "project", "experiment_id", "variation_id", "visitor_id", "exposed_at")
CONSENT_FIELDS = ("provider", "granted")


# --------------------------------------------------------------------------- JSON -> Purchase


def _missing(obj: Mapping[str, Any], name: str, path: str) -> Any:
    if name not in obj:
        raise ValueError(f"{path}{name}: is required")
    return obj[name]


def _text(obj: Mapping[str, Any], name: str, path: str, *, allow_empty: bool = False) -> str:
    v = _missing(obj, name, path)
    if isinstance(v, bool) or not isinstance(v, str | int):
        raise ValueError(f"{path}{name}: expected a string, got {v!r}")
    s = str(v)
    if not s and not allow_empty:
        raise ValueError(f"{path}{name}: must not be empty")
    return s


def _timestamp(obj: Mapping[str, Any], name: str, path: str) -> int:
    """Epoch milliseconds from an integer or an ISO-8601 string with a UTC offset (sub-ms floored)."""
    v = _missing(obj, name, path)
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if isinstance(v, int) and not isinstance(v, bool):
        return v
    if isinstance(v, str):
        if re.fullmatch(r"-?\d+", v.strip()):
            return int(v)
        try:
            dt = datetime.fromisoformat(v.strip())
        except ValueError:
            raise ValueError(f"{path}{name}: expected epoch milliseconds or an ISO-8601 timestamp, got {v!r}") from None
        if dt.tzinfo is None:
            raise ValueError(f"{path}{name}: an ISO-8601 timestamp needs a UTC offset (e.g. 'Z'), got {v!r}")
        return (dt - _EPOCH) // _MS
    raise ValueError(f"{path}{name}: expected epoch milliseconds or an ISO-8601 timestamp, got {v!r}")


def parse_now(text: str) -> int:
    """`explain --now`: epoch milliseconds or an ISO-8601 timestamp with an offset, as the event's own times."""
    return _timestamp({"now": text}, "now", "--")


def _revenue(obj: Mapping[str, Any], path: str) -> Decimal:
    v = _missing(obj, "revenue", path)
    if isinstance(v, bool) or not isinstance(v, str | int | float):
        raise ValueError(f'{path}revenue: expected a decimal string like "23.50" or a number, got {v!r}')
    try:
        d = Decimal(str(v).strip())  # str() of a float is its shortest repr: 23.5, not 23.4999...
    except InvalidOperation:
        raise ValueError(f'{path}revenue: expected a decimal string like "23.50" or a number, got {v!r}') from None
    if not d.is_finite():
        raise ValueError(f"{path}revenue: must be a finite number, got {v!r}")
    try:
        return contract_revenue(d)  # what the Avro contract carries: refused, never rounded
    except RevenueError as exc:
        raise ValueError(f"{path}revenue: {v!r} {exc.detail}") from None


def _enum_value(v: Any, name: str, path: str, choices: tuple[str, ...]) -> str:
    if not isinstance(v, str) or v.strip().upper() not in choices:
        raise ValueError(f"{path}{name}: expected one of {', '.join(choices)} (any case), got {v!r}")
    return v.strip().upper()


def _exposure(obj: Any, path: str) -> Exposure:
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path.rstrip('.')}: expected an object, got {obj!r}")
    provider = _enum_value(_missing(obj, "provider", path), "provider", path, tuple(registry.by_symbol()))
    visitor = obj.get("visitor_id")
    return Exposure(
        provider=Provider(provider),
        project=_text(obj, "project", path),
        experiment_id=_text(obj, "experiment_id", path),
        variation_id=_text(obj, "variation_id", path),
        # Empty (or null) is allowed: a provider may fall back to the customer id (its identity rule decides).
        visitor_id="" if visitor is None else _text(obj, "visitor_id", path, allow_empty=True),
        exposed_at=_timestamp(obj, "exposed_at", path),
    )


def _consent(entries: Any) -> dict[Provider, bool]:
    """The `consent` list as the decoder reads it: per provider, a denial winning over a grant."""
    if not isinstance(entries, list):
        raise ValueError(f"consent: expected a list, got {type(entries).__name__}")
    out: dict[Provider, bool] = {}
    for i, entry in enumerate(entries):
        path = f"consent[{i}]."
        if not isinstance(entry, Mapping):
            raise ValueError(f"consent[{i}]: expected an object, got {entry!r}")
        provider = Provider(_enum_value(_missing(entry, "provider", path), "provider", path,
                                        tuple(registry.by_symbol())))
        granted = _missing(entry, "granted", path)
        if not isinstance(granted, bool):
            raise ValueError(f"{path}granted: expected true or false, got {granted!r}")
        out[provider] = out.get(provider, True) and granted
    return out


def purchase_from_json(obj: Mapping[str, Any]) -> Purchase:
    """A Purchase from the event as JSON, with the Avro schema's required fields and defaults.

    Required: event_id, order_id, occurred_at, currency, revenue, item_count. Defaults: channel OTHER,
    customer_id null, exposures [], attributes {}, consent []. Timestamps are epoch milliseconds or ISO-8601 with an
    offset; revenue a decimal string or a number; channel and provider names in any case. Unknown fields
    are ignored here (`unknown_fields` lists them). Bad input raises ValueError naming the field.
    """
    if not isinstance(obj, Mapping):
        raise ValueError(f"event: expected a JSON object, got {type(obj).__name__}")
    currency = _text(obj, "currency", "")
    if not re.fullmatch(r"[A-Za-z]{3}", currency):
        raise ValueError(f"currency: expected an ISO 4217 code like 'EUR', got {currency!r}")
    item_count = _missing(obj, "item_count", "")
    if isinstance(item_count, bool) or not isinstance(item_count, int) or item_count < 0:
        raise ValueError(f"item_count: expected a non-negative integer, got {item_count!r}")
    customer = obj.get("customer_id")
    if customer is not None and (isinstance(customer, bool) or not isinstance(customer, str | int)):
        raise ValueError(f"customer_id: expected a string or null, got {customer!r}")
    exposures = obj.get("exposures", [])
    if not isinstance(exposures, list):
        raise ValueError(f"exposures: expected a list, got {type(exposures).__name__}")
    attributes = obj.get("attributes", {})
    if not isinstance(attributes, Mapping):
        raise ValueError(f"attributes: expected an object of strings, got {type(attributes).__name__}")
    for k, v in attributes.items():
        if not isinstance(v, str):
            raise ValueError(f"attributes.{k}: expected a string, got {v!r}")
    return Purchase(
        event_id=_text(obj, "event_id", ""),
        order_id=_text(obj, "order_id", ""),
        occurred_at=_timestamp(obj, "occurred_at", ""),
        channel=Channel(_enum_value(obj.get("channel", "OTHER"), "channel", "", tuple(c.value for c in Channel))),
        currency=currency.upper(),
        revenue=_revenue(obj, ""),
        item_count=item_count,
        customer_id=None if customer is None else str(customer),
        exposures=tuple(_exposure(e, f"exposures[{i}].") for i, e in enumerate(exposures)),
        attributes=dict(attributes),
        consent=_consent(obj.get("consent", [])),
    )


def unknown_fields(obj: Mapping[str, Any]) -> list[str]:
    """Fields of the event JSON the schema does not have (likely typos), as dotted paths."""
    out = [k for k in obj if k not in PURCHASE_FIELDS]
    exposures = obj.get("exposures", [])
    if isinstance(exposures, list):
        for i, e in enumerate(exposures):
            if isinstance(e, Mapping):
                out += [f"exposures[{i}].{k}" for k in e if k not in EXPOSURE_FIELDS]
    consent = obj.get("consent", [])
    if isinstance(consent, list):
        for i, c in enumerate(consent):
            if isinstance(c, Mapping):
                out += [f"consent[{i}].{k}" for k in c if k not in CONSENT_FIELDS]
    return out


# --------------------------------------------------------------------------- requests

REDACTED = "***"
# Headers whose whole value is a credential; for Authorization-like ones the scheme stays readable.
_CREDENTIAL_HEADERS = frozenset({"authorization", "proxy-authorization", "cookie", "x-api-key", "api-key"})


def _secrets(obj: object) -> Iterator[str]:
    """Every Secret's value in a config tree (dataclasses, mappings, sequences)."""
    if isinstance(obj, Secret):
        yield obj.reveal()
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            yield from _secrets(getattr(obj, f.name))
    elif isinstance(obj, Mapping):
        for v in obj.values():
            yield from _secrets(v)
    elif isinstance(obj, list | tuple | set | frozenset):
        for v in obj:
            yield from _secrets(v)


class Redactor:
    """Replaces the configured secrets in every form a request can carry them (raw, URL- and JSON-encoded)."""

    def __init__(self, cfg: Config) -> None:
        forms = set()
        for value in _secrets(cfg):
            if value:
                forms |= {value, quote(value, safe=""), quote_plus(value), json_string(value)[1:-1]}
        self._forms = sorted(forms, key=len, reverse=True)  # a secret inside another goes after it

    def text(self, text: str) -> str:
        for form in self._forms:
            if form in text:
                text = text.replace(form, REDACTED)
        return text

    def url(self, url: str) -> str:
        parts = urlsplit(url)
        if parts.password is not None:  # credentials in the URL: user:***@host
            host = parts.netloc.rpartition("@")[2]
            parts = parts._replace(netloc=f"{parts.username or ''}:{REDACTED}@{host}")
        return self.text(urlunsplit(parts))

    def header(self, name: str, value: str) -> str:
        if name.lower() in _CREDENTIAL_HEADERS:
            scheme, sep, _ = value.partition(" ")
            return f"{scheme} {REDACTED}" if sep else REDACTED
        return self.text(value)


def _request_json(request: HttpRequest, redact: Redactor) -> dict[str, Any]:
    body = None if request.body is None else request.body.decode("utf-8", "backslashreplace")
    return {
        "method": request.method,
        "url": redact.url(request.redacted_url or request.url),
        "headers": {k: redact.header(k, v) for k, v in request.headers.items()},
        "body": None if body is None else redact.text(body),
    }


def planned_requests(cfg: Config, conversions: Sequence[Conversion]) -> list[dict[str, Any]]:
    """The HTTP requests the service would send for these conversions, batched as it batches, redacted.

    A project with OAuth credentials first gets its client-credentials grant (sent once, then the token is
    cached until it expires); its token is shown as `Bearer ***`. In the running service, conversions of
    other events may share a batched request (Kameleoon, Convert v1) with these.
    """
    mods: dict[Provider, ProviderModule] = modules(cfg)
    redact = Redactor(cfg)
    batcher: Batcher[Conversion] = Batcher()
    closed: list[Batch[Conversion]] = []
    for c in conversions:
        m = mods[c.provider]
        route = m.route(c)
        closed += batcher.add((c.provider, route.key), route.batch, c, m.item_bytes(c), 0.0)
    closed += batcher.drain()
    order = {c.key: i for i, c in enumerate(conversions)}
    closed.sort(key=lambda b: order[b.items[0].key])
    out: list[dict[str, Any]] = []
    granted: set[object] = set()
    for batch in closed:
        first = batch.items[0]
        m = mods[first.provider]
        route = m.route(first)
        where = {"provider": first.provider.value, "project": route.project}
        if route.token is not None and route.token not in granted:
            granted.add(route.token)
            grant = token_request(route.token)
            out.append({**where, "purpose": "token", "conversions": [], **_request_json(grant, redact)})
        request = m.build(route, batch.items, REDACTED if route.token is not None else None)
        out.append({**where, "purpose": "conversions", "conversions": [c.key for c in batch.items],
                    **_request_json(request, redact)})
    return out


# --------------------------------------------------------------------------- report


def _iso(ms: int) -> str:
    return (_EPOCH + ms * _MS).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _exposure_json(e: Exposure) -> dict[str, Any]:
    return {
        "provider": e.provider.value,
        "project": e.project,
        "experiment_id": e.experiment_id,
        "variation_id": e.variation_id,
        "visitor_id": e.visitor_id,
        "exposed_at": e.exposed_at,
        "exposed_at_iso": _iso(e.exposed_at),
    }


def _rejection_json(r: Rejection) -> dict[str, Any]:
    return {
        "reason": r.reason.value,
        "detail": r.detail,
        "exposure": None if r.exposure is None else _exposure_json(r.exposure),
    }


def _conversion_json(c: Conversion, currency: str) -> dict[str, Any]:
    return {
        "provider": c.provider.value,
        "project": c.project,
        "identity": c.identity.value,
        "visitor": c.visitor_id,
        "goals": list(c.goals),
        "transaction_goals": list(c.transaction_goals),
        "experiment_id": c.experiment_id,
        "variation_id": c.variation_id,
        "revenue": None if c.revenue is None else str(c.revenue),
        "currency": None if c.revenue is None else currency,
        "key": c.key,
    }


def _credit_json(c: Credit) -> dict[str, Any]:
    return {
        "provider": c.provider.value,
        "project": c.project,
        "experiment_id": c.experiment_id,
        "attribution": c.attribution.value,
        "revenue_share": c.revenue_share.value,
        "detail": c.detail,
        "identities": [
            {
                "identity": t.identity.value,
                "visitor": t.visitor_id,
                "variation_id": t.variation_id,
                "first_exposed_at": t.first_exposed_at,
                "last_exposed_at": t.last_exposed_at,
                "last_exposed_at_iso": _iso(t.last_exposed_at),
                "exposures": t.exposures,
                "credited": t.credited,
                "revenue": None if t.revenue is None else str(t.revenue),
            }
            for t in c.touches
        ],
    }


def explain(cfg: Config, event: Mapping[str, Any], now_ms: int) -> dict[str, Any]:
    """A JSON-serialisable report of what `match` decides for `event` at `now_ms`, why, and what is sent."""
    purchase = purchase_from_json(event)
    settings = MatchSettings.from_config(cfg)
    dead_letter: dict[str, Any] | None = None
    try:
        decision = match(purchase, settings, now_ms)
    except TooManyExposures as exc:  # the service dead-letters such an event whole: nothing is sent
        decision = Decision(())
        dead_letter = {"stage": "match", "reason": exc.reason.value, "detail": str(exc)}
    return {
        "now": now_ms,
        "now_iso": _iso(now_ms),
        "purchase": {
            "event_id": purchase.event_id,
            "order_id": purchase.order_id,
            "occurred_at": purchase.occurred_at,
            "occurred_at_iso": _iso(purchase.occurred_at),
            "age_ms": now_ms - purchase.occurred_at,
            "age": human(now_ms - purchase.occurred_at),
            "channel": purchase.channel.value,
            "currency": purchase.currency,
            "revenue": str(purchase.revenue),
            "item_count": purchase.item_count,
            "customer_id": purchase.customer_id,
            "exposures": len(purchase.exposures),
            "consent": {p.value: granted for p, granted in purchase.consent.items()},
        },
        "dead_letter": dead_letter,
        "attributed": decision.attributed,
        "matched": [_exposure_json(e) for e in decision.matched],
        "rejections": [_rejection_json(r) for r in decision.rejections],
        "attribution": [_credit_json(c) for c in decision.credits],
        "conversions": [
            _conversion_json(c, settings.currency_of(c.provider, c.project, purchase)) for c in decision.conversions
        ],
        "requests": planned_requests(cfg, decision.conversions),
        "warnings": [f"unknown field {f} ignored" for f in unknown_fields(event)],
    }


def _exposure_line(e: Mapping[str, Any]) -> str:
    return (
        f"{e['provider'].lower()}/{e['project']} experiment {e['experiment_id']} variation {e['variation_id']}"
        f" visitor {e['visitor_id'] or '(empty)'} at {e['exposed_at_iso']}"
    )


def render_text(report: Mapping[str, Any]) -> str:
    """The report for humans, one fact per line."""
    p = report["purchase"]
    consent = ", ".join(f"{k.lower()} {'granted' if v else 'declined'}" for k, v in p["consent"].items())
    lines = [
        f"order {p['order_id']} (event {p['event_id']}): {p['revenue']} {p['currency']}, {p['item_count']} items,"
        f" channel {p['channel']}, at {p['occurred_at_iso']} ({p['age']} before now {report['now_iso']})",
        f"customer: {p['customer_id'] or '(none)'}; exposures: {p['exposures']}; consent: {consent or '(not stated)'}",
    ]
    lines += [f"warning: {w}" for w in report["warnings"]]
    if report["dead_letter"] is not None:
        d = report["dead_letter"]
        lines.append(f"dead-lettered whole at stage {d['stage']}, reason {d['reason']}: {d['detail']}; nothing is sent")
    lines.append(f"matched exposures: {len(report['matched'])}")
    lines += [f"  + {_exposure_line(e)}" for e in report["matched"]]
    lines.append(f"rejections: {len(report['rejections'])}")
    for r in report["rejections"]:
        where = f"{_exposure_line(r['exposure'])}: " if r["exposure"] else ""
        lines.append(f"  - {r['reason']}: {where}{r['detail']}")
    lines.append(f"attribution: {len(report['attribution'])}")
    for c in report["attribution"]:
        experiment = f" experiment {c['experiment_id']}" if c["experiment_id"] else ""
        lines.append(f"  = {c['provider'].lower()}/{c['project']}{experiment}: {c['detail']}")
        for t in c["identities"]:
            variation = f" variation {t['variation_id']}" if t["variation_id"] else ""
            got = ("credited" + ("" if t["revenue"] is None else f", revenue {t['revenue']}")) if t["credited"] \
                else "not credited"
            lines.append(f"    {t['identity']} {t['visitor']}{variation}: {got}; {t['exposures']} exposures,"
                         f" last at {t['last_exposed_at_iso']}")
    lines.append(f"conversions: {len(report['conversions'])}" + ("" if report["attributed"] else " (not attributed)"))
    for c in report["conversions"]:
        revenue = "no revenue" if c["revenue"] is None else f"revenue {c['revenue']} {c['currency']}"
        experiment = f" experiment {c['experiment_id']}-{c['variation_id']}" if c["experiment_id"] else ""
        tx = f" transaction goals {','.join(c['transaction_goals'])}" if c["transaction_goals"] else ""
        lines.append(
            f"  > {c['provider'].lower()}/{c['project']} {c['identity']} {c['visitor']}{experiment}"
            f" goals {','.join(c['goals'])}{tx}, {revenue}, key {c['key']}"
        )
    lines.append(f"requests: {len(report['requests'])}" + (" (secrets shown as ***)" if report["requests"] else ""))
    for r in report["requests"]:
        what = "OAuth token, sent once and cached" if r["purpose"] == "token" else _count(len(r["conversions"]))
        lines.append(f"  {r['method']} {r['url']}  ({r['provider'].lower()}/{r['project']}: {what})")
        lines += [f"    {k}: {v}" for k, v in r["headers"].items()]
        if r["body"] is not None:
            lines.append(f"    body: {r['body']}")
    return "\n".join(_printable(line) for line in lines) + "\n"


def _printable(line: str) -> str:
    """Control characters as \\uXXXX: ids come from upstream, and a hostile one must not drive the terminal."""
    if line.isprintable():
        return line
    return "".join(c if c.isprintable() else f"\\u{ord(c):04x}" for c in line)


def _count(n: int) -> str:
    return "1 conversion" if n == 1 else f"{n} conversions"
