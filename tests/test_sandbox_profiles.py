"""The sandbox's latency profiles: log-normal latency, a capacity (429 or queue beyond it), random 5xx, seeded."""

from __future__ import annotations

import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiohttp
import pytest

from consumer.providers.registry import BUILTIN
from consumer.sandbox import Profile, Sandbox, SpecError, parse_profile, profiles_of

ROOT = Path(__file__).resolve().parent.parent
TRACK = "/track/?c=1&p=2&e=3-4&g=5&ga=1&vi=v1"
UA = {"User-Agent": "ConvertAgent/1.0 (test)"}


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


async def poll_until(check: Callable[[], bool], timeout: float = 5.0) -> None:
    """Poll a condition the sandbox does not signal (requests waiting in its queue), with a deadline."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.005)


async def track(http: aiohttp.ClientSession, sb: Sandbox) -> tuple[int, str | None]:
    async with http.get(sb.url + TRACK, headers=UA) as r:
        await r.read()
        return r.status, r.headers.get("Retry-After")


# --------------------------------------------------------------------------- the distribution


def test_lognormal_draws_have_the_configured_median_and_p99() -> None:
    p = Profile("convert", median=0.12, p99=0.8)
    assert [p.draw(random.Random(1)) for _ in range(3)] == [p.draw(random.Random(1))] * 3  # seeded
    rng = random.Random(7)
    values = sorted(p.draw(rng) for _ in range(40_000))
    median, p99 = values[len(values) // 2], values[int(len(values) * 0.99)]
    assert median == pytest.approx(0.12, rel=0.03)
    assert p99 == pytest.approx(0.8, rel=0.08)
    assert sum(values) / len(values) == pytest.approx(p.mean, rel=0.03)
    assert p.mean == pytest.approx(0.12 * 1.3945, rel=0.01)  # exp(sigma^2 / 2), sigma = ln(0.8/0.12) / 2.326


def test_a_profile_without_p99_is_a_constant_latency_and_bad_profiles_are_refused() -> None:
    assert Profile("kameleoon", median=0.05).draw(random.Random(0)) == 0.05
    for kwargs, needle in [
        ({"median": 0.2, "p99": 0.1}, "p99"), ({"capacity": 0}, "capacity"), ({"over_capacity": "drop"}, "over"),
        ({"error_rate": 1.5}, "error_rate"), ({"error_status": 429}, "5xx"), ({"median": -1.0}, "median"),
    ]:
        with pytest.raises(ValueError, match=needle):
            Profile("convert", **kwargs)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="provider"):
        Profile("optimizely")
    with pytest.raises(ValueError, match="colour"):
        profiles_of({"provider": "convert", "colour": "red"})
    # "*" is every registered provider and the token endpoint; another test may have registered a provider
    # of its own (tests/providers/), which is not the built-in set this test pins.
    builtin = {m.rsplit(".", 1)[1] for m in BUILTIN} | {"token"}
    everyone = [p.provider for p in profiles_of({"provider": "*", "median": 0.1})]
    assert [p for p in everyone if p in builtin] == ["kameleoon", "convert", "conductrics", "token"]


def test_parse_profile_reads_the_cli_form() -> None:
    [spec] = parse_profile("convert:median=120ms,p99=0.8,capacity=64,over=queue,retry_after=2,errors=0.002,seed=3")
    assert spec == {"kind": "profile", "provider": "convert", "median": 0.12, "p99": 0.8, "capacity": 64,
                    "over_capacity": "queue", "retry_after": "2", "error_rate": 0.002, "seed": 3}
    [p] = profiles_of(spec)
    assert (p.capacity, p.over_capacity, p.retry_after) == (64, "queue", "2")
    for bad, needle in [("convert", "PROVIDER:"), ("convert:speed=1", "speed"), ("convert:median=fast", "median"),
                        ("convert:capacity=x", "capacity")]:
        with pytest.raises(SpecError, match=needle):
            parse_profile(bad)


# --------------------------------------------------------------------------- capacity


async def test_beyond_the_capacity_requests_are_answered_429_with_retry_after(http: aiohttp.ClientSession) -> None:
    async with Sandbox(profiles=[Profile("convert", median=0.3, capacity=3, retry_after="2")]) as sb:
        results = await asyncio.gather(*(track(http, sb) for _ in range(8)))
        assert sorted(results) == [(200, None)] * 3 + [(429, "2")] * 5
        assert sb.counts()["convert"] == 3
        state = sb.profile_state("convert")
        assert (state["peak_busy"], state["rejected"], state["busy"]) == (3, 5, 0)
        assert [r.outcome for r in sb.requests].count("capacity") == 5
        # Other providers have no profile: no capacity.
        assert sb.profile_state("kameleoon")["rejected"] == 0


async def test_queue_mode_slows_down_instead_of_refusing(http: aiohttp.ClientSession) -> None:
    async with Sandbox(profiles=[Profile("convert", median=0.1, capacity=2, over_capacity="queue")]) as sb:
        started = time.monotonic()
        results = await asyncio.gather(*(track(http, sb) for _ in range(6)))
        elapsed = time.monotonic() - started
        assert results == [(200, None)] * 6
        assert sb.profile_state("convert")["peak_busy"] == 2
        assert elapsed >= 0.29  # three rounds of two, 0.1 s each


async def test_capacity_changes_while_requests_are_served(http: aiohttp.ClientSession) -> None:
    async with Sandbox(profiles=[Profile("convert", median=0.2, capacity=4, over_capacity="queue")]) as sb:
        first = [asyncio.ensure_future(track(http, sb)) for _ in range(8)]
        await poll_until(lambda: sb.profile_state("convert")["queued"] == 4)
        # Doubling the capacity lets the queued four in at once; a capacity of 2 later refuses the third.
        spec = {"kind": "profile", "provider": "convert", "median": 0.2, "capacity": 8, "over_capacity": "queue"}
        sb.apply_spec(spec)
        assert sb.profile_state("convert")["busy"] == 8 and sb.profile_state("convert")["queued"] == 0
        assert [r[0] for r in await asyncio.gather(*first)] == [200] * 8
        sb.apply_spec({"kind": "profile", "provider": "convert", "median": 0.2, "capacity": 2})
        results = await asyncio.gather(*(track(http, sb) for _ in range(3)))
        assert sorted(s for s, _ in results) == [200, 200, 429]


async def test_clear_faults_returns_to_the_profiles_given_at_start(http: aiohttp.ClientSession) -> None:
    async with Sandbox(profiles=[Profile("convert", median=0.0, capacity=1)]) as sb:
        sb.apply_spec({"kind": "profile", "provider": "convert", "median": 0.0, "error_rate": 1.0})
        assert (await track(http, sb))[0] == 503
        sb.clear_faults()
        assert (await track(http, sb))[0] == 200
        assert sb.profile_state("convert")["capacity"] == 1


# --------------------------------------------------------------------------- random errors, seeds, faults


async def statuses_with_errors(http: aiohttp.ClientSession, seed: int, n: int = 120) -> list[int]:
    async with Sandbox(profiles=[Profile("convert", median=0.0, p99=0.0, error_rate=0.25, seed=seed)]) as sb:
        return [(await track(http, sb))[0] for _ in range(n)]


async def test_random_errors_come_at_the_rate_and_repeat_with_the_seed(http: aiohttp.ClientSession) -> None:
    a = await statuses_with_errors(http, 5)
    b = await statuses_with_errors(http, 5)
    c = await statuses_with_errors(http, 6)
    assert a == b and a != c
    assert set(a) == {200, 503}
    assert 15 <= a.count(503) <= 45  # 30 expected


async def test_injected_faults_still_apply_under_a_profile(http: aiohttp.ClientSession) -> None:
    async with Sandbox(profiles=[Profile("convert", median=0.05, capacity=2)]) as sb:
        sb.fail("convert", 502, times=1)
        sb.set_latency("convert", 0.05)
        started = time.monotonic()
        assert (await track(http, sb))[0] == 502
        assert time.monotonic() - started >= 0.1  # the profile's latency, then the fixed one
        assert (await track(http, sb))[0] == 200


# --------------------------------------------------------------------------- control API and CLI


async def test_control_api_sets_and_reports_profiles(http: aiohttp.ClientSession) -> None:
    async with Sandbox() as sb:
        spec = {"kind": "profile", "provider": "conductrics", "median": 0.12, "p99": 0.8, "capacity": 32,
                "retry_after": 1, "error_rate": 0.001, "seed": 2}
        async with http.post(sb.url + "/_sandbox/faults", data=json.dumps(spec)) as r:
            assert r.status == 200
        async with http.post(sb.url + "/_sandbox/faults", data=json.dumps({**spec, "capacity": 0})) as r:
            assert r.status == 400 and "capacity" in (await r.json())["error"]
        async with http.post(sb.url + "/_sandbox/faults", data=json.dumps({**spec, "speed": 1})) as r:
            assert r.status == 400 and "speed" in (await r.json())["error"]
        async with http.get(sb.url + "/_sandbox/records?records=false") as r:
            state = (await r.json())["profiles"]["conductrics"]
        assert (state["capacity"], state["retry_after"], state["p99"]) == (32, "1", 0.8)
        assert state["mean"] == pytest.approx(0.1673, rel=0.01)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_cli_serves_a_profile_and_refuses_a_bad_one() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    bad = subprocess.run([sys.executable, "-m", "consumer", "sandbox", "--profile", "convert:capacity=0"],
                         capture_output=True, text=True, env=env, timeout=60)
    assert bad.returncode == 2 and "capacity" in bad.stderr
    port = free_port()
    cmd = [sys.executable, "-m", "consumer", "sandbox", "--port", str(port),
           "--profile", "convert:median=300ms,capacity=1,retry_after=3"]
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env) as proc:
        try:
            assert proc.stdout is not None
            assert "listening" in proc.stdout.readline()

            async def two_at_once() -> list[tuple[int, str | None]]:
                async with aiohttp.ClientSession() as http:

                    async def one() -> tuple[int, str | None]:
                        async with http.get(f"http://127.0.0.1:{port}{TRACK}", headers=UA) as r:
                            return r.status, r.headers.get("Retry-After")

                    return sorted(await asyncio.gather(one(), one()))

            assert asyncio.run(two_at_once()) == [(200, None), (429, "3")]
        finally:
            proc.terminate()
            proc.wait(timeout=10)
