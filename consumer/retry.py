"""Retry policy, pure: exponential backoff with full jitter, bounded by attempts and elapsed time."""

from __future__ import annotations

import random
from collections.abc import Callable

from consumer.config import RetryConfig


def backoff(attempt: int, cfg: RetryConfig, retry_after: float | None = None,
            rand: Callable[[], float] = random.random) -> float:
    """Seconds to wait before attempt `attempt + 1` (attempt counts from 1).

    Full jitter (uniform in [0, min(max_delay, base * 2^(attempt-1))]) spreads a thundering herd
    of retries after an outage; a provider's Retry-After is a floor we honour, not a suggestion.
    """
    ceiling = min(cfg.max_delay, cfg.base_delay * (2 ** max(0, attempt - 1)))
    delay = rand() * ceiling
    if retry_after is not None:
        delay = max(delay, retry_after)
    return float(delay)


def budget_left(attempt: int, elapsed: float, delay: float, cfg: RetryConfig) -> bool:
    """Whether another attempt fits: fewer than max_attempts so far and the wait ends inside max_elapsed."""
    return attempt < cfg.max_attempts and elapsed + delay <= cfg.max_elapsed
