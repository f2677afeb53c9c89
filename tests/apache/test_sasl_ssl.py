"""On Apache Kafka behind a SASL_SSL listener (SCRAM-SHA-512 users created at format time, a CA and a broker
certificate made here with openssl): the service and its DLQ producer connect with the keys documented
in deploy/config.example.toml, and a wrong password stops the service at start, naming the cause and
never the password.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from consumer.apache_kafka import ApacheKafka, Scram
from consumer.app import EXIT_KAFKA_AUTH, Application
from consumer.config import parse
from consumer.metrics import Metrics
from consumer.sandbox import Sandbox
from tests.conftest import read_all, to_toml
from tests.reliability.harness import (
    REPO,
    account,
    config_dict,
    conversions_of,
    dlq_sources,
    expected_view,
    produce,
    result_line,
)

USER = "offline-conversions"
PASSWORD = "scram-pw-7c1e9a"
EXAMPLE = REPO / "deploy" / "config.example.toml"


def openssl(*args: str) -> None:
    done = subprocess.run(["openssl", *args], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr


def make_pki(d: Path) -> dict[str, Path]:
    """A CA, and a broker key (PKCS#8) and certificate for 127.0.0.1/localhost signed by it."""
    p = {n: d / f"{n}.pem" for n in ("ca-key", "ca", "key", "csr", "cert")}
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=test-ca",
            "-keyout", str(p["ca-key"]), "-out", str(p["ca"]))
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost",
            "-keyout", str(p["key"]), "-out", str(p["csr"]))
    ext = d / "san.ext"
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    openssl("x509", "-req", "-in", str(p["csr"]), "-CA", str(p["ca"]), "-CAkey", str(p["ca-key"]),
            "-CAcreateserial", "-days", "2", "-extfile", str(ext), "-out", str(p["cert"]))
    return p


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ApacheKafka, dict[str, Path]]]:
    d = tmp_path_factory.mktemp("sasl")
    pki = make_pki(d)
    with ApacheKafka(scram=Scram({USER: PASSWORD}, pki["key"], pki["cert"]), directory=d / "kafka") as k:
        yield k, pki


def documented_security_keys() -> dict[str, str]:
    """The commented librdkafka keys under [kafka.common] in the example config, as a user uncomments them."""
    keys: dict[str, str] = {}
    inside = False
    for line in EXAMPLE.read_text().splitlines():
        if line.startswith("["):
            inside = line.startswith("[kafka.common]")
            continue
        if inside and line.startswith('# "'):
            k, _, v = line[2:].partition("=")
            keys[k.strip().strip('"')] = v.split("#")[0].strip().strip('"')
    return keys


def secured_config(k: ApacheKafka, pki: dict[str, Path], topics: dict[str, str], url: str) -> dict[str, Any]:
    data = config_dict(k.sasl_bootstrap, topics, url)
    data["logging"] = {"level": "WARNING"}
    common = documented_security_keys()
    assert {"security.protocol", "sasl.mechanisms", "sasl.username", "sasl.password", "ssl.ca.location"} <= set(
        common), f"deploy/config.example.toml documents {sorted(common)}"
    data["kafka"]["common"] = {**common, "ssl.ca.location": str(pki["ca"])}
    return data


async def test_service_and_dlq_producer_over_sasl_ssl(secured: tuple[ApacheKafka, dict[str, Path]],
                                                      sandbox: Sandbox) -> None:
    k, pki = secured
    topics = {"topic": "secure.purchases", "dlq": "secure.purchases.dlq", "group": "secure"}
    k.create_topics([topics["topic"], topics["dlq"]])  # over the PLAINTEXT listener, as an admin would
    data = secured_config(k, pki, topics, sandbox.url)
    env = {"KAFKA_USERNAME": USER, "KAFKA_PASSWORD": PASSWORD}
    cfg = parse(data, env=env)
    stream = produce(k.bootstrap, topics["topic"], 200, 6, seed=101)
    app = Application(cfg, metrics=Metrics(), install_signals=False,
                      stop_when=lambda a: a.consumed >= stream.total and a.live == 0)
    assert await asyncio.wait_for(app.run(), 90) == 0, app.fatal
    acc = account(sandbox, expected_view(conversions_of(cfg, stream.items)))
    assert acc.lost == 0 and acc.unexpected == 0, acc
    sources = dlq_sources(read_all(k.bootstrap, topics["dlq"], len(stream.bad)))
    assert set(sources) == stream.malformed_positions(), "the DLQ producer wrote over SASL_SSL too"
    result_line("sasl-ssl", listener=k.sasl_bootstrap, conversions=acc.expected, dead_letters=len(sources))


async def test_wrong_password_stops_at_start_naming_the_cause(secured: tuple[ApacheKafka, dict[str, Path]],
                                                              sandbox: Sandbox, tmp_path: Path) -> None:
    k, pki = secured
    topics = {"topic": "secure.wrong", "dlq": "secure.wrong.dlq", "group": "secure-wrong"}
    k.create_topics([topics["topic"], topics["dlq"]])
    data = secured_config(k, pki, topics, sandbox.url)
    data["logging"] = {"level": "INFO", "format": "json"}
    path = tmp_path / "wrong.toml"
    path.write_text(to_toml(data))
    wrong = "not-the-password-4f2d"
    env = {**os.environ, "KAFKA_USERNAME": USER, "KAFKA_PASSWORD": wrong,
           "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "consumer", "run", "--config", str(path), cwd=str(REPO), env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        if proc.returncode is None:
            proc.kill()
    text = out.decode(errors="replace")
    assert proc.returncode == EXIT_KAFKA_AUTH, text[-3000:]
    assert "Kafka refused the credentials" in text and "sasl.password" in text, text[-3000:]
    assert "SCRAM-SHA-512" in text or "Authentication failed" in text, text[-3000:]
    assert wrong not in text and PASSWORD not in text
    result_line("sasl-ssl wrong password", exit_code=proc.returncode,
                cause=next(ln for ln in text.splitlines() if "refused the credentials" in ln)[:160])
