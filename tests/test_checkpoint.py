"""The commit protocol's owner (consumer/checkpoint.py) on its own: no broker, no clock, milliseconds."""

from __future__ import annotations

from collections import deque

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from consumer.checkpoint import Checkpoint, CommitFailed, NotAssigned, OffsetRegressed
from consumer.offsets import OffsetTracker

P0, P1, P2 = ("t", 0), ("t", 1), ("t", 2)
STALE = CommitFailed("ILLEGAL_GENERATION", "Broker: Specified group generation id is not valid")


def checkpoint_with(done: dict[tuple[str, int], int]) -> Checkpoint:
    """A checkpoint whose partitions are assigned and have every offset below `done[tp]` finished."""
    cp = Checkpoint(OffsetTracker())
    cp.assign(done)
    for tp, end in done.items():
        for offset in range(end):
            cp.tracker.track_done(tp, offset)
    return cp


def test_an_offset_is_committed_only_when_the_broker_confirms_it() -> None:
    cp = checkpoint_with({P0: 5, P1: 3})
    assert cp.due() == {P0: 5, P1: 3}
    cp.requested({P0: 5, P1: 3})
    assert cp.due() == {}, "on its way: not sent twice"
    state = cp.state(P0)
    assert state is not None and state.confirmed is None and state.outstanding == (5,)
    cp.answered({P0: 5, P1: 3}, {})
    assert cp.due() == {}
    state = cp.state(P0)
    assert state is not None and state.confirmed == 5 and state.outstanding == ()


def test_a_rejected_commit_is_due_again_until_confirmed() -> None:
    cp = checkpoint_with({P0: 5, P1: 3})
    cp.requested({P0: 5, P1: 3})
    cp.answered({P0: 5, P1: 3}, {P0: STALE})  # one partition rejected, the other confirmed
    assert cp.failing == 1
    state = cp.state(P0)
    assert state is not None and state.last_error is STALE and state.confirmed is None
    assert cp.due() == {P0: 5}, "nothing new was read, and the rejected offset is still due"
    assert cp.due(final=True) == {P0: 5}
    cp.requested({P0: 5})
    cp.answered({P0: 5}, {})
    assert cp.due(final=True) == {}
    assert cp.failing == 0


def test_a_failed_commit_overtaken_by_a_newer_one_is_moot() -> None:
    cp = checkpoint_with({P0: 5})
    cp.requested({P0: 5})
    cp.tracker.track_done(P0, 5)
    cp.requested(cp.due())  # 6, sent before the answer to 5 is read
    cp.answered({P0: 5}, {P0: STALE})
    cp.answered({P0: 6}, {})
    assert cp.due() == {} and cp.failing == 0


def test_the_final_commit_resends_what_is_on_its_way() -> None:
    cp = checkpoint_with({P0: 5, P1: 3})
    cp.requested({P0: 5, P1: 3})  # asynchronous, unanswered
    assert cp.due() == {}
    assert cp.due([P0], final=True) == {P0: 5}
    cp.requested({P0: 5})
    cp.answered({P0: 5}, {})  # the synchronous answer, read first
    cp.answered({P0: 5, P1: 3}, {P0: STALE, P1: STALE})  # the asynchronous one, read later
    state = cp.state(P0)
    assert state is not None and state.confirmed == 5 and state.last_error is None, \
        "a failure of what is confirmed already changes nothing"
    assert cp.due() == {P1: 3}


def test_a_synchronous_answer_overtaking_an_older_asynchronous_one() -> None:
    cp = checkpoint_with({P0: 5})
    cp.requested({P0: 5})  # asynchronous
    cp.tracker.track_done(P0, 5)
    cp.requested(cp.due(final=True))  # 6, synchronous: answered at once
    cp.answered({P0: 6}, {})
    cp.answered({P0: 5}, {})  # the older request's answer: the broker applied it before 6
    state = cp.state(P0)
    assert state is not None and state.confirmed == 6 and state.outstanding == ()
    assert cp.due(final=True) == {}


def test_dropped_partitions_are_never_committed_and_their_late_answers_ignored() -> None:
    cp = checkpoint_with({P0: 5, P1: 3})
    cp.requested({P0: 5, P1: 3})
    cp.drop([P0])
    assert cp.due(final=True) == {P1: 3}
    with pytest.raises(NotAssigned):
        cp.requested({P0: 5})
    cp.answered({P0: 5, P1: 3}, {P0: STALE})  # the answer to a request from before the drop
    assert cp.state(P0) is None and cp.failing == 0
    cp.assign([P0])  # ours again: from its committed offset, nothing known
    state = cp.state(P0)
    assert state is not None and state.committable is None and state.confirmed is None


def test_commits_never_go_backwards() -> None:
    cp = checkpoint_with({P0: 5})
    cp.requested({P0: 5})
    cp.answered({P0: 5}, {})
    with pytest.raises(OffsetRegressed) as raised:
        cp.requested({P0: 4})
    assert raised.value.regressions == {P0: (5, 4)}
    state = cp.state(P0)
    assert state is not None and state.outstanding == () and state.confirmed == 5, "refused: nothing recorded"


def test_restart_keeps_only_partitions_that_are_ours() -> None:
    cp = checkpoint_with({P0: 5})
    cp.requested({P0: 5})
    cp.answered({P0: 5}, {})
    cp.tracker.track(P2, 0)  # read, but not ours (lost a moment ago)
    cp.restart([P0, P2])
    assert cp.partitions() == [P0]
    state = cp.state(P0)
    assert state is not None and state.confirmed is None, "a rewound partition starts afresh"
    cp.tracker.track_done(P0, 0)
    cp.requested(cp.due())  # 1: below what was confirmed before the rewind, and allowed
    assert cp.state(P0) is not None


class Broker:
    """A broker's view of one group's commits: applied in the order sent, answered in that order.

    Asynchronous answers wait in a queue until the member reads them (its poll); a synchronous answer is read
    at once, so it overtakes any still queued, as in librdkafka.
    """

    def __init__(self) -> None:
        self.committed: dict[tuple[str, int], int] = {}
        self.queue: deque[tuple[dict[tuple[str, int], int], dict[tuple[str, int], CommitFailed]]] = deque()

    def apply(self, offsets: dict[tuple[str, int], int], rejected: set[tuple[str, int]]) -> dict[
            tuple[str, int], CommitFailed]:
        failures = {tp: STALE for tp in offsets if tp in rejected}
        for tp, offset in offsets.items():
            if tp not in failures:
                self.committed[tp] = offset
        return failures


PARTS = st.sampled_from([P0, P1, P2])


class CommitProtocol(RuleBasedStateMachine):
    """Interleavings of reads, finishes, commits (asynchronous and final), answers (confirmed or rejected),
    revocations, losses and assignments against a model broker."""

    @initialize()
    def start(self) -> None:
        self.cp = Checkpoint(OffsetTracker())
        self.broker = Broker()
        self.owned: set[tuple[str, int]] = set()
        self.next_read: dict[tuple[str, int], int] = {}
        self.in_flight: dict[tuple[str, int], list[int]] = {}
        for tp in (P0, P1):
            self._assign(tp)

    def _assign(self, tp: tuple[str, int]) -> None:
        self.cp.assign([tp])
        self.owned.add(tp)
        self.next_read[tp] = self.broker.committed.get(tp, 0)  # a new owner starts from the committed offset
        self.in_flight[tp] = []

    def _first_not_done(self, tp: tuple[str, int]) -> int:
        flight = self.in_flight[tp]
        return min(flight) if flight else self.next_read[tp]

    def _send(self, offsets: dict[tuple[str, int], int], rejected: set[tuple[str, int]], *, sync: bool) -> None:
        assert set(offsets) <= self.owned, "a partition not ours is never committed"
        for tp, offset in offsets.items():
            assert offset <= self._first_not_done(tp), "nothing is committed that is not done"
        self.cp.requested(offsets)
        failures = self.broker.apply(offsets, rejected)
        if sync:
            self.cp.answered(offsets, failures)
        else:
            self.broker.queue.append((offsets, failures))

    @precondition(lambda self: self.owned)
    @rule(data=st.data(), done=st.booleans())
    def read(self, data: st.DataObject, done: bool) -> None:
        tp = data.draw(st.sampled_from(sorted(self.owned)))
        offset = self.next_read[tp]
        self.next_read[tp] += 1
        if done:
            self.cp.tracker.track_done(tp, offset)
        else:
            self.cp.tracker.track(tp, offset)
            self.in_flight[tp].append(offset)

    @precondition(lambda self: any(self.in_flight.get(tp) for tp in self.owned))
    @rule(data=st.data())
    def finish(self, data: st.DataObject) -> None:
        tp = data.draw(st.sampled_from(sorted(tp for tp in self.owned if self.in_flight[tp])))
        offset = data.draw(st.sampled_from(self.in_flight[tp]))
        self.in_flight[tp].remove(offset)
        self.cp.tracker.finish(tp, offset)

    @rule(rejected=st.sets(PARTS))
    def tick(self, rejected: set[tuple[str, int]]) -> None:
        offsets = self.cp.due()
        if offsets:
            self._send(offsets, rejected, sync=False)

    @precondition(lambda self: self.broker.queue)
    @rule()
    def read_answer(self) -> None:
        offsets, failures = self.broker.queue.popleft()
        self.cp.answered(offsets, failures)

    @precondition(lambda self: self.owned)
    @rule(data=st.data(), rejected=st.sets(PARTS))
    def revoke(self, data: st.DataObject, rejected: set[tuple[str, int]]) -> None:
        tp = data.draw(st.sampled_from(sorted(self.owned)))
        offsets = self.cp.due([tp], final=True)
        if offsets:
            self._send(offsets, rejected, sync=True)
        self.cp.drop([tp])
        self.owned.discard(tp)

    @precondition(lambda self: self.owned)
    @rule(data=st.data())
    def lose(self, data: st.DataObject) -> None:
        tp = data.draw(st.sampled_from(sorted(self.owned)))
        self.cp.drop([tp])
        self.owned.discard(tp)

    @rule(tp=PARTS)
    def assign(self, tp: tuple[str, int]) -> None:
        if tp not in self.owned:
            self._assign(tp)

    @invariant()
    def never_believes_more_than_the_broker_has(self) -> None:
        for tp in self.owned:
            state = self.cp.state(tp)
            assert state is not None
            if state.confirmed is not None:
                assert state.confirmed <= self.broker.committed[tp]
        assert set(self.cp.partitions()) == self.owned

    @invariant()
    def a_rejected_offset_is_never_forgotten(self) -> None:
        for tp in self.owned:
            state = self.cp.state(tp)
            assert state is not None
            if state.committable is not None and state.committable != state.confirmed:
                assert tp in self.cp.due(final=True)

    def teardown(self) -> None:
        """Everything finishes and the broker accepts again: every partition's commit reaches what is done."""
        if not hasattr(self, "cp"):
            return
        for tp in self.owned:
            for offset in list(self.in_flight[tp]):
                self.cp.tracker.finish(tp, offset)
            self.in_flight[tp].clear()
        for _ in range(3):
            while self.broker.queue:
                self.read_answer()
            self.tick(set())
        while self.broker.queue:
            self.read_answer()
        for tp in self.owned:
            state = self.cp.state(tp)
            assert state is not None
            if state.committable is not None:
                assert self.broker.committed[tp] == state.committable == state.confirmed
        assert self.cp.due(final=True) == {} and self.cp.failing == 0


TestCommitProtocol = CommitProtocol.TestCase
TestCommitProtocol.settings = settings(max_examples=150, stateful_step_count=30, deadline=None)
