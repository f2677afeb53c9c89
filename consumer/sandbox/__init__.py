"""Provider sandbox: emulates every registered provider's endpoints, records what they accept, injects faults.

The real providers cannot be reached from the test machines, so this server answers like their documented
APIs (seeds 001-003 and shared/providers.md): it validates every request, records every accepted conversion
(never de-duplicating, so tests can see duplicates), logs every request with its status, and can be told to
fail: an HTTP status for the next N requests or with a seeded probability, latency, hangs, connection
resets, a JSON status 500 under HTTP 200 (Conductrics), and permanent 400s for chosen visitors or goals. A
latency profile per provider makes it answer like a remote SaaS API under load: log-normal latency, a
capacity of concurrent requests beyond which it answers 429 (or queues), and a random 5xx rate, all seeded.

Each provider's emulator lives in its package (consumer/providers/<slug>/emulator.py, an `Emulator`); the
sandbox makes one of every registered provider's and lets it add its routes. Paths are served at the root,
so every provider's base URL is the sandbox URL. Secrets (API keys, OAuth client secrets, bearer tokens)
are kept only as SHA-256 digests and never recorded.
"""

from consumer.sandbox.base import profiles_of
from consumer.sandbox.common import (
    ANY,
    Fault,
    Profile,
    Record,
    RequestEntry,
    SpecError,
    parse_profile,
    redact_query,
)
from consumer.sandbox.emulator import Emulator, provider_names
from consumer.sandbox.server import Sandbox, load_options, option_names, serve

__all__ = [
    "ANY", "Emulator", "Fault", "Profile", "Record", "RequestEntry", "Sandbox", "SpecError", "load_options",
    "option_names", "parse_profile", "profiles_of", "provider_names", "redact_query", "serve",
]
