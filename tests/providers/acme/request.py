"""The test-only provider's requests: `POST {base}/acme/v1/conversions`, JSON, the key in `X-Api-Key`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import orjson

from consumer.model import Conversion, Provider
from consumer.providers.base import HttpRequest, Outcome, Route, Verdict, classify_status

from .config import ACME, AcmeConfig, AcmeProject


def item(conversion: Conversion) -> dict[str, object]:
    out: dict[str, object] = {"id": conversion.key, "visitor": conversion.visitor_id,
                              "goals": list(conversion.goals), "order": conversion.order_id}
    if conversion.revenue is not None:
        out["revenue"] = str(conversion.revenue)  # a string: exact digits, no float
    return out


class AcmeModule:
    provider: Provider = ACME

    def __init__(self, cfg: AcmeConfig) -> None:
        self._cfg = cfg

    def _project(self, key: str) -> AcmeProject:
        try:
            return self._cfg.projects[key]
        except KeyError:
            raise ValueError(f"unknown acme project {key!r}") from None

    def route(self, conversion: Conversion) -> Route:
        p = self._project(conversion.project)
        return Route(key=(p.base_url, p.key), project=p.key, batch=self._cfg.batch, flow=p.flow,
                     retry=self._cfg.retry)

    def item_bytes(self, conversion: Conversion) -> int:
        return len(orjson.dumps(item(conversion))) + 1

    def build(self, route: Route, conversions: Sequence[Conversion], token: str | None = None) -> HttpRequest:
        p = self._project(route.project)
        body = orjson.dumps({"project": p.key, "conversions": [item(c) for c in conversions]})
        headers = {"Content-Type": "application/json", "User-Agent": self._cfg.user_agent,
                   "X-Api-Key": p.api_key.reveal()}
        url = f"{p.base_url}/acme/v1/conversions"
        return HttpRequest("POST", url, headers, body, redacted_url=url)

    def classify(self, request: HttpRequest, status: int, headers: Mapping[str, str], body: bytes) -> Outcome:
        if status == 401:
            return Outcome(Verdict.PERMANENT, "unauthorized (api key?)", status)
        return classify_status(status, headers)
