"""A bad config is reported whole at start-up: librdkafka's settings checked offline, every error at once,
misspelt keys with a suggestion, invalid URLs, no value from `${…}` ever echoed, and the metrics port.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import socket
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from consumer.config import ConfigError, ConfigErrors, load, parse
from consumer.kafkacheck import check, properties
from tests.test_config import BASE, EXAMPLE, ROOT
from tests.test_kafka_logs import closed_port, offline_service_config, write_config

CLI = [sys.executable, "-m", "consumer"]


def with_kafka(**sections: dict[str, Any]) -> dict[str, Any]:
    data = copy.deepcopy(BASE)
    data["kafka"].update(sections)
    return data


def errors_of(data: dict[str, Any], env: dict[str, str] | None = None, **kw: Any) -> dict[str, str]:
    """Key -> message of every error `parse` reports for `data` (the Kafka clients checked too)."""
    with pytest.raises(ConfigError) as err:
        parse(data, env=env or {}, check=check, **kw)
    found = err.value.errors if isinstance(err.value, ConfigErrors) else (err.value,)
    return {e.key: e.message for e in found}


# --------------------------------------------------------------------------- 4: librdkafka, offline


def test_librdkafka_rejects_each_bad_property_under_its_own_key_with_a_suggestion() -> None:
    found = errors_of(with_kafka(
        consumer={"session.timeot.ms": 6000, "fetch.wait.max.ms": "soon"},
        producer={"compression.type": "zsd"},
    ))
    assert found['kafka.consumer."session.timeot.ms"'] == (
        'librdkafka has no property "session.timeot.ms" (did you mean "session.timeout.ms"?)')
    assert "expected an integer, got 'soon'" in found['kafka.consumer."fetch.wait.max.ms"']
    assert "did you mean 'zstd'?" in found['kafka.producer."compression.type"']
    assert len(found) == 3


def test_an_unknown_sasl_mechanism_and_a_bad_enum_are_caught_before_any_connection() -> None:
    found = errors_of(with_kafka(common={"security.protocol": "SASL_SSL", "sasl.mechanism": "SCRAM-SHA512",
                                         "sasl.username": "u", "sasl.password": "p"}))
    assert "Unsupported SASL mechanism" in found['kafka.common."sasl.mechanism"']
    assert "did you mean 'SCRAM-SHA-512'?" in found['kafka.common."sasl.mechanism"']
    found = errors_of(with_kafka(common={"security.protocol": "SASL_SSLX"}))
    assert "did you mean 'sasl_ssl'?" in found['kafka.common."security.protocol"']


def test_an_alias_and_a_missing_ca_file_are_traced_to_the_key_the_user_wrote(tmp_path: Path) -> None:
    # librdkafka names linger.ms by what it aliases (queue.buffering.max.ms): the key is still the user's.
    found = errors_of(with_kafka(producer={"linger.ms": "later"},
                                 common={"security.protocol": "SSL", "ssl.ca.location": str(tmp_path / "ca.pem")}))
    assert "expected a float, got 'later'" in found['kafka.producer."linger.ms"']
    assert f"no such file: '{tmp_path / 'ca.pem'}'" in found['kafka.common."ssl.ca.location"']


def test_good_kafka_settings_pass_and_misplaced_ones_are_warnings() -> None:
    warnings: list[ConfigError] = []
    cfg = parse(with_kafka(common={"session.timeout.ms": 7000}, consumer={"fetch.wait.max.ms": 100}),
                env={}, check=check, warnings=warnings)
    assert cfg.kafka.consumer == {"fetch.wait.max.ms": 100}
    assert [(w.key, "consumer property" in w.message) for w in warnings] == [
        ('kafka.common."session.timeout.ms"', True)]


def test_librdkafkas_property_table_is_read_from_the_running_library() -> None:
    table = properties()
    assert table["session.timeout.ms"].scope == "C" and table["linger.ms"].alias_of == "queue.buffering.max.ms"
    assert "sasl_ssl" in table["security.protocol"].values
    assert "SCRAM-SHA-512" in table["sasl.mechanisms"].values


def test_check_config_builds_the_clients_without_connecting(tmp_path: Path) -> None:
    """A broker that would see a connection at once (a listening socket) sees none."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        bootstrap = f"127.0.0.1:{listener.getsockname()[1]}"
        data = offline_service_config(bootstrap)
        data["kafka"]["consumer"]["session.timeot.ms"] = 6000
        proc = subprocess.run([*CLI, "check-config", str(write_config(tmp_path, data))], capture_output=True,
                              text=True, timeout=60)
        assert proc.returncode == 2, proc.stderr
        assert 'kafka.consumer."session.timeot.ms"' in proc.stderr and "session.timeout.ms" in proc.stderr
        assert "Traceback" not in proc.stderr
        # The process has exited: a connection it had made would be waiting in the backlog now.
        listener.setblocking(False)
        with pytest.raises(BlockingIOError):
            listener.accept()


def test_an_oidc_client_is_checked_without_fetching_a_token() -> None:
    """librdkafka fetches an OIDC token while it creates the client: the check must not let it."""
    with socket.socket() as token_endpoint:
        token_endpoint.bind(("127.0.0.1", 0))
        token_endpoint.listen(16)
        common = {"security.protocol": "SASL_SSL", "sasl.mechanisms": "OAUTHBEARER", "sasl.oauthbearer.method": "oidc",
                  "sasl.oauthbearer.client.id": "svc", "sasl.oauthbearer.client.secret": "s3cret",
                  "sasl.oauthbearer.token.endpoint.url": f"http://127.0.0.1:{token_endpoint.getsockname()[1]}/t"}
        parse(with_kafka(common=common), env={}, check=check)
        found = errors_of(with_kafka(common={**common, "sasl.oauthbearer.scope.x": "y"}))
        assert list(found) == ['kafka.common."sasl.oauthbearer.scope.x"']
        token_endpoint.setblocking(False)
        with pytest.raises(BlockingIOError):
            token_endpoint.accept()


def test_run_exits_2_naming_a_bad_librdkafka_property(tmp_path: Path) -> None:
    data = offline_service_config(f"127.0.0.1:{closed_port()}")
    data["kafka"]["common"] = {"security.protocol": "SASL_PLAINTEXT", "sasl.mechanisms": "KERBEROS"}
    proc = subprocess.run([*CLI, "run", "--config", str(write_config(tmp_path, data))], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2
    assert 'kafka.common."sasl.mechanisms"' in proc.stderr and "Traceback" not in proc.stderr


def test_a_metrics_port_in_use_exits_2_naming_the_key(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        cfg = write_config(tmp_path, offline_service_config(f"127.0.0.1:{closed_port()}", metrics_port=port))
        proc = subprocess.run([*CLI, "run", "--config", str(cfg)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "OSError" not in proc.stderr
    errors = [json.loads(line) for line in proc.stderr.splitlines() if '"metrics.port"' in line]
    assert errors and errors[0]["level"] == "error" and errors[0]["key"] == "metrics.port"
    assert f"cannot listen on 127.0.0.1:{port}: port {port} is in use" in errors[0]["msg"]


# --------------------------------------------------------------------------- 6: values from ${…}


def test_a_secret_put_in_the_wrong_key_is_never_echoed(tmp_path: Path) -> None:
    key = "sk-live-7d1f0c9a2b44e6"
    data = copy.deepcopy(BASE)
    data["conductrics"]["projects"]["ac-1"]["agent_api_url"] = "${CONDUCTRICS_API_KEY}"
    data["kameleoon"]["projects"]["site1"]["currency"] = "${CONDUCTRICS_API_KEY}"
    data["kafka"]["common"] = {"security.protocol": "SASL_SSL", "sasl.mechanism": "${CONDUCTRICS_API_KEY}"}
    found = errors_of(data, env={"CONDUCTRICS_API_KEY": key})
    assert found["conductrics.projects.ac-1.agent_api_url"].endswith("the value from ${CONDUCTRICS_API_KEY}")
    assert found["kameleoon.projects.site1.currency"].endswith("got the value from ${CONDUCTRICS_API_KEY}")
    assert 'kafka.common."sasl.mechanism"' in found  # librdkafka echoes the mechanism it refuses
    assert all(key not in m for m in found.values()), found
    # The same through the command, and from a secret file.
    secret_file = tmp_path / "api-key"
    secret_file.write_text(key + "\n")
    data["conductrics"]["projects"]["ac-1"]["agent_api_url"] = f"https://${{file:{secret_file}}}/x y"
    proc = subprocess.run([*CLI, "check-config", str(write_config(tmp_path, data))], capture_output=True,
                          text=True, timeout=60, env={**os.environ, "CONDUCTRICS_API_KEY": key})
    assert proc.returncode == 2
    assert "conductrics.projects.ac-1.agent_api_url" in proc.stderr and 'kafka.common."sasl.mechanism"' in proc.stderr
    assert key not in proc.stderr + proc.stdout
    assert "${file:" in proc.stderr


def test_credentials_in_a_url_are_not_echoed() -> None:
    data = copy.deepcopy(BASE)
    data["decoding"] = {"format": "confluent", "schema_registry_url": "https://user:pa55w0rd-xyz@registry/ x"}
    found = errors_of(data)
    assert "***@registry" in found["decoding.schema_registry_url"]
    assert "pa55w0rd" not in found["decoding.schema_registry_url"]


def test_rates_take_values_from_the_environment() -> None:
    data = copy.deepcopy(BASE)
    data["matcher"] = {"rates": {"USD/EUR": "${USD_EUR}"}}
    cfg = parse(data, env={"USD_EUR": "0.92"})
    assert str(cfg.matcher.rates[("USD", "EUR")]) == "0.92"
    found = errors_of(data, env={"USD_EUR": "-0.92x"})
    assert found == {'matcher.rates."USD/EUR"': "expected a decimal number, got the value from ${USD_EUR}"}


def test_kafka_credentials_are_among_the_secrets_the_logs_redact() -> None:
    data = with_kafka(common={"sasl.username": "svc", "sasl.password": "${KAFKA_PASSWORD}"})
    cfg = parse(data, env={"KAFKA_PASSWORD": "kafka-pw-123456"})
    assert "kafka-pw-123456" in cfg.secrets() and "svc" not in cfg.secrets()


# --------------------------------------------------------------------------- 7: every error at once


def test_every_error_is_reported_at_once_and_a_misspelt_key_gets_a_suggestion() -> None:
    data = copy.deepcopy(BASE)
    data["kafka"]["groupid"] = data["kafka"].pop("group_id")
    data["kafka"]["consumer"] = {"session.timeot.ms": 6000}
    data["metrics"] = {"prot": 9400}
    data["pipeline"] = {"max_in_flight": 0}
    data["kameleoon"]["projects"]["site1"]["base_url"] = "https://eu data.kameleoon.io"
    data["colour"] = "blue"
    found = errors_of(data)
    assert found["kafka.groupid"] == "unknown key 'groupid' (did you mean 'group_id'?)"
    assert "kafka.group_id" not in found  # not "is required": the suggestion says it all
    assert found["metrics.prot"] == "unknown key 'prot' (did you mean 'port'?)"
    assert found["pipeline.max_in_flight"] == "must be at least 1, got 0"
    assert found["kameleoon.projects.site1.base_url"].startswith("contains a space")
    assert found["colour"].startswith(
        "unknown key 'colour' (the keys here: adjustments, conductrics, control, convert, decoding")
    # The librdkafka tables themselves are sound, so the clients are built too (with a stand-in group).
    assert found['kafka.consumer."session.timeot.ms"'].endswith('(did you mean "session.timeout.ms"?)')
    assert len(found) == 6


def test_a_missing_required_key_without_a_near_miss_is_still_required() -> None:
    data = copy.deepcopy(BASE)
    del data["kafka"]["group_id"]
    assert errors_of(data) == {"kafka.group_id": "is required"}


@pytest.mark.parametrize(("url", "why"), [
    ("https://api xxx.conductrics.com/ac-1/v3/agent-api", "contains a space"),
    ("https://api.conductrics.com /ac-1", "contains a space"),
    ("https:///ac-1/v3/agent-api", "expected an http(s) URL"),
    ("ftp://api.conductrics.com/ac-1", "expected an http(s) URL"),
    ("https://api.conductrics.com:99999/ac-1", "is not a valid URL"),
    ("https://api.conductrics.com:http/ac-1", "is not a valid URL"),
    ("https://api_conductrics!.com/ac-1", "has an invalid host"),
    ("https://[::1x]/ac-1", "is not a valid URL"),
])
def test_an_invalid_url_is_rejected_naming_its_key(url: str, why: str) -> None:
    data = copy.deepcopy(BASE)
    data["conductrics"]["projects"]["ac-1"]["agent_api_url"] = url
    found = errors_of(data)
    assert list(found) == ["conductrics.projects.ac-1.agent_api_url"]
    assert found["conductrics.projects.ac-1.agent_api_url"].startswith(why)


@pytest.mark.parametrize("url", ["http://127.0.0.1:8080/ac-1/v3/agent-api", "https://[::1]:8443/x",
                                 "http://sandbox:8080", "https://api-xxx.conductrics.com/ac-xxx/v3/agent-api"])
def test_valid_urls_pass(url: str) -> None:
    data = copy.deepcopy(BASE)
    data["conductrics"]["projects"]["ac-1"]["agent_api_url"] = url
    assert parse(data, env={}).providers["conductrics"].projects["ac-1"].agent_api_url == url.rstrip("/")


def test_check_config_prints_every_error_and_exits_2(tmp_path: Path) -> None:
    data = offline_service_config("127.0.0.1:9092")
    data["kafka"]["groupid"] = data["kafka"].pop("group_id")
    data["conductrics"]["projects"]["ac-xxx"]["agent_api_url"] = "https://api xxx/ac-xxx/v3/agent-api"
    data["pipeline"]["commit_interval"] = "soon"
    proc = subprocess.run([*CLI, "check-config", str(write_config(tmp_path, data))], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2
    lines = proc.stderr.splitlines()
    assert lines[0].endswith("config.toml: 3 errors")
    assert "unknown key 'groupid' (did you mean 'group_id'?)" in lines[1]
    assert any("pipeline.commit_interval" in ln for ln in lines[2:])
    assert any("conductrics.projects.ac-xxx.agent_api_url" in ln for ln in lines[2:])


def documented_validation_command() -> list[str]:
    """The command the example config's header gives, with `offline-conversions` the installed script."""
    line = next(ln for ln in EXAMPLE.read_text().splitlines() if ln.startswith("# Validate with:"))
    argv = shlex.split(line.split(":", 1)[1])
    assert argv[0] == "offline-conversions"
    script = Path(sys.executable).parent / "offline-conversions"
    return [str(script) if script.exists() else CLI[0], *([] if script.exists() else CLI[1:]), *argv[1:]]


def test_the_example_configs_documented_validation_line_passes_without_its_secrets() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CONDUCTRICS", "KAMELEOON", "KAFKA"))}
    proc = subprocess.run(documented_validation_command(), capture_output=True, text=True, cwd=ROOT, env=env,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "ok" in proc.stdout and proc.stderr == ""
    # Without --no-env the secrets are required, as at start-up, and the message says how to check without.
    proc = subprocess.run([*CLI, "check-config", "deploy/config.example.toml"], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=60)
    assert proc.returncode == 2
    assert "CONDUCTRICS_API_KEY is not set" in proc.stderr and "--no-env" in proc.stderr


def test_no_env_leaves_placeholders_unjudged_but_reports_everything_else() -> None:
    data = copy.deepcopy(BASE)
    data["conductrics"]["projects"]["ac-1"]["agent_api_url"] = "${CONDUCTRICS_URL}"  # not a URL as a placeholder
    data["kafka"]["common"] = {"security.protocol": "SASL_SSL", "sasl.mechanisms": "${KAFKA_MECHANISM}",
                               "sasl.password": "${KAFKA_PASSWORD}"}
    cfg = parse(data, env={}, placeholders=True, check=check)
    assert cfg.kafka.common["sasl.password"] == "placeholder"
    data["kameleoon"]["projects"]["site1"]["currency"] = "euro"
    assert errors_of(data, placeholders=True) == {
        "kameleoon.projects.site1.currency": "expected an ISO 4217 code like 'EUR', got 'euro'"}


@pytest.mark.parametrize("where", ["compose", "k8s"])
def test_the_shipped_configs_pass_the_full_check(where: str) -> None:
    if where == "compose":
        text = (ROOT / "deploy" / "compose" / "config.toml").read_text()
    else:
        docs = yaml.safe_load_all((ROOT / "deploy" / "k8s" / "configmap.yaml").read_text())
        text = next(d for d in docs if d and d.get("kind") == "ConfigMap")["data"]["config.toml"]
    refs = set(re.findall(r"\$\{([A-Z_]+)\}", text))
    warnings: list[ConfigError] = []
    parse(tomllib.loads(text), env={r: "x" for r in refs}, base_dir=ROOT, check=check, warnings=warnings)
    assert warnings == []
    example = load(EXAMPLE, env={"CONDUCTRICS_API_KEY": "x"}, check=check).kafka
    assert example.consumer == {} and example.group_protocol == "auto"
