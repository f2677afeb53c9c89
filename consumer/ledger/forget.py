"""Forgetting a person: tombstones for every ledger record of a customer id or a visitor id."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from confluent_kafka import Producer

from consumer.ledger.record import LedgerRecord, customer_hash
from consumer.logs import KafkaLog


class ForgetError(RuntimeError):
    """A tombstone was not acknowledged: the person is not forgotten yet (run it again)."""


def matching(records: Iterable[tuple[str, LedgerRecord | None]], *, customer_id: str | None = None,
             visitor_id: str | None = None) -> dict[str, int]:
    """Key -> ledger partition of the records still standing that name the person. Pure."""
    wanted = customer_hash(customer_id) if customer_id else None
    out: dict[str, int] = {}
    for key, rec in records:
        if rec is None:
            out.pop(key, None)
        elif ((wanted is not None and rec.customer_hash == wanted)
              or (visitor_id is not None and rec.visitor_id == visitor_id)
              or (customer_id is not None and rec.identity == "mapping" and rec.visitor_id == customer_id)):
            out[key] = rec.source_partition
    return out


def tombstones(settings: dict[str, Any], topic: str, keys: dict[str, int], timeout: float = 30.0) -> int:
    """Write a tombstone per key to its partition (idempotent, acks=all); how many were acknowledged."""
    p = Producer({**settings, "enable.idempotence": True, "acks": "all", "logger": KafkaLog()})
    failed: list[str] = []

    def report(err: object, _msg: object) -> None:
        if err is not None:
            failed.append(str(err))

    for key, partition in keys.items():
        p.produce(topic, key=key.encode(), value=None, partition=partition, on_delivery=report)
    left = p.flush(timeout)
    if left or failed:
        raise ForgetError(f"{left + len(failed)} of {len(keys)} tombstones not acknowledged: "
                          f"{failed[0] if failed else 'timed out'}")
    return len(keys)
