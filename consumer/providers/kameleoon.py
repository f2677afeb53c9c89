"""Kameleoon Data API: `POST /visit/events?siteCode=…&json=true`, many visitors per request.

One conversion is one CONVERSION event (one goal). The visitor goes into each event
(`visitorCode`, or `mappingValue` for a cross-device identifier) instead of the query, so one
request can carry many visitors (seed 001 puts `visitorCode` in the query: that form applies
to every event and cannot batch). The body is written by hand so that `item_bytes` is exact and
revenue keeps its exact decimal digits. An order adjustment's events (consumer/adjustments.py) are
conversions too: a cancellation carries `"negative":true`, a restatement is a plain conversion.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from hashlib import sha256
from urllib.parse import quote

from consumer.config import KameleoonConfig, KameleoonProject
from consumer.model import Conversion, Identity, Provider
from consumer.providers.base import (
    HttpRequest,
    Outcome,
    Route,
    TokenSpec,
    Verdict,
    chunk,
    classify_status,
    digest,
    json_number,
    json_string,
)

# Every event starts with this; a JSON string escapes `"`, so it can only occur at an event's start.
_EVENT_START = b'{"nonce":'


def nonce(site_code: str, order_id: str, goal: str, visitor: str, identity: Identity = Identity.VISITOR) -> str:
    """The event nonce: 16 lowercase hex digits, the same for the same (site, order, goal, visitor).

    Kameleoon keeps a nonce across retries and de-duplicates on it, so a redelivered purchase
    cannot count twice. The identity kind is part of it: a visitorCode and a mappingValue that
    happen to be the same string are different visitors.
    """
    return nonce_of(nonce_prefix(site_code), chunk(order_id), chunk(goal), chunk(identity.value), chunk(visitor))


def nonce_prefix(site_code: str) -> bytes:
    """The part of every nonce of a site that does not change (the matcher computes it once per project)."""
    return chunk("kameleoon") + chunk(site_code)


def nonce_of(prefix: bytes, order: bytes, goal: bytes, identity: bytes, visitor: bytes) -> str:
    """`nonce` from its parts already encoded with `chunk`, for the matcher's hot path."""
    return sha256(b"".join((prefix, order, goal, identity, visitor))).hexdigest()[:16]


def adjustment_nonce(site_code: str, adjustment_event_id: str, original_key: str, role: str) -> str:
    """The nonce of an event an order adjustment sends: 16 hex digits from (site, adjustment, original, role).

    `role` is "cancel" (the `negative: true` event) or "restate" (the conversion with the revenue a
    partial refund leaves). Derived from the adjustment's event id, never from a clock or a counter, so
    an adjustment read again (a redelivery, a restart after a crash) sends the same nonces, which
    Kameleoon de-duplicates. Its prefix differs from every purchase nonce's input (`nonce`).
    """
    return digest("kameleoon-adjustment", site_code, adjustment_event_id, original_key, role)[:16]


def event_json(conversion: Conversion) -> str:
    """One CONVERSION event, compact JSON, keys in a fixed order."""
    goals = conversion.goals
    if len(goals) != 1:
        raise ValueError(f"a Kameleoon conversion carries exactly one goal, got {len(goals)}")
    goal = _GOAL_JSON.get(goals[0])
    if goal is None:
        goal = str(int(goals[0]))  # "036151" would not be a JSON number
        if len(_GOAL_JSON) < 1024:
            _GOAL_JSON[goals[0]] = goal
    revenue = "" if conversion.revenue is None else ',"revenue":' + json_number(conversion.revenue)
    if conversion.negative:
        revenue += ',"negative":true'  # the documented cancel flag (adjustments only; see adjustment_nonce)
    who = "mappingValue" if conversion.identity is _MAPPING else "visitorCode"
    return (f'{{"nonce":{json_string(conversion.key)},"eventType":"CONVERSION","goalId":{goal}{revenue},'
            f'"{who}":{json_string(conversion.visitor_id)}}}')


_GOAL_JSON: dict[str, str] = {}
_MAPPING = Identity.MAPPING  # a module constant: an enum member lookup costs ~0.1 µs per event


def events_url(base_url: str, site_code: str) -> str:
    return f"{base_url}/visit/events?siteCode={quote(site_code, safe='')}&json=true"


def count_events(body: bytes | None) -> int:
    """How many events a body built by `KameleoonModule.build` carries (exact: see _EVENT_START)."""
    return body.count(_EVENT_START) if body else 0


class KameleoonModule:
    provider: Provider = Provider.KAMELEOON

    def __init__(self, cfg: KameleoonConfig) -> None:
        self._cfg = cfg
        self._routes: dict[str, Route] = {}
        # Each event's JSON is written once: measured for the batch limit, then joined into the body.
        self._encoded: dict[str, str] = {}

    def __repr__(self) -> str:
        return f"KameleoonModule(projects={sorted(self._cfg.projects)})"

    def _project(self, site_code: str) -> KameleoonProject:
        try:
            return self._cfg.projects[site_code]
        except KeyError:
            raise ValueError(f"unknown Kameleoon project {site_code!r}") from None

    def route(self, conversion: Conversion) -> Route:
        route = self._routes.get(conversion.project)
        if route is None:
            route = self._routes[conversion.project] = self._route(conversion.project)
        return route

    def _route(self, site_code: str) -> Route:
        p = self._project(site_code)
        token = None
        if p.client_id and p.client_secret:
            token = TokenSpec(self._cfg.token_url, p.client_id, p.client_secret, self._cfg.token_refresh_margin,
                              Provider.KAMELEOON)
        return Route(
            key=(p.base_url, p.site_code),
            project=p.site_code,
            batch=self._cfg.batch,
            flow=p.flow,
            retry=self._cfg.retry,
            token=token,
        )

    def item_bytes(self, conversion: Conversion) -> int:
        """The event's JSON plus one comma: a body of n events is sum(item_bytes) + 1 bytes."""
        encoded = self._encoded[conversion.key] = event_json(conversion)
        return (len(encoded) if encoded.isascii() else len(encoded.encode())) + 1

    def build(self, route: Route, conversions: Sequence[Conversion], token: str | None = None) -> HttpRequest:
        p = self._project(route.project)
        pop = self._encoded.pop
        body = ("[" + ",".join(pop(c.key, "") or event_json(c) for c in conversions) + "]").encode()
        headers = {"Content-Type": "application/json", "User-Agent": self._cfg.user_agent}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        url = events_url(p.base_url, p.site_code)
        return HttpRequest("POST", url, headers, body, redacted_url=url)

    def classify(self, request: HttpRequest, status: int, headers: Mapping[str, str], body: bytes) -> Outcome:
        if status == 400 and count_events(request.body) > 1:
            # Bisect: one malformed event must not poison its batch; only a single-event 400 is permanent.
            return Outcome(Verdict.SPLIT, "bad request: splitting the batch", status)
        if status == 403:
            return Outcome(Verdict.PERMANENT, "forbidden (user-agent?)", status)
        return classify_status(status, headers, has_token="Authorization" in request.headers)
