"""Realistic sample purchases (demo, tests, benchmarks, the `produce` command); seeded, so reproducible."""

from __future__ import annotations

import random
import uuid
from collections.abc import Iterator
from decimal import Decimal

from consumer.model import Channel, Exposure, Provider, Purchase
from consumer.providers import registry

# Each built-in provider's example project (its package's `Sample`: for the seeds, their own examples).
PROJECTS: dict[Provider, str] = {spec.provider: spec.sample.project for spec in registry.specs() if spec.sample}
SAMPLED = tuple(PROJECTS)  # the providers the sample purchases have exposures of, in registry order
HOUR_MS = 3_600_000


def purchases(count: int, *, now_ms: int, seed: int = 7, providers: tuple[Provider, ...] = SAMPLED,
              max_exposures: int = 4, stale_share: float = 0.05) -> Iterator[Purchase]:
    """Purchases with 1 to `max_exposures` exposures each; about `stale_share` of exposures are outside every window."""
    rng = random.Random(seed)
    channels = [Channel.STORE, Channel.STORE, Channel.PHONE, Channel.APP, Channel.OTHER]
    for i in range(count):
        occurred = now_ms - rng.randrange(0, 2 * HOUR_MS)
        exposures = []
        for _ in range(rng.randint(1, max_exposures)):
            provider = rng.choice(providers)
            age = rng.randrange(40 * 24 * HOUR_MS, 60 * 24 * HOUR_MS) if rng.random() < stale_share \
                else rng.randrange(60_000, 48 * HOUR_MS)
            exposures.append(Exposure(
                provider=provider,
                project=PROJECTS[provider],
                experiment_id=str(rng.randint(100_000, 100_020)),
                variation_id=str(rng.randint(1_000_000, 1_000_003)),
                visitor_id=f"v{rng.getrandbits(40):010x}",
                exposed_at=occurred - age,
            ))
        yield Purchase(
            event_id=str(uuid.UUID(int=rng.getrandbits(128), version=4)),
            order_id=f"ORD-{seed}-{i:08d}",
            occurred_at=occurred,
            channel=rng.choice(channels),
            currency="EUR",
            revenue=Decimal(rng.randint(100, 50_000)) / 100,
            item_count=rng.randint(1, 6),
            customer_id=f"cust-{rng.getrandbits(32):08x}" if rng.random() < 0.7 else None,
            exposures=tuple(exposures),
            attributes={"store_id": str(rng.randint(1, 40))},
        )


def malformed(count: int, seed: int = 11) -> Iterator[bytes]:
    """Bytes that are not a valid event: garbage, truncated, empty."""
    rng = random.Random(seed)
    for i in range(count):
        kind = i % 3
        if kind == 0:
            yield bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 40)))
        elif kind == 1:
            yield b"\x02\x48" + b"x" * rng.randint(0, 5)  # a string claiming 36 bytes, cut short
        else:
            yield b"\xff\xff\xff\xff\x0f"  # a varint far beyond any real length
