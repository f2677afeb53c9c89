"""What a Convert tracking answer means for the conversions of its request."""

from __future__ import annotations

from collections.abc import Mapping

from consumer.providers.base import HttpRequest, Outcome, Verdict, classify_status

# Every v1 visitor entry starts with this; a JSON string escapes `"`, so it occurs nowhere else.
VISITOR_START = b'{"visitorId":'


def count_visitors(body: bytes | None) -> int:
    """How many visitor entries a v1 body built by `ConvertModule.build` carries (exact: see VISITOR_START)."""
    return body.count(VISITOR_START) if body else 0


def classify(request: HttpRequest, status: int, headers: Mapping[str, str], body: bytes) -> Outcome:
    if status == 400 and count_visitors(request.body) > 1:
        # Bisect: one bad visitor must not poison the batch; only a single-visitor 400 is permanent.
        return Outcome(Verdict.SPLIT, "bad request: splitting the batch", status)
    return classify_status(status, headers)
