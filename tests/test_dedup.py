"""RecentKeys: a bounded LRU of recently delivered conversion keys."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from consumer.config import parse
from consumer.dedup import RecentKeys

KAFKA = {"bootstrap_servers": "localhost:9092", "topic": "purchases", "group_id": "g", "dlq_topic": "purchases-dlq"}
PROJECTS = {"kameleoon": {"projects": {"site": {"goals": ["1"]}}}}


def test_remembers_what_was_added() -> None:
    keys = RecentKeys(3)
    assert not keys.seen("a")
    keys.add("a")
    assert keys.seen("a")
    assert not keys.seen("b")
    assert len(keys) == 1


def test_adding_twice_keeps_one_entry() -> None:
    keys = RecentKeys(3)
    keys.add("a")
    keys.add("a")
    assert len(keys) == 1


def test_forgets_the_oldest_keys_first() -> None:
    keys = RecentKeys(4)  # two generations of two keys
    for k in "abcde":
        keys.add(k)
    assert len(keys) <= 4
    assert not keys.seen("a") and not keys.seen("b")
    assert keys.seen("c") and keys.seen("d") and keys.seen("e")


def test_re_adding_a_key_keeps_it() -> None:
    keys = RecentKeys(4)
    for k in "abcabdaef":  # "a" delivered again and again stays while older ones go
        keys.add(k)
    assert keys.seen("a") and keys.seen("f") and not keys.seen("b")


def test_capacity_one_remembers_the_last_key() -> None:
    keys = RecentKeys(1)
    keys.add("a")
    keys.add("b")
    assert keys.seen("b") and not keys.seen("a") and len(keys) == 1


def test_capacity_zero_disables() -> None:
    keys = RecentKeys(0)
    keys.add("a")
    assert not keys.seen("a")
    assert len(keys) == 0


def test_negative_capacity_is_refused() -> None:
    with pytest.raises(ValueError, match="capacity"):
        RecentKeys(-1)


def test_discard_forgets() -> None:
    keys = RecentKeys(2)
    keys.add("a")
    keys.discard("a")
    keys.discard("never-added")
    assert not keys.seen("a") and len(keys) == 0


def test_memory_is_bounded_under_many_keys() -> None:
    keys = RecentKeys(100)
    for i in range(200_000):
        keys.add(f"{i:016x}")
    assert len(keys) <= 100
    assert all(keys.seen(f"{i:016x}") for i in range(199_950, 200_000))
    assert not keys.seen(f"{199_899:016x}")


@pytest.mark.parametrize(
    ("pipeline", "capacity"), [({}, 100_000), ({"dedup_cache_size": 7}, 7), ({"dedup_cache_size": 0}, 0)]
)
def test_from_config(pipeline: dict[str, Any], capacity: int) -> None:
    cfg = parse({"kafka": KAFKA, "pipeline": pipeline, **PROJECTS}, env={})
    keys = RecentKeys.from_config(cfg)
    assert keys.capacity == capacity
    keys.add("k")
    assert keys.seen("k") is (capacity > 0)


ops = st.lists(st.tuples(st.sampled_from(["add", "seen", "discard"]), st.sampled_from("abcdefgh")), max_size=60)


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 6), ops)
def test_property_remembers_the_recent_half_and_never_more_than_capacity(
    capacity: int, operations: list[tuple[str, str]]
) -> None:
    keys = RecentKeys(capacity)
    added: list[str] = []  # distinct keys in order of their last add, most recent last
    discarded: set[str] = set()
    for op, k in operations:
        if op == "add":
            keys.add(k)
            if k in added:
                added.remove(k)
            added.append(k)
            discarded.discard(k)
        elif op == "discard":
            keys.discard(k)
            discarded.add(k)
        else:
            keys.seen(k)
        assert len(keys) <= capacity
        must = max(capacity // 2, min(capacity, 1))  # the guarantee: the last capacity // 2 (1 for capacity 1)
        for recent in added[len(added) - must:] if must else []:
            assert keys.seen(recent) is (recent not in discarded)
        for d in discarded:
            assert not keys.seen(d)


@given(capacity=st.integers(0, 5), batches=st.lists(st.lists(st.sampled_from("abcdefgh"), max_size=8), max_size=6))
def test_add_many_is_add_in_order(capacity: int, batches: list[list[str]]) -> None:
    one, many = RecentKeys(capacity), RecentKeys(capacity)
    for batch in batches:
        for k in batch:
            one.add(k)
        many.add_many(batch)
        assert (one._current, one._previous) == (many._current, many._previous)
