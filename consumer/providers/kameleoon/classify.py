"""What a Kameleoon Data API answer means for the events of its request."""

from __future__ import annotations

from collections.abc import Mapping

from consumer.providers.base import HttpRequest, Outcome, Verdict, classify_status

# Every event starts with this; a JSON string escapes `"`, so it can only occur at an event's start.
EVENT_START = b'{"nonce":'


def count_events(body: bytes | None) -> int:
    """How many events a body built by `KameleoonModule.build` carries (exact: see EVENT_START)."""
    return body.count(EVENT_START) if body else 0


def classify(request: HttpRequest, status: int, headers: Mapping[str, str], body: bytes) -> Outcome:
    if status == 400 and count_events(request.body) > 1:
        # Bisect: one malformed event must not poison its batch; only a single-event 400 is permanent.
        return Outcome(Verdict.SPLIT, "bad request: splitting the batch", status)
    if status == 403:
        return Outcome(Verdict.PERMANENT, "forbidden (user-agent?)", status)
    return classify_status(status, headers, has_token="Authorization" in request.headers)
