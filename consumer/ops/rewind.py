"""`offline-conversions rewind`: move one provider's consumer group back (or forward) to a point in time.

What it does, in order (`rewind`):
  1. the group is `<kafka.group_id>.<provider>`; it is described, and while it has members the rewind
     is refused (Kafka itself refuses to alter the offsets of a group with members);
  2. per partition of `[kafka] topic`: the group's committed offset, and the first offset whose
     timestamp is at or after TIME (ListOffsets by timestamp; no such message: the end of the log,
     as `kafka-consumer-groups.sh --reset-offsets --to-datetime` does);
  3. the before/after table is printed; `--dry-run` stops here;
  4. the new offsets are committed for the group (AlterConsumerGroupOffsets) and read back.
The service then re-reads that provider's events from TIME and sends them again to that provider
only: Kameleoon de-duplicates by nonce, Convert and Conductrics count what they receive again.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TextIO

from confluent_kafka import Consumer, ConsumerGroupTopicPartitions, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient, OffsetSpec  # type: ignore[attr-defined]

from consumer import groups
from consumer.config import Config, ConfigError, parse_duration
from consumer.logs import KafkaLog
from consumer.model import Provider

EXIT_REFUSED = 1
EXIT_USAGE = 2


class RewindError(RuntimeError):
    """The rewind could not be done; nothing was changed unless the message says so."""


class GroupActive(RewindError):
    """The group has members: its offsets cannot be moved under them."""

    def __init__(self, group: str, members: Sequence[str]) -> None:
        super().__init__(f"group {group!r} has {len(members)} active member(s) ({', '.join(members)}): stop the "
                         "service (scale it to 0) first, or wait until they have left the group")
        self.group = group
        self.members = tuple(members)


class RewindRefused(RewindError):
    """The broker refused to commit the new offsets (per partition)."""


# --------------------------------------------------------------------------- the plan (pure)


_ISO_HINT = "ISO-8601 with an offset (2026-12-01T09:00:00Z), epoch milliseconds, or a duration ago (-2h, -30m, -7d)"


def parse_time(text: str, now_ms: int) -> int:
    """Epoch milliseconds of `--to`: ISO-8601 with an offset, epoch ms, or `-<duration>` before `now_ms`.

    A time in the future is refused: it would move the group past events not yet read, skipping them.
    """
    s = text.strip()
    if re.fullmatch(r"\d+", s):
        ms = int(s)
    elif s.startswith("-"):
        try:
            ago = parse_duration(s[1:], "--to")
        except ConfigError:
            raise ValueError(f"--to {text!r}: expected {_ISO_HINT}") from None
        ms = now_ms - round(ago * 1000)
    else:
        try:
            when = datetime.fromisoformat(s)
        except ValueError:
            raise ValueError(f"--to {text!r}: expected {_ISO_HINT}") from None
        if when.tzinfo is None:
            raise ValueError(f"--to {text!r} has no UTC offset: add one (Z, +01:00), a local time is ambiguous")
        ms = round(when.timestamp() * 1000)
    if ms > now_ms:
        raise ValueError(f"--to {text!r} is in the future: the group would skip every event until then")
    if ms < 0:
        raise ValueError(f"--to {text!r} is before 1970")
    return ms


def group_for(group_id: str, provider: Provider) -> str:
    """The provider's own consumer group, as the service names it (consumer/groups.py, isolation "provider")."""
    return f"{group_id}.{provider.slug}"


def provider_named(name: str) -> Provider:
    for p in Provider:
        if name.strip().lower() == p.slug:
            return p
    raise ValueError(f"--provider {name!r}: expected one of {', '.join(p.slug for p in Provider)}")


@dataclass(frozen=True, slots=True)
class Move:
    """One partition's move: from the committed offset (None: none committed) to `after`."""

    partition: int
    before: int | None
    after: int
    found: bool  # a message at or after the time exists; False: `after` is the end of the log


def plan(before: Mapping[int, int | None], at_time: Mapping[int, int], ends: Mapping[int, int]) -> list[Move]:
    """The moves for every partition: the first offset at or after the time, or the log end when there is none."""
    return [Move(p, before.get(p), at_time[p] if at_time[p] >= 0 else ends[p], at_time[p] >= 0)
            for p in sorted(ends)]


def iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def render(moves: Sequence[Move], group: str, topic: str, to_ms: int) -> str:
    lines = [f"group {group} on {topic}, to {iso(to_ms)} ({to_ms})",
             f"{'PARTITION':>9}  {'COMMITTED':>12}  {'NEW-OFFSET':>12}  {'CHANGE':>10}"]
    for m in moves:
        before = "-" if m.before is None else str(m.before)
        change = "-" if m.before is None else f"{m.after - m.before:+d}"
        note = "" if m.found else "  (no message at or after the time: the end of the log)"
        lines.append(f"{m.partition:>9}  {before:>12}  {m.after:>12}  {change:>10}{note}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- the broker (I/O)


def admin_config(cfg: Config) -> dict[str, Any]:
    conf: dict[str, Any] = {**cfg.kafka.common, "bootstrap.servers": cfg.kafka.bootstrap_servers,
                            "logger": KafkaLog()}
    for key, value in cfg.kafka.consumer.items():  # the consumer's own credentials, where they differ
        if key.startswith(("sasl.", "ssl.")) or key == "security.protocol":
            conf[key] = value
    return conf


def _result(future: Any, timeout: float, what: str) -> Any:
    try:
        return future.result(timeout)
    except KafkaException as exc:
        raise RewindError(f"{what}: {exc.args[0].str() if exc.args else exc}") from None
    except Exception as exc:
        raise RewindError(f"{what}: {exc}") from None


def members(admin: AdminClient, group: str, timeout: float) -> list[str]:
    """The group's members as `client-id@host` (empty for a group that is empty or does not exist)."""
    described = _result(admin.describe_consumer_groups([group], request_timeout=timeout)[group], timeout * 2,
                        f"cannot describe group {group!r}")
    return [f"{m.client_id}@{m.host.lstrip('/')}" for m in described.members or ()]


def committed(cfg: Config, group: str, partitions: Sequence[int], timeout: float) -> dict[int, int | None]:
    """The group's committed offsets (None: none), read by a consumer that never joins it, as the service's
    group seeding does: librdkafka 2.x can crash on an AdminClient's OffsetFetch answered with a retriable
    error (consumer/groups.py)."""
    client = Consumer({**admin_config(cfg), "group.id": group, "enable.auto.commit": False})
    try:
        found = groups.committed(client, cfg.kafka.topic, list(partitions), timeout)
    except groups.SeedError as exc:
        raise RewindError(f"cannot read group {group!r}'s committed offsets: {exc}") from None
    finally:
        client.close()
    return {p: found.get(p) for p in partitions}


def _offsets(admin: AdminClient, topic: str, partitions: Sequence[int], spec: Any, timeout: float) -> dict[int, int]:
    futures = admin.list_offsets({TopicPartition(topic, p): spec for p in partitions}, request_timeout=timeout)
    return {tp.partition: _result(f, timeout * 2, f"cannot list offsets of {topic}[{tp.partition}]").offset
            for tp, f in futures.items()}


@dataclass(frozen=True)
class RewindResult:
    group: str
    moves: tuple[Move, ...]
    applied: bool
    after: dict[int, int | None]  # the committed offsets read back (the before offsets on a dry run)


def rewind(cfg: Config, provider: Provider, to_ms: int, *, dry_run: bool, force: bool = False,
           out: TextIO | None = None, timeout: float = 15.0) -> RewindResult:
    """Steps 1-4 of the module's docstring; RewindError (GroupActive, RewindRefused) says why it stopped."""
    stream = out or sys.stdout
    if cfg.kafka.isolation != "provider":
        raise RewindError(f"[kafka] isolation is {cfg.kafka.isolation!r}: every provider reads in group "
                          f"{cfg.kafka.group_id!r}, so moving it re-sends to all of them; with isolation "
                          "'provider' each has a group of its own (or move the shared group with "
                          "kafka-consumer-groups.sh --reset-offsets, docs/operations.md)")
    group, topic = groups.group_of(cfg.kafka, provider.slug), cfg.kafka.topic
    admin = AdminClient(admin_config(cfg))
    # 1
    try:
        active = members(admin, group, timeout)
    except RewindError as exc:
        if not force:
            raise
        print(f"warning: --force: {exc}; going on without knowing the group's members", file=stream)
        active = []
    if active and not force:
        raise GroupActive(group, active)
    if active:
        print(f"warning: --force: group {group!r} has {len(active)} member(s) ({', '.join(active)}); Kafka refuses "
              "to alter the offsets of a group with members, so the broker is expected to refuse this", file=stream)
    # 2
    try:
        md = admin.list_topics(topic, timeout=timeout).topics.get(topic)
    except KafkaException as exc:
        raise RewindError(f"cannot read topic {topic!r}'s metadata: {exc}") from None
    if md is None or md.error is not None or not md.partitions:
        raise RewindError(f"topic {topic!r} ([kafka] topic) cannot be read: "
                          f"{md.error.str() if md is not None and md.error is not None else 'it has no partitions'}")
    partitions = sorted(md.partitions)
    before = committed(cfg, group, partitions, timeout)
    moves = plan(before, _offsets(admin, topic, partitions, OffsetSpec.for_timestamp(to_ms), timeout),
                 _offsets(admin, topic, partitions, OffsetSpec.latest(), timeout))  # type: ignore[no-untyped-call]
    # 3
    print(render(moves, group, topic, to_ms), file=stream)
    if dry_run:
        print("dry run: nothing changed", file=stream)
        return RewindResult(group, tuple(moves), False, dict(before))
    # 4
    request = [ConsumerGroupTopicPartitions(group, [TopicPartition(topic, m.partition, m.after) for m in moves])]
    answer = _result(admin.alter_consumer_group_offsets(request, request_timeout=timeout)[group], timeout * 2,
                     f"the broker refused to move group {group!r}")
    refused = {tp.partition: tp.error for tp in answer.topic_partitions if tp.error is not None}
    if refused:
        why = ", ".join(f"partition {p}: {e.name()} ({e.str()})" for p, e in sorted(refused.items()))
        hint = ("; the group has members: Kafka alters only an empty group's offsets, stop the service first"
                if any(e.name() == "UNKNOWN_MEMBER_ID" for e in refused.values()) else "")
        moved = sorted({m.partition for m in moves} - set(refused))
        changed = "nothing changed" if not moved else f"partitions {moved} did move"
        raise RewindRefused(f"the broker refused to move group {group!r}, {changed}: {why}{hint}")
    after = committed(cfg, group, partitions, timeout)
    wrong = {m.partition: after.get(m.partition) for m in moves if after.get(m.partition) != m.after}
    if wrong:
        raise RewindRefused(f"group {group!r}'s offsets read back differ from the ones committed: {wrong}")
    print(f"done: group {group} now starts at the offsets above", file=stream)
    return RewindResult(group, tuple(moves), True, after)


def run_rewind(args: argparse.Namespace, cfg: Config, now_ms: int | None = None) -> int:
    """The CLI: 0 done (or a dry run), 1 refused or failed (nothing changed), 2 bad arguments."""
    try:
        provider = provider_named(args.provider)
        to_ms = parse_time(args.to, int(time.time() * 1000) if now_ms is None else now_ms)
    except ValueError as exc:
        print(f"offline-conversions: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        rewind(cfg, provider, to_ms, dry_run=args.dry_run, force=args.force)
    except RewindError as exc:
        print(f"offline-conversions: rewind refused: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    return 0
