"""Which offsets are safe to commit: the contiguous prefix of finished events, per partition.

Events finish out of order (a Kameleoon batch may return before a Convert call of an earlier
event), so a partition's committable offset is the first offset that is still unfinished, or one
past the last offset read when none is. Mirrors quix-streams' checkpoint: one object owns "what is
safe to commit", and it refuses to move an offset backwards.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

TopicPartition = tuple[str, int]


class OffsetOrderError(RuntimeError):
    """An offset arrived that is not above every offset already tracked for its partition."""


class _Partition:
    __slots__ = ("done", "last_read", "order", "position")

    def __init__(self) -> None:
        self.order: deque[int] = deque()  # offsets read and not yet retired, in read order
        self.done: set[int] = set()  # finished offsets still behind an unfinished one
        self.last_read = -1
        self.position: int | None = None  # the committable offset (next offset to read after a restart)


class OffsetTracker:
    """Tracks in-flight offsets per partition; `finish` returns the new committable offset, if it moved."""

    def __init__(self) -> None:
        self._parts: dict[TopicPartition, _Partition] = {}
        self._in_flight = 0

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def _read(self, tp: TopicPartition, offset: int) -> _Partition:
        """The partition of an offset just read, which must be above every offset read before."""
        part = self._parts.get(tp)
        if part is None:
            part = self._parts[tp] = _Partition()
        if offset <= part.last_read:
            raise OffsetOrderError(f"{tp[0]}[{tp[1]}] offset {offset} read after {part.last_read}")
        part.last_read = offset
        return part

    def track(self, tp: TopicPartition, offset: int) -> None:
        self._read(tp, offset).order.append(offset)
        self._in_flight += 1

    def track_done(self, tp: TopicPartition, offset: int) -> None:
        """`track` then `finish` at once: an event with nothing to deliver is done as it is read."""
        part = self._read(tp, offset)
        if part.order:
            part.order.append(offset)  # behind an unfinished event: retired with it
            part.done.add(offset)
        else:
            if part.position is not None and offset + 1 <= part.position:
                raise OffsetOrderError(f"{tp[0]}[{tp[1]}] committable offset would move from {part.position} "
                                       f"to {offset + 1}")
            part.position = offset + 1

    def finish(self, tp: TopicPartition, offset: int) -> int | None:
        """Mark one offset finished. A partition revoked meanwhile is ignored (its new owner re-reads)."""
        part = self._parts.get(tp)
        if part is None:
            return None
        order, done = part.order, part.done
        if order and order[0] == offset:
            # The oldest unfinished event (the common case: results mostly come back in order).
            order.popleft()
            self._in_flight -= 1
            while done and order and order[0] in done:
                done.discard(order.popleft())
        else:
            if offset > part.last_read or offset in done or not order or offset < order[0]:
                return None  # unknown, or already retired: finishing twice must not double count
            done.add(offset)
            self._in_flight -= 1
            return None  # behind an unfinished event: the committable offset does not move
        new = part.order[0] if part.order else part.last_read + 1
        if part.position is not None and new <= part.position:
            raise OffsetOrderError(f"{tp[0]}[{tp[1]}] committable offset would move from {part.position} to {new}")
        part.position = new
        return new

    def committable(self, tps: Iterable[TopicPartition] | None = None) -> dict[TopicPartition, int]:
        """The committable offset of every partition (or the given ones) that has one."""
        keys = self._parts.keys() if tps is None else [tp for tp in tps if tp in self._parts]
        return {tp: p.position for tp in keys if (p := self._parts[tp]).position is not None}

    def pending(self, tp: TopicPartition) -> int:
        part = self._parts.get(tp)
        return len(part.order) - len(part.done) if part else 0

    def forget(self, tps: Iterable[TopicPartition]) -> None:
        """Drop revoked partitions: their unfinished events no longer count, their offsets are not ours."""
        for tp in tps:
            part = self._parts.pop(tp, None)
            if part is not None:
                self._in_flight -= len(part.order) - len(part.done)

    def partitions(self) -> list[TopicPartition]:
        return list(self._parts)
