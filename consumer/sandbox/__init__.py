"""Provider sandbox: emulates Kameleoon, Convert and Conductrics endpoints, records what they accept, injects faults.

The real providers cannot be reached from the test machines, so this server answers like their documented
APIs (seeds 001-003 and shared/providers.md): it validates every request, records every accepted conversion
(never de-duplicating, so tests can see duplicates), logs every request with its status, and can be told to
fail: an HTTP status for the next N requests or with a seeded probability, latency, hangs, connection
resets, Conductrics' JSON status 500 under HTTP 200, and permanent 400s for chosen visitors or goals. A
latency profile per provider makes it answer like a remote SaaS API under load: log-normal latency, a
capacity of concurrent requests beyond which it answers 429 (or queues), and a random 5xx rate, all seeded.

Paths are served at the root, so every provider's base URL is the sandbox URL. Secrets (Conductrics
API keys, OAuth client secrets, bearer tokens) are kept only as SHA-256 digests and never recorded.
"""

from consumer.sandbox.base import profiles_of
from consumer.sandbox.common import (
    ANY,
    CONDUCTRICS,
    CONVERT,
    KAMELEOON,
    PROVIDERS,
    TOKEN,
    Fault,
    Profile,
    Record,
    RequestEntry,
    SpecError,
    parse_profile,
    redact_query,
)
from consumer.sandbox.kameleoon import ReportLine
from consumer.sandbox.server import OPTION_NAMES, Sandbox, load_options, serve

__all__ = [
    "ANY", "CONDUCTRICS", "CONVERT", "KAMELEOON", "OPTION_NAMES", "PROVIDERS", "TOKEN", "Fault", "Profile",
    "Record", "ReportLine", "RequestEntry", "Sandbox", "SpecError", "load_options", "parse_profile", "profiles_of",
    "redact_query", "serve",
]
