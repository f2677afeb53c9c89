"""RecentKeys: a bounded LRU of recently delivered conversion keys."""

from __future__ import annotations

from collections import OrderedDict
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


def test_evicts_the_least_recently_added() -> None:
    keys = RecentKeys(2)
    for k in "abc":
        keys.add(k)
    assert len(keys) == 2
    assert not keys.seen("a")
    assert keys.seen("b") and keys.seen("c")


def test_a_hit_makes_a_key_most_recent() -> None:
    keys = RecentKeys(2)
    keys.add("a")
    keys.add("b")
    assert keys.seen("a")  # "b" is now the least recently used
    keys.add("c")
    assert keys.seen("a") and keys.seen("c")
    assert not keys.seen("b")


def test_re_adding_makes_a_key_most_recent() -> None:
    keys = RecentKeys(2)
    keys.add("a")
    keys.add("b")
    keys.add("a")
    keys.add("c")
    assert keys.seen("a") and not keys.seen("b")


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
    assert len(keys) == 100
    assert keys.seen(f"{199_999:016x}") and not keys.seen(f"{199_899:016x}")


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
@given(st.integers(0, 5), ops)
def test_property_behaves_like_a_reference_lru(capacity: int, operations: list[tuple[str, str]]) -> None:
    keys, model = RecentKeys(capacity), OrderedDict[str, None]()
    for op, k in operations:
        if op == "add":
            keys.add(k)
            if capacity:
                model[k] = None
                model.move_to_end(k)
                while len(model) > capacity:
                    model.popitem(last=False)
        elif op == "seen":
            expected = k in model
            if expected:
                model.move_to_end(k)
            assert keys.seen(k) is expected
        else:
            keys.discard(k)
            model.pop(k, None)
        assert len(keys) == len(model) <= capacity


@given(capacity=st.integers(0, 5), batches=st.lists(st.lists(st.sampled_from("abcdefgh"), max_size=8), max_size=6))
def test_add_many_is_add_in_order(capacity: int, batches: list[list[str]]) -> None:
    one, many = RecentKeys(capacity), RecentKeys(capacity)
    for batch in batches:
        for k in batch:
            one.add(k)
        many.add_many(batch)
        assert list(one._keys) == list(many._keys)
