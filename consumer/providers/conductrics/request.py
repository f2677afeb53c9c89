"""Conductrics REST agent API requests: `POST {agent_api_url}?vid=&session=&apikey=`, one visitor per request.

One conversion is all goals of one visitor: a `{"g": goal, "v": revenue}` command per goal (seed 003).
The API key travels in the query, so it appears only in `HttpRequest.url`; `redacted_url`, headers,
reprs and outcome reasons never carry it. A 2xx answer is read further: a JSON `status` other than
200 is an error, and reward items that all have an empty `rs` mean no agent accepted the goal.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from urllib.parse import quote

from consumer.config import BatchConfig
from consumer.model import Conversion, Provider
from consumer.providers.base import HttpRequest, Outcome, Route, json_number, json_string
from consumer.providers.conductrics.classify import classify
from consumer.providers.conductrics.config import CONDUCTRICS, ConductricsConfig, ConductricsProject

REDACTED = "***"


def commands_body(conversion: Conversion) -> bytes:
    """`{"commands":[{"g":…,"v":…},…]}`: one command per goal, "v" only with revenue (exact digits)."""
    v = "" if conversion.revenue is None else ',"v":' + json_number(conversion.revenue)
    commands = ",".join('{"g":' + json_string(g) + v + "}" for g in conversion.goals)
    return ('{"commands":[' + commands + "]}").encode()


def _q(value: str) -> str:
    """One query part, percent-encoded as UTF-8 (a lone surrogate passes instead of raising)."""
    return quote(value, safe="", errors="surrogatepass")


def agent_url(p: ConductricsProject, conversion: Conversion, api_key: str) -> str:
    session = p.session.format(vid=conversion.visitor_id, order_id=conversion.order_id, event_id=conversion.event_id)
    sep = "&" if "?" in p.agent_api_url else "?"
    q = [f"vid={_q(conversion.visitor_id)}", f"session={_q(session)}", f"apikey={api_key}"]
    return p.agent_api_url + sep + "&".join(q)


class ConductricsModule:
    provider: Provider = CONDUCTRICS

    def __init__(self, cfg: ConductricsConfig) -> None:
        self._cfg = cfg
        # One visitor per call: never wait to fill a batch.
        self._single = BatchConfig(max_events=1, linger=0.0)

    def __repr__(self) -> str:
        return f"ConductricsModule(projects={sorted(self._cfg.projects)})"

    def _project(self, key: str) -> ConductricsProject:
        try:
            return self._cfg.projects[key]
        except KeyError:
            raise ValueError(f"unknown Conductrics project {key!r}") from None

    def route(self, conversion: Conversion) -> Route:
        p = self._project(conversion.project)
        return Route(
            key=(p.key, conversion.key),
            project=p.key,
            batch=self._single,
            flow=p.flow,
            retry=self._cfg.retry,
        )

    def item_bytes(self, conversion: Conversion) -> int:
        return len(commands_body(conversion))

    def build(self, route: Route, conversions: Sequence[Conversion], token: str | None = None) -> HttpRequest:
        if len(conversions) != 1:
            raise ValueError(f"a Conductrics call carries one conversion, got {len(conversions)}")
        p, c = self._project(route.project), conversions[0]
        headers = {"Content-Type": "application/json", "User-Agent": self._cfg.user_agent}
        return HttpRequest(
            "POST",
            agent_url(p, c, _q(p.api_key.reveal())),
            headers,
            commands_body(c),
            redacted_url=agent_url(p, c, REDACTED),
        )

    def classify(self, request: HttpRequest, status: int, headers: Mapping[str, str], body: bytes) -> Outcome:
        return classify(request, status, headers, body)
