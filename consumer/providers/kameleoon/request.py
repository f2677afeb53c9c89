"""Kameleoon Data API requests: `POST /visit/events?siteCode=…&json=true`, many visitors per request.

One conversion is one CONVERSION event (one goal). The visitor goes into each event
(`visitorCode`, or `mappingValue` for a cross-device identifier) instead of the query, so one
request can carry many visitors (seed 001 puts `visitorCode` in the query: that form applies
to every event and cannot batch). The body is written by hand so that `item_bytes` is exact and
revenue keeps its exact decimal digits. An order adjustment's events (consumer/adjustments.py) are
conversions too: a cancellation carries `"negative":true`, a restatement is a plain conversion.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from urllib.parse import quote

from consumer.model import Conversion, Identity, Provider
from consumer.providers.base import HttpRequest, Outcome, Route, TokenSpec, json_number, json_string
from consumer.providers.kameleoon.classify import classify
from consumer.providers.kameleoon.config import KAMELEOON, KameleoonConfig, KameleoonProject


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
        revenue += ',"negative":true'  # the documented cancel flag (adjustments only; see keys.adjustment_nonce)
    who = "mappingValue" if conversion.identity is _MAPPING else "visitorCode"
    return (f'{{"nonce":{json_string(conversion.key)},"eventType":"CONVERSION","goalId":{goal}{revenue},'
            f'"{who}":{json_string(conversion.visitor_id)}}}')


_GOAL_JSON: dict[str, str] = {}
_MAPPING = Identity.MAPPING  # a module constant: an enum member lookup costs ~0.1 µs per event


def events_url(base_url: str, site_code: str) -> str:
    return f"{base_url}/visit/events?siteCode={quote(site_code, safe='')}&json=true"


class KameleoonModule:
    provider: Provider = KAMELEOON

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
                              KAMELEOON, self._cfg.user_agent)
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
        return classify(request, status, headers, body)
