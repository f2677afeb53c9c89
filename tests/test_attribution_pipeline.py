"""Attribution models and consent end to end: what the sandbox holds after the service read the events from Kafka."""

from __future__ import annotations

import time
from collections.abc import Callable
from decimal import Decimal

from consumer.config import Config, parse
from consumer.embedded import EmbeddedBroker
from consumer.metrics import Metrics
from consumer.model import Channel, Exposure, Provider, Purchase
from consumer.producer import encoded, produce_values
from consumer.providers.conductrics import SAMPLE_PROJECT as CONDUCTRICS_PROJECT
from consumer.providers.convert import SAMPLE_PROJECT as CONVERT_PROJECT
from consumer.providers.kameleoon import SAMPLE_SITE as KAMELEOON_SITE
from consumer.sandbox import Sandbox
from tests.conftest import config_dict, run_until_done

K, C, D = Provider.KAMELEOON, Provider.CONVERT, Provider.CONDUCTRICS
PROJECT = {K: KAMELEOON_SITE, C: CONVERT_PROJECT, D: CONDUCTRICS_PROJECT}


def _purchase(order: str, now: int, exposures: list[tuple[Provider, str, str, int]],
              consent: dict[Provider, bool] | None = None) -> Purchase:
    return Purchase(f"evt-{order}", order, now - 60_000, Channel.STORE, "EUR", Decimal("10.00"), 1, None,
                    tuple(Exposure(p, PROJECT[p], "100001", variation, visitor, now - ago)
                          for p, visitor, variation, ago in exposures), {}, consent or {})


async def test_split_shares_and_consent_reach_the_providers_as_decided(
    broker: EmbeddedBroker, topics: dict[str, str], sandbox: Sandbox, make_config: Callable[..., Config],
) -> None:
    data = config_dict(broker.bootstrap, topics, sandbox.url)
    data["convert"]["projects"][CONVERT_PROJECT]["require_consent"] = True
    cfg = parse(data, env={})
    now = int(time.time() * 1000)
    items = [
        # Three devices in Kameleoon (all/split), two visitors in one Convert experiment (last_touch), one in
        # Conductrics; no consent stated: Convert requires it.
        _purchase("o-devices", now, [(K, "phone", "1", 3_600_000), (K, "laptop", "1", 120_000),
                                     (K, "tablet", "2", 7_200_000), (C, "c-phone", "1000001", 120_000),
                                     (C, "c-laptop", "1000002", 3_600_000), (D, "d-1", "A", 120_000)]),
        # The buyer declined Kameleoon and consented to Convert.
        _purchase("o-consent", now, [(K, "k-declined", "1", 120_000), (C, "c-old", "1000001", 7_200_000),
                                     (C, "c-new", "1000002", 120_000)], {K: False, C: True}),
    ]
    produce_values(broker.bootstrap, topics["topic"], encoded(items))
    metrics = Metrics()
    await run_until_done(cfg, len(items), metrics=metrics)

    kameleoon = sorted((r.visitor, r.revenue) for r in sandbox.records_for("kameleoon"))
    assert kameleoon == [("laptop", 3.34), ("phone", 3.33), ("tablet", 3.33)]  # 10.00 in exact cents, no declined
    convert = [(r.visitor, r.experiment_id, r.transaction_id, r.revenue) for r in sandbox.records_for("convert")]
    assert convert == [("c-new", "100001", "o-consent", 10.0)]  # last touch, and only where consented
    conductrics = [(r.visitor, r.revenue) for r in sandbox.records_for("conductrics")]
    assert conductrics == [("d-1", 10.0)]
    assert sandbox.duplicates() == {}

    def decisions(provider: str, reason: str) -> float | None:
        return metrics.registry.get_sample_value("offline_conversions_match_decisions_total",
                                                 {"provider": provider, "reason": reason})
    assert decisions("convert", "no_consent") == 2  # o-devices: not stated, and the project requires it
    assert decisions("kameleoon", "no_consent") == 1
    assert decisions("convert", "not_credited") == 1  # c-old lost to c-new
    assert decisions("kameleoon", "matched") == 3 and decisions("convert", "matched") == 1
