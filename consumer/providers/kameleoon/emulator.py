"""Kameleoon's Data API as the sandbox answers it: POST /visit/events, GET /visit/visitor, POST /oauth/token."""

from __future__ import annotations

import hmac
import re
import secrets
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from aiohttp import web

from consumer.sandbox.base import SandboxState
from consumer.sandbox.common import Record, SpecError, _digest, _dumps, _Invalid, _is_number, _loads
from consumer.sandbox.emulator import Emulator

KAMELEOON = "kameleoon"
TOKEN = "token"  # the OAuth endpoint: faulted, profiled and logged on its own
_NONCE = re.compile(r"[0-9a-fA-F]{16}")
_DIGITS = re.compile(r"[0-9]+")
# Event types the Data API knows; only CONVERSION is recorded as a conversion.
KAMELEOON_EVENT_TYPES = frozenset(
    {"CONVERSION", "CUSTOM_DATA", "PAGE", "STATIC_DATA", "EXPERIMENT", "PERSONALIZATION", "ACTIVITY", "GEOLOCATION",
     "DEVICE", "BROWSER", "WEATHER", "TARGETING_SEGMENT", "PRODUCT", "EVENT"}
)


@dataclass(frozen=True, slots=True)
class ReportLine:
    """One visitor's goal as a Kameleoon report counts it (KameleoonEmulator.kameleoon_report)."""

    conversions: int  # conversions minus cancellations
    revenue: Decimal  # their revenue minus the cancellations' revenue, to the cent
    cancellations: int  # `negative: true` events among them


class KameleoonEmulator(Emulator):
    """The Kameleoon handlers, validating as the Data API does.

    kameleoon_auth_sites: siteCodes whose /visit endpoints need `Authorization: Bearer <token>`.
    kameleoon_clients: client_id -> client_secret accepted by POST /oauth/token.
    token_lifetime: seconds a granted token is valid. kameleoon_max_body: the largest body accepted (413 above).
    kameleoon_visit_delay: seconds after it was accepted before GET /visit/visitor shows a conversion.
    """

    names = (KAMELEOON, TOKEN)
    options = ("kameleoon_auth_sites", "kameleoon_clients", "token_lifetime", "kameleoon_max_body",
               "kameleoon_visit_delay")
    credentials = ("kameleoon_clients",)

    def __init__(self, sandbox: SandboxState, *, kameleoon_auth_sites: Iterable[str] = (),
                 kameleoon_clients: Mapping[str, str] | None = None, token_lifetime: float = 3600.0,
                 kameleoon_max_body: int = 3_000_000, kameleoon_visit_delay: float = 0.0) -> None:
        super().__init__(sandbox)
        self.auth_sites = frozenset(kameleoon_auth_sites)
        self._clients: dict[str, bytes] = {}
        self.check_credentials({"kameleoon_clients": kameleoon_clients or {}})()
        self.token_lifetime = float(token_lifetime)
        self.max_body = int(kameleoon_max_body)
        # GET /visit/visitor shows a conversion only this long after it was accepted: Kameleoon shows it once
        # the visit is processed, "usually after 30 minutes of inactivity" without Feature Experimentation
        # (seed 001). 0 (the tests' default) shows it at once; `sandbox --options` can set 1800.
        self.kameleoon_visit_delay = float(kameleoon_visit_delay)
        self.token_grants = 0
        self._tokens: dict[bytes, float] = {}  # digest -> monotonic expiry

    def check_credentials(self, credentials: Mapping[str, Any]) -> Callable[[], None]:
        """kameleoon_clients: client_id -> client_secret, what POST /oauth/token accepts from now on."""
        kameleoon_clients = credentials["kameleoon_clients"]
        if not isinstance(kameleoon_clients, Mapping) or not all(
                isinstance(c, str) and isinstance(v, str) and c and v for c, v in kameleoon_clients.items()):
            raise SpecError("kameleoon_clients maps each client_id to its client_secret (non-empty strings)")
        clients = {cid: _digest(sec) for cid, sec in kameleoon_clients.items()}

        def apply() -> None:
            self._clients = clients

        return apply

    def add_routes(self, router: web.UrlDispatcher) -> None:
        router.add_post("/visit/events", self._kameleoon_events)
        router.add_get("/visit/visitor", self._kameleoon_visitor)
        router.add_post("/oauth/token", self._oauth_token)
        router.add_post("/_sandbox/tokens/expire", self._ctl_expire_tokens)
        router.add_post("/_sandbox/tokens/revoke", self._ctl_revoke_tokens)

    def reset(self) -> None:
        self._tokens.clear()
        self.token_grants = 0

    def summary(self) -> dict[str, Any]:
        return {"token_grants": self.token_grants}

    def kameleoon_nonces(self) -> list[str]:
        """Every nonce Kameleoon accepted, in arrival order, repeats included."""
        return [r.nonce for r in self.sandbox.records if r.provider == KAMELEOON and r.nonce is not None]

    async def _ctl_expire_tokens(self, request: web.Request) -> web.StreamResponse:
        self.expire_tokens()
        return web.Response(status=204)

    async def _ctl_revoke_tokens(self, request: web.Request) -> web.StreamResponse:
        self.revoke_tokens()
        return web.Response(status=204)

    def kameleoon_report(self, site: str) -> dict[tuple[str, str, str], ReportLine]:
        """(identity, visitor, goal) -> what a report would count for `site`: each nonce once (Kameleoon
        de-duplicates on it), a conversion +1 with its revenue, a `negative: true` one -1 and minus its
        revenue (inferred: the documents say only that `negative` cancels a conversion). A restatement is
        a conversion like any other. Needs the records (`records=True`, the default)."""
        seen: set[str] = set()
        sums: dict[tuple[str, str, str], tuple[int, Decimal, int]] = {}
        for r in self.sandbox.records:
            if r.provider != KAMELEOON or r.project != site or r.nonce is None or r.nonce.lower() in seen:
                continue
            seen.add(r.nonce.lower())
            key = (r.identity, r.visitor, r.goals[0])
            n, revenue, cancelled = sums.get(key, (0, Decimal(0), 0))
            amount = Decimal(repr(r.revenue)) if r.revenue is not None else Decimal(0)
            sign = -1 if r.negative else 1
            sums[key] = (n + sign, revenue + sign * amount, cancelled + r.negative)
        return {k: ReportLine(n, rev.quantize(Decimal("0.01")), c) for k, (n, rev, c) in sorted(sums.items())}

    def _token_ok(self, request: web.Request) -> bool:
        auth = request.headers.get("Authorization", "")
        if not auth.startswith("Bearer "):
            return False
        expiry = self._tokens.get(_digest(auth[7:].strip()))
        return expiry is not None and expiry > time.monotonic()

    def _kameleoon_gate(self, request: web.Request, site: str) -> web.Response | None:
        if not site:
            return self.sandbox._error(request, KAMELEOON, 400, "siteCode", "is required")
        if not request.headers.get("User-Agent", "").strip():
            return self.sandbox._error(request, KAMELEOON, 403, "User-Agent", "a User-Agent header is required")
        if site in self.auth_sites and not self._token_ok(request):
            return self.sandbox._error(request, KAMELEOON, 401, "Authorization",
                                       "missing, invalid or expired bearer token")
        return None

    async def _kameleoon_events(self, request: web.Request) -> web.StreamResponse:
        early = await self.sandbox._enter(request, KAMELEOON)
        if early is not None:
            return early
        q = request.query
        site = q.get("siteCode", "")
        refused = self._kameleoon_gate(request, site)
        if refused is not None:
            return refused
        body = await self.sandbox._read(request, KAMELEOON, self.max_body)
        if isinstance(body, web.Response):
            return body
        rid = self.sandbox._seq
        try:
            if q.get("json") != "true":
                raise _Invalid("json", "must be 'true' for a JSON array body")
            try:
                events = _loads(body)
            except ValueError:
                raise _Invalid("body", "is not valid JSON") from None
            keys: list[str] | None = None if self.sandbox.keep_records else []
            records = self._kameleoon_parse(events, site, q.get("visitorCode"), request, rid, keys)
        except _Invalid as exc:
            return self.sandbox._error(request, KAMELEOON, 400, exc.field, exc.message)
        self.sandbox._accept(records, KAMELEOON, keys)
        self.sandbox._log(request, KAMELEOON, 204, "accepted")
        return web.Response(status=204)

    def _kameleoon_parse(
        self, events: Any, site: str, query_visitor: str | None, request: web.Request, rid: int,
        keys: list[str] | None = None,
    ) -> list[Record]:
        """Validate every event; the accepted conversions as Records, or only their keys into `keys`
        when the sandbox keeps no records (a Record costs more than validating its event)."""
        if query_visitor is not None and not 0 < len(query_visitor) <= 100:
            raise _Invalid("visitorCode", "must be 1 to 100 characters")
        if not isinstance(events, list):
            raise _Invalid("body", "must be a JSON array of events")
        if not events:
            raise _Invalid("body", "must hold at least one event")
        now = time.time()
        qs = request.query_string
        ua = request.headers.get("User-Agent")
        out: list[Record] = []
        for i, ev in enumerate(events):
            at = f"[{i}]."
            if not isinstance(ev, dict):
                raise _Invalid(f"[{i}]", "an event must be a JSON object")
            nonce = ev.get("nonce")
            if not isinstance(nonce, str) or not _NONCE.fullmatch(nonce):
                raise _Invalid(at + "nonce", "must be 16 hexadecimal characters")
            etype = ev.get("eventType")
            if not isinstance(etype, str):
                raise _Invalid(at + "eventType", "is required")
            if etype not in KAMELEOON_EVENT_TYPES:
                raise _Invalid(at + "eventType", f"unknown event type {etype!r}")
            vc = ev.get("visitorCode")
            mv = ev.get("mappingValue")
            if vc is not None and (not isinstance(vc, str) or not 0 < len(vc) <= 100):
                raise _Invalid(at + "visitorCode", "must be a string of 1 to 100 characters")
            if mv is not None and (not isinstance(mv, str) or not mv):
                raise _Invalid(at + "mappingValue", "must be a non-empty string")
            if vc is not None:
                visitor, identity = vc, "visitor"
            elif mv is not None:
                visitor, identity = mv, "mapping"
            elif query_visitor is not None:
                visitor, identity = query_visitor, "visitor"
            else:
                raise _Invalid(at + "visitorCode", "a visitorCode (query or event) or mappingValue is required")
            if etype != "CONVERSION":
                continue
            goal = ev.get("goalId")
            if not isinstance(goal, int) or isinstance(goal, bool):
                raise _Invalid(at + "goalId", "must be an integer")
            revenue = ev.get("revenue")
            if revenue is not None and not _is_number(revenue):
                raise _Invalid(at + "revenue", "must be a number")
            negative = ev.get("negative", False)
            if not isinstance(negative, bool):
                raise _Invalid(at + "negative", "must be a boolean")
            metadata = ev.get("metadata")
            if metadata is not None and not isinstance(metadata, dict | list):
                raise _Invalid(at + "metadata", "must be an object or an array")
            self.sandbox._rejected(KAMELEOON, visitor, (str(goal),), at)
            if keys is not None:
                keys.append(f"kameleoon|{site}|{nonce}")
                continue
            out.append(
                Record(KAMELEOON, "visit/events", site, visitor, identity, (str(goal),),
                       None if revenue is None else float(revenue), f"kameleoon|{site}|{nonce}", qs, now, rid,
                       nonce=nonce, event_type=etype, negative=negative, metadata=metadata, user_agent=ua)
            )
        return out

    async def _kameleoon_visitor(self, request: web.Request) -> web.StreamResponse:
        q = request.query
        site = q.get("siteCode", "")
        refused = self._kameleoon_gate(request, site)
        if refused is not None:
            return refused
        visitor = q.get("visitorCode", "")
        if not visitor:
            return self.sandbox._error(request, KAMELEOON, 400, "visitorCode", "is required")
        max_visits = q.get("maxNumberPreviousVisits", "1")
        if not _DIGITS.fullmatch(max_visits):
            return self.sandbox._error(request, KAMELEOON, 400, "maxNumberPreviousVisits", "must be an integer")
        with_conversions = q.get("conversion") == "true"
        visits: dict[int, list[Record]] = {}
        processed_before = time.time() - self.kameleoon_visit_delay
        for r in self.sandbox.records:
            if (r.provider == KAMELEOON and r.project == site and r.visitor == visitor and r.identity == "visitor"
                    and r.time <= processed_before):
                visits.setdefault(r.request_id, []).append(r)
        out = []
        for recs in sorted(visits.values(), key=lambda rs: -rs[0].time)[: int(max_visits)]:
            visit: dict[str, Any] = {"siteCode": site, "visitorCode": visitor, "timeStarted": int(recs[0].time * 1000)}
            if with_conversions:
                visit["conversionEvents"] = [
                    {"itp": False, "time": int(r.time * 1000),
                     "data": {"goalId": int(r.goals[0]), "revenue": r.revenue if r.revenue is not None else 0.0,
                              "negative": r.negative, "metadata": r.metadata if r.metadata is not None else {}}}
                    for r in recs
                ]
            out.append(visit)
        self.sandbox._log(request, KAMELEOON, 200, "accepted")
        return web.Response(body=_dumps({"previousVisits": out}), content_type="application/json")

    async def _oauth_token(self, request: web.Request) -> web.StreamResponse:
        early = await self.sandbox._enter(request, TOKEN)
        if early is not None:
            return early
        form = await request.post()
        if form.get("grant_type") != "client_credentials":
            self.sandbox._log(request, TOKEN, 400, "rejected", "grant_type")
            return web.Response(status=400, body=_dumps({"error": "unsupported_grant_type"}),
                                content_type="application/json")
        cid, sec = form.get("client_id"), form.get("client_secret")
        expected = self._clients.get(cid) if isinstance(cid, str) else None
        if expected is None or not isinstance(sec, str) or not hmac.compare_digest(expected, _digest(sec)):
            self.sandbox._log(request, TOKEN, 401, "rejected", "client")
            return web.Response(status=401, body=_dumps({"error": "invalid_client"}), content_type="application/json")
        token = secrets.token_urlsafe(24)
        self._tokens[_digest(token)] = time.monotonic() + self.token_lifetime
        self.token_grants += 1
        self.sandbox._log(request, TOKEN, 200, "accepted")
        body = {"access_token": token, "token_type": "Bearer", "expires_in": int(self.token_lifetime)}
        return web.Response(body=_dumps(body), content_type="application/json")

    def expire_tokens(self) -> None:
        """Every token issued so far is now expired (a request with one gets 401)."""
        for k in self._tokens:
            self._tokens[k] = 0.0

    def revoke_tokens(self) -> None:
        """Forget every token issued so far (a request with one gets 401)."""
        self._tokens.clear()
