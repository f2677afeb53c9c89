"""The control API, in Kafka Connect's manner: list provider projects, pause and resume them group-wide.

    GET /providers                                 every provider project's state (a JSON list)
    GET /providers/{provider}/{project}            one of them; 404 with a JSON error otherwise
    PUT /providers/{provider}/{project}/pause      optional body {"reason": "..."}; 202 with the new state
    PUT /providers/{provider}/{project}/resume     202 with the new state

A pause or resume is written to the control topic (consumer/ops/control_store.py), so it survives
restarts and reaches every member; the answer comes once this member has applied it. With `[control]
token` set every request carries `Authorization: Bearer <token>` (401 otherwise), without one only requests
addressed to localhost are answered (403 otherwise: DNS rebinding); errors are JSON
`{"error_code": …, "message": …}` as Kafka Connect's are.
"""

from __future__ import annotations

import errno
import hmac
import ipaddress
import json
import logging
import socket
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from aiohttp import web

from consumer import delivery
from consumer.config import ConfigError, Secret
from consumer.ops.control_store import REASON_MAX, ControlStore, ControlStoreError, PauseRecord

log = logging.getLogger(__name__)


# One provider project's state, as its Dispatcher reports it.
ProjectStatus = delivery.ProjectStatus


class Controlled(Protocol):
    """What the API reads of the service."""

    def statuses(self) -> list[ProjectStatus]: ...

    def lag(self) -> dict[str, int]: ...  # provider slug -> its consumer group's lag, summed over partitions


class ControlListenError(ConfigError):
    """The control API cannot listen where `[control]` says: the port is taken, or the host is not local."""

    def __init__(self, host: str, port: int, exc: OSError) -> None:
        if isinstance(exc, socket.gaierror) or exc.errno == errno.EADDRNOTAVAIL:
            key, why = "control.host", f"{host!r} is not an address of this machine"
        elif exc.errno == errno.EADDRINUSE:
            key, why = "control.port", f"port {port} is in use by another process"
        elif exc.errno == errno.EACCES:
            key, why = "control.port", f"port {port} needs privileges this process does not have"
        else:
            key, why = "control.port", exc.strerror or str(exc)
        super().__init__(key, f"cannot listen on {host}:{port}: {why}")


# --------------------------------------------------------------------------- the answers (pure)


def status_document(status: ProjectStatus, lag: dict[str, int], group_id: str,
                    pause: PauseRecord | None) -> dict[str, Any]:
    """One provider project as the API shows it: its state, its group's lag, the operator's pause if any."""
    return {
        "provider": status.provider,
        "project": status.project,
        "state": status.state,
        "reason": status.reason,
        "paused_by": status.paused_by,
        "since": status.since,
        "circuit": status.circuit,
        "in_flight": status.in_flight,
        "group": f"{group_id}.{status.provider}",
        "lag": lag.get(status.provider),  # the provider's group: the same for each of its projects
        "last_error": status.last_error,
        "counts": dict(status.counts),
        "pause": None if pause is None else {"reason": pause.reason, "at": pause.at, "by": pause.by},
    }


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error_code": status, "message": message}, status=status, headers=headers)


def pause_reason(body: str) -> str | None:
    """The reason of a pause request's body: empty, or {"reason": "..."}; ValueError says what is wrong."""
    if not body.strip():
        return None
    try:
        doc = json.loads(body)
    except ValueError:
        raise ValueError('the body is not JSON: send {"reason": "..."} or nothing') from None
    if not isinstance(doc, dict):
        raise ValueError('the body must be a JSON object: {"reason": "..."}')
    unknown = sorted(set(doc) - {"reason"})
    if unknown:
        raise ValueError(f"unknown field(s) {', '.join(map(repr, unknown))}: the body takes only 'reason'")
    reason = doc.get("reason")
    if reason is not None and not isinstance(reason, str):
        raise ValueError("'reason' must be a string")
    if reason is not None and len(reason) > REASON_MAX:
        raise ValueError(f"'reason' is longer than {REASON_MAX} characters")
    return reason or None


def local_host(host_header: str | None) -> bool:
    """Whether a request's Host names this machine's loopback (localhost, 127.x, ::1), port or not.

    Without a token, a page in an operator's browser could otherwise reach the loopback API through a
    name of its own that resolves to 127.0.0.1 (DNS rebinding); such a request carries that name.
    """
    if not host_header:
        return False
    host = host_header.strip()
    if host.startswith("["):
        host = host[1:host.find("]")] if "]" in host else host
    elif host.count(":") == 1:
        host = host.split(":", 1)[0]
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def authorized(header: str | None, token: Secret) -> bool:
    """Whether an Authorization header carries the bearer token; compared in constant time."""
    if header is None:
        return False
    scheme, _, given = header.strip().partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(given.strip().encode(), token.reveal().encode())


# --------------------------------------------------------------------------- the server (I/O)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class ControlApi:
    """Serves the control API on its own port; reads `controlled`, writes pauses to `store`."""

    def __init__(self, store: ControlStore, controlled: Controlled, group_id: str, token: Secret | None = None,
                 scrub: Callable[[str], str] | None = None) -> None:
        self.store = store
        self.controlled = controlled
        self.group_id = group_id
        self._token = token
        # A last error or a reason could quote a credential: every answer goes through the log redactor's scrub.
        self._scrub = scrub
        self._runner: web.AppRunner | None = None
        self.port = 0

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._scrubbed, self._errors, self._auth], client_max_size=64 * 1024)
        app.router.add_get("/providers", self._list)
        app.router.add_get("/providers/{provider}/{project}", self._one)
        app.router.add_put("/providers/{provider}/{project}/pause", self._pause)
        app.router.add_put("/providers/{provider}/{project}/resume", self._resume)
        return app

    async def start(self, host: str, port: int) -> int:
        """Listen on host:port (0: a free port); returns the port. ControlListenError names the key."""
        # No access log: a request line is harmless, but a habit of logging requests would log headers next.
        self._runner = web.AppRunner(self.app(), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        try:
            await site.start()
        except OSError as exc:
            await self._runner.cleanup()
            self._runner = None
            raise ControlListenError(host, port, exc) from None
        sockets = getattr(site._server, "sockets", None) or []
        self.port = sockets[0].getsockname()[1] if sockets else port
        log.info("control API listening", extra={"host": host, "port": self.port, "auth": self._token is not None})
        return self.port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # ------------------------------------------------------------------ middlewares

    @web.middleware
    async def _errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """aiohttp's own 404/405/413 as JSON errors too."""
        try:
            return await handler(request)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            return error_response(exc.status, exc.reason, {k: v for k, v in exc.headers.items()
                                                            if k.lower() == "allow"})

    @web.middleware
    async def _scrubbed(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        response = await handler(request)
        if self._scrub is not None and isinstance(response, web.Response) and response.text is not None:
            scrubbed = self._scrub(response.text)
            if scrubbed != response.text:
                response.text = scrubbed
        return response

    @web.middleware
    async def _auth(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if self._token is None:
            if not local_host(request.headers.get("Host")):
                return error_response(403, "without [control] token the API answers only requests to localhost, "
                                           "127.0.0.1 or [::1] (the Host header names another host)")
        elif not authorized(request.headers.get("Authorization"), self._token):
            return error_response(401, "a valid bearer token is required (Authorization: Bearer …)",
                                  {"WWW-Authenticate": 'Bearer realm="offline-conversions control"'})
        return await handler(request)

    # ------------------------------------------------------------------ handlers

    def _find(self, request: web.Request) -> ProjectStatus | None:
        provider, project = request.match_info["provider"], request.match_info["project"]
        return next((s for s in self.controlled.statuses() if s.provider == provider and s.project == project), None)

    def _document(self, status: ProjectStatus) -> dict[str, Any]:
        return status_document(status, self.controlled.lag(), self.group_id,
                               self.store.paused().get((status.provider, status.project)))

    @staticmethod
    def _not_found(request: web.Request) -> web.Response:
        provider, project = request.match_info["provider"], request.match_info["project"]
        return error_response(404, f"no provider project {provider}/{project} is configured "
                                   "(GET /providers lists them)")

    async def _list(self, _request: web.Request) -> web.Response:
        lag, paused = self.controlled.lag(), self.store.paused()
        return web.json_response([status_document(s, lag, self.group_id, paused.get((s.provider, s.project)))
                                  for s in self.controlled.statuses()])

    async def _one(self, request: web.Request) -> web.Response:
        status = self._find(request)
        return self._not_found(request) if status is None else web.json_response(self._document(status))

    async def _pause(self, request: web.Request) -> web.Response:
        status = self._find(request)
        if status is None:
            return self._not_found(request)
        try:
            reason = pause_reason(await request.text())
        except ValueError as exc:
            return error_response(400, str(exc))
        try:
            await self.store.pause(status.provider, status.project, reason, by="api")
        except ControlStoreError as exc:
            return error_response(503, f"the pause was not recorded: {exc}")
        log.info("paused by the control API", extra={"provider": status.provider, "project": status.project,
                                                     "reason": reason})
        return await self._changed(request)

    async def _resume(self, request: web.Request) -> web.Response:
        status = self._find(request)
        if status is None:
            return self._not_found(request)
        try:
            await self.store.resume(status.provider, status.project)
        except ControlStoreError as exc:
            return error_response(503, f"the resume was not recorded: {exc}")
        log.info("resumed by the control API", extra={"provider": status.provider, "project": status.project})
        return await self._changed(request)

    async def _changed(self, request: web.Request) -> web.Response:
        # 202 as Kafka Connect answers: applied on this member, the others apply it as they read the topic.
        status = self._find(request)
        if status is None:
            return self._not_found(request)
        return web.json_response(self._document(status), status=202)
