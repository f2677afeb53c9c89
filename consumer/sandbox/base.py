"""The sandbox's state and the request bookkeeping every emulated provider shares."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from aiohttp import web

from consumer.sandbox.common import (
    _REASONS,
    ANY,
    Fault,
    Record,
    RequestEntry,
    _ActiveFault,
    _digest,
    _dumps,
    _Invalid,
    redact_query,
)


class SandboxState:
    """Records, faults and tokens, and the steps every request goes through (faults, latency, logging)."""

    def __init__(
        self,
        *,
        kameleoon_auth_sites: Iterable[str] = (),
        kameleoon_clients: Mapping[str, str] | None = None,
        token_lifetime: float = 3600.0,
        kameleoon_max_body: int = 3_000_000,
        conductrics_keys: Mapping[str, str | Iterable[str]] | None = None,
        conductrics_no_selection: Iterable[str] = (),
        conductrics_no_selection_all: bool = False,
        hang_seconds: float = 3600.0,
        request_log: bool = True,
        records: bool = True,
    ) -> None:
        """
        kameleoon_auth_sites: siteCodes whose /visit endpoints need `Authorization: Bearer <token>`.
        kameleoon_clients: client_id -> client_secret accepted by POST /oauth/token.
        conductrics_keys: account -> API key(s); None accepts any non-empty apikey for any account.
        conductrics_no_selection(_all): vids (or every vid) for which no agent accepts the goal (empty `rs`).
        request_log: keep every RequestEntry in `requests` (False for long benchmarks: statuses are still counted).
        records: keep every accepted conversion in `records` (False for long benchmarks: every request is still
            validated in full, and counts and duplicate keys are still tallied).
        """
        self.auth_sites = frozenset(kameleoon_auth_sites)
        self._clients = {cid: _digest(sec) for cid, sec in (kameleoon_clients or {}).items()}
        self.token_lifetime = float(token_lifetime)
        self.max_body = int(kameleoon_max_body)
        self._conductrics_keys: dict[str, list[bytes]] | None = None
        if conductrics_keys is not None:
            self._conductrics_keys = {
                acc: [_digest(k)] if isinstance(k, str) else [_digest(x) for x in k]
                for acc, k in conductrics_keys.items()
            }
        self._base_no_selection = frozenset(conductrics_no_selection)
        self._base_no_selection_all = bool(conductrics_no_selection_all)
        self.hang_seconds = float(hang_seconds)

        self.records: list[Record] = []
        self.dropped: list[Record] = []  # Convert v1 events with a non-ConvertAgent User-Agent (answered 200)
        self.unrewarded: list[Record] = []  # Conductrics goals no agent accepted (answered with an empty rs)
        self.requests: list[RequestEntry] = []
        self.keep_request_log = bool(request_log)
        self.keep_records = bool(records)
        self._key_counts: Counter[str] = Counter()  # accepted conversions per duplicate-detection key
        self._seq = 0  # requests seen, and the id of the next one
        self._statuses: Counter[tuple[str, int]] = Counter()
        self.token_grants = 0
        self._tokens: dict[bytes, float] = {}  # digest -> monotonic expiry
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
        self._no_selection: set[str] = set(self._base_no_selection)  # clear_faults() returns to these
        self._no_selection_all = self._base_no_selection_all

    def _take_fault(self, provider: str) -> Fault | None:
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
        """Latency, then any fault due: the response to send instead of handling the request, or None."""
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
