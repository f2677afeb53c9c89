"""Configuration: the documented shape loads; every invalid value fails at start-up naming its key."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from consumer.config import ConfigError, Secret, load, parse, parse_duration

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "deploy" / "config.example.toml"

BASE: dict[str, Any] = {
    "kafka": {"bootstrap_servers": "b:9092", "topic": "t", "group_id": "g", "dlq_topic": "t.dlq"},
    "kameleoon": {"projects": {"site1": {"goals": [1]}}},
    "convert": {"projects": {"1111_2222": {"goals": [100], "transaction_goals": [100]}}},
    "conductrics": {"projects": {"ac-1": {"agent_api_url": "https://x/ac-1/v3/agent-api", "api_key": "k",
                                          "goals": ["g-p"]}}},
}


def with_(path: str, value: Any) -> dict[str, Any]:
    data = copy.deepcopy(BASE)
    *parents, last = path.split(".")
    node = data
    for p in parents:
        node = node.setdefault(p, {})
    if value is DELETE:
        del node[last]
    else:
        node[last] = value
    return data


DELETE = object()


def test_the_annotated_example_loads_with_its_secrets_from_the_environment() -> None:
    cfg = load(EXAMPLE, env={"CONDUCTRICS_API_KEY": "s3cret-value"})
    assert cfg.kafka.topic == "purchases.completed.v1"
    assert cfg.providers["kameleoon"].projects["f17c21u1ag"].rules.goals == ("36151",)
    assert cfg.providers["kameleoon"].projects["f17c21u1ag"].rules.attribution_window == 7 * 86400
    assert cfg.providers["convert"].projects["1111_2222"].account_id == "1111"
    assert cfg.providers["convert"].projects["1111_2222"].project_id == "2222"
    assert cfg.providers["conductrics"].projects["ac-xxx"].api_key.reveal() == "s3cret-value"
    assert "s3cret-value" not in repr(cfg)
    assert cfg.matcher.max_exposures == 100
    kameleoon = cfg.providers["kameleoon"].projects["f17c21u1ag"].rules
    assert (kameleoon.attribution, kameleoon.revenue_share, kameleoon.require_consent) == ("all", "split", False)
    assert cfg.providers["convert"].projects["1111_2222"].rules.attribution == "last_touch"
    assert cfg.decoding.schema.exists()


def test_defaults_windows_and_derived_convert_url() -> None:
    cfg = parse(BASE, env={})
    assert cfg.providers["kameleoon"].projects["site1"].rules.attribution_window == 7 * 86400
    assert cfg.providers["convert"].projects["1111_2222"].rules.attribution_window == 30 * 86400
    assert cfg.providers["conductrics"].projects["ac-1"].rules.attribution_window == 72 * 3600
    assert cfg.providers["convert"].projects["1111_2222"].base_url == "https://2222.track.convertexperiments.com"
    v1 = parse(with_("convert.projects.1111_2222.api", "v1"), env={})
    assert v1.providers["convert"].projects["1111_2222"].base_url == "https://2222.metrics.convertexperiments.com"


@pytest.mark.parametrize(("path", "value", "key"), [
    ("kafka.topic", DELETE, "kafka.topic"),
    ("kafka.bootstrap_servers", 9092, "kafka.bootstrap_servers"),
    ("kafka.dlq_topic", "t", "kafka.dlq_topic"),
    ("kafka.consumer", {"enable.auto.commit": True}, 'kafka.consumer."enable.auto.commit"'),
    ("kafka.consumer", {"x": [1]}, "kafka.consumer.x"),
    ("kafka.colour", "blue", "kafka.colour"),
    ("decoding.format", "json", "decoding.format"),
    ("decoding.format", "confluent", "decoding.schema_registry_url"),
    ("decoding.schema", "/nope.avsc", "decoding.schema"),
    ("metrics.port", 70000, "metrics.port"),
    ("metrics.port", "9400", "metrics.port"),
    ("pipeline.max_in_flight", 0, "pipeline.max_in_flight"),
    ("pipeline.commit_interval", "soon", "pipeline.commit_interval"),
    ("pipeline.shutdown_deadline", "0s", "pipeline.shutdown_deadline"),
    ("pipeline.gc_threshold", -1, "pipeline.gc_threshold"),
    ("pipeline.dedup_cache_size", -5, "pipeline.dedup_cache_size"),
    ("logging.level", "LOUD", "logging.level"),
    ("matcher.clock_skew", -1, "matcher.clock_skew"),
    ("matcher.rates", {"usd-eur": 1}, "matcher.rates.usd-eur"),
    ("matcher.rates", {"USD/EUR": 0}, 'matcher.rates."USD/EUR"'),
    ("matcher.max_exposures", 0, "matcher.max_exposures"),
    ("matcher.max_exposures", "100", "matcher.max_exposures"),
    ("kameleoon.user_agent", " ", "kameleoon.user_agent"),
    ("kameleoon.batch", {"max_bytes": 4_000_000}, "kameleoon.batch.max_bytes"),
    ("kameleoon.retry", {"max_attempts": 0}, "kameleoon.retry.max_attempts"),
    ("kameleoon.retry", {"base_delay": "2s", "max_delay": "1s"}, "kameleoon.retry.max_delay"),
    ("kameleoon.flow", {"concurrency": 0}, "kameleoon.flow.concurrency"),
    ("kameleoon.projects.site1.goals", [], "kameleoon.projects.site1.goals"),
    ("kameleoon.projects.site1.goals", ["abc"], "kameleoon.projects.site1.goals[0]"),
    ("kameleoon.projects.site1.base_url", "eu-data.kameleoon.io", "kameleoon.projects.site1.base_url"),
    ("kameleoon.projects.site1.attribution_window", "7 days", "kameleoon.projects.site1.attribution_window"),
    ("kameleoon.projects.site1.client_id", "abc", "kameleoon.projects.site1.client_secret"),
    ("kameleoon.projects.site1.channels", ["SHOP"], "kameleoon.projects.site1.channels[0]"),
    ("kameleoon.projects.site1.currency", "euro", "kameleoon.projects.site1.currency"),
    ("kameleoon.projects.site1.min_revenue", "ten", "kameleoon.projects.site1.min_revenue"),
    ("kameleoon.projects.site1", {"goals": [1], "experiments_allow": ["1"], "experiments_deny": ["2"]},
     "kameleoon.projects.site1.experiments_deny"),
    ("kameleoon.projects.site1.flow", {"timeout": "0s"}, "kameleoon.projects.site1.flow.timeout"),
    ("kameleoon.projects.site1.gaols", [1], "kameleoon.projects.site1.gaols"),
    ("kameleoon.projects.site1.attribution", "last", "kameleoon.projects.site1.attribution"),
    ("kameleoon.projects.site1.attribution", "LAST_TOUCH", "kameleoon.projects.site1.attribution"),
    ("kameleoon.projects.site1.revenue_share", "half", "kameleoon.projects.site1.revenue_share"),
    ("kameleoon.projects.site1.require_consent", "yes", "kameleoon.projects.site1.require_consent"),
    ("convert.projects.1111_2222.attribution", 1, "convert.projects.1111_2222.attribution"),
    ("conductrics.projects.ac-1.revenue_share", "", "conductrics.projects.ac-1.revenue_share"),
    ("convert.projects.9-9", {"goals": [1]}, "convert.projects.9-9"),
    ("convert.projects.1111_2222.api", "v2", "convert.projects.1111_2222.api"),
    ("convert.projects.1111_2222.transaction_goals", [999], "convert.projects.1111_2222.transaction_goals[0]"),
    ("conductrics.projects.ac-1.api_key", DELETE, "conductrics.projects.ac-1.api_key"),
    ("conductrics.projects.ac-1.api_key", "${MISSING_KEY}", "conductrics.projects.ac-1.api_key"),
    ("conductrics.projects.ac-1.api_key", "${file:/nonexistent/key}", "conductrics.projects.ac-1.api_key"),
    ("conductrics.projects.ac-1.session", "{visitor}", "conductrics.projects.ac-1.session"),
    ("conductrics.projects.ac-1.agent_api_url", DELETE, "conductrics.projects.ac-1.agent_api_url"),
])
def test_an_invalid_value_names_its_key(path: str, value: Any, key: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse(with_(path, value), env={})
    assert err.value.key == key
    assert f"'{key}'" in str(err.value)


def test_attribution_models_consent_and_the_cap_are_read() -> None:
    data = with_("kameleoon.projects.site1.attribution", "first_touch")
    data["kameleoon"]["projects"]["site1"].update(revenue_share="full", require_consent=True)
    data["matcher"] = {"max_exposures": 5000}
    cfg = parse(data, env={})
    rules = cfg.providers["kameleoon"].projects["site1"].rules
    assert (rules.attribution.value, rules.revenue_share.value, rules.require_consent) == ("first_touch", "full", True)
    assert cfg.matcher.max_exposures == 5000
    defaults = parse(BASE, env={})
    assert defaults.matcher.max_exposures == 100
    assert [(r.attribution.value, r.revenue_share.value, r.require_consent) for r in defaults.rules().values()] == [
        ("all", "split", False), ("last_touch", "full", False), ("all", "split", False)]
    with pytest.raises(ConfigError, match="expected one of 'all', 'last_touch', 'first_touch', got 'last'"):
        parse(with_("kameleoon.projects.site1.attribution", "last"), env={})


def test_v1_requires_a_convert_agent() -> None:
    data = with_("convert.projects.1111_2222.api", "v1")
    data["convert"]["user_agent"] = "Mozilla/5.0"
    with pytest.raises(ConfigError) as err:
        parse(data, env={})
    assert err.value.key == "convert.user_agent"


def test_no_project_at_all_is_an_error() -> None:
    with pytest.raises(ConfigError, match="no provider project"):
        parse({"kafka": BASE["kafka"]}, env={})


def test_secrets_come_from_env_and_files_and_never_print(tmp_path: Path) -> None:
    secret_file = tmp_path / "key"
    secret_file.write_text("from-a-file-123\n")
    data = with_("conductrics.projects.ac-1.api_key", f"${{file:{secret_file}}}")
    data["kameleoon"]["projects"]["site1"].update(client_id="${CID}", client_secret="${CSECRET}")
    cfg = parse(data, env={"CID": "id-456", "CSECRET": "secret-789"})
    assert cfg.providers["conductrics"].projects["ac-1"].api_key.reveal() == "from-a-file-123"
    assert sorted(cfg.secrets()) == ["from-a-file-123", "id-456", "secret-789"]
    text = repr(cfg) + str(cfg)
    assert all(s not in text for s in cfg.secrets())
    assert f"{Secret('x')}" == "Secret('***')"


@pytest.mark.parametrize(("text", "seconds"), [("250ms", 0.25), ("5s", 5), ("30m", 1800), ("72h", 259200),
                                                ("7d", 604800), (12, 12), ("1.5h", 5400)])
def test_durations(text: str | int, seconds: float) -> None:
    assert parse_duration(text, "k") == seconds


_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-10, 10**7), st.floats(allow_nan=True), st.text(max_size=12),
    st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
)
_paths = st.sampled_from([
    "kafka.topic", "kafka.group_id", "decoding.format", "decoding.max_message_bytes", "metrics.port",
    "pipeline.max_in_flight", "pipeline.commit_interval", "logging.level", "matcher.max_age",
    "kameleoon.batch", "kameleoon.retry", "kameleoon.projects.site1.goals", "kameleoon.projects.site1.base_url",
    "kameleoon.projects.site1.attribution_window", "kameleoon.projects.site1.use_mapping_identifier",
    "convert.projects.1111_2222.api", "convert.projects.1111_2222.goals", "conductrics.projects.ac-1.api_key",
    "conductrics.projects.ac-1.session", "kameleoon.projects.site1.min_revenue", "matcher.rates",
])


@settings(max_examples=300, deadline=None)
@given(path=_paths, value=_scalars)
def test_fuzzed_configs_load_or_fail_naming_a_key(path: str, value: Any) -> None:
    try:
        parse(with_(path, value), env={})
    except ConfigError as exc:
        assert exc.key and exc.key != "(file)"
        assert exc.key.split(".")[0] == path.split(".")[0]


def test_check_config_command_exits_2_naming_the_key(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[kafka]\nbootstrap_servers = "b"\ntopic = "t"\ngroup_id = "g"\n')
    proc = subprocess.run([sys.executable, "-m", "consumer", "check-config", str(bad)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "kafka.dlq_topic" in proc.stderr
    broken = tmp_path / "broken.toml"
    broken.write_text("[kafka\n")
    proc = subprocess.run([sys.executable, "-m", "consumer", "check-config", str(broken)], capture_output=True,
                          text=True)
    assert proc.returncode == 2 and "not valid TOML" in proc.stderr


def test_tls_and_sasl_settings_reach_the_consumer_and_the_dlq_producer() -> None:
    from consumer.source import consumer_config

    data = copy.deepcopy(BASE)
    data["kafka"]["common"] = {"security.protocol": "SASL_SSL", "sasl.mechanisms": "SCRAM-SHA-512",
                               "sasl.username": "svc", "sasl.password": "${KAFKA_PASSWORD}",
                               "ssl.ca.location": "/etc/ssl/ca.pem"}
    data["kafka"]["consumer"] = {"sasl.mechanisms": "OAUTHBEARER"}  # a section-specific value wins
    cfg = parse(data, env={"KAFKA_PASSWORD": "pw-from-env"})
    conf = consumer_config(cfg.kafka)
    assert conf["security.protocol"] == "SASL_SSL" and conf["ssl.ca.location"] == "/etc/ssl/ca.pem"
    assert conf["sasl.password"] == "pw-from-env" and conf["sasl.mechanisms"] == "OAUTHBEARER"
    assert conf["enable.auto.commit"] is False and conf["enable.auto.offset.store"] is False
    from consumer.app import Application

    producer = Application.producer_config(cfg)
    assert producer["security.protocol"] == "SASL_SSL" and producer["sasl.mechanisms"] == "SCRAM-SHA-512"
    assert producer["sasl.password"] == "pw-from-env"
