"""No secret leaks anywhere, with OAuth and API keys in real use and errors being logged and dead-lettered.

A full run with all three providers: Kameleoon behind OAuth client credentials, Conductrics with an API key
in the query string (and a second Conductrics project whose key the provider refuses: 401, the project pauses
until the provider accepts the key, then a probe resumes it),
permanent 400s, connection resets, a hang past the timeout and a failing token endpoint. Every secret is a
long random string given through `${VAR}` interpolation. Logging is at DEBUG. Then every output is searched
for every secret (and every 16-character piece of one): the log stream, the log records before the redactor
saw them, /metrics, every dead letter's key, value and headers, and the reprs of the config, the results
and the requests. Mid-run the provider revokes every token: the service gets a new one and delivers.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import secrets as secrets_mod
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import replace
from typing import Any

import pytest
from confluent_kafka import Message

from consumer import logs
from consumer.app import Application
from consumer.config import Config, parse
from consumer.delivery import Pending, Result, Status
from consumer.dlq import parse_headers
from consumer.embedded import EmbeddedBroker
from consumer.metrics import Metrics
from consumer.model import Conversion, Provider, Purchase
from consumer.pipeline import Hooks, Pipeline
from consumer.producer import encoded, produce_values
from consumer.providers.base import TokenSpec
from consumer.providers.conductrics import SAMPLE_PROJECT as CONDUCTRICS_PROJECT
from consumer.providers.kameleoon import SAMPLE_SITE as KAMELEOON_SITE
from consumer.providers.registry import modules
from consumer.samples import malformed, purchases
from consumer.sandbox import Sandbox
from consumer.transport import TokenCache
from tests.conftest import config_dict, read_all
from tests.test_observability import http_get, json_log_lines, log_stream, poll_until, stop_app, wait_for_port
from tests.test_pipeline import expected_conversions

__all__ = ["log_stream"]  # the fixture, imported for its side effect of being registered here

BAD_PROJECT = "ac-refused"  # a Conductrics account whose API key the provider does not accept


def secret() -> str:
    # URL-safe, so a leak through a URL or a form body would show the same characters.
    return "sk-" + secrets_mod.token_urlsafe(40)


class CapturingHandler(logging.Handler):
    """Every record as the service logged it, formatted before any redaction."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.texts: list[str] = []
        self.formatter_ = logs.JsonFormatter()

    def emit(self, record: logging.LogRecord) -> None:
        self.texts.append(self.formatter_.format(record))
        self.texts.append(repr(vars(record)))


class RecordingTokenCache(TokenCache):
    """The service's token cache, remembering every bearer token it obtained (they are secrets too)."""

    granted: list[str] = []

    async def _grant(self, spec: TokenSpec, timeout: float) -> tuple[str, float]:
        token, expires_in = await super()._grant(spec, timeout)
        RecordingTokenCache.granted.append(token)
        return token, expires_in


def pieces(value: str, width: int = 16) -> set[str]:
    """The value and every `width`-character piece of it: a truncated or partial leak shows too."""
    return {value} | {value[i:i + width] for i in range(len(value) - width + 1)}


def leaks(secrets: dict[str, str], outputs: dict[str, Iterable[str]]) -> list[str]:
    found = []
    for where, texts in outputs.items():
        for text in texts:
            for name, value in secrets.items():
                if any(p in text for p in pieces(value)):
                    found.append(f"{name} in {where}: ...{text[:200]!r}")
    return found


def dlq_texts(messages: list[Message]) -> list[str]:
    out = []
    for m in messages:
        out.append((m.key() or b"").decode("utf-8", "replace"))
        out.append((m.value() or b"").decode("utf-8", "replace"))
        headers = m.headers() or []
        for k, v in headers.items() if isinstance(headers, dict) else headers:
            out.append(k)
            out.append(v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v or ""))
    return out


def with_refused_conductrics(items: list[Purchase], every: int) -> list[Purchase]:
    """Move the Conductrics exposures of every `every`-th purchase to the project whose key is refused."""
    out = []
    for n, p in enumerate(items):
        if n % every == 0:
            p = replace(p, exposures=tuple(
                replace(e, project=BAD_PROJECT) if e.provider is Provider.CONDUCTRICS else e for e in p.exposures))
        out.append(p)
    return out


def secret_config(broker: EmbeddedBroker, topics: dict[str, str], url: str, env: dict[str, str]) -> Config:
    data: dict[str, Any] = config_dict(broker.bootstrap, topics, url)
    data["logging"] = {"level": "DEBUG"}
    data["kafka"]["consumer"]["fetch.wait.max.ms"] = 100
    kameleoon = data["kameleoon"]["projects"][KAMELEOON_SITE]
    kameleoon["client_id"] = "${KAMELEOON_CLIENT_ID}"
    kameleoon["client_secret"] = "${KAMELEOON_CLIENT_SECRET}"
    conductrics = data["conductrics"]
    conductrics["projects"][CONDUCTRICS_PROJECT]["api_key"] = "${CONDUCTRICS_API_KEY}"
    conductrics["projects"][CONDUCTRICS_PROJECT]["flow"] = {"timeout": "500ms"}
    conductrics["projects"][BAD_PROJECT] = {
        "agent_api_url": f"{url}/{BAD_PROJECT}/v3/agent-api",
        "api_key": "${CONDUCTRICS_REFUSED_KEY}",
        "goals": ["g-purchase"],
    }
    conductrics["retry"]["auth_probe_interval"] = "200ms"
    cfg = parse(data, env=env)
    assert sorted(cfg.secrets()) == sorted(env.values())
    return cfg


async def test_no_secret_leaks_and_tokens_are_refreshed_after_revocation(
    broker: EmbeddedBroker, topics: dict[str, str], log_stream: io.StringIO, monkeypatch: pytest.MonkeyPatch,
) -> None:
    env = {
        "KAMELEOON_CLIENT_ID": f"client-{uuid.uuid4().hex}",
        "KAMELEOON_CLIENT_SECRET": secret(),
        "CONDUCTRICS_API_KEY": secret(),
        "CONDUCTRICS_REFUSED_KEY": secret(),
    }
    sandbox = Sandbox(
        kameleoon_auth_sites=[KAMELEOON_SITE],
        kameleoon_clients={env["KAMELEOON_CLIENT_ID"]: env["KAMELEOON_CLIENT_SECRET"]},
        conductrics_keys={CONDUCTRICS_PROJECT: env["CONDUCTRICS_API_KEY"]},  # none for BAD_PROJECT: 401
    )
    await sandbox.start()
    RecordingTokenCache.granted = []
    monkeypatch.setattr("consumer.app.TokenCache", RecordingTokenCache)
    try:
        await run_and_check(broker, topics, sandbox, env, log_stream)
    finally:
        await sandbox.stop()


async def run_and_check(broker: EmbeddedBroker, topics: dict[str, str], sandbox: Sandbox, env: dict[str, str],
                        log_stream: io.StringIO) -> None:
    cfg = secret_config(broker, topics, sandbox.url, env)
    # As the CLI does it: JSON logs at the configured level, the config's secrets given to the redactor.
    logs.setup(cfg.logging.level, cfg.logging.format, cfg.secrets(), stream=log_stream)
    raw = CapturingHandler()
    logging.getLogger().handlers.insert(0, raw)  # sees each record before the redactor rewrites it

    now = int(time.time() * 1000)
    first = with_refused_conductrics(list(purchases(150, now_ms=now, seed=41)), every=7)
    second = with_refused_conductrics(list(purchases(150, now_ms=now, seed=42)), every=7)
    bad = list(malformed(6, seed=3))
    expected = {phase: expected_conversions(cfg, items) for phase, items in (("first", first), ("second", second))}
    everything = {prov: expected["first"][prov] + expected["second"][prov] for prov in expected["first"]}
    refused = [(p, c) for p, c in everything["conductrics"] if c.project == BAD_PROJECT]
    assert refused and len(refused) < len(everything["conductrics"])
    # Permanent rejections (400) for some Kameleoon and Convert visitors.
    k_bad = {c.visitor_id for _, c in everything["kameleoon"][::15]}
    v_bad = {c.visitor_id for _, c in everything["convert"][::15]}
    sandbox.reject("kameleoon", visitors=k_bad)
    sandbox.reject("convert", visitors=v_bad)
    # Transient trouble: the token endpoint fails once, Conductrics resets two connections and hangs once.
    sandbox.fail("token", 503, times=1)
    sandbox.reset_connections("conductrics", times=2)
    sandbox.hang("conductrics", times=1, seconds=2.0)

    results: list[tuple[Conversion, Result]] = []
    metrics = Metrics()

    class Spy(Hooks):
        def results(self, pipeline: Pipeline, items: Sequence[Pending], result: Result) -> None:
            results.extend((p.conversion, result) for p in items)

    app = Application(cfg, metrics=metrics, install_signals=False, stop_when=None, hooks=Spy())
    assert produce_values(broker.bootstrap, topics["topic"],
                          list(encoded(first)) + [(b"bad", v) for v in bad]).delivered == len(first) + len(bad)
    task = asyncio.get_running_loop().create_task(app.run())
    try:
        port = await wait_for_port(app, task)

        async def progress() -> tuple[int, int]:
            return app.consumed, app.live

        # The refused key pauses its project (its conversions wait, nothing is dead-lettered) until the
        # provider accepts the key; then a probe resumes it.
        paused = {"provider": "conductrics", "project": BAD_PROJECT, "reason": "credentials"}

        async def pause_gauge() -> float | None:
            return metrics.registry.get_sample_value("offline_conversions_project_paused", paused)

        await poll_until(pause_gauge, lambda v: v == 1.0, 30, "the refused project to pause")
        assert app.live > 0, "its conversions wait"
        sandbox.set_credentials(conductrics_keys={CONDUCTRICS_PROJECT: env["CONDUCTRICS_API_KEY"],
                                                  BAD_PROJECT: env["CONDUCTRICS_REFUSED_KEY"]})
        await poll_until(progress, lambda r: r == (len(first) + len(bad), 0), 30, "the first batch to be done")
        assert await pause_gauge() == 0.0
        assert sandbox.token_grants == 1, "one token, shared by every Kameleoon request"
        assert sandbox.status_counts("kameleoon").get(401, 0) == 0
        k_first = sandbox.counts()["kameleoon"]
        assert k_first > 0, sandbox.summary()

        # The provider revokes every token; the next Kameleoon requests are refused with 401 once.
        sandbox.revoke_tokens()
        assert produce_values(broker.bootstrap, topics["topic"], list(encoded(second))).delivered == len(second)
        total = len(first) + len(bad) + len(second)
        await poll_until(progress, lambda r: r == (total, 0), 30, "the second batch to be done")
        assert sandbox.status_counts("kameleoon").get(401, 0) >= 1, "no request was sent with the revoked token"
        assert sandbox.token_grants == 2, "exactly one new token after the revocation"
        assert len(RecordingTokenCache.granted) == 2

        status, exposition = await http_get(f"http://127.0.0.1:{port}/metrics")
        assert status == 200
        await stop_app(app, task)
    finally:
        if not task.done():
            app.stop()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(task, 30)

    # What the providers got: every Kameleoon conversion of the second batch too, with the new token.
    want_k = {c.key for _, c in everything["kameleoon"] if c.visitor_id not in k_bad}
    got_k = {r.nonce for r in sandbox.records_for("kameleoon")}
    assert got_k == want_k
    assert {r.nonce for r in sandbox.records_for("kameleoon")} >= {
        c.key for _, c in expected["second"]["kameleoon"] if c.visitor_id not in k_bad}
    assert sandbox.counts()["kameleoon"] > k_first
    want_d = {(c.visitor_id, c.project) for _, c in everything["conductrics"]}  # the refused project's too
    assert {(r.visitor, r.project) for r in sandbox.records_for("conductrics")} == want_d
    assert sandbox.status_counts("conductrics").get(401, 0) >= 1
    assert sandbox.duplicates() == {}
    value = metrics.registry.get_sample_value
    assert value("offline_conversions_token_grants_total", {"provider": "kameleoon", "result": "ok"}) == 2
    assert value("offline_conversions_token_grants_total", {"provider": "kameleoon", "result": "error"}) == 1

    # The dead letters: malformed events and the 400 rejections — never a 401: a refused token is replaced
    # and the request sent again, a refused key pauses its project.
    failed_pairs = {(p.event_id, "kameleoon") for p, c in everything["kameleoon"] if c.visitor_id in k_bad}
    failed_pairs |= {(p.event_id, "convert") for p, c in everything["convert"] if c.visitor_id in v_bad}
    dlq = read_all(broker.bootstrap, topics["dlq"], len(bad) + len(failed_pairs))
    assert len(dlq) == len(bad) + len(failed_pairs)
    headers = [parse_headers(m.headers()) for m in dlq]
    dispatch = [h for h in headers if h["stage"] == "dispatch"]
    assert {(h["event_id"], h["provider"]) for h in dispatch} == failed_pairs
    assert {h["http.status"] for h in dispatch} == {"400"}
    k_results = [r for c, r in results if c.provider is Provider.KAMELEOON]
    assert all(r.outcome.status != 401 for r in k_results), "a Kameleoon 401 reached a result"
    assert all(r.status is Status.DELIVERED for c, r in results
               if c.provider is Provider.KAMELEOON and c.visitor_id not in k_bad)

    # Finally, the search: no secret (nor a 16-character piece of one) in any output.
    all_secrets = dict(env)
    all_secrets.update({f"bearer token {n}": t for n, t in enumerate(RecordingTokenCache.granted)})
    log_text = log_stream.getvalue()
    lines = json_log_lines(log_text)
    assert any(d["level"] == "debug" for d in lines), "DEBUG logging was not on"
    failures = [d for d in lines if d["msg"] == "delivery failed"]
    assert {d["provider"] for d in failures} == {"kameleoon", "convert"}, "errors were logged"
    refusals = [d for d in lines if "credentials refused" in d["msg"]]
    assert [(d["provider"], d["project"]) for d in refusals] == [("conductrics", BAD_PROJECT)], "the pause was logged"
    built = [m.build(m.route(c), [c], "token") for prov, m in modules(cfg).items()
             for _, c in everything[prov.slug][:1]]
    conductrics_request = next(r for r in built if f"/{CONDUCTRICS_PROJECT}/" in r.url)
    assert env["CONDUCTRICS_API_KEY"] in conductrics_request.url  # the search below would find it
    assert env["CONDUCTRICS_API_KEY"] not in conductrics_request.redacted_url
    outputs: dict[str, Iterable[str]] = {
        "the log stream": [log_text],
        "log records before redaction": raw.texts,
        "/metrics": [exposition, metrics.render().decode()],
        "the dead-letter topic": dlq_texts(dlq),
        "config reprs": [repr(cfg), str(cfg)],
        "results": [repr(r) + str(r.outcome.reason) for _, r in results],
        "request reprs": [repr(r) + r.redacted_url for r in built],
        "provider modules": [repr(m) for m in modules(cfg).values()],
    }
    assert leaks({"canary": env["CONDUCTRICS_API_KEY"]}, {"a request URL": [conductrics_request.url]})
    found = leaks(all_secrets, outputs)
    assert not found, "\n".join(found[:20])
