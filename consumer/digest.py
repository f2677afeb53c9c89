"""Rate-limited summaries of a repeated failure for the log: the first at once, then at most one per interval."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Summary:
    """What happened since the previous summary."""

    count: int
    reasons: dict[str, int]  # reason -> count, most frequent first
    examples: list[str]  # the first occurrence of each reason (up to max_examples)
    seconds: float  # from the first failure counted here to the summary

    def text(self) -> str:
        return ", ".join(f"{reason} {n}" for reason, n in self.reasons.items())


class FailureDigest:
    """Counts failures by reason; `take` returns a Summary when one is due. Time is passed in (monotonic s).

    A failure after a quiet spell is reported on the next `take`; while failures keep coming, one
    summary covers each `interval`, so a stream of bad records costs a log line per interval, not per record.
    """

    def __init__(self, interval: float, max_examples: int = 5) -> None:
        self.interval = interval
        self.max_examples = max_examples
        self.count = 0
        self._reasons: dict[str, int] = {}
        self._examples: list[str] = []
        self._since = 0.0
        self._next_at = float("-inf")

    def add(self, reason: str, example: str, now: float) -> None:
        if not self.count:
            self._since = now
        self.count += 1
        seen = self._reasons.get(reason)
        self._reasons[reason] = (seen or 0) + 1
        if seen is None and len(self._examples) < self.max_examples:
            self._examples.append(example)

    def take(self, now: float, *, force: bool = False) -> Summary | None:
        """The summary of what was added since the last one, if there is any and it is due (or `force`)."""
        if not self.count or (now < self._next_at and not force):
            return None
        reasons = dict(sorted(self._reasons.items(), key=lambda kv: (-kv[1], kv[0])))
        summary = Summary(self.count, reasons, self._examples, max(0.0, now - self._since))
        self.count = 0
        self._reasons = {}
        self._examples = []
        self._next_at = now + self.interval
        return summary
