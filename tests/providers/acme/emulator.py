"""The test-only provider's API as the sandbox answers it: POST /acme/v1/conversions with an API key."""

from __future__ import annotations

import hmac
import time
from collections.abc import Mapping
from decimal import Decimal, InvalidOperation
from typing import Any

from aiohttp import web

from consumer.sandbox.base import SandboxState
from consumer.sandbox.common import Record, _digest, _Invalid, _loads
from consumer.sandbox.emulator import Emulator

ACME = "acme"


class AcmeEmulator(Emulator):
    """acme_keys: project -> the API key it accepts (401 otherwise). Records every conversion it accepts."""

    names = (ACME,)
    options = ("acme_keys",)

    def __init__(self, sandbox: SandboxState, *, acme_keys: Mapping[str, str] | None = None) -> None:
        super().__init__(sandbox)
        self._keys = {project: _digest(k) for project, k in (acme_keys or {}).items()}

    def add_routes(self, router: web.UrlDispatcher) -> None:
        router.add_post("/acme/v1/conversions", self._conversions)

    async def _conversions(self, request: web.Request) -> web.StreamResponse:
        sb = self.sandbox
        early = await sb._enter(request, ACME)
        if early is not None:
            return early
        body = await sb._read(request, ACME, self.max_body)
        if isinstance(body, web.Response):
            return body
        try:
            doc = _loads(body)
            if not isinstance(doc, dict) or not isinstance(doc.get("project"), str):
                raise _Invalid("project", "is required")
            project = doc["project"]
            expected = self._keys.get(project)
            given = request.headers.get("X-Api-Key", "")
            if expected is None or not hmac.compare_digest(expected, _digest(given)):
                return sb._error(request, ACME, 401, "X-Api-Key", "missing or invalid API key")
            records = self._parse(doc, project, request)
        except _Invalid as exc:
            return sb._error(request, ACME, 400, exc.field, exc.message)
        except ValueError:
            return sb._error(request, ACME, 400, "body", "is not valid JSON")
        sb._accept(records, ACME)
        sb._log(request, ACME, 200, "accepted")
        return web.json_response({"accepted": len(records)})

    def _parse(self, doc: dict[str, Any], project: str, request: web.Request) -> list[Record]:
        items = doc.get("conversions")
        if not isinstance(items, list) or not items:
            raise _Invalid("conversions", "must be a non-empty array")
        now, rid, ua = time.time(), self.sandbox._seq, request.headers.get("User-Agent")
        out = []
        for i, c in enumerate(items):
            at = f"conversions[{i}]."
            if not isinstance(c, dict):
                raise _Invalid(f"conversions[{i}]", "must be an object")
            cid, visitor, goals, order = c.get("id"), c.get("visitor"), c.get("goals"), c.get("order")
            if not isinstance(cid, str) or len(cid) != 32:
                raise _Invalid(at + "id", "must be 32 characters")
            if not isinstance(visitor, str) or not visitor:
                raise _Invalid(at + "visitor", "is required")
            if not isinstance(goals, list) or not goals or not all(isinstance(g, str) for g in goals):
                raise _Invalid(at + "goals", "must be a non-empty array of strings")
            revenue = c.get("revenue")
            if revenue is not None:
                try:
                    revenue = float(Decimal(revenue)) if isinstance(revenue, str) else None
                except InvalidOperation:
                    revenue = None
                if revenue is None:
                    raise _Invalid(at + "revenue", "must be a decimal string")
            self.sandbox._rejected(ACME, visitor, goals, at)
            out.append(Record(ACME, "v1/conversions", project, visitor, "visitor", tuple(goals), revenue,
                              f"acme|{project}|{cid}", request.query_string, now, rid,
                              transaction_id=order if isinstance(order, str) else None, user_agent=ua))
        return out
