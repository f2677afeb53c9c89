"""What a Conductrics agent-API answer means: the HTTP status, then the JSON `status` and the rewards under a 2xx."""

from __future__ import annotations

from collections.abc import Mapping

import orjson

from consumer.providers.base import HttpRequest, Outcome, Verdict, classify_status


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


def classify(request: HttpRequest, status: int, headers: Mapping[str, str], body: bytes) -> Outcome:
    if status == 401:
        return Outcome(Verdict.PERMANENT, "unauthorized (api key?)", status)
    if status == 403:
        return Outcome(Verdict.PERMANENT, "forbidden (api key?)", status)
    outcome = classify_status(status, headers)
    if outcome.verdict is not Verdict.DELIVERED:
        return outcome
    answer = classify_answer(body)
    return Outcome(answer.verdict, answer.reason, status)
