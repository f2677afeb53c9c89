"""A bounded, least-recently-used set of conversion keys delivered recently by this process."""

from __future__ import annotations

from collections import OrderedDict

from consumer.config import Config


class RecentKeys:
    """Remembers at most `capacity` keys; the least recently seen or added is forgotten first.

    Every operation is O(1) and memory is bounded by `capacity`. A capacity of 0 disables the cache:
    `add` remembers nothing and `seen` is always False. This is an optimisation within one process
    (skip a conversion whose key was just delivered, e.g. a redelivered Kafka message); the providers'
    idempotency keys remain the guarantee across processes and restarts.
    """

    __slots__ = ("_capacity", "_keys")

    def __init__(self, capacity: int) -> None:
        if capacity < 0:
            raise ValueError(f"capacity must be at least 0, got {capacity}")
        self._capacity = capacity
        self._keys: OrderedDict[str, None] = OrderedDict()

    @classmethod
    def from_config(cls, cfg: Config) -> RecentKeys:
        return cls(cfg.pipeline.dedup_cache_size)

    @property
    def capacity(self) -> int:
        return self._capacity

    def seen(self, key: str) -> bool:
        """True when `key` was added and not yet evicted; a hit makes it the most recently used."""
        if key not in self._keys:
            return False
        self._keys.move_to_end(key)
        return True

    def add(self, key: str) -> None:
        """Remember `key` as the most recently used, evicting the least recently used beyond capacity."""
        if self._capacity == 0:
            return
        if key in self._keys:
            self._keys.move_to_end(key)
            return
        self._keys[key] = None
        if len(self._keys) > self._capacity:
            self._keys.popitem(last=False)

    def add_many(self, keys: list[str]) -> None:
        """`add` for each key, in order (one call per delivered batch)."""
        if self._capacity == 0:
            return
        store, capacity = self._keys, self._capacity
        for key in keys:
            if key in store:
                store.move_to_end(key)
            else:
                store[key] = None
        excess = len(store) - capacity
        for _ in range(excess):
            store.popitem(last=False)

    def discard(self, key: str) -> None:
        """Forget `key` (e.g. a delivery that was later found not to have been accepted)."""
        self._keys.pop(key, None)

    def __len__(self) -> int:
        return len(self._keys)
