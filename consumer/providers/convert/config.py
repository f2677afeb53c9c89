"""[convert]: what a user writes for Convert Experiences, validated, with Convert's defaults."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from consumer.config import (
    BatchConfig,
    FlowConfig,
    HttpConfig,
    RetryConfig,
    Rules,
    Table,
    integer_goals,
    parse_batch,
    parse_flow,
    parse_http,
    parse_projects,
    parse_retry,
    parse_rules,
    parse_url,
)
from consumer.model import Attribution, Provider, RefundPolicy, RevenueShare

CONVERT = Provider.register("CONVERT")

# A Convert conversion names its experiment: 30 days of exposures, and one identity per experiment gets all
# of the revenue (docs/operations.md, "Attribution models").
DEFAULT_WINDOW = 30 * 86400.0
DEFAULT_MODEL = (Attribution.LAST_TOUCH, RevenueShare.FULL)
# Convert documents no way to take a conversion back: an order adjustment is skipped, the only policy.
REFUNDS = (RefundPolicy.SKIP,)


@dataclass(frozen=True)
class ConvertProject:
    key: str  # "account_project"
    account_id: str
    project_id: str
    rules: Rules
    base_url: str
    api: str = "track"  # "track" (the seed's GET) or "v1" (batched POST)
    transaction_goals: tuple[str, ...] = ()
    flow: FlowConfig = field(default_factory=FlowConfig)


@dataclass(frozen=True)
class ConvertConfig:
    user_agent: str = "ConvertAgent/1.0 (offline-conversions)"
    batch: BatchConfig = field(default_factory=lambda: BatchConfig(max_events=100, max_bytes=1_000_000))
    retry: RetryConfig = field(default_factory=RetryConfig)
    projects: dict[str, ConvertProject] = field(default_factory=dict)
    http: HttpConfig = field(default_factory=HttpConfig)

    def secrets(self) -> list[str]:
        return []  # the tracking endpoints take no credential


def parse(t: Table) -> ConvertConfig:
    d = ConvertConfig()
    # One request per conversion: throughput is concurrency / latency, so allow more requests at once.
    flow = parse_flow(t.table("flow"), FlowConfig(concurrency=64))

    def project(key: str, p: Table) -> ConvertProject:
        m = re.fullmatch(r"(\d+)_(\d+)", key)
        if not m:
            p.problem(p.path, "a Convert project key is the ID NUMBER 'accountid_projectid', e.g. '1111_2222'")
        account, proj = m.groups() if m else ("0", "0")
        api = p.get_str("api", "track")
        if api not in ("track", "v1"):
            p.problem(p.key("api"), f"expected 'track' or 'v1', got {api!r}")
        host = "track" if api != "v1" else "metrics"
        rules = parse_rules(p, DEFAULT_WINDOW, *DEFAULT_MODEL, refunds=REFUNDS)
        integer_goals(p, rules, CONVERT.slug)
        tx = p.str_list("transaction_goals")
        for i, g in enumerate(tx):
            if g not in rules.goals and not p.failed("goals"):
                p.problem(f"{p.key('transaction_goals')}[{i}]", f"goal {g} is not in goals")
        cp = ConvertProject(
            key=key,
            account_id=account,
            project_id=proj,
            rules=rules,
            base_url=parse_url(p, "base_url", f"https://{proj}.{host}.convertexperiments.com"),
            api=api,
            transaction_goals=tx,
            flow=parse_flow(p.table("flow"), flow),
        )
        p.done()
        return cp

    cfg = ConvertConfig(
        user_agent=t.get_str("user_agent", d.user_agent),
        batch=parse_batch(t.table("batch"), d.batch),
        retry=parse_retry(t.table("retry")),
        projects=parse_projects(t, project),
        http=parse_http(t.table("http")),
    )
    if any(p.api == "v1" for p in cfg.projects.values()) and not cfg.user_agent.startswith("ConvertAgent/"):
        t.problem(t.key("user_agent"), "must start with 'ConvertAgent/': Convert silently drops other agents")
    t.done()
    return cfg
