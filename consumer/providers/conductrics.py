"""Conductrics REST agent API: `POST {agent_api_url}?vid=&session=&apikey=`, one visitor per request.

One conversion is all goals of one visitor: a `{"g": goal, "v": revenue}` command per goal (seed 003).
The API key travels in the query, so it appears only in `HttpRequest.url`; `redacted_url`, headers,
reprs and outcome reasons never carry it. A 2xx answer is read further: a JSON `status` other than
200 is an error, and reward items that all have an empty `rs` mean no agent accepted the goal.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from urllib.parse import quote

import orjson

from consumer.config import BatchConfig, ConductricsConfig, ConductricsProject
from consumer.model import Conversion, Provider
from consumer.providers.base import (
    HttpRequest,
    Outcome,
    Route,
    Verdict,
    classify_status,
    digest,
    json_number,
    json_string,
)

REDACTED = "***"


def conductrics_key(project: str, vid: str, order_id: str) -> str:
    """The idempotency key of one Conductrics conversion: 32 lowercase hex, deterministic."""
    return digest("conductrics", project, vid, order_id)[:32]


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


def _retryable(status: int) -> bool:
    return status in (408, 429) or status >= 500


def classify_answer(body: bytes) -> Outcome:
    """What a 2xx agent-API answer means (reasons are fixed strings: nothing from the body is echoed)."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return Outcome(Verdict.RETRY, "unparseable body")
    if not isinstance(doc, dict):
        return Outcome(Verdict.RETRY, "unparseable body")
    status = doc.get("status")
    if isinstance(status, bool) or not isinstance(status, int):
        return Outcome(Verdict.RETRY, "json status missing")
    if status != 200:
        return Outcome(Verdict.RETRY if _retryable(status) else Verdict.PERMANENT, f"json status {status}")
    data = doc.get("data")
    items = data.get("items") if isinstance(data, dict) else None
    rewards = [i for i in items if isinstance(i, dict) and "rs" in i] if isinstance(items, list) else []
    if rewards and not any(i["rs"] for i in rewards):
        return Outcome(Verdict.NOT_ACCEPTED, "no agent accepted")
    return Outcome(Verdict.DELIVERED, "ok")


class ConductricsModule:
    provider: Provider = Provider.CONDUCTRICS

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
        if status == 401:
            return Outcome(Verdict.PERMANENT, "unauthorized (api key?)", status)
        if status == 403:
            return Outcome(Verdict.PERMANENT, "forbidden (api key?)", status)
        outcome = classify_status(status, headers)
        if outcome.verdict is not Verdict.DELIVERED:
            return outcome
        answer = classify_answer(body)
        return Outcome(answer.verdict, answer.reason, status)
