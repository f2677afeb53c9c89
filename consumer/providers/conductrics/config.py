"""[conductrics]: what a user writes for the Conductrics agent API, validated, with Conductrics' defaults."""

from __future__ import annotations

from dataclasses import dataclass, field

from consumer.config import (
    FlowConfig,
    HttpConfig,
    RetryConfig,
    Rules,
    Secret,
    Table,
    parse_flow,
    parse_http,
    parse_projects,
    parse_retry,
    parse_rules,
    parse_url,
)
from consumer.model import Attribution, Provider, RefundPolicy, RevenueShare

CONDUCTRICS = Provider.register("CONDUCTRICS")

# Conductrics attributes through the visitor within a session: three days of exposures, every identity keeps
# its experiments and shares the revenue (docs/operations.md, "Attribution models").
DEFAULT_WINDOW = 72 * 3600.0
DEFAULT_MODEL = (Attribution.ALL, RevenueShare.SPLIT)
# Conductrics documents no way to take a conversion back: an order adjustment is skipped, the only policy.
REFUNDS = (RefundPolicy.SKIP,)


@dataclass(frozen=True)
class ConductricsProject:
    key: str
    agent_api_url: str
    api_key: Secret
    rules: Rules
    session: str = "{vid}"  # template: {vid}, {order_id}, {event_id}
    flow: FlowConfig = field(default_factory=FlowConfig)


@dataclass(frozen=True)
class ConductricsConfig:
    user_agent: str = "offline-conversions/1.0"
    retry: RetryConfig = field(default_factory=RetryConfig)
    projects: dict[str, ConductricsProject] = field(default_factory=dict)
    http: HttpConfig = field(default_factory=HttpConfig)

    def secrets(self) -> list[str]:
        return [p.api_key.reveal() for p in self.projects.values()]


def parse(t: Table) -> ConductricsConfig:
    d = ConductricsConfig()
    flow = parse_flow(t.table("flow"), FlowConfig(concurrency=64))

    def project(key: str, p: Table) -> ConductricsProject:
        session = p.get_str("session", "{vid}")
        try:
            session.format(vid="v", order_id="o", event_id="e")
        except (KeyError, IndexError, ValueError):
            p.problem(p.key("session"), "a template using only {vid}, {order_id}, {event_id}")
        dp = ConductricsProject(
            key=key,
            agent_api_url=parse_url(p, "agent_api_url", required=True),
            api_key=p.secret("api_key", required=True) or Secret(""),
            rules=parse_rules(p, DEFAULT_WINDOW, *DEFAULT_MODEL, refunds=REFUNDS),
            session=session,
            flow=parse_flow(p.table("flow"), flow),
        )
        p.done()
        return dp

    cfg = ConductricsConfig(
        user_agent=t.get_str("user_agent", d.user_agent),
        retry=parse_retry(t.table("retry")),
        projects=parse_projects(t, project),
        http=parse_http(t.table("http")),
    )
    t.done()
    return cfg
