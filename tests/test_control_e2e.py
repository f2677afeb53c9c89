"""The control API on a running service: an operator's pause holds one provider project, survives a restart
(it lives in the control topic), and a resume releases what waited; the other providers never notice."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from typing import Any

from consumer.app import Application
from consumer.config import parse
from consumer.metrics import Metrics
from consumer.producer import encoded, produce_values
from consumer.samples import purchases
from consumer.sandbox import Sandbox
from tests.conftest import Broker, config_dict
from tests.reliability.harness import wait_for
from tests.test_pipeline import expected_conversions

N = 200


def call(port: int, method: str, path: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method,
                                 data=json.dumps(body).encode() if body is not None else None,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return resp.status, json.loads(resp.read() or b"null")


async def api(port: int, method: str, path: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
    return await asyncio.get_running_loop().run_in_executor(None, call, port, method, path, body)


async def started(app: Application) -> asyncio.Task[int]:
    task = asyncio.get_running_loop().create_task(app.run())
    await wait_for(lambda: app.control_port is not None and app.readiness()[0], 30, "the service to be ready")
    return task


async def test_an_operator_pause_holds_one_project_across_a_restart_and_resume_releases_it(
    broker: Broker, topics: dict[str, str], sandbox: Sandbox,
) -> None:
    cfg = parse(config_dict(broker.bootstrap, topics, sandbox.url), env={})
    items = list(purchases(N, now_ms=int(time.time() * 1000), seed=44))
    expected = expected_conversions(cfg, items)
    n_k, n_c = len(expected["kameleoon"]), len(expected["convert"])
    assert n_k and n_c

    app = Application(cfg, metrics=Metrics(), install_signals=False)
    task = await started(app)
    assert app.control_port is not None
    status, listed = await api(app.control_port, "GET", "/providers")
    assert status == 200
    assert {(p["provider"], p["project"]) for p in listed} >= {("kameleoon", "f17c21u1ag"), ("convert", "1111_2222")}
    status, _ = await api(app.control_port, "PUT", "/providers/convert/1111_2222/pause", {"reason": "audit"})
    assert status == 202
    produce_values(broker.bootstrap, topics["topic"], encoded(items))
    await sandbox.wait_until(lambda s: s.counts()["kameleoon"] == n_k, 30)
    assert sandbox.counts()["convert"] == 0  # held, while Kameleoon got everything
    app.stop()
    assert await asyncio.wait_for(task, 60) == 0

    # A new process: the pause is read back from the control topic before anything is delivered.
    again = Application(cfg, metrics=Metrics(), install_signals=False)
    task = await started(again)
    assert again.control_port is not None
    _, one = await api(again.control_port, "GET", "/providers/convert/1111_2222")
    assert one["state"] == "paused" and one["paused_by"] == "operator" and "audit" in (one["reason"] or "")
    assert sandbox.counts()["convert"] == 0
    status, _ = await api(again.control_port, "PUT", "/providers/convert/1111_2222/resume")
    assert status == 202
    await sandbox.wait_until(lambda s: s.counts()["convert"] == n_c, 30)
    again.stop()
    assert await asyncio.wait_for(task, 60) == 0
    assert sandbox.duplicates() == {}
    assert sandbox.counts()["kameleoon"] == n_k
