"""Conductrics' REST agent API as the sandbox answers it: POST /{account}/v3/agent-api."""

from __future__ import annotations

import hmac
import time

from aiohttp import web

from consumer.sandbox.base import SandboxState
from consumer.sandbox.common import (
    CONDUCTRICS,
    Record,
    _digest,
    _dumps,
    _Invalid,
    _is_number,
    _loads,
    redact_query,
)


class ConductricsRoutes(SandboxState):
    """The Conductrics agent-API handler, with its API-key check and JSON envelope."""

    def _key_ok(self, account: str, apikey: str) -> bool:
        if not apikey:
            return False
        if self._conductrics_keys is None:
            return True
        digest = _digest(apikey)
        return any(hmac.compare_digest(digest, k) for k in self._conductrics_keys.get(account, ()))

    def _conductrics_error(self, request: web.Request, status: int, fld: str, message: str) -> web.Response:
        self._log(request, CONDUCTRICS, status, "rejected", fld)
        body = {"status": status, "error": message, "field": fld}
        return web.Response(status=status, body=_dumps(body), content_type="application/json")

    async def _conductrics(self, request: web.Request) -> web.StreamResponse:
        early = await self._enter(request, CONDUCTRICS)
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
        body = await self._read(request, CONDUCTRICS, self.max_body)
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
            self._rejected(CONDUCTRICS, vid, (g for g, _ in goals), "")
        except _Invalid as exc:
            return self._conductrics_error(request, 400, exc.field, exc.message)
        rewarded = not (self._no_selection_all or vid in self._no_selection)
        now, rid, qs = time.time(), self._seq, redact_query(request.query_string)
        ua = request.headers.get("User-Agent")
        records = [
            Record(CONDUCTRICS, "agent-api", account, vid, "visitor", (g,), v,
                   f"conductrics|{account}|{vid}|{session}|{g}", qs, now, rid, session=session, user_agent=ua)
            for g, v in goals
        ]
        if rewarded:
            self._accept(records, CONDUCTRICS)
            items = [{"g": g, "rs": [{"a": "a-agent", "v": 1 if v is None else v}]} for g, v in goals]
        else:
            self.unrewarded.extend(records)
            items = [{"g": g, "rs": []} for g, _ in goals]
        self._log(request, CONDUCTRICS, 200, "accepted" if rewarded else "unrewarded")
        return web.Response(body=_dumps({"status": 200, "data": {"items": items}}), content_type="application/json")
