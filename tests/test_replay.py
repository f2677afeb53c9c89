"""DLQ replay: re-sends to the provider that failed only, keeps the keys, resumes in its own group."""

from __future__ import annotations

import io
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from confluent_kafka import Message

from consumer.cli import main
from consumer.config import Config
from consumer.dlq import parse_headers
from consumer.embedded import EmbeddedBroker
from consumer.producer import encoded, produce_values
from consumer.replay import ReplayFilter, ReplayFilterError, replay
from consumer.samples import malformed, purchases
from consumer.sandbox import Sandbox
from tests.conftest import config_dict, read_all, run_until_done, to_toml
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


# --------------------------------------------------------------------------- edges (issue 14, item 10)


def test_an_unknown_stage_or_provider_is_refused_naming_the_valid_values(
    broker: EmbeddedBroker, topics: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    path = tmp_path / "replay.toml"
    # A real DLQ (empty): a replay that did not check its filter would read it and exit 0, "0 selected".
    path.write_text(to_toml(config_dict(broker.bootstrap, topics, "http://127.0.0.1:9")))
    started = time.monotonic()
    assert main(["dlq", "replay", "--config", str(path), "--stage", "dispach"]) == 2
    err = capsys.readouterr().err
    assert "unknown --stage 'dispach'" in err and "decode, match, dispatch" in err
    assert main(["dlq", "replay", "--config", str(path), "--provider", "optimizely", "--provider", "Convert"]) == 2
    err = capsys.readouterr().err
    assert "unknown --provider 'optimizely'" in err and "kameleoon, convert, conductrics" in err
    assert "'convert'" not in err  # a valid value (any case) is not reported
    assert time.monotonic() - started < 5
    with pytest.raises(ReplayFilterError, match="valid: decode, match, dispatch"):
        ReplayFilter(stages=frozenset({"Dispatch"}))


def dlq_letters(bootstrap: str, topic: str, expected: int) -> list[Message]:
    return read_all(bootstrap, topic, expected)


async def test_a_letter_that_fails_again_is_requeued_and_the_next_replay_finds_it(
    broker: EmbeddedBroker, topics: dict[str, str], sandbox: Sandbox, make_config: Callable[..., Config],
) -> None:
    cfg = make_config(sandbox.url)
    items = list(purchases(80, now_ms=int(time.time() * 1000), seed=31))
    expected = expected_conversions(cfg, items)
    bad = {c.visitor_id for _, c in expected["convert"][::6]}
    failed = [c for _, c in expected["convert"] if c.visitor_id in bad]
    sandbox.reject("convert", visitors=bad)
    garbage = list(malformed(2, seed=31))
    produce_values(broker.bootstrap, topics["topic"], list(encoded(items)) + [(b"bad", v) for v in garbage])
    await run_until_done(cfg, len(items) + len(garbage))
    letters = dlq_letters(broker.bootstrap, topics["dlq"], len({c.event_id for c in failed}) + len(garbage))
    n_dispatch = len({c.event_id for c in failed})
    assert len(letters) == n_dispatch + len(garbage)

    # 1. The provider still refuses: every letter fails again and goes back to the DLQ, none is lost.
    group = f"{topics['group']}.replay"
    out = io.StringIO()
    first = await replay(cfg, ReplayFilter(), dry_run=False, group_id=group, idle_timeout=2, out=out)
    assert first.read == len(letters) and first.outcomes["convert failed"] == len(failed)
    assert first.requeued == len(letters) and not first.complete
    text = out.getvalue()
    for m in letters:  # each message names the letter's partition and offset, and the original's
        h = parse_headers(m.headers())
        assert (f"letter {topics['dlq']}[{m.partition()}] offset {m.offset()} (original {topics['topic']}"
                f"[{h['original.partition']}] offset {h['original.offset']})") in text
    everything = dlq_letters(broker.bootstrap, topics["dlq"], 2 * len(letters))
    requeued = [m for m in everything if "requeued.from" in parse_headers(m.headers())]
    assert len(everything) == 2 * len(letters) and len(requeued) == len(letters)
    originals = {f"{m.topic()}[{m.partition()}]@{m.offset()}": m for m in letters}
    for m in requeued:
        h = parse_headers(m.headers())
        source = originals[h["requeued.from"]]
        was = parse_headers(source.headers())
        assert h["replay.attempts"] == "1" and h["stage"] == was["stage"]
        assert (m.key(), m.value()) == (source.key(), source.value())  # the original event, untouched
        assert (h["original.partition"], h["original.offset"]) == (was["original.partition"], was["original.offset"])
        if h["stage"] == "dispatch":
            assert h["conversion.keys"] == was["conversion.keys"] and h["http.status"] == "400"

    # 2. The provider is fixed: the next replay (same group) finds exactly the re-queued letters and
    #    delivers them; the garbage is still undecodable and goes back again, attempt 2.
    sandbox.clear_faults()
    second = await replay(cfg, ReplayFilter(), dry_run=False, group_id=group, idle_timeout=2, out=io.StringIO())
    assert second.read == len(letters) and second.outcomes["convert delivered"] == len(failed)
    assert second.undecodable == len(garbage) and second.requeued == len(garbage)
    assert sandbox_view(sandbox)["convert"] == view_of([c for _, c in expected["convert"]], "convert")
    everything = dlq_letters(broker.bootstrap, topics["dlq"], 2 * len(letters) + len(garbage))
    attempts = sorted(parse_headers(m.headers()).get("replay.attempts", "0") for m in everything)
    assert attempts.count("2") == len(garbage)

    # 3. And the one after that sees only those.
    third = await replay(cfg, ReplayFilter(), dry_run=False, group_id=group, idle_timeout=2, out=io.StringIO())
    assert third.read == len(garbage) and third.requeued == len(garbage)
