"""The sample producer: a paced stream, whose timestamps the benchmark reads as latency, loses nothing."""

from __future__ import annotations

from consumer.embedded import EmbeddedBroker
from consumer.producer import produce_values
from tests.conftest import read_all


def test_a_paced_stream_delivers_every_record_once_the_first_before_the_rest(
    broker: EmbeddedBroker, topics: dict[str, str],
) -> None:
    # The first record is sent alone and flushed before the pacing starts (so a cold producer does not
    # hold a burst of timestamped records); splitting it off the iterator must not drop or repeat it.
    values = [(f"k{i}".encode(), f"v{i}".encode()) for i in range(40)]
    tally = produce_values(broker.bootstrap, topics["topic"], iter(values), rate=400.0)
    assert tally.delivered == 40 and not tally.errors
    got = read_all(broker.bootstrap, topics["topic"], 40)
    assert sorted(m.value() for m in got) == sorted(v for _, v in values)
    stamps = {m.value(): m.timestamp()[1] for m in got}
    # Flushed before any other record was produced, so no other record can carry an earlier timestamp.
    assert stamps[b"v0"] <= min(t for v, t in stamps.items() if v != b"v0")
