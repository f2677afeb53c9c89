"""The container image, built from the Dockerfile and run with podman as Kubernetes would run it.

The image is built once per session on a local stand-in for the Dockerfile's base image (no registry is
reachable; `scripts/image-test-setup` builds the stand-in and configures podman, and `scripts/test` runs
it). The container runs with the host's network, so it reaches the test broker and the sandbox on
loopback, with deploy/k8s/deployment.yaml's restrictions: read-only root, /tmp the only writable path,
the config mounted read-only, no capabilities, the image's own non-root user.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
import yaml

from consumer.config import parse
from consumer.embedded import EmbeddedBroker, free_port
from consumer.sandbox import Sandbox
from tests.conftest import read_all, to_toml
from tests.reliability.harness import (
    account,
    all_present,
    committed_async,
    config_dict,
    conversions_of,
    dlq_sources,
    expected_view,
    new_topics,
    produce,
    wait_for,
)

ROOT = Path(__file__).resolve().parents[1]
BASE_IMAGE = os.environ.get("OC_BASE_IMAGE", "localhost/python:3.11-bookworm")
IMAGE = "localhost/offline-conversions:image-test"
SETUP = "scripts/image-test-setup (scripts/test runs it)"
CONDUCTRICS_KEY = "api-1234567890"  # the sandbox's key for project ac-xxx; passed as the Secret would be


def grace_period() -> int:
    """terminationGracePeriodSeconds of the Deployment: how long the kubelet waits before SIGKILL."""
    doc = yaml.safe_load((ROOT / "deploy/k8s/deployment.yaml").read_text())
    return int(doc["spec"]["template"]["spec"]["terminationGracePeriodSeconds"])


@dataclass
class Ran:
    code: int
    out: str
    err: str


def podman_sync(*args: str, timeout: float = 60.0) -> Ran:
    p = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout)
    return Ran(p.returncode, p.stdout, p.stderr)


async def podman(*args: str, timeout: float = 60.0) -> Ran:
    """podman without blocking the event loop: the sandbox serves the container from this same loop."""
    proc = await asyncio.create_subprocess_exec("podman", *args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise AssertionError(f"podman {' '.join(args[:2])} did not finish within {timeout:.0f}s") from None
    assert proc.returncode is not None
    return Ran(proc.returncode, out.decode(errors="replace"), err.decode(errors="replace"))


@pytest.fixture(scope="session")
def image() -> Iterator[str]:
    """The project's image, built from the working tree (podman's layer cache makes a rebuild quick)."""
    if shutil.which("podman") is None:
        pytest.fail(f"podman is not installed: run {SETUP}")
    if podman_sync("image", "exists", BASE_IMAGE).code != 0:
        pytest.fail(f"the base image {BASE_IMAGE} does not exist: run {SETUP}")
    t0 = time.monotonic()
    # --format docker: the OCI format has no HEALTHCHECK, and podman would drop it from the image.
    built = podman_sync("build", "--network=host", "--format", "docker", "--build-arg", f"PYTHON_IMAGE={BASE_IMAGE}",
                        "--tag", IMAGE, str(ROOT), timeout=900)
    assert built.code == 0, f"podman build failed (is podman set up? {SETUP}):\n{built.err[-3000:]}"
    print(f"image built in {time.monotonic() - t0:.1f}s")
    yield IMAGE


def k8s_like(image: str, name: str, config_dir: Path, *extra: str, entrypoint: str | None = None) -> list[str]:
    """`podman run` arguments with the Deployment's securityContext and volumes, on the host's network.
    --read-only-tmpfs=false: podman would add tmpfs on /run and /var/tmp; the pod has only /tmp (emptyDir)."""
    args = ["run", "--detach", "--name", name, "--network=host",
            "--read-only", "--read-only-tmpfs=false", "--tmpfs", "/tmp:rw,size=64m",
            "--cap-drop=ALL", "--security-opt=no-new-privileges",
            "--volume", f"{config_dir}:/etc/offline-conversions:ro", *extra]
    if entrypoint is not None:
        args += ["--entrypoint", entrypoint]
    return [*args, image]


async def written_by_podman(image: str, config_dir: Path) -> set[str]:
    """`podman diff` of a container that ran nothing: what podman itself writes when it starts one
    (here `C /etc`: it links /etc/mtab), so not the service's doing."""
    name = f"oc-image-base-{uuid.uuid4().hex[:8]}"
    try:
        ran = await podman(*k8s_like(image, name, config_dir, "--no-healthcheck", entrypoint="true"))
        assert ran.code == 0, f"podman run failed (is podman set up? {SETUP}):\n{ran.err[-2000:]}"
        assert (await podman("wait", name)).out.strip() == "0"
        return set((await podman("diff", name)).out.split("\n")) - {""}
    finally:
        await podman("rm", "--force", name)


async def http_status(url: str) -> int | None:
    try:
        async with aiohttp.ClientSession() as http, http.get(url, timeout=aiohttp.ClientTimeout(total=2)) as r:
            return r.status
    except aiohttp.ClientError:
        return None


async def test_the_image_delivers_a_stream_stays_healthy_and_stops_on_sigterm(
    image: str, broker: EmbeddedBroker, sandbox: Sandbox, tmp_path: Path,
) -> None:
    topics = new_topics(broker)
    port = free_port()
    data = config_dict(broker.bootstrap, topics, sandbox.url)
    data["metrics"] = {"host": "127.0.0.1", "port": port}
    data["logging"] = {"level": "INFO", "format": "json"}
    # Offsets are committed only on the way out, so the commit after SIGTERM is seen to happen.
    data["pipeline"]["commit_interval"] = "10m"
    data["conductrics"]["projects"]["ac-xxx"]["api_key"] = "${CONDUCTRICS_API_KEY}"
    config_dir = tmp_path / "config"
    config_dir.mkdir()
    (config_dir / "config.toml").write_text(to_toml(data))
    cfg = parse(data, env={"CONDUCTRICS_API_KEY": CONDUCTRICS_KEY})
    baseline = await written_by_podman(image, config_dir)

    # Half the stream waits in the topic before the container starts, half arrives while it runs.
    stream = produce(broker.bootstrap, topics["topic"], 300, 4, seed=131)
    name = f"oc-image-{uuid.uuid4().hex[:8]}"
    run = k8s_like(image, name, config_dir,
                   "--env", f"CONDUCTRICS_API_KEY={CONDUCTRICS_KEY}",
                   "--env", f"OFFLINE_CONVERSIONS_HEALTHCHECK_PORT={port}")
    try:
        started = await podman(*run)
        assert started.code == 0, f"podman run failed (is podman set up? {SETUP}):\n{started.err[-2000:]}"

        async def ready() -> bool:
            state = (await podman("inspect", "--format", "{{.State.Status}}", name)).out.strip()
            if state != "running":
                logs = await podman("logs", name)
                raise AssertionError(f"the container is {state}:\n{(logs.out + logs.err)[-3000:]}")
            return await http_status(f"http://127.0.0.1:{port}/readyz") == 200

        await wait_for(ready, 60, "/readyz to answer 200", every=0.5)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, lambda: produce(broker.bootstrap, topics["topic"], 300, 0, seed=132,
                                                          stream=stream))
        want = expected_view(conversions_of(cfg, stream.items))
        await sandbox.wait_until(lambda s: all_present(s, want), timeout=60)
        before = await committed_async(broker.bootstrap, topics["group"], topics["topic"])
        assert all(before[p] < end for p, end in stream.ends().items()), f"committed before SIGTERM: {before}"

        # The service runs as the image's user, not root (the Deployment's runAsUser 10001).
        user = (await podman("image", "inspect", "--format", "{{.Config.User}}", image)).out.strip()
        assert user == "10001:10001"
        pid = (await podman("inspect", "--format", "{{.State.Pid}}", name)).out.strip()
        status = Path(f"/proc/{pid}/status").read_text()
        uids = next(line.split()[1:] for line in status.splitlines() if line.startswith("Uid:"))
        assert set(uids) == {"10001"}, f"the service runs as uid {uids}"

        # The image's own HEALTHCHECK command, as the engine runs it.
        health = await podman("healthcheck", "run", name)
        assert health.code == 0, f"HEALTHCHECK answered unhealthy: {health.out} {health.err}"
        state = (await podman("inspect", "--format", "{{.State.Health.Status}}", name)).out.strip()
        assert state == "healthy"

        # SIGTERM (the image's STOPSIGNAL), then SIGKILL after the grace period, as the kubelet does.
        grace = grace_period()
        t0 = time.monotonic()
        stopped = await podman("stop", "--time", str(grace), name, timeout=grace + 30)
        stop_seconds = time.monotonic() - t0
        assert stopped.code == 0, stopped.err
        code = (await podman("inspect", "--format", "{{.State.ExitCode}}", name)).out.strip()
        logs = await podman("logs", name)
        assert code == "0", f"exit {code} after SIGTERM (137 is SIGKILL):\n{logs.err[-3000:]}"
        assert stop_seconds < grace, f"took {stop_seconds:.1f}s to stop, grace period {grace}s"
        print(f"stopped in {stop_seconds:.1f}s after SIGTERM")
        assert await committed_async(broker.bootstrap, topics["group"], topics["topic"]) == stream.ends()

        # Nothing written outside the mounted volumes (the config, /tmp).
        written = set((await podman("diff", name)).out.split("\n")) - {""}
        assert written <= baseline, f"written into the image's filesystem: {sorted(written - baseline)}"
    finally:
        await podman("rm", "--force", "--time", "0", name)

    out = logs.out + logs.err
    assert '"stopped"' in out and '"started"' in out
    assert CONDUCTRICS_KEY not in out, "the secret from the environment appears in the logs"
    tally = account(sandbox, want)
    assert (tally.lost, tally.unexpected, tally.duplicates) == (0, 0, 0), tally
    letters = await loop.run_in_executor(None, read_all, broker.bootstrap, topics["dlq"], len(stream.bad))
    assert set(dlq_sources(letters)) == stream.malformed_positions()
