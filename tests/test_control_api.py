"""The control API on a real port and a real broker: bearer auth, the shapes of GET and PUT, 404s, a pause that
reaches another member through the control topic; the [control] config; the token never shown."""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from typing import Any

import aiohttp
import pytest

from consumer.config import Config, ConfigError, parse
from consumer.ops.control_api import ControlListenError, ProjectStatus, authorized, local_host, pause_reason
from consumer.ops.control_plane import ControlPlane
from consumer.ops.control_store import ControlStore
from tests.conftest import Broker, config_dict
from tests.reliability.harness import wait_for

TOKEN = "ctl-4f0c2b9e7d1a4e58b3c6"  # long enough for [control] token, and findable in any output


class Service:
    """A stand-in for the Application: three projects; the store's on_change pauses and resumes them."""

    def __init__(self) -> None:
        self.projects: dict[tuple[str, str], ProjectStatus] = {
            (p, k): ProjectStatus(provider=p, project=k, state="running", reason=None, paused_by=None, since=None,
                              last_error=None, circuit="closed", in_flight=3,
                                  counts={"delivered": 10, "dead_lettered": 1})
            for p, k in (("kameleoon", "f17c21u1ag"), ("convert", "1111_2222"), ("conductrics", "ac-xxx"))
        }

    def statuses(self) -> list[ProjectStatus]:
        return list(self.projects.values())

    def lag(self) -> dict[str, int]:
        return {"kameleoon": 5, "convert": 1200, "conductrics": 0}

    def on_change(self, provider: str, project: str, paused: bool, reason: str | None) -> None:
        old = self.projects.get((provider, project))
        if old is None:
            return  # a pause for a project this member does not run
        self.projects[(provider, project)] = replace(
            old, state="paused" if paused else "running", reason=reason if paused else None,
            paused_by="operator" if paused else None, since=time.time())


@pytest.fixture
def control_config(broker: Broker, topics: dict[str, str]) -> Callable[..., Config]:
    def make(**control: Any) -> Config:
        data = config_dict(broker.bootstrap, topics, "http://127.0.0.1:9")
        data["control"] = {"port": 0, **control}
        return parse(data, env={"CONTROL_TOKEN": TOKEN})
    return make


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def bearer(token: str = TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_every_request_needs_the_token_when_one_is_set(control_config: Callable[..., Config],
                                                             http: aiohttp.ClientSession) -> None:
    cfg = control_config(token="${CONTROL_TOKEN}")
    service = Service()
    async with ControlPlane(cfg, service, service.on_change) as cp:
        base = f"http://127.0.0.1:{cp.port}"
        for headers in ({}, bearer("ctl-wrong-token-0000000000"), {"Authorization": f"Basic {TOKEN}"},
                        {"Authorization": TOKEN}, bearer(TOKEN[:-1])):
            for method, path in (("GET", "/providers"), ("GET", "/providers/convert/1111_2222"),
                                 ("PUT", "/providers/convert/1111_2222/pause"), ("GET", "/nowhere")):
                async with http.request(method, base + path, headers=headers) as r:
                    assert r.status == 401, (method, path, headers)
                    assert r.headers["WWW-Authenticate"].startswith("Bearer")
                    body = await r.json()
                    assert body["error_code"] == 401 and TOKEN not in str(body)
        assert cp.store.paused() == {}  # no unauthorized write got through
        async with http.get(base + "/providers", headers=bearer()) as r:
            assert r.status == 200
        async with http.get(base + "/providers", headers={"Authorization": f"bearer  {TOKEN} "}) as r:
            assert r.status == 200  # the scheme is case-insensitive, as RFC 7235 says


async def test_list_one_pause_resume_and_not_found(control_config: Callable[..., Config],
                                                   http: aiohttp.ClientSession) -> None:
    cfg = control_config()
    here, there = Service(), Service()  # two members of the group
    other_member = ControlStore.for_config(cfg, there.on_change)
    await other_member.start()
    try:
        async with ControlPlane(cfg, here, here.on_change) as cp:
            base = f"http://127.0.0.1:{cp.port}"
            async with http.get(base + "/providers") as r:
                assert r.status == 200
                listed = await r.json()
            assert [(d["provider"], d["project"], d["state"]) for d in listed] == [
                ("kameleoon", "f17c21u1ag", "running"), ("convert", "1111_2222", "running"),
                ("conductrics", "ac-xxx", "running")]
            convert = listed[1]
            assert convert == {
                "provider": "convert", "project": "1111_2222", "state": "running", "reason": None,
                "paused_by": None, "since": None, "circuit": "closed", "in_flight": 3,
                "group": f"{cfg.kafka.group_id}.convert", "lag": 1200, "last_error": None,
                "counts": {"delivered": 10, "dead_lettered": 1}, "pause": None}

            async with http.get(base + "/providers/convert/1111_2222") as r:
                assert r.status == 200 and await r.json() == convert
            for path in ("/providers/convert/9999_9999", "/providers/optimizely/1111_2222"):
                async with http.get(base + path) as r:
                    assert r.status == 404
                    assert "no provider project" in (await r.json())["message"]
                async with http.put(base + path + "/pause") as r:
                    assert r.status == 404
            async with http.get(base + "/nowhere") as r:
                assert r.status == 404 and (await r.json())["error_code"] == 404
            async with http.post(base + "/providers/convert/1111_2222/pause") as r:
                assert r.status == 405 and (await r.json())["error_code"] == 405
            too_long = '{"reason": "' + "x" * 501 + '"}'
            for bad in ('{"reason": 5}', "[]", "not json", '{"reason": "x", "until": 3}', too_long):
                async with http.put(base + "/providers/convert/1111_2222/pause", data=bad) as r:
                    assert r.status == 400, bad
            assert cp.store.paused() == {}

            async with http.put(base + "/providers/convert/1111_2222/pause",
                                json={"reason": "Convert maintenance"}) as r:
                assert r.status == 202
                doc = await r.json()
            # Applied on this member before the answer, and recorded in the topic.
            assert (doc["state"], doc["paused_by"], doc["reason"]) == ("paused", "operator", "Convert maintenance")
            assert doc["pause"]["reason"] == "Convert maintenance" and doc["pause"]["by"] == "api"
            assert here.projects[("convert", "1111_2222")].state == "paused"
            assert set(cp.store.paused()) == {("convert", "1111_2222")}
            # ...and on the other member, through the topic.
            await wait_for(lambda: there.projects[("convert", "1111_2222")].state == "paused", 20,
                           "the other member to apply the pause")
            assert there.projects[("kameleoon", "f17c21u1ag")].state == "running"

            async with http.put(base + "/providers/kameleoon/f17c21u1ag/pause") as r:  # no body: no reason
                assert r.status == 202 and (await r.json())["pause"]["reason"] is None

            async with http.put(base + "/providers/convert/1111_2222/resume") as r:
                assert r.status == 202
                doc = await r.json()
            assert doc["state"] == "running" and doc["pause"] is None
            await wait_for(lambda: there.projects[("convert", "1111_2222")].state == "running", 20,
                           "the other member to apply the resume")
            assert set(cp.store.paused()) == {("kameleoon", "f17c21u1ag")}
    finally:
        await other_member.close()

    # A restart: the Kameleoon pause still stands and is applied before the API listens.
    restarted = Service()
    async with ControlPlane(cfg, restarted, restarted.on_change) as cp:
        assert restarted.projects[("kameleoon", "f17c21u1ag")].state == "paused"
        assert restarted.projects[("convert", "1111_2222")].state == "running"
        async with http.get(f"http://127.0.0.1:{cp.port}/providers/kameleoon/f17c21u1ag") as r:
            assert (await r.json())["state"] == "paused"


async def test_without_a_token_only_requests_to_localhost_are_answered(control_config: Callable[..., Config],
                                                                       http: aiohttp.ClientSession) -> None:
    cfg = control_config()
    service = Service()
    async with ControlPlane(cfg, service, service.on_change) as cp:
        base = f"http://127.0.0.1:{cp.port}"
        for host in ("rebound.attacker.example", f"rebound.attacker.example:{cp.port}", "10.0.0.8"):
            async with http.put(base + "/providers/convert/1111_2222/pause", headers={"Host": host}) as r:
                assert r.status == 403, host
                assert "localhost" in (await r.json())["message"]
        assert cp.store.paused() == {}
        for host in (f"localhost:{cp.port}", f"127.0.0.1:{cp.port}", "localhost"):
            async with http.get(base + "/providers", headers={"Host": host}) as r:
                assert r.status == 200, host


async def test_answers_never_quote_a_configured_secret(control_config: Callable[..., Config],
                                                       http: aiohttp.ClientSession) -> None:
    cfg = control_config()
    key = cfg.providers["conductrics"].projects["ac-xxx"].api_key.reveal()
    service = Service()
    old = service.projects[("conductrics", "ac-xxx")]
    service.projects[("conductrics", "ac-xxx")] = replace(old, last_error=f"401 for key {key}")
    async with ControlPlane(cfg, service, service.on_change) as cp:
        r = await http.get(f"http://127.0.0.1:{cp.port}/providers/conductrics/ac-xxx")
        body = await r.text()
    assert key not in body and "401 for key ***" in body


async def test_a_taken_port_names_control_port(control_config: Callable[..., Config]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        cfg = control_config(port=taken.getsockname()[1])
        service = Service()
        with pytest.raises(ControlListenError) as err:
            async with ControlPlane(cfg, service, service.on_change):
                pass
        assert err.value.key == "control.port" and "in use" in str(err.value)


async def test_the_token_never_appears_in_logs_errors_or_answers(control_config: Callable[..., Config],
                                                                 http: aiohttp.ClientSession,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    cfg = control_config(token="${CONTROL_TOKEN}")
    assert TOKEN not in repr(cfg) and TOKEN not in str(cfg.control)
    assert TOKEN in cfg.secrets()  # so the log redactor knows it
    service = Service()
    answers: list[str] = []
    async with ControlPlane(cfg, service, service.on_change) as cp:
        base = f"http://127.0.0.1:{cp.port}"
        for headers in ({}, bearer("ctl-wrong-token-0000000000"), bearer()):
            async with http.put(base + "/providers/convert/1111_2222/pause", headers=headers,
                                json={"reason": "checking"}) as r:
                answers.append(f"{r.status} {dict(r.headers)} {await r.text()}")
        async with http.get(base + "/providers", headers=bearer()) as r:
            answers.append(await r.text())
    assert "202" in answers[2]
    logged = "\n".join(f"{r.getMessage()} {vars(r)}" for r in caplog.records)
    assert "paused by the control API" in logged  # the log was captured
    assert TOKEN not in logged
    assert not [a for a in answers if TOKEN in a]
    # A token that is too short fails naming the key, without showing the value.
    with pytest.raises(ConfigError) as err:
        control_config(token="short-secret")
    assert err.value.key == "control.token" and "short-secret" not in str(err.value)


# --------------------------------------------------------------------------- pure parts, no broker


def test_authorized_compares_the_whole_token() -> None:
    from consumer.config import Secret

    token = Secret(TOKEN)
    assert authorized(f"Bearer {TOKEN}", token)
    for header in (None, "", "Bearer", f"Bearer {TOKEN}x", f"Bearer {TOKEN[:-1]}", f"Token {TOKEN}", TOKEN):
        assert not authorized(header, token), header


def test_local_host() -> None:
    for host in ("localhost", "LOCALHOST:8083", "127.0.0.1", "127.0.0.1:8083", "[::1]:8083", "[::1]", "::1",
                 "127.8.9.10:1"):
        assert local_host(host), host
    for host in (None, "", "example.com", "example.com:8083", "10.0.0.1", "[2001:db8::1]:80", "localhost.evil"):
        assert not local_host(host), host


def test_pause_reason() -> None:
    assert pause_reason("") is None and pause_reason("  ") is None
    assert pause_reason('{"reason": "maintenance"}') == "maintenance"
    assert pause_reason('{}') is None
    for bad in ("[1]", "{", '{"reason": null, "x": 1}', '{"reason": ["a"]}'):
        with pytest.raises(ValueError):
            pause_reason(bad)


def _parse(control: dict[str, Any], **metrics: Any) -> Config:
    data = config_dict("127.0.0.1:9092", {"topic": "t", "dlq": "t.dlq", "group": "g"}, "http://127.0.0.1:9")
    data["control"] = control
    if metrics:
        data["metrics"] = metrics
    return parse(data, env={"TOKEN": TOKEN})


def test_control_config_defaults() -> None:
    cfg = _parse({})
    assert cfg.control_topic() == "g.control"
    assert (cfg.control.host, cfg.control.port, cfg.control.token, cfg.control.replication_factor) == (
        "127.0.0.1", 8083, None, None)
    cfg = _parse({"topic": "ops.control", "replication_factor": 3, "host": "0.0.0.0", "token": "${TOKEN}",
                  "start_timeout": "1m"})
    assert cfg.control_topic() == "ops.control" and cfg.control.replication_factor == 3
    assert cfg.control.token is not None and cfg.control.token.reveal() == TOKEN and cfg.control.start_timeout == 60


@pytest.mark.parametrize(("control", "key", "says"), [
    ({"port": 70000}, "control.port", "at most 65535"),
    ({"port": "8083"}, "control.port", "expected an integer"),
    ({"port": 9400}, "control.port", "must differ from metrics.port"),
    ({"host": "0.0.0.0"}, "control.token", "not a loopback address"),
    ({"host": ""}, "control.host", "must not be empty"),
    ({"token": "${NOT_SET}"}, "control.token", "NOT_SET is not set"),
    ({"topic": "t"}, "control.topic", "must differ from kafka.topic"),
    ({"topic": "t.dlq"}, "control.topic", "must differ from kafka.dlq_topic"),
    ({"topic": "no spaces"}, "control.topic", "not a Kafka topic name"),
    ({"replication_factor": 0}, "control.replication_factor", "at least 1"),
    ({"start_timeout": "0s"}, "control.start_timeout", "greater than zero"),
    ({"prot": 8083}, "control.prot", "did you mean 'port'"),
])
def test_a_bad_control_config_fails_naming_the_key(control: dict[str, Any], key: str, says: str) -> None:
    with pytest.raises(ConfigError) as err:
        _parse(control, host="0.0.0.0", port=9400)
    assert err.value.key == key, str(err.value)
    assert says in str(err.value)


def test_each_worker_process_gets_its_own_control_port() -> None:
    from consumer.cli import for_worker

    cfg = _parse({})
    assert [for_worker(cfg, i).control.port for i in range(3)] == [8083, 8084, 8085]
    assert for_worker(_parse({"port": 0}), 2).control.port == 0
