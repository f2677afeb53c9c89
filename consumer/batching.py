"""Batching decisions, pure: which conversions share a request, and when a batch closes.

A batch closes on the first of: its event count reaching `max_events`, the next item not fitting
under `max_bytes`, or `linger` seconds after its first item. The caller owns the clock and the
timers (one per open batch, due at `Batch.deadline`); this module only answers "close now?".
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from consumer.config import BatchConfig

T = TypeVar("T")

# The body's own framing: the JSON array brackets (Kameleoon) or the envelope (Convert v1).
ENVELOPE_BYTES = 256


@dataclass
class Batch(Generic[T]):
    key: Hashable
    limits: BatchConfig
    opened_at: float
    items: list[T] = field(default_factory=list)
    size: int = ENVELOPE_BYTES

    def fits(self, item_bytes: int) -> bool:
        return not self.items or (
            len(self.items) < self.limits.max_events and self.size + item_bytes <= self.limits.max_bytes
        )

    @property
    def full(self) -> bool:
        return len(self.items) >= self.limits.max_events

    @property
    def deadline(self) -> float:
        return self.opened_at + self.limits.linger


class Batcher(Generic[T]):
    """Open batches by key. `add` returns the batches that closed because of it (at most two)."""

    def __init__(self) -> None:
        self.open: dict[Hashable, Batch[T]] = {}

    def add(self, key: Hashable, limits: BatchConfig, item: T, item_bytes: int, now: float) -> list[Batch[T]]:
        closed: list[Batch[T]] = []
        batch = self.open.get(key)
        if batch is not None and not batch.fits(item_bytes):
            closed.append(self.open.pop(key))
            batch = None
        if batch is None:
            batch = self.open[key] = Batch(key, limits, now)
        batch.items.append(item)
        batch.size += item_bytes
        if batch.full or limits.linger <= 0:
            closed.append(self.open.pop(key))
        return closed

    def drain(self) -> Iterator[Batch[T]]:
        """Close everything (shutdown)."""
        while self.open:
            yield self.open.pop(next(iter(self.open)))

    def __len__(self) -> int:
        return sum(len(b.items) for b in self.open.values())
