"""What is safe to commit and what the broker has confirmed, per partition: the commit protocol's one owner.

An offset counts as committed only when the broker has confirmed it. Until then it is due at every
commit, so a commit the broker rejects (a stale generation during a rebalance, a coordinator that
moved) is sent again at the next one, the final commit of a revocation or a shutdown included.

The protocol, per partition; the code below carries the same numbers:

1. **Assigned** (`assign`). The partition becomes ours with nothing requested and nothing confirmed.
   Its committable offset is the offset tracker's (consumer/offsets.py, the owner of in-flight order):
   the first offset not yet done, or one past the last read when all are done.
2. **Due** (`due`). At a commit, a partition is due when its committable offset is not the one the
   broker confirmed and is not already on its way. A final commit (revocation, shutdown) sends what is
   on its way too: the answer to the earlier request may never be read.
3. **Requested** (`requested`). The offsets about to be sent are recorded as outstanding, in the order
   sent. Paranoid: an offset below one requested or confirmed before is refused (`OffsetRegressed`);
   much relies on a partition's commits never going backwards while it is ours.
4. **Answered** (`answered`). The broker's answer, partition by partition, takes the offset off the
   outstanding list:
   a. confirmed: it becomes the confirmed offset;
   b. failed (`CommitFailed`): nothing else changes, so the offset is due again at the next step 2;
   c. an answer to a request older than the one confirmed already (a synchronous commit's answer comes
      back at once, overtaking asynchronous answers still queued) changes nothing: the broker applied
      it before the newer one. An answer for an offset not outstanding (sent before the partition was
      dropped) is ignored too.
5. **Dropped** (`drop`). On revocation (after its final commit), loss or rewind the partition is
   forgotten, here and in the tracker; assigned again, it starts at step 1.

Pure: no I/O and no clock. The Kafka side (consumer/source.py) sends the commits and reports answers.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from consumer.offsets import OffsetTracker, TopicPartition

TP = TopicPartition


class CheckpointError(RuntimeError):
    """An error of the commit protocol: a commit that failed, a step out of order, an invariant broken."""


class CommitFailed(CheckpointError):
    """The broker (or the client, on its behalf) did not commit an offset; it is due again at the next commit."""

    def __init__(self, code: str, reason: str, *, retriable: bool = True) -> None:
        super().__init__(f"{code}: {reason}")
        self.code = code  # librdkafka's name of the error, e.g. ILLEGAL_GENERATION
        self.reason = reason
        self.retriable = retriable


class OffsetRegressed(CheckpointError):
    """A partition still ours would go backwards: a commit requested, or confirmed, below an earlier offset."""

    def __init__(self, regressions: Mapping[TP, tuple[int, int]]) -> None:
        listed = ", ".join(f"{t}[{p}] {old} -> {new}" for (t, p), (old, new) in sorted(regressions.items()))
        super().__init__(f"commit offsets would go backwards: {listed}")
        self.regressions = dict(regressions)  # partition -> (the offset before, the offset requested)


class NotAssigned(CheckpointError):
    """A commit was requested for a partition that is not ours."""


@dataclass(frozen=True, slots=True)
class PartitionCommits:
    """One partition's commit state, as `Checkpoint.state` reports it."""

    committable: int | None
    outstanding: tuple[int, ...]
    confirmed: int | None
    last_error: CommitFailed | None


class _Partition:
    __slots__ = ("confirmed", "confirmed_by", "last_error", "outstanding")

    def __init__(self) -> None:
        self.outstanding: list[tuple[int, int]] = []  # (offset, request number) sent and not yet answered, in order
        self.confirmed: int | None = None  # the last offset the broker confirmed while the partition is ours
        self.confirmed_by = -1  # the number of the request that confirmed it
        self.last_error: CommitFailed | None = None  # the last failure not yet made good by a confirmation

    def take(self, offset: int) -> int | None:
        """The number of the oldest outstanding request of `offset`, taken off the list (None: not outstanding)."""
        for i, (o, n) in enumerate(self.outstanding):
            if o == offset:
                del self.outstanding[i]
                return n
        return None


class Checkpoint:
    """Per partition: the committable offset (the tracker's), the offsets requested, the offset confirmed."""

    def __init__(self, tracker: OffsetTracker) -> None:
        self.tracker = tracker
        self._parts: dict[TP, _Partition] = {}
        self._requests = 0  # requests numbered in the order sent

    # ------------------------------------------------------------------ the protocol

    def assign(self, tps: Iterable[TP]) -> None:
        """Step 1: partitions newly ours. Whatever the tracker knew of them is stale: they start from their
        committed offsets."""
        tps = list(tps)
        self.tracker.forget(tps)
        for tp in tps:
            self._parts[tp] = _Partition()

    def due(self, only: Iterable[TP] | None = None, *, final: bool = False) -> dict[TP, int]:
        """Step 2: the offsets to commit now, of every partition of ours (or of `only`)."""
        out: dict[TP, int] = {}
        parts = self._parts
        for tp, offset in self.tracker.committable(parts if only is None else only).items():
            part = parts.get(tp)
            if part is None or offset == part.confirmed:
                continue
            if not final and part.outstanding and part.outstanding[-1][0] == offset:
                continue  # on its way; its answer will say whether it is due again
            out[tp] = offset
        return out

    def requested(self, offsets: Mapping[TP, int]) -> None:
        """Step 3: these offsets are being sent."""
        parts = self._parts
        missing = [tp for tp in offsets if tp not in parts]
        if missing:
            raise NotAssigned(f"commit requested for partitions not assigned: {sorted(missing)}")
        backwards: dict[TP, tuple[int, int]] = {}
        for tp, offset in offsets.items():
            part = parts[tp]
            floor = max(part.confirmed if part.confirmed is not None else -1,
                        part.outstanding[-1][0] if part.outstanding else -1)
            if offset < floor:
                backwards[tp] = (floor, offset)
        if backwards:
            raise OffsetRegressed(backwards)
        self._requests += 1
        for tp, offset in offsets.items():
            parts[tp].outstanding.append((offset, self._requests))

    def answered(self, offsets: Mapping[TP, int], failures: Mapping[TP, CommitFailed]) -> None:
        """Step 4: the broker's answer to a request: every partition of `offsets` not in `failures` is confirmed."""
        backwards: dict[TP, tuple[int, int]] = {}
        for tp, offset in offsets.items():
            part = self._parts.get(tp)
            number = part.take(offset) if part is not None else None
            if part is None or number is None or number < part.confirmed_by:
                continue  # 4c. older than what is confirmed, or sent before the partition was dropped
            failure = failures.get(tp)
            if failure is not None:
                # 4b. Due again at the next step 2, unless it asked for what is confirmed already.
                if part.confirmed is None or offset > part.confirmed:
                    part.last_error = failure
                continue
            # 4a. Requests never go backwards (step 3), so neither can what they confirm: checked all the same.
            if part.confirmed is not None and offset < part.confirmed:
                backwards[tp] = (part.confirmed, offset)
                continue
            part.confirmed, part.confirmed_by = offset, number
            part.last_error = None
        if backwards:
            raise OffsetRegressed(backwards)

    def drop(self, tps: Iterable[TP]) -> None:
        """Step 5: partitions no longer ours (revoked, lost). Answers that arrive for them later are ignored."""
        tps = list(tps)
        self.tracker.forget(tps)
        for tp in tps:
            self._parts.pop(tp, None)

    def restart(self, tps: Iterable[TP]) -> None:
        """Steps 5 then 1 for partitions whose offsets went back (a reset, a recreated topic); of those, only
        the ones that are ours stay ours."""
        tps = list(tps)
        ours = [tp for tp in tps if tp in self._parts]
        self.drop(tps)
        self.assign(ours)

    # ------------------------------------------------------------------ reading

    @property
    def failing(self) -> int:
        """Partitions whose last commit failed and has not been made good by a confirmation."""
        return sum(1 for p in self._parts.values() if p.last_error is not None)

    def partitions(self) -> list[TP]:
        return list(self._parts)

    def state(self, tp: TP) -> PartitionCommits | None:
        part = self._parts.get(tp)
        if part is None:
            return None
        committable = self.tracker.committable([tp]).get(tp)
        return PartitionCommits(committable, tuple(o for o, _ in part.outstanding), part.confirmed, part.last_error)
