"""[kameleoon]: what a user writes for Kameleoon, validated, with Kameleoon's defaults; every error names its key."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from consumer.config import (
    BatchConfig,
    FlowConfig,
    HttpConfig,
    RetryConfig,
    Rules,
    Secret,
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

KAMELEOON = Provider.register("KAMELEOON")

# Kameleoon attributes through the visitor: a week of exposures, every identity keeps its experiments and
# shares the revenue (docs/operations.md, "Attribution models").
DEFAULT_WINDOW = 7 * 86400.0
DEFAULT_MODEL = (Attribution.ALL, RevenueShare.SPLIT)
# Kameleoon documents `negative: true` (cancel a conversion): an order adjustment retracts by default, or is
# skipped (docs/operations.md, "Refunds and cancellations").
REFUNDS = (RefundPolicy.RETRACT, RefundPolicy.SKIP)


@dataclass(frozen=True)
class KameleoonProject:
    site_code: str
    rules: Rules
    base_url: str = "https://eu-data.kameleoon.io"
    use_mapping_identifier: bool = False
    client_id: Secret | None = None
    client_secret: Secret | None = None
    flow: FlowConfig = field(default_factory=FlowConfig)


@dataclass(frozen=True)
class KameleoonConfig:
    user_agent: str = "offline-conversions/1.0"
    token_url: str = "https://api.kameleoon.com/oauth/token"
    token_refresh_margin: float = 60.0
    batch: BatchConfig = field(default_factory=BatchConfig)
    retry: RetryConfig = field(default_factory=RetryConfig)
    projects: dict[str, KameleoonProject] = field(default_factory=dict)
    http: HttpConfig = field(default_factory=HttpConfig)

    def secrets(self) -> list[str]:
        return [s.reveal() for p in self.projects.values() for s in (p.client_id, p.client_secret) if s]


def parse(t: Table) -> KameleoonConfig:
    d = KameleoonConfig()
    flow = parse_flow(t.table("flow"), FlowConfig())

    def project(site_code: str, p: Table) -> KameleoonProject:
        if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", site_code):
            p.problem(p.path, "a Kameleoon siteCode is letters and digits")
        cid, csec = p.secret("client_id"), p.secret("client_secret")
        if bool(cid) != bool(csec):
            p.problem(p.key("client_secret" if cid else "client_id"), "client_id and client_secret go together")
        rules = parse_rules(p, DEFAULT_WINDOW, *DEFAULT_MODEL, refunds=REFUNDS)
        integer_goals(p, rules, KAMELEOON.slug)
        kp = KameleoonProject(
            site_code=site_code,
            rules=rules,
            base_url=parse_url(p, "base_url", "https://eu-data.kameleoon.io"),
            use_mapping_identifier=p.get_bool("use_mapping_identifier", False),
            client_id=cid,
            client_secret=csec,
            flow=parse_flow(p.table("flow"), flow),
        )
        p.done()
        return kp

    cfg = KameleoonConfig(
        user_agent=t.get_str("user_agent", d.user_agent),
        token_url=parse_url(t, "token_url", d.token_url),
        token_refresh_margin=t.duration("token_refresh_margin", d.token_refresh_margin),
        batch=parse_batch(t.table("batch"), d.batch),
        retry=parse_retry(t.table("retry")),
        projects=parse_projects(t, project),
        http=parse_http(t.table("http")),
    )
    if not cfg.user_agent.strip() and not t.failed("user_agent"):
        t.problem(t.key("user_agent"), "must not be empty: Kameleoon rejects requests without a User-Agent")
    t.done()
    return cfg
