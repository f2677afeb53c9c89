"""The sandbox's state, its emulators, and the request bookkeeping every emulated provider shares."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from aiohttp import web

from consumer.sandbox.common import (
    _REASONS,
    ANY,
    Fault,
    Profile,
    Record,
    RequestEntry,
    SpecError,
    _ActiveFault,
    _ActiveProfile,
    _dumps,
    _Invalid,
    redact_query,
)
from consumer.sandbox.emulator import Emulator, emulator_classes, names_of, provider_names


class SandboxState:
    """Records, faults and tokens, and the steps every request goes through (faults, latency, logging)."""

    def __init__(
        self,
        *,
        hang_seconds: float = 3600.0,
        request_log: bool = True,
        records: bool = True,
        profiles: Iterable[Profile | Mapping[str, Any]] = (),
        providers: Iterable[str] = (),
        **options: Any,
    ) -> None:
        """
        request_log: keep every RequestEntry in `requests` (False for long benchmarks: statuses are still counted).
        records: keep every accepted conversion in `records` (False for long benchmarks: every request is still
            validated in full, and counts and duplicate keys are still tallied).
        profiles: latency profiles (`Profile`, or its fields as a mapping; provider '*' for all) in force from
            the start; `clear_faults()` returns to these.
        providers: provider modules to register besides the built-in ones (as `[providers] modules`), so
            that their emulators answer too.
        options: the emulators' own (e.g. `kameleoon_clients`, `conductrics_keys`: see each emulator).
        """
        self.hang_seconds = float(hang_seconds)
        classes = emulator_classes(tuple(providers))
        taken = {o for cls in classes for o in cls.options}
        unknown = sorted(set(options) - taken)
        if unknown:
            raise TypeError(f"Sandbox() got an unexpected option {unknown[0]!r}")
        self.emulators: list[Emulator] = [
            cls(self, **{k: v for k, v in options.items() if k in cls.options}) for cls in classes]
        self.names: tuple[str, ...] = names_of(classes)
        self.max_body = max((e.max_body for e in self.emulators), default=1 << 20)

        self.records: list[Record] = []
        self.requests: list[RequestEntry] = []
        self.keep_request_log = bool(request_log)
        self.keep_records = bool(records)
        self._key_counts: Counter[str] = Counter()  # accepted conversions per duplicate-detection key
        self._seq = 0  # requests seen, and the id of the next one
        self._statuses: Counter[tuple[str, int]] = Counter()
        self._counts: Counter[str] = Counter()
        self._waiters: list[tuple[Callable[[Any], bool], asyncio.Future[None]]] = []
        self._closing = asyncio.Event()
        self._app: web.Application | None = None
        self._runner: web.AppRunner | None = None
        self.url = ""
        self._faults: list[_ActiveFault] = []
        self._latency: dict[str, float] = {}
        self._reject_visitors: dict[str, set[str]] = {}
        self._reject_goals: dict[str, set[str]] = {}
        self._base_profiles = tuple(p for spec in profiles for p in profiles_of(spec))
        self._profiles: dict[str, _ActiveProfile] = {p.provider: _ActiveProfile(p) for p in self._base_profiles}
        self._busy: Counter[str] = Counter()  # requests being served (inside their latency) per provider
        self._peak_busy: Counter[str] = Counter()
        self._over_capacity: Counter[str] = Counter()  # answered 429 for being beyond the capacity
        self._queued: dict[str, deque[asyncio.Future[None]]] = {}

    def add_fault(self, fault: Fault) -> None:
        self._faults.append(_ActiveFault(fault, time.monotonic()))

    def set_credentials(self, **credentials: Any) -> None:
        """Replace credentials the emulators accept, as a provider's console would (e.g. `kameleoon_clients`:
        client_id -> client_secret for POST /oauth/token, `conductrics_keys`: account -> key or keys; see each
        emulator's `credentials`). A credential not given keeps what is in force; tokens issued already stay
        valid (`revoke_tokens()` ends them). Every one is checked before any is applied: a refused change
        changes nothing."""
        known = {c for e in self.emulators for c in e.credentials}
        unknown = sorted(set(credentials) - known)
        if unknown:
            raise SpecError(f"unknown credentials {unknown[0]!r} (known: {', '.join(sorted(known))})")
        apply: list[Callable[[], None]] = []
        for e in self.emulators:
            mine = {k: v for k, v in credentials.items() if k in e.credentials and v is not None}
            if mine:
                apply.append(e.check_credentials(mine))
        for step in apply:
            step()

    def _take_fault(self, provider: str) -> Fault | None:
        now = time.monotonic()
        if any(af.until is not None and af.until <= now for af in self._faults):
            self._faults = [af for af in self._faults if af.until is None or af.until > now]  # outages over
        for af in self._faults:
            f = af.fault
            if f.provider != provider and f.provider != ANY:
                continue
            if af.remaining == 0:
                continue
            if f.probability < 1.0 and af.rng.random() >= f.probability:
                continue
            if af.remaining is not None:
                af.remaining -= 1
            if af.remaining == 0:
                self._faults = [x for x in self._faults if x.remaining != 0]
            return f
        return None

    async def _pause(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._closing.wait(), seconds)

    async def _enter(self, request: web.Request, provider: str) -> web.StreamResponse | None:
        """The profile (capacity, drawn latency, random 5xx), then the fixed latency, then any fault due:
        the response to send instead of handling the request, or None."""
        active = self._profiles.get(provider)
        if active is not None:
            early = await self._serve(request, provider, active)
            if early is not None:
                return early
        latency = self._latency.get(provider)
        if latency:
            await self._pause(latency)
        if not self._faults:
            return None
        fault = self._take_fault(provider)
        if fault is None:
            return None
        if fault.kind == "status":
            headers = {"Retry-After": fault.retry_after} if fault.retry_after is not None else None
            body = {"status": fault.status, "error": "fault injected by the sandbox"}
            self._log(request, provider, fault.status, "fault:status")
            return web.Response(
                status=fault.status, body=_dumps(body), content_type="application/json", headers=headers
            )
        if fault.kind == "json_status":
            self._log(request, provider, 200, "fault:json_status")
            body = {"status": fault.status, "error": "internal error (fault injected by the sandbox)"}
            return web.Response(status=200, body=_dumps(body), content_type="application/json")
        if fault.kind == "hang":
            self._log(request, provider, 0, "fault:hang")
            await self._pause(self.hang_seconds if fault.seconds is None else fault.seconds)
        else:
            self._log(request, provider, 0, "fault:reset")
        self._abort(request)
        raise asyncio.CancelledError  # nothing more to write on this connection

    async def _serve(self, request: web.Request, provider: str, active: _ActiveProfile) -> web.StreamResponse | None:
        """Take a place within the capacity (or answer 429, or queue), hold it for a drawn latency."""
        p = active.profile
        if p.capacity is not None and (self._busy[provider] >= p.capacity or self._queued.get(provider)):
            if p.over_capacity == "reject":
                self._over_capacity[provider] += 1
                self._log(request, provider, 429, "capacity")
                headers = {"Retry-After": p.retry_after} if p.retry_after is not None else None
                body = {"status": 429, "error": f"over capacity: {p.capacity} requests at once (sandbox profile)"}
                return web.Response(status=429, body=_dumps(body), content_type="application/json", headers=headers)
            await self._queue_for_place(provider)  # counted as busy when it returns
        else:
            self._busy[provider] += 1
        if self._busy[provider] > self._peak_busy[provider]:
            self._peak_busy[provider] = self._busy[provider]
        try:
            await self._pause(p.draw(active.rng))
        finally:
            self._busy[provider] -= 1
            self._hand_on(provider)
        if p.error_rate and active.rng.random() < p.error_rate:
            self._log(request, provider, p.error_status, "profile:error")
            body = {"status": p.error_status, "error": "random error (sandbox profile)"}
            return web.Response(status=p.error_status, body=_dumps(body), content_type="application/json")
        return None

    async def _queue_for_place(self, provider: str) -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        queue = self._queued.setdefault(provider, deque())
        queue.append(fut)
        try:
            await fut
        except BaseException:
            if fut.done() and not fut.cancelled():
                self._busy[provider] -= 1  # handed a place, then cancelled: hand it on
                self._hand_on(provider)
            elif fut in queue:
                queue.remove(fut)
            raise

    def _hand_on(self, provider: str) -> None:
        """Give free places to queued requests in arrival order (counted busy on their behalf)."""
        queue = self._queued.get(provider)
        if not queue:
            return
        active = self._profiles.get(provider)
        capacity = active.profile.capacity if active is not None else None
        while queue and (capacity is None or self._busy[provider] < capacity):
            fut = queue.popleft()
            if not fut.done():
                self._busy[provider] += 1
                fut.set_result(None)

    def set_profile(self, profile: Profile) -> None:
        """Put `profile` in force for its provider (the requests being served keep their places)."""
        self._profiles[profile.provider] = _ActiveProfile(profile)
        self._hand_on(profile.provider)  # a larger capacity frees queued requests at once

    def _clear_profiles(self) -> None:
        self._profiles = {p.provider: _ActiveProfile(p) for p in self._base_profiles}
        for provider in list(self._queued):
            self._hand_on(provider)

    @staticmethod
    def _abort(request: web.Request) -> None:
        """Close the connection without an answer, with a TCP RST where the socket allows it."""
        transport = request.transport
        if transport is None:
            return
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abort()

    # ------------------------------------------------------------------ bookkeeping

    def _log(self, request: web.Request, provider: str, status: int, outcome: str, error: str | None = None) -> int:
        rid = self._seq
        self._seq = rid + 1
        self._statuses[provider, status] += 1
        if self.keep_request_log:
            self.requests.append(
                RequestEntry(rid, provider, request.method, request.path, redact_query(request.query_string), status,
                             outcome, time.time(), error)
            )
        if self._waiters:
            self._wake()
        return rid

    def _accept(self, records: list[Record], provider: str, keys: list[str] | None = None) -> None:
        """Count accepted conversions: `records`, or only their `keys` when records are not kept."""
        if keys is None:
            keys = [r.key for r in records]
            if self.keep_records:
                self.records.extend(records)
        self._key_counts.update(keys)
        self._counts[provider] += len(keys)

    def _error(self, request: web.Request, provider: str, status: int, fld: str, message: str) -> web.Response:
        self._log(request, provider, status, "rejected", fld)
        body = {"status": status, "error": _REASONS.get(status, "Error"), "field": fld, "message": message}
        return web.Response(status=status, body=_dumps(body), content_type="application/json")

    async def _read(self, request: web.Request, provider: str, limit: int) -> bytes | web.Response:
        if request.content_length is not None and request.content_length > limit:
            return self._error(request, provider, 413, "body", f"larger than {limit} bytes")
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return self._error(request, provider, 413, "body", f"larger than {limit} bytes")
        if len(body) > limit:
            return self._error(request, provider, 413, "body", f"larger than {limit} bytes")
        return body

    def _rejected(self, provider: str, visitor: str, goals: Iterable[str], where: str) -> None:
        rv = self._reject_visitors.get(provider)
        if rv and visitor in rv:
            raise _Invalid(f"{where}visitor", "rejected by a sandbox rule")
        rg = self._reject_goals.get(provider)
        if rg:
            for g in goals:
                if g in rg:
                    raise _Invalid(f"{where}goal", f"goal {g} rejected by a sandbox rule")

    def _wake(self) -> None:
        for pred, fut in list(self._waiters):
            if not fut.done() and pred(self):
                fut.set_result(None)


def profiles_of(spec: Profile | Mapping[str, Any]) -> list[Profile]:
    """One profile per provider it applies to ('*': every provider, each with its own generator)."""
    if isinstance(spec, Profile):
        return [spec]
    fields = dict(spec)
    fields.pop("kind", None)
    provider = fields.pop("provider", None)
    if not isinstance(provider, str):
        raise ValueError("a profile needs a 'provider'")
    ra = fields.get("retry_after", "1")
    if isinstance(ra, int | float) and not isinstance(ra, bool):
        fields["retry_after"] = str(int(ra))  # Retry-After is whole seconds
    unknown = sorted(set(fields) - set(Profile.__dataclass_fields__))
    if unknown:
        raise ValueError(f"unknown profile setting {unknown[0]!r}")
    return [Profile(p, **fields) for p in (provider_names() if provider == ANY else (provider,))]
