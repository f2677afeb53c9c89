"""[acme]: the test-only provider's section: projects with an API key, sent to a JSON endpoint."""

from __future__ import annotations

from dataclasses import dataclass, field

from consumer.config import (
    BatchConfig,
    FlowConfig,
    HttpConfig,
    RetryConfig,
    Rules,
    Secret,
    Table,
    parse_batch,
    parse_flow,
    parse_http,
    parse_projects,
    parse_retry,
    parse_rules,
    parse_url,
)
from consumer.model import Attribution, Provider, RevenueShare

ACME = Provider.register("ACME")

DEFAULT_WINDOW = 14 * 86400.0  # its own default, unlike any built-in provider's
DEFAULT_MODEL = (Attribution.FIRST_TOUCH, RevenueShare.FULL)


@dataclass(frozen=True)
class AcmeProject:
    key: str
    rules: Rules
    api_key: Secret
    base_url: str = "https://api.acme.example"
    flow: FlowConfig = field(default_factory=FlowConfig)


@dataclass(frozen=True)
class AcmeConfig:
    user_agent: str = "offline-conversions/1.0 (acme)"
    batch: BatchConfig = field(default_factory=lambda: BatchConfig(max_events=50, max_bytes=100_000, linger=0.02))
    retry: RetryConfig = field(default_factory=RetryConfig)
    projects: dict[str, AcmeProject] = field(default_factory=dict)
    http: HttpConfig = field(default_factory=HttpConfig)

    def secrets(self) -> list[str]:
        return [p.api_key.reveal() for p in self.projects.values()]


def parse(t: Table) -> AcmeConfig:
    d = AcmeConfig()

    def project(key: str, p: Table) -> AcmeProject:
        ap = AcmeProject(
            key=key,
            rules=parse_rules(p, DEFAULT_WINDOW, *DEFAULT_MODEL),
            api_key=p.secret("api_key", required=True) or Secret(""),
            base_url=parse_url(p, "base_url", AcmeProject.base_url),
            flow=parse_flow(p.table("flow"), FlowConfig()),
        )
        p.done()
        return ap

    cfg = AcmeConfig(
        user_agent=t.get_str("user_agent", d.user_agent),
        batch=parse_batch(t.table("batch"), d.batch),
        retry=parse_retry(t.table("retry")),
        projects=parse_projects(t, project),
        http=parse_http(t.table("http")),
    )
    t.done()
    return cfg
