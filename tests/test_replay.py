"""DLQ replay: re-sends to the provider that failed only, keeps the keys, resumes in its own group."""

from __future__ import annotations

import io
import time
from collections.abc import Callable

from consumer.config import Config
from consumer.embedded import EmbeddedBroker
from consumer.producer import encoded, produce_values
from consumer.replay import ReplayFilter, replay
from consumer.samples import malformed, purchases
from consumer.sandbox import Sandbox
from tests.conftest import run_until_done
from tests.test_pipeline import expected_conversions, sandbox_view, view_of

N = 300


async def test_replay_resends_only_what_failed_and_resumes(
    broker: EmbeddedBroker, topics: dict[str, str], sandbox: Sandbox, make_config: Callable[..., Config],
) -> None:
    cfg = make_config(sandbox.url)
    items = list(purchases(N, now_ms=int(time.time() * 1000), seed=12))
    expected = expected_conversions(cfg, items)
    bad = {c.visitor_id for _, c in expected["convert"][::5]}
    sandbox.reject("convert", visitors=bad)
    produce_values(broker.bootstrap, topics["topic"], list(encoded(items)) + [(b"x", v) for v in malformed(4)])
    await run_until_done(cfg, N + 4)
    before = sandbox_view(sandbox)
    failed = [c for _, c in expected["convert"] if c.visitor_id in bad]
    assert failed and before["convert"] == view_of([c for _, c in expected["convert"] if c.visitor_id not in bad],
                                                   "convert")
    sandbox.clear_faults()  # the provider is fixed; now re-drive what it refused

    out = io.StringIO()
    dry = await replay(cfg, ReplayFilter(providers=frozenset({"convert"})), dry_run=True,
                       group_id=f"{topics['group']}.dry", idle_timeout=2, out=out)
    assert sandbox_view(sandbox) == before
    assert dry.outcomes["convert would send"] == len(failed)
    assert dry.skipped == 4  # the undecodable letters are another stage's
    assert all(c.key in out.getvalue() for c in failed)

    group = f"{topics['group']}.replay"
    stats = await replay(cfg, ReplayFilter(providers=frozenset({"convert"})), dry_run=False, group_id=group,
                         idle_timeout=2, out=io.StringIO())
    assert stats.outcomes["convert delivered"] == len(failed)
    after = sandbox_view(sandbox)
    assert after["convert"] == view_of([c for _, c in expected["convert"]], "convert")
    assert after["kameleoon"] == before["kameleoon"] and after["conductrics"] == before["conductrics"]
    assert sandbox.duplicates() == {}
    # The transaction ids of the replayed calls are the orders', exactly as a first attempt would send them.
    replayed = {r.transaction_id for r in sandbox.records_for("convert") if r.visitor in bad}
    assert replayed == {c.order_id for c in failed if c.revenue is not None and c.transaction_goals}

    again = await replay(cfg, ReplayFilter(providers=frozenset({"convert"})), dry_run=False, group_id=group,
                         idle_timeout=2, out=io.StringIO())
    assert again.read == 0  # its own group remembers where it stopped
