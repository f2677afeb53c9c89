"""Conductrics' REST agent API as the sandbox answers it: POST /{account}/v3/agent-api."""

from __future__ import annotations

import hmac
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from aiohttp import web

from consumer.sandbox.base import SandboxState
from consumer.sandbox.common import (
    Fault,
    Record,
    SpecError,
    _digest,
    _dumps,
    _Invalid,
    _is_number,
    _loads,
    _spec_str_list,
    redact_query,
)
from consumer.sandbox.emulator import Emulator

CONDUCTRICS = "conductrics"


class ConductricsEmulator(Emulator):
    """The Conductrics agent-API handler, with its API-key check and JSON envelope.

    conductrics_keys: account -> API key(s); None accepts any non-empty apikey for any account.
    conductrics_no_selection(_all): vids (or every vid) for which no agent accepts the goal (empty `rs`).
    """

    names = (CONDUCTRICS,)
    options = ("conductrics_keys", "conductrics_no_selection", "conductrics_no_selection_all")
    json_status_faults = True
    credentials = ("conductrics_keys",)

    def __init__(self, sandbox: SandboxState, *, conductrics_keys: Mapping[str, str | Iterable[str]] | None = None,
                 conductrics_no_selection: Iterable[str] = (), conductrics_no_selection_all: bool = False) -> None:
        super().__init__(sandbox)
        self._conductrics_keys: dict[str, list[bytes]] | None = None
        if conductrics_keys is not None:
            self.check_credentials({"conductrics_keys": conductrics_keys})()
        self._base_no_selection = frozenset(conductrics_no_selection)
        self._base_no_selection_all = bool(conductrics_no_selection_all)
        self._no_selection: set[str] = set(self._base_no_selection)  # clear_faults() returns to these
        self._no_selection_all = self._base_no_selection_all
        self.unrewarded: list[Record] = []  # goals no agent accepted (answered with an empty rs)

    def check_credentials(self, credentials: Mapping[str, Any]) -> Callable[[], None]:
        """conductrics_keys: account -> API key or keys, what the agent API accepts from now on."""
        conductrics_keys = credentials["conductrics_keys"]
        if not isinstance(conductrics_keys, Mapping):
            raise SpecError("conductrics_keys maps each account to an API key or a list of them")
        keys: dict[str, list[bytes]] = {}
        for acc, k in conductrics_keys.items():
            values = [k] if isinstance(k, str) else list(k)
            if not isinstance(acc, str) or not all(isinstance(x, str) and x for x in values):
                raise SpecError("conductrics_keys maps each account to an API key or a list of them")
            keys[acc] = [_digest(x) for x in values]

        def apply() -> None:
            self._conductrics_keys = keys

        return apply

    def add_routes(self, router: web.UrlDispatcher) -> None:
        router.add_post("/{account}/v3/agent-api", self._conductrics)

    def clear_faults(self) -> None:
        self._no_selection = set(self._base_no_selection)
        self._no_selection_all = self._base_no_selection_all

    def reset(self) -> None:
        self.unrewarded.clear()

    def summary(self) -> dict[str, Any]:
        return {"unrewarded": len(self.unrewarded)}

    def records_json(self) -> dict[str, Any]:
        return {"unrewarded_records": self.unrewarded}

    def json_status(self, status: int = 500, times: int | None = 1) -> Fault:
        """Conductrics answers HTTP 200 with a JSON `status` of `status`."""
        f = Fault(CONDUCTRICS, "json_status", status, times)
        self.sandbox.add_fault(f)
        return f

    def no_selection(self, vids: Iterable[str] = (), *, all_vids: bool = False) -> None:
        """No agent accepts goals for these vids (or every vid): the answer has an empty `rs`."""
        self._no_selection.update(vids)
        self._no_selection_all = self._no_selection_all or all_vids

    def parse_spec(self, item: dict[str, Any]) -> Callable[[], None] | None:
        """{"kind": "no_selection", "vids": ["lana-123"]}  or  {"kind": "no_selection", "all": true}"""
        if item.get("kind") != "no_selection":
            return None
        unknown = sorted(set(item) - {"kind", "provider", "vids", "all"})
        if unknown:
            raise SpecError(f"unknown key {unknown[0]!r}")
        if item.get("provider", CONDUCTRICS) != CONDUCTRICS:
            raise SpecError("no_selection applies to conductrics only")
        vids = _spec_str_list(item, "vids")
        every = item.get("all", False)
        if not isinstance(every, bool):
            raise SpecError("'all' must be true or false")
        return lambda: self.no_selection(vids, all_vids=every)

    def _key_ok(self, account: str, apikey: str) -> bool:
        if not apikey:
            return False
        if self._conductrics_keys is None:
            return True
        digest = _digest(apikey)
        return any(hmac.compare_digest(digest, k) for k in self._conductrics_keys.get(account, ()))

    def _conductrics_error(self, request: web.Request, status: int, fld: str, message: str) -> web.Response:
        self.sandbox._log(request, CONDUCTRICS, status, "rejected", fld)
        body = {"status": status, "error": message, "field": fld}
        return web.Response(status=status, body=_dumps(body), content_type="application/json")

    async def _conductrics(self, request: web.Request) -> web.StreamResponse:
        early = await self.sandbox._enter(request, CONDUCTRICS)
        if early is not None:
            return early
        q = request.query
        account = request.match_info["account"]
        if not self._key_ok(account, q.get("apikey", "")):
            return self._conductrics_error(request, 401, "apikey", "missing or invalid API key")
        vid, session = q.get("vid", ""), q.get("session", "")
        if not vid:
            return self._conductrics_error(request, 400, "vid", "is required")
        if not session:
            return self._conductrics_error(request, 400, "session", "is required")
        body = await self.sandbox._read(request, CONDUCTRICS, self.max_body)
        if isinstance(body, web.Response):
            return body
        try:
            try:
                payload = _loads(body)
            except ValueError:
                raise _Invalid("body", "is not valid JSON") from None
            commands = payload.get("commands") if isinstance(payload, dict) else None
            if not isinstance(commands, list) or not commands:
                raise _Invalid("commands", "must be a non-empty array")
            goals: list[tuple[str, float | None]] = []
            for i, cmd in enumerate(commands):
                if not isinstance(cmd, dict) or not isinstance(cmd.get("g"), str) or not cmd["g"]:
                    raise _Invalid(f"commands[{i}].g", "a goal command needs a goal code 'g'")
                v = cmd.get("v")
                if v is not None and not _is_number(v):
                    raise _Invalid(f"commands[{i}].v", "must be a number")
                goals.append((cmd["g"], None if v is None else float(v)))
            self.sandbox._rejected(CONDUCTRICS, vid, (g for g, _ in goals), "")
        except _Invalid as exc:
            return self._conductrics_error(request, 400, exc.field, exc.message)
        rewarded = not (self._no_selection_all or vid in self._no_selection)
        now, rid, qs = time.time(), self.sandbox._seq, redact_query(request.query_string)
        ua = request.headers.get("User-Agent")
        records = [
            Record(CONDUCTRICS, "agent-api", account, vid, "visitor", (g,), v,
                   f"conductrics|{account}|{vid}|{session}|{g}", qs, now, rid, session=session, user_agent=ua)
            for g, v in goals
        ]
        if rewarded:
            self.sandbox._accept(records, CONDUCTRICS)
            items = [{"g": g, "rs": [{"a": "a-agent", "v": 1 if v is None else v}]} for g, v in goals]
        else:
            self.unrewarded.extend(records)
            items = [{"g": g, "rs": []} for g, _ in goals]
        self.sandbox._log(request, CONDUCTRICS, 200, "accepted" if rewarded else "unrewarded")
        return web.Response(body=_dumps({"status": 200, "data": {"items": items}}), content_type="application/json")
