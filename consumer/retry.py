"""Retry policy, pure: capped exponential backoff with full jitter, and when (if ever) a transient failure gives up."""

from __future__ import annotations

import random
from collections.abc import Callable

from consumer.config import RetryConfig

# 2**62 times any base delay is past every max_delay; a larger exponent would overflow a float for
# nothing (a conversion may be retried for days while its provider is down).
_MAX_EXPONENT = 62


def backoff(attempt: int, cfg: RetryConfig, retry_after: float | None = None,
            rand: Callable[[], float] = random.random) -> float:
    """Seconds to wait before attempt `attempt + 1` (attempt counts from 1).

    Full jitter (uniform in [0, min(max_delay, base * 2^(attempt-1))]) spreads a thundering herd
    of retries after an outage; a provider's Retry-After is a floor we honour, not a suggestion.
    """
    exponent = min(max(0, attempt - 1), _MAX_EXPONENT)
    ceiling = min(cfg.max_delay, cfg.base_delay * float(1 << exponent))
    delay = rand() * ceiling
    if retry_after is not None:
        delay = max(delay, retry_after)
    return float(delay)


def gives_up(age: float, delay: float, cfg: RetryConfig) -> bool:
    """Whether a transient failure ends a conversion's delivery (the DLQ) instead of a retry after `delay`.

    `age`: seconds since the conversion's batch opened. Never by default (`give_up_after` 0): its offset
    stays uncommitted and it waits for the provider however long the outage lasts. With `give_up_after`
    set, it gives up once waiting `delay` more would take it past that age.
    """
    return cfg.give_up_after > 0 and age + delay > cfg.give_up_after
