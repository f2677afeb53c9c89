"""Per source partition, the ledger offset a commit's metadata must carry so that recovery misses nothing. Pure.

The invariant recovery relies on: when source offset O of partition p is committed with metadata L,
every ledger record for an event of p at offset >= O that this pipeline wrote is at ledger offset >= L.

The ledger's end offset at commit time is *not* such an L: events finish out of order, so an event at
O + 5 may be done (its records at ledger offsets below the end) while O is not, and those records would
be skipped. L is therefore the lowest ledger offset of a record acknowledged for a source offset >= O,
or, when there is none, one past the highest ledger offset acknowledged so far (a record still on its
way lands above it: one producer's records of one partition are appended in the order produced), or,
before any, the ledger end that recovery read up to at assignment.

Acknowledgements arrive in ledger-offset order per partition, so they are kept in a deque: at a commit
of O the entries of source offsets below O at its front are dropped (they can never matter again: O
only grows), and the front is then the lowest ledger offset of a source offset >= O. Entries below O
behind the front wait until they reach it; the deque holds about one entry per record of the
uncommitted window.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

METADATA_PREFIX = "ledger:v1:"


class MetadataError(ValueError):
    """Commit metadata that is not ours (written by another tool) or not a number."""


def encode_metadata(ledger_offset: int) -> str:
    return f"{METADATA_PREFIX}{ledger_offset}"


def decode_metadata(metadata: str | None) -> int | None:
    """The ledger offset in a commit's metadata; None when there is none (first start, an upgrade)."""
    if not metadata:
        return None
    if not metadata.startswith(METADATA_PREFIX):
        raise MetadataError(f"commit metadata {metadata[:40]!r} is not the ledger's")
    try:
        value = int(metadata[len(METADATA_PREFIX):])
    except ValueError:
        raise MetadataError(f"commit metadata {metadata[:40]!r} has no ledger offset") from None
    if value < 0:
        raise MetadataError(f"commit metadata {metadata[:40]!r} has a negative ledger offset")
    return value


class _Partition:
    __slots__ = ("acked", "floor")

    def __init__(self, floor: int) -> None:
        self.acked: deque[tuple[int, int]] = deque()  # (source offset, ledger offset), ledger offsets increasing
        self.floor = floor  # one past the highest ledger offset known to be below every future record


class LedgerMarks:
    """One provider pipeline's marks, per source partition (the ledger partition of the same number)."""

    def __init__(self) -> None:
        self._parts: dict[int, _Partition] = {}

    def assign(self, partition: int, ledger_end: int, recovered: Iterable[tuple[int, int]] = ()) -> None:
        """The partition is ours; recovery read its ledger partition up to `ledger_end` (exclusive).

        `recovered`: (source offset, ledger offset) of the final records recovery found, in ledger order.
        They count as acknowledged: their events are skipped when re-read, writing nothing final, so the
        next commit's metadata must still point at them or a second crash would forget them.
        """
        part = self._parts[partition] = _Partition(ledger_end)
        part.acked.extend(recovered)

    def drop(self, partition: int) -> None:
        self._parts.pop(partition, None)

    def acked(self, partition: int, source_offset: int, ledger_offset: int) -> None:
        """The broker acknowledged a record of source offset `source_offset` at `ledger_offset`."""
        part = self._parts.get(partition)
        if part is None:
            return  # revoked meanwhile: the next owner recovers from the committed metadata
        part.acked.append((source_offset, ledger_offset))
        if ledger_offset + 1 > part.floor:
            part.floor = ledger_offset + 1

    def metadata_offset(self, partition: int, committed: int) -> int | None:
        """The ledger offset to store with a commit of `committed`; None when the partition is not ours."""
        part = self._parts.get(partition)
        if part is None:
            return None
        acked = part.acked
        while acked and acked[0][0] < committed:
            acked.popleft()
        return acked[0][1] if acked else part.floor

    def metadata(self, partition: int, committed: int) -> str | None:
        offset = self.metadata_offset(partition, committed)
        return None if offset is None else encode_metadata(offset)

    def held(self, partition: int) -> int:
        """Entries kept for a partition (a test's and a gauge's view of the memory it costs)."""
        part = self._parts.get(partition)
        return len(part.acked) if part is not None else 0
