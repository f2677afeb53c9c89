"""Convert's tracking endpoints as the sandbox answers them: GET /track/ and POST /v1/track/{account}/{project}."""

from __future__ import annotations

import re
import time
from typing import Any

from aiohttp import web

from consumer.sandbox.base import SandboxState
from consumer.sandbox.common import Record, _dumps, _Invalid, _is_number, _loads
from consumer.sandbox.emulator import Emulator

CONVERT = "convert"
_DIGITS = re.compile(r"[0-9]+")
_EXP_VAR = re.compile(r"([0-9]+)-([0-9]+)")
_TWO_DECIMALS = re.compile(r"-?[0-9]+\.[0-9]{2}")
CONVERT_GOAL_DATA_KEYS = frozenset({"amount", "productsCount", "transactionId"})
# A 1x1 transparent GIF, the body of a browser tracking pixel.
TRACKING_PIXEL = bytes.fromhex("47494638396101000100800000000000ffffff21f90401000000002c00000000010001000002024401003b")


class ConvertEmulator(Emulator):
    """The Convert handlers: the seed's tracking GET and the v1 batched POST."""

    names = (CONVERT,)

    def __init__(self, sandbox: SandboxState) -> None:
        super().__init__(sandbox)
        self.dropped: list[Record] = []  # v1 events with a non-ConvertAgent User-Agent (answered 200)

    def add_routes(self, router: web.UrlDispatcher) -> None:
        router.add_get("/track/", self._convert_track)
        router.add_get("/track", self._convert_track)
        router.add_post("/v1/track/{account_id}/{project_id}", self._convert_v1)

    def reset(self) -> None:
        self.dropped.clear()

    def summary(self) -> dict[str, Any]:
        return {"dropped": len(self.dropped)}

    def records_json(self) -> dict[str, Any]:
        return {"dropped_records": self.dropped}

    async def _convert_track(self, request: web.Request) -> web.StreamResponse:
        early = await self.sandbox._enter(request, CONVERT)
        if early is not None:
            return early
        try:
            record = self._convert_track_parse(request)
        except _Invalid as exc:
            return self.sandbox._error(request, CONVERT, 400, exc.field, exc.message)
        self.sandbox._accept([record], CONVERT)
        self.sandbox._log(request, CONVERT, 200, "accepted")
        return web.Response(body=TRACKING_PIXEL, content_type="image/gif")

    def _convert_track_parse(self, request: web.Request) -> Record:
        q = request.query
        c, p = q.get("c", ""), q.get("p", "")
        if not _DIGITS.fullmatch(c):
            raise _Invalid("c", "the account id is required, digits only")
        if not _DIGITS.fullmatch(p):
            raise _Invalid("p", "the project id is required, digits only")
        m = _EXP_VAR.fullmatch(q.get("e", ""))
        if m is None:
            raise _Invalid("e", "must be experiment_id-variation_id, digits")
        g, ga, t = q.get("g"), q.get("ga"), q.get("t")
        if g is None and t is None:
            raise _Invalid("g", "at least one of g (goals) or t (transaction) is required")
        goals: tuple[str, ...] = ()
        if g is not None:
            goals = tuple(g.split(","))
            if not all(_DIGITS.fullmatch(x) for x in goals):
                raise _Invalid("g", "must be a comma-separated list of goal ids")
            if ga is None or not _DIGITS.fullmatch(ga) or int(ga) != len(goals):
                raise _Invalid("ga", f"must be the number of goals in g ({len(goals)})")
        elif ga is not None:
            raise _Invalid("ga", "given without g")
        tx_goals: tuple[str, ...] = ()
        tx = revenue = count = None
        if t is not None:
            # Seed 002 defines `t` as four `|`-separated parts and no escape for a `|` inside one: the
            # strictest reading, which the service must satisfy, is a split on every `|`.
            parts = t.split("|")
            if len(parts) != 4:
                raise _Invalid("t", f"must be goal_ids|transaction_id|value|products_count, got {len(parts)} parts")
            tx_goals = tuple(parts[0].split("."))
            if not all(_DIGITS.fullmatch(x) for x in tx_goals):
                raise _Invalid("t", "goal ids must be dot-separated digits")
            if not parts[1]:
                raise _Invalid("t", "the transaction id is empty")
            if not _TWO_DECIMALS.fullmatch(parts[2]):
                raise _Invalid("t", "the value must have exactly two decimals")
            if not _DIGITS.fullmatch(parts[3]):
                raise _Invalid("t", "products_count must be an integer")
            tx, revenue, count = parts[1], float(parts[2]), int(parts[3])
        visitor = q.get("vi", "")
        project = f"{c}_{p}"
        self.sandbox._rejected(CONVERT, visitor, goals + tx_goals, "")
        e = m.group(0)
        key = f"convert|{project}|{visitor}|{e}|" + (f"t:{tx}" if tx is not None else "g:" + ",".join(sorted(goals)))
        return Record(CONVERT, "track", project, visitor, "visitor", goals, revenue, key, request.query_string,
                      time.time(), self.sandbox._seq, transaction_id=tx, transaction_goals=tx_goals,
                      products_count=count, experiment_id=m.group(1), variation_id=m.group(2),
                      bucketing=((m.group(1), m.group(2)),), user_agent=request.headers.get("User-Agent"))

    async def _convert_v1(self, request: web.Request) -> web.StreamResponse:
        early = await self.sandbox._enter(request, CONVERT)
        if early is not None:
            return early
        body = await self.sandbox._read(request, CONVERT, self.max_body)
        if isinstance(body, web.Response):
            return body
        try:
            records = self._convert_v1_parse(request, body)
        except _Invalid as exc:
            return self.sandbox._error(request, CONVERT, 400, exc.field, exc.message)
        ua = request.headers.get("User-Agent", "")
        if not ua.startswith("ConvertAgent/"):
            self.dropped.extend(records)  # the bot filter: answered 200, never counted
            self.sandbox._log(request, CONVERT, 200, "dropped", "User-Agent")
        else:
            self.sandbox._accept(records, CONVERT)
            self.sandbox._log(request, CONVERT, 200, "accepted")
        return web.Response(body=_dumps({"status": "ok"}), content_type="application/json")

    def _convert_v1_parse(self, request: web.Request, raw: bytes) -> list[Record]:
        account, project_id = request.match_info["account_id"], request.match_info["project_id"]
        if not _DIGITS.fullmatch(account):
            raise _Invalid("account_id", "must be digits")
        if not _DIGITS.fullmatch(project_id):
            raise _Invalid("project_id", "must be digits")
        try:
            body = _loads(raw)
        except ValueError:
            raise _Invalid("body", "is not valid JSON") from None
        if not isinstance(body, dict):
            raise _Invalid("body", "must be a JSON object")
        for name, want in (("accountId", account), ("projectId", project_id)):
            v = body.get(name)
            if isinstance(v, bool) or not isinstance(v, str | int) or str(v) != want:
                raise _Invalid(name, f"must equal the id in the path ({want})")
        visitors = body.get("visitors")
        if not isinstance(visitors, list) or not visitors:
            raise _Invalid("visitors", "must be a non-empty array")
        project = f"{account}_{project_id}"
        now, rid, qs = time.time(), self.sandbox._seq, request.query_string
        ua = request.headers.get("User-Agent")
        out: list[Record] = []
        for i, vis in enumerate(visitors):
            at = f"visitors[{i}]"
            if not isinstance(vis, dict):
                raise _Invalid(at, "must be an object")
            vid = vis.get("visitorId")
            if not isinstance(vid, str) or not vid:
                raise _Invalid(f"{at}.visitorId", "must be a non-empty string")
            events = vis.get("events")
            if not isinstance(events, list) or not events:
                raise _Invalid(f"{at}.events", "must be a non-empty array")
            for j, ev in enumerate(events):
                eat = f"{at}.events[{j}]"
                if not isinstance(ev, dict):
                    raise _Invalid(eat, "must be an object")
                etype = ev.get("eventType")
                data = ev.get("data")
                if etype not in ("conversion", "bucketing"):
                    raise _Invalid(f"{eat}.eventType", "must be 'conversion' or 'bucketing'")
                if not isinstance(data, dict):
                    raise _Invalid(f"{eat}.data", "must be an object")
                if etype == "conversion":
                    out.append(self._convert_v1_event(data, eat, project, vid, qs, now, rid, ua))
        return out

    def _convert_v1_event(
        self, data: dict[str, Any], eat: str, project: str, vid: str, qs: str, now: float, rid: int, ua: str | None
    ) -> Record:
        goal = data.get("goalId")
        if isinstance(goal, bool) or not (isinstance(goal, int) or (isinstance(goal, str) and _DIGITS.fullmatch(goal))):
            raise _Invalid(f"{eat}.data.goalId", "must be a goal id (integer)")
        goal_s = str(goal)
        amount: float | None = None
        count: int | None = None
        tx: str | None = None
        goal_data = data.get("goalData", [])
        if not isinstance(goal_data, list):
            raise _Invalid(f"{eat}.data.goalData", "must be an array")
        for k, item in enumerate(goal_data):
            gat = f"{eat}.data.goalData[{k}]"
            if not isinstance(item, dict) or item.get("key") not in CONVERT_GOAL_DATA_KEYS or "value" not in item:
                raise _Invalid(gat, "must be {key: amount|productsCount|transactionId, value}")
            key, value = item["key"], item["value"]
            if key == "amount":
                if not _is_number(value):
                    raise _Invalid(f"{gat}.value", "amount must be a number")
                amount = float(value)
            elif key == "productsCount":
                if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                    raise _Invalid(f"{gat}.value", "productsCount must be a non-negative integer")
                count = value
            else:
                if isinstance(value, bool) or not isinstance(value, str | int) or value == "":
                    raise _Invalid(f"{gat}.value", "transactionId must be a non-empty string")
                tx = str(value)
        bd = data.get("bucketingData", {})
        if not isinstance(bd, dict):
            raise _Invalid(f"{eat}.data.bucketingData", "must be an object {experienceId: variationId}")
        pairs: list[tuple[str, str]] = []
        for exp, var in bd.items():
            if not _DIGITS.fullmatch(exp) or isinstance(var, bool) or not _DIGITS.fullmatch(str(var)):
                raise _Invalid(f"{eat}.data.bucketingData", "keys and values must be numeric ids")
            pairs.append((exp, str(var)))
        self.sandbox._rejected(CONVERT, vid, (goal_s,), eat + ".")
        bucketing = tuple(sorted(pairs))
        key = f"convert|{project}|{vid}|{bucketing}|t:{tx}|{goal_s}"
        return Record(CONVERT, "v1/track", project, vid, "visitor", (goal_s,), amount, key, qs, now, rid,
                      event_type="conversion", transaction_id=tx, products_count=count,
                      experiment_id=bucketing[0][0] if bucketing else None,
                      variation_id=bucketing[0][1] if bucketing else None, bucketing=bucketing, user_agent=ua)
