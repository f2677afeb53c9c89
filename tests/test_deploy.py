"""Checks of the deployment and operator artifacts: Dockerfile, compose, Kubernetes, Prometheus, Grafana, docs.

Nothing here is skipped: a missing tool (promtool, prometheus, kubernetes-validate, check-jsonschema)
fails the test that needs it. CI installs Debian `prometheus` and the pip packages named in
docs/operations.md ("CI requirements of tests/test_deploy.py").
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from consumer.config import load as load_config
from consumer.config import parse as parse_config
from consumer.groups import group_of
from consumer.metrics import Metrics
from consumer.providers.registry import modules

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
PROM = DEPLOY / "prometheus"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "offline-conversions.json"
COMPOSE = ROOT / "docker-compose.yml"
OPERATIONS = ROOT / "docs" / "operations.md"
METRICS_DOC = ROOT / "docs" / "metrics.md"
METRIC_NAME = re.compile(r"\boffline_conversions_[a-z_]+\b")


def tool(name: str) -> str:
    path = shutil.which(name) or (f"/usr/bin/{name}" if Path(f"/usr/bin/{name}").exists() else None)
    assert path, f"{name} is not installed: CI must `apt-get install -y prometheus` (it ships {name})"
    return path


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=120, check=False)


def yaml_docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


# --------------------------------------------------------------------------- the metric catalogue


def catalogue() -> dict[str, tuple[str, tuple[str, ...]]]:
    """Family name -> (type, label names), from the service's own registry."""
    out: dict[str, tuple[str, tuple[str, ...]]] = {}
    m = Metrics()
    for collector in list(m.registry._collector_to_names):  # the registry keeps no public list
        for fam in collector.describe():
            labels = tuple(getattr(collector, "_labelnames", ()))
            out[fam.name] = (fam.type, labels)
    return out


def series_names() -> set[str]:
    """Every series name a query can select: counters' _total, histograms' _bucket/_count/_sum."""
    names: set[str] = set()
    for fam, (kind, _) in catalogue().items():
        if kind == "counter":
            names.add(f"{fam}_total")
        elif kind == "histogram":
            names |= {f"{fam}_bucket", f"{fam}_count", f"{fam}_sum"}
        else:
            names.add(fam)
    return names


def group_series() -> set[str]:
    """The series names of the metrics labelled with the consumer group (one series set per provider group)."""
    out: set[str] = set()
    for fam, (kind, labels) in catalogue().items():
        if "group" in labels:
            out |= ({f"{fam}_total"} if kind == "counter" else
                    {f"{fam}_bucket", f"{fam}_count", f"{fam}_sum"} if kind == "histogram" else {fam})
    return out


def test_catalogue_is_read_from_the_service() -> None:
    names = series_names()
    assert "offline_conversions_consumer_lag_messages" in names
    assert "offline_conversions_http_request_duration_seconds_count" in names
    assert len(catalogue()) >= 20
    assert {"offline_conversions_consumer_lag_messages", "offline_conversions_events_consumed_total",
            "offline_conversions_in_flight_events", "offline_conversions_paused_partitions"} <= group_series()


def test_metrics_doc_describes_every_metric_with_type_and_labels() -> None:
    doc = METRICS_DOC.read_text()
    sections = re.split(r"^### ", doc, flags=re.M)
    by_name = {}
    for s in sections[1:]:
        m = re.match(r"`([a-z_]+)`", s)
        if m:
            by_name[m.group(1)] = s
    for fam, (kind, labels) in catalogue().items():
        shown = f"{fam}_total" if kind == "counter" else fam
        assert shown in by_name, f"docs/metrics.md has no '### `{shown}`' section"
        section = by_name[shown]
        assert re.search(rf"\*\*Type:\*\* {kind}\b", section), f"{shown}: type {kind} not stated"
        for label in labels:
            assert f"`{label}`" in section, f"{shown}: label {label} not documented"
        assert "```promql" in section, f"{shown}: no example PromQL"
    documented = set(by_name)
    known = {f"{f}_total" if k == "counter" else f for f, (k, _) in catalogue().items()}
    assert documented <= known, f"docs/metrics.md documents metrics the service lacks: {documented - known}"


# --------------------------------------------------------------------------- Prometheus rules


def test_promtool_check_rules() -> None:
    r = run(tool("promtool"), "check", "rules", str(PROM / "rules.yml"))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout


def test_promtool_check_config() -> None:
    r = run(tool("promtool"), "check", "config", str(PROM / "prometheus.yml"))
    assert r.returncode == 0, r.stdout + r.stderr


def test_promtool_test_rules() -> None:
    r = run(tool("promtool"), "test", "rules", str(PROM / "rules.test.yml"))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout


def alerting_rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load((PROM / "rules.yml").read_text())
    return [r for g in doc["groups"] for r in g["rules"] if "alert" in r]


def github_anchors(markdown: str) -> set[str]:
    anchors = set()
    for line in markdown.splitlines():
        m = re.match(r"^#{1,6}\s+(.*?)\s*$", line)
        if m:
            slug = re.sub(r"[^\w\- ]", "", m.group(1).lower()).replace(" ", "-")
            anchors.add(slug)
    return anchors


REQUIRED_ALERTS = {
    # Per consumer group: every provider's group reads the whole topic, so groups are never added up.
    "OfflineConversionsConsumerLagGrowing": ["deriv(offline_conversions_consumer_lag_messages[10m])",
                                             "sum by (group, topic) (max by (group, topic, partition) ("],
    "OfflineConversionsDeadLetterRateHigh": ["offline_conversions_dlq_messages_total"],
    "OfflineConversionsProviderErrorRatioHigh": ["offline_conversions_http_request_duration_seconds_count"],
    "OfflineConversionsCircuitOpen": ["offline_conversions_circuit_state", "== 2"],
    "OfflineConversionsNoEventsConsumed": ["sum by (group) (rate(offline_conversions_events_consumed_total",
                                           "sum by (group) (max by (group, topic, partition) ("],
    "OfflineConversionsNotReady": ["offline_conversions_ready == 0"],
}


def test_alerts_have_severity_annotations_and_runbooks() -> None:
    rules = alerting_rules()
    by_name = {r["alert"]: r for r in rules}
    for name, fragments in REQUIRED_ALERTS.items():
        assert name in by_name, f"missing alert {name}"
        for f in fragments:
            assert f in by_name[name]["expr"], f"{name}: expected {f!r} in its expression"
    assert by_name["OfflineConversionsCircuitOpen"]["for"] == "2m"
    assert by_name["OfflineConversionsNotReady"]["for"] == "5m"
    anchors = github_anchors(OPERATIONS.read_text())
    for r in rules:
        assert r["labels"]["severity"] in {"warning", "critical"}, r["alert"]
        ann = r["annotations"]
        if set(METRIC_NAME.findall(r["expr"])) & group_series():
            assert "$labels.group" in ann["summary"] and "$labels.group" in ann["description"], (
                f"{r['alert']}: a per-group alert names its group (and so its provider)")
        assert ann.get("summary") and ann.get("description"), r["alert"]
        path, _, anchor = ann["runbook_url"].partition("#")
        assert path.endswith("docs/operations.md"), r["alert"]
        assert anchor in anchors, f"{r['alert']}: docs/operations.md has no heading for #{anchor}"


def test_every_alert_has_a_firing_and_a_quiet_unit_test() -> None:
    tests = yaml.safe_load((PROM / "rules.test.yml").read_text())["tests"]
    fired: set[str] = set()
    quiet: set[str] = set()
    for t in tests:
        for case in t.get("alert_rule_test", []):
            (fired if case.get("exp_alerts") else quiet).add(case["alertname"])
    names = {r["alert"] for r in alerting_rules()}
    assert names - fired == set(), f"alerts never tested firing: {names - fired}"
    assert names - quiet == set(), f"alerts never tested quiet: {names - quiet}"


def test_rules_reference_only_exported_metrics() -> None:
    known = series_names()
    for r in alerting_rules():
        for name in METRIC_NAME.findall(r["expr"]):
            assert name in known, f"{r['alert']} uses {name}, which the service does not export"


# --------------------------------------------------------------------------- Grafana dashboard


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def dashboard_exprs() -> list[tuple[str, str]]:
    out = []
    for p in dashboard()["panels"]:
        for t in p.get("targets", []):
            out.append((p["title"], t["expr"]))
    return out


GRAFANA_VARS = {
    "$__rate_interval": "1m",
    "${__rate_interval}": "1m",
    "$__interval": "30s",
    "${__interval}": "30s",
    "$__range": "1h",
    "${__range}": "1h",
    "$instance": ".*",
    "${instance}": ".*",
    "$group": ".*",
    "${group}": ".*",
}


def substitute(expr: str) -> str:
    for k in sorted(GRAFANA_VARS, key=len, reverse=True):
        expr = expr.replace(k, GRAFANA_VARS[k])
    assert "$" not in expr, f"unknown Grafana variable left in {expr!r}"
    return expr


def test_dashboard_structure() -> None:
    d = dashboard()
    assert d["uid"] == "offline-conversions"
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    variables = {v["name"] for v in d["templating"]["list"]}
    assert {"datasource", "instance", "group"} <= variables
    for p in d["panels"]:
        assert {"h", "w", "x", "y"} <= set(p["gridPos"]), p["title"]
        if p["type"] != "row":
            assert p["targets"], f"panel {p['title']} has no query"
            assert p["datasource"]["uid"] == "${datasource}", p["title"]
    ds = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())
    assert ds["datasources"][0]["type"] == "prometheus"
    current = next(v for v in d["templating"]["list"] if v["name"] == "datasource")["current"]["value"]
    assert current == ds["datasources"][0]["uid"]


def test_dashboard_covers_the_required_views() -> None:
    exprs = "\n".join(e for _, e in dashboard_exprs())
    for needle in [
        "offline_conversions_events_consumed_total",  # throughput consumed
        'outcome="delivered"',  # throughput delivered
        "sum by (group) (max by (group, topic, partition) (offline_conversions_consumer_lag_messages",  # per group
        "max by (group, topic, partition) (offline_conversions_consumer_lag_messages",  # per group and partition
        "sum by (group) (rate(offline_conversions_events_consumed_total",  # consumed per group
        "sum by (provider, outcome) (rate(offline_conversions_conversions_total",  # outcomes per provider
        'status_class!="2xx"',  # error rate
        "offline_conversions_http_retries_total",  # retry rate
        "histogram_quantile(0.5, sum by (provider, le) (rate(offline_conversions_http_request_duration_seconds_bucket",
        "histogram_quantile(0.99, sum by (provider, le) (rate(offline_conversions_http_request_duration_seconds_bucket",
        "offline_conversions_dlq_messages_total",
        "sum by (group) (offline_conversions_in_flight_events",
        "sum by (group) (offline_conversions_paused_partitions",
        "sum by (group) (offline_conversions_assigned_partitions",
        "sum by (group) (offline_conversions_commit_failing_partitions",
        "sum by (group, result) (rate(offline_conversions_commits_total",
        "offline_conversions_circuit_state",
        "sum by (provider, project) (offline_conversions_concurrency_limit",  # the (adaptive) limit
        "histogram_quantile(0.5, sum by (provider, le) (rate(offline_conversions_delivery_delay_seconds_bucket",
        "histogram_quantile(0.99, sum by (provider, le) (rate(offline_conversions_delivery_delay_seconds_bucket",
    ]:
        assert needle in exprs, f"dashboard lacks {needle}"


def test_dashboard_references_only_exported_metrics() -> None:
    known = series_names()
    for title, expr in dashboard_exprs():
        for name in METRIC_NAME.findall(expr):
            assert name in known, f"panel {title!r} uses {name}, which the service does not export"


def test_dashboard_filters_group_metrics_by_the_group_variable() -> None:
    """Every query of a metric labelled with the group selects `group=~"$group"` in each of its selectors."""
    group_metrics = group_series()
    seen = 0
    for title, expr in dashboard_exprs():
        for m in re.finditer(r"\b(offline_conversions_[a-z_]+)\b(\{[^}]*\})?", expr):
            if m.group(1) in group_metrics:
                seen += 1
                assert m.group(2) and 'group=~"$group"' in m.group(2), (
                    f"panel {title!r}: {m.group(1)} is not filtered by the group variable in {expr!r}")
    assert seen >= 10
    group_var = next(v for v in dashboard()["templating"]["list"] if v["name"] == "group")
    assert group_var["includeAll"] and group_var["multi"] and group_var["allValue"] == ".*"
    assert re.fullmatch(r"label_values\(offline_conversions_[a-z_]+(\{[^}]*\})?, group\)", group_var["definition"])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get_json(url: str) -> dict[str, Any]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return dict(json.loads(r.read()))
    except urllib.error.HTTPError as e:
        return dict(json.loads(e.read()))


PROVIDERS = ("kameleoon", "convert", "conductrics")
GROUPS = tuple(f"offline-conversions.{p}" for p in PROVIDERS)


def populate(m: Metrics) -> None:
    """Give every metric series with realistic label values, as a running service would: a pipeline per provider,
    each in its own consumer group, reading every message of the topic."""
    for group in GROUPS:
        m.events_consumed.labels(group).inc(100)
        m.events_decoded.labels(group).inc(99)
        m.purchases.labels(group, "attributed").inc(20)
        m.purchases.labels(group, "unattributed").inc(79)
        m.in_flight.labels(group).set(5)
        m.paused_partitions.labels(group).set(0)
        m.assigned_partitions.labels(group).set(3)
        m.rebalances.labels(group, "assigned").inc()
        m.commits.labels(group, "ok").inc(4)
        m.commit_failing_partitions.labels(group).set(0)
        m.consumer_lag.labels(group, "purchases.completed", "0").set(10)
        m.consumer_lag.labels(group, "purchases.completed", "1").set(0)
    m.decode_failures.labels("schema").inc()
    for provider in PROVIDERS:
        m.match_decisions.labels(provider, "matched").inc(20)
        m.match_decisions.labels(provider, "outside_window").inc(3)
        m.conversions.labels(provider, "delivered").inc(20)
        m.conversions.labels(provider, "dead_lettered").inc(1)
        m.http_duration.labels(provider, "2xx").observe(0.05)
        m.http_duration.labels(provider, "5xx").observe(0.2)
        m.retries.labels(provider, "5xx").inc()
        m.batch_conversions.labels(provider).observe(10)
        m.batch_bytes.labels(provider).observe(2048)
        m.circuit_state.labels(provider, "p1").set(0)
        m.concurrency_limit.labels(provider, "p1").set(64)
        m.project_paused.labels(provider, "p1", "credentials").set(0)
        m.project_paused.labels(provider, "p1", "operator").set(0)
        m.delivery_delay.labels(provider).observe(120)
        m.dlq_produced.labels("dispatch", provider).inc()
        m.adjustments.labels(provider, "retracted" if provider == "kameleoon" else "not_supported").inc()
        m.ledger_records.labels(provider, "delivered").inc(20)
        m.ledger_records.labels(provider, "dead_lettered").inc()
        m.ledger_recovery_records.labels(provider).inc(40)
        m.ledger_recovered_keys.labels(provider).inc(2)
        m.ledger_recovery_seconds.labels(provider).observe(0.4)
        m.ledger_recovery_fallbacks.labels(provider, "no_metadata").inc()
    m.adjustments.labels("none", "orphan").inc()
    m.token_grants.labels("kameleoon", "ok").inc()
    m.ledger_records.labels("none", "unattributed").inc(79)
    m.ledger_write_failures.labels("_MSG_TIMED_OUT").inc(0)
    m.ledger_pending.set(3)
    m.dlq_failures.inc(0)
    m.dlq_values_omitted.labels("MSG_SIZE_TOO_LARGE").inc()
    m.processing_delay.observe(0.3)
    m.ready.set(1)


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real Prometheus on loopback, scraping two instances of the service's metrics, with the rules loaded."""
    from prometheus_client import start_http_server

    binary = tool("prometheus")
    tmp = tmp_path_factory.mktemp("prometheus")
    servers = []
    targets = []
    for _ in range(2):  # two members exporting the same partition: catches vector-matching errors
        m = Metrics()
        populate(m)
        port = free_port()
        server, _thread = start_http_server(port, addr="127.0.0.1", registry=m.registry)
        servers.append(server)
        targets.append(f"127.0.0.1:{port}")
    shutil.copy(PROM / "rules.yml", tmp / "rules.yml")
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": ["rules.yml"],
        "scrape_configs": [{"job_name": "offline-conversions", "static_configs": [{"targets": targets}]}],
    }
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log_file = (tmp / "prometheus.log").open("w")
    proc = subprocess.Popen(
        [
            binary,
            f"--config.file={tmp / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=log_file,
    )
    try:
        deadline = time.monotonic() + 60
        ready = False
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                q = urllib.parse.quote("count_over_time(up[1m])")
                res = get_json(f"{base}/api/v1/query?query={q}")["data"]["result"]
                # Two scrapes of each target, so rate() over a window has two samples.
                ready = len(res) == 2 and all(float(r["value"][1]) >= 2 for r in res)
            except (urllib.error.URLError, ConnectionError, KeyError, ValueError):
                ready = False
            if ready:
                break
            time.sleep(0.2)  # polling interval, bounded by the deadline above
        log = (tmp / "prometheus.log").read_text()
        assert ready, f"prometheus did not scrape both targets twice within 60s:\n{log}"
        yield base
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log_file.close()
        for s in servers:
            s.shutdown()


def test_dashboard_queries_parse_and_return_data(prometheus: str) -> None:
    problems = []
    for title, expr in dashboard_exprs():
        q = urllib.parse.quote(substitute(expr))
        body = get_json(f"{prometheus}/api/v1/query?query={q}")
        if body.get("status") != "success":
            problems.append(f"{title}: {expr}: {body.get('error')}")
        elif not body["data"]["result"]:
            problems.append(f"{title}: {expr}: no series (wrong metric or label name?)")
    assert not problems, "\n".join(problems)


def test_dashboard_shows_group_metrics_per_group(prometheus: str) -> None:
    """A query of a group-labelled metric keeps the group: one series (set) per provider group, none summed away."""
    group_metrics = group_series()
    problems = []
    for title, expr in dashboard_exprs():
        if not set(METRIC_NAME.findall(expr)) & group_metrics:
            continue
        body = get_json(f"{prometheus}/api/v1/query?query={urllib.parse.quote(substitute(expr))}")
        result = body.get("data", {}).get("result", [])
        groups = {r["metric"].get("group") for r in result}
        if groups != set(GROUPS):
            problems.append(f"{title}: {expr}: groups {groups}, expected one series set per group {set(GROUPS)}")
    assert not problems, "\n".join(problems)


def metrics_doc_queries() -> list[str]:
    """Every example query of docs/metrics.md: the ```promql blocks, one query per paragraph."""
    blocks = re.findall(r"```promql\n(.*?)```", METRICS_DOC.read_text(), flags=re.S)
    return [q.strip() for b in blocks for q in re.split(r"\n\s*\n", b) if q.strip()]


def test_metrics_doc_examples_are_valid_queries(prometheus: str) -> None:
    """The documented queries parse and evaluate on the service's series (a wrong label set errors or is empty
    only where the query filters: comparisons such as `== 2` may rightly return nothing)."""
    queries = metrics_doc_queries()
    assert len(queries) >= 26
    problems = []
    for q in queries:
        body = get_json(f"{prometheus}/api/v1/query?query={urllib.parse.quote(q)}")
        if body.get("status") != "success":
            problems.append(f"{q}: {body.get('error')}")
        elif not body["data"]["result"] and not re.search(r"(==|>|<)\s*[\d.]+\s*$", q):
            problems.append(f"{q}: no series")
    assert not problems, "\n".join(problems)


def test_a_broken_query_is_reported(prometheus: str) -> None:
    """The check above can fail: a syntax error comes back as bad_data."""
    body = get_json(f"{prometheus}/api/v1/query?query=" + urllib.parse.quote("sum(rate(x[5m])"))
    assert body["status"] == "error" and body["errorType"] == "bad_data"


def test_rules_evaluate_without_errors_on_real_series(prometheus: str) -> None:
    """promtool only parses; a vector-matching error shows only when a rule is evaluated on real data."""
    deadline = time.monotonic() + 30
    rules: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        groups = get_json(f"{prometheus}/api/v1/rules")["data"]["groups"]
        rules = [r for g in groups for r in g["rules"]]
        if rules and all(not r["lastEvaluation"].startswith("0001") for r in rules):
            break
        time.sleep(0.2)  # polling interval, bounded by the deadline above
    assert len(rules) == len(alerting_rules())
    bad = [(r["name"], r.get("lastError")) for r in rules if r["health"] != "ok"]
    assert not bad, bad


# --------------------------------------------------------------------------- docker-compose.yml


def compose() -> dict[str, Any]:
    return dict(yaml.safe_load(COMPOSE.read_text()))


def project_version() -> str:
    return str(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"])


def test_compose_validates_against_the_compose_spec() -> None:
    # The venv's own bin first: the suite may run with the venv's python without the venv on PATH.
    exe = shutil.which("check-jsonschema", path=os.pathsep.join([str(Path(sys.executable).parent),
                                                                os.environ.get("PATH", "")]))
    assert exe, "check-jsonschema is not installed: CI must pip install check-jsonschema"
    r = run(exe, "--builtin-schema", "vendor.compose-spec", str(COMPOSE))
    assert r.returncode == 0, r.stdout + r.stderr


def test_compose_images_are_pinned() -> None:
    for name, svc in compose()["services"].items():
        image = svc.get("image")
        assert image, f"{name}: no image"
        repo, _, tag = image.rpartition(":")
        assert repo and "/" not in tag, f"{name}: image {image} has no tag"
        assert tag != "latest" and re.search(r"\d", tag), f"{name}: image {image} is not pinned to a version"
        if "build" in svc:
            assert tag == project_version(), f"{name}: the project image is tagged with the pyproject version"


def test_compose_has_the_required_services() -> None:
    services = compose()["services"]
    images = {n: s["image"].split(":")[0] for n, s in services.items()}
    for needed in ("apache/kafka", "confluentinc/cp-schema-registry", "prom/prometheus", "grafana/grafana"):
        assert needed in images.values(), f"no {needed} service"
    kafka = next(s for s in services.values() if s["image"].startswith("apache/kafka") and "environment" in s)
    assert "controller" in kafka["environment"]["KAFKA_PROCESS_ROLES"], "Kafka must run in KRaft mode"
    commands = {n: s.get("command") for n, s in services.items() if "build" in s}
    assert any(c and c[0] == "sandbox" for c in commands.values())
    assert any(c and c[0] == "run" for c in commands.values())
    producer = next(c for c in commands.values() if c and c[0] == "produce")
    assert producer[producer.index("--format") + 1] == "confluent"


def test_compose_mounts_exist_and_dependencies_are_defined() -> None:
    doc = compose()
    services = doc["services"]
    named_volumes = set(doc.get("volumes") or {})
    for name, svc in services.items():
        for v in svc.get("volumes", []):
            source = v.split(":")[0] if isinstance(v, str) else v["source"]
            if source.startswith((".", "/")):
                assert (ROOT / source).exists(), f"{name}: mounted {source} does not exist"
            else:
                assert source in named_volumes, f"{name}: volume {source} is not declared"
        deps = svc.get("depends_on", {})
        for dep in deps:
            assert dep in services, f"{name} depends on unknown service {dep}"
            condition = deps[dep]["condition"] if isinstance(deps, dict) else "service_started"
            if condition == "service_healthy":
                assert "healthcheck" in services[dep] or "build" in services[dep], f"{dep} has no healthcheck"


def test_compose_project_image_services_override_the_service_healthcheck() -> None:
    """The image's HEALTHCHECK probes :9400/healthz; containers running another command must not inherit it."""
    for name, svc in compose()["services"].items():
        if "build" in svc and svc["command"][0] != "run":
            assert "healthcheck" in svc, f"{name} would inherit the service's /healthz HEALTHCHECK"


def test_compose_service_config_is_valid_and_uses_the_stack() -> None:
    svc = next(s for s in compose()["services"].values() if s.get("command", [None])[0] == "run")
    mount = next(v for v in svc["volumes"] if v.endswith("/etc/offline-conversions/config.toml:ro"))
    env = {k: str(v) for k, v in svc.get("environment", {}).items()} | {"HOSTNAME": "container-id"}
    cfg = load_config(ROOT / mount.split(":")[0], env=env)
    assert cfg.kafka.bootstrap_servers == "kafka:9092"
    assert cfg.decoding.format == "confluent"
    assert cfg.decoding.schema_registry_url == "http://schema-registry:8081"
    kameleoon, convert, conductrics = (cfg.providers[p] for p in ("kameleoon", "convert", "conductrics"))
    urls = [p.base_url for p in kameleoon.projects.values()] + [p.base_url for p in convert.projects.values()]
    urls += [p.agent_api_url for p in conductrics.projects.values()]
    assert kameleoon.projects and convert.projects and conductrics.projects
    assert all(u.startswith("http://sandbox:8080") for u in urls), urls
    assert int(re.sub(r"\D", "", svc["stop_grace_period"])) > cfg.pipeline.shutdown_deadline
    init = next(s for n, s in compose()["services"].items() if "init" in n)
    script = "\n".join(init["command"])
    assert cfg.kafka.topic in script and cfg.kafka.dlq_topic in script, "the init container must create both topics"


# --------------------------------------------------------------------------- Kubernetes


def kustomization() -> dict[str, Any]:
    return dict(yaml.safe_load((K8S / "kustomization.yaml").read_text()))


def k8s_resources() -> list[tuple[str, dict[str, Any]]]:
    return [(f, d) for f in kustomization()["resources"] for d in yaml_docs(K8S / f)]


def test_kustomization_lists_existing_files_and_not_the_example_secret() -> None:
    listed = kustomization()["resources"]
    for f in listed:
        assert (K8S / f).is_file(), f"kustomization lists {f}, which does not exist"
    assert "secret.example.yaml" not in listed, "applying the example Secret would overwrite real credentials"
    assert (K8S / "secret.example.yaml").is_file()
    manifests = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml", "secret.example.yaml"}
    assert manifests == set(listed), f"manifests not in the kustomization: {manifests - set(listed)}"


def test_k8s_builtin_kinds_validate_against_kubernetes_schemas() -> None:
    from kubernetes_validate import utils as kv

    builtin = {"ConfigMap", "Deployment", "Service", "PodDisruptionBudget", "Secret"}
    seen = set()
    docs = k8s_resources() + [("secret.example.yaml", d) for d in yaml_docs(K8S / "secret.example.yaml")]
    for _file, d in docs:
        if d["kind"] in builtin:
            kv.validate(d, "1.30.0", strict=True)  # raises ValidationError with the path on failure
            seen.add(d["kind"])
    assert seen == builtin


def test_kubernetes_validate_rejects_a_broken_manifest() -> None:
    from kubernetes_validate import utils as kv

    d = next(d for _, d in k8s_resources() if d["kind"] == "Deployment")
    broken = json.loads(json.dumps(d))
    broken["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["memroy"] = "1Gi"
    broken["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = "45"
    with pytest.raises(kv.ValidationError):
        kv.validate(broken, "1.30.0", strict=True)


def by_kind(kind: str) -> dict[str, Any]:
    found = [d for _, d in k8s_resources() if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def test_deployment_probes_security_and_shutdown() -> None:
    dep = by_kind("Deployment")
    pod = dep["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["resources"]["requests"] and c["resources"]["limits"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    env = {e["name"]: e for e in c["env"]}
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    secret_refs = {e["valueFrom"]["secretKeyRef"]["name"] for e in c["env"] if "secretKeyRef" in e.get("valueFrom", {})}
    assert secret_refs == {"offline-conversions-secrets"}
    assert not any("value" in e for e in c["env"]), "no literal values in env: secrets come from the Secret"
    cm = by_kind("ConfigMap")
    assert any(v.get("configMap", {}).get("name") == cm["metadata"]["name"] for v in pod["volumes"])
    cfg = parse_config(tomllib.loads(cm["data"]["config.toml"]), env={n: "x" for n in env})
    assert pod["terminationGracePeriodSeconds"] > cfg.pipeline.shutdown_deadline
    assert cfg.kafka.consumer["group.instance.id"] == "x", "static membership from POD_NAME"
    assert "${POD_NAME}" in cm["data"]["config.toml"]
    assert "replicas" not in dep["spec"], "the ScaledObject owns the replica count"
    assert c["ports"][0]["containerPort"] == cfg.metrics.port


def test_configmap_needs_only_variables_the_deployment_provides() -> None:
    cm = by_kind("ConfigMap")
    (c,) = by_kind("Deployment")["spec"]["template"]["spec"]["containers"]
    provided = {e["name"] for e in c["env"]}
    used = set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", cm["data"]["config.toml"]))
    assert used <= provided, f"config.toml uses unset variables {used - provided}"
    secret = yaml_docs(K8S / "secret.example.yaml")[0]
    refs = {e["valueFrom"]["secretKeyRef"]["key"] for e in c["env"] if "secretKeyRef" in e.get("valueFrom", {})}
    assert refs <= set(secret["stringData"]), "the example Secret must name every key the Deployment reads"
    assert all("CHANGE-ME" in v for v in secret["stringData"].values()), "example values must be marked placeholders"


def test_configmap_files_and_secrets_are_ones_the_deployment_mounts() -> None:
    # Commented-out lines count too: they are what an operator uncomments.
    text = by_kind("ConfigMap")["data"]["config.toml"]
    pod = by_kind("Deployment")["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"].rstrip("/"): volumes[m["name"]] for m in c["volumeMounts"]}
    paths = re.findall(r'"ssl\.[a-z.]+\.location"\s*=\s*"([^"]+)"', text) + re.findall(r"\$\{file:([^}]+)\}", text)
    assert paths, "the ConfigMap names the Kafka CA file"
    for path in paths:
        parents = [m for m in mounts if path.startswith(m + "/")]
        assert parents, f"{path} is under no volumeMount of the Deployment"
        mount = max(parents, key=len)
        volume = mounts[mount]
        if "configMap" in volume:  # a ConfigMap volume holds its listed items and nothing else
            items = {i["path"] for i in volume["configMap"]["items"]}
            assert path[len(mount) + 1:] in items, f"{path} is not a file of the {volume['name']} volume"
        else:
            assert "secret" in volume, f"{path}: credentials come from a Secret volume"
    named = set(re.findall(r"\b(offline-conversions-[a-z0-9-]+) Secret\b", text))
    assert "offline-conversions-kafka-ca" in named
    provided = {v["secret"]["secretName"] for v in pod["volumes"] if "secret" in v}
    provided |= {e["valueFrom"]["secretKeyRef"]["name"] for e in c["env"] if "secretKeyRef" in e.get("valueFrom", {})}
    assert named <= provided, f"the ConfigMap names Secrets the Deployment does not use: {named - provided}"
    ca = next(v for v in pod["volumes"] if v.get("secret", {}).get("secretName") == "offline-conversions-kafka-ca")
    assert ca["secret"]["optional"] is True, "a cluster without a private CA must still start"


def test_service_pdb_and_servicemonitor_select_the_pods() -> None:
    labels = by_kind("Deployment")["spec"]["template"]["metadata"]["labels"]
    svc = by_kind("Service")
    assert svc["spec"]["selector"].items() <= labels.items()
    pdb = by_kind("PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    sm = by_kind("ServiceMonitor")
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    port_names = {p["name"] for p in svc["spec"]["ports"]}
    assert all(e["port"] in port_names for e in sm["spec"]["endpoints"])
    assert svc["metadata"]["name"] == "offline-conversions", "job label must match rules.yml up{job=...}"


def test_scaledobject_scales_on_each_provider_groups_lag_capped_at_partitions() -> None:
    """One kafka trigger per consumer group the ConfigMap's configuration runs: a group per configured provider."""
    so = by_kind("ScaledObject")
    assert so["apiVersion"] == "keda.sh/v1alpha1"
    dep = by_kind("Deployment")
    assert so["spec"]["scaleTargetRef"]["name"] == dep["metadata"]["name"]
    cm = by_kind("ConfigMap")
    cfg = parse_config(
        tomllib.loads(cm["data"]["config.toml"]),
        env=dict.fromkeys(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", cm["data"]["config.toml"]), "x"),
    )
    providers = sorted(p.slug for p in modules(cfg))
    assert providers == sorted(PROVIDERS), "the example ConfigMap configures every provider"
    groups = ({group_of(cfg.kafka, None)} if cfg.kafka.isolation == "shared"
              else {group_of(cfg.kafka, p) for p in providers})
    assert groups == {f"{cfg.kafka.group_id}.{p}" for p in providers}, "isolation is per provider in the ConfigMap"
    triggers = so["spec"]["triggers"]
    # A trigger for a group the service does not run would hold KEDA at maxReplicaCount (no committed offsets).
    assert sorted(t["metadata"]["consumerGroup"] for t in triggers) == sorted(groups), "one trigger per group"
    assert len({t["name"] for t in triggers}) == len(triggers), "trigger names are unique"
    auth = by_kind("TriggerAuthentication")
    for trigger in triggers:
        assert trigger["type"] == "kafka"
        meta = trigger["metadata"]
        assert meta["topic"] == cfg.kafka.topic
        assert meta["bootstrapServers"] == cfg.kafka.bootstrap_servers
        assert all(isinstance(v, str) for v in meta.values()), "KEDA trigger metadata values are strings"
        assert meta["excludePersistentLag"] == "true", "a stalled provider's group must not scale the Deployment out"
        assert trigger["authenticationRef"]["name"] == auth["metadata"]["name"]
    # The triggers differ in their group alone.
    same = [{k: v for k, v in t["metadata"].items() if k != "consumerGroup"} for t in triggers]
    assert all(m == same[0] for m in same), "the groups' triggers differ only in consumerGroup"
    assert 1 <= so["spec"]["minReplicaCount"] <= so["spec"]["maxReplicaCount"]
    text = (K8S / "keda-scaledobject.yaml").read_text()
    assert re.search(r"#.*partition count", text), "maxReplicaCount must say it equals the partition count"
    assert re.search(r"#.*[Kk]eep only the triggers of the providers configured", text)


# --------------------------------------------------------------------------- Dockerfile


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_dockerfile_is_multistage_pinned_nonroot_with_healthcheck() -> None:
    ins = dockerfile_instructions()
    args = dict(a.split("=", 1) for k, a in ins if k == "ARG" and "=" in a)
    froms = [a.split()[0] for k, a in ins if k == "FROM"]
    assert len(froms) >= 2, "multi-stage build"
    for f in froms:
        image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], f)
        assert re.fullmatch(r"python:3\.11\.\d+-slim(-\w+)?", image), f"base image {image} is not pinned"
    users = [a for k, a in ins if k == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "the final stage runs as a non-root USER"
    assert [k for k, _ in ins].index("USER") > [k for k, _ in ins].index("FROM") + 1
    (hc,) = [a for k, a in ins if k == "HEALTHCHECK"]
    assert "/healthz" in hc and "curl" not in hc
    assert ("ENTRYPOINT", '["offline-conversions"]') in ins
    assert ("CMD", '["run", "--config", "/etc/offline-conversions/config.toml"]') in ins
    assert ("EXPOSE", "9400") in ins
    final = ins[max(i for i, (k, _) in enumerate(ins) if k == "FROM") :]
    copies = [a for k, a in final if k == "COPY"]
    assert copies and all(c.startswith("--from=builder") for c in copies), "the final stage copies only the venv"
    assert not any("build-essential" in a or "gcc" in a for k, a in final if k == "RUN"), "no compilers at runtime"


def test_dockerfile_copies_only_existing_files_the_dockerignore_keeps() -> None:
    ins = dockerfile_instructions()
    sources = [s for k, a in ins if k == "COPY" and not a.startswith("--from") for s in a.split()[:-1]]
    lines = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()]
    ignore = [ln for ln in lines if ln and not ln.startswith("#")]
    assert ignore[0] == "*", ".dockerignore starts from an empty context"
    kept = {ln[1:].rstrip("/") for ln in ignore if ln.startswith("!")}
    for s in sources:
        if "*" not in s:  # a glob may match nothing (optional files); a plain path must exist
            assert (ROOT / s).exists(), f"Dockerfile copies {s}, which is not in the repository"
        assert s.rstrip("/*") in kept, f"Dockerfile copies {s}, which .dockerignore excludes"
    assert {"pyproject.toml", "consumer", "schemas"} <= {s.rstrip("/") for s in sources}
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    readme = pyproject["project"].get("readme")
    if isinstance(readme, str):
        assert any(fnmatch.fnmatch(readme, s) for s in sources), "the wheel build needs the readme pyproject names"
        assert readme in kept
