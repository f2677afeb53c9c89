"""The sandbox server: lifecycle, fault control, queries, the control API, and `serve` for the CLI."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import signal
import ssl
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from aiohttp import web

from consumer.sandbox.base import SandboxState, profiles_of
from consumer.sandbox.common import (
    ANY,
    Fault,
    Record,
    SpecError,
    _dumps,
    _loads,
    _spec_str_list,
)
from consumer.sandbox.emulator import Emulator, emulator_classes


class Sandbox(SandboxState):
    """An aiohttp server emulating every registered provider (one emulator each); see the package docstring."""

    def __getattr__(self, name: str) -> Any:
        # An emulator's own public attributes and methods (`sandbox.expire_tokens()`), found by name.
        if not name.startswith("_") and "emulators" in self.__dict__:
            for e in self.emulators:
                if hasattr(e, name):
                    return getattr(e, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def emulator(self, slug: str) -> Emulator:
        """The emulator of the provider `slug`."""
        for e in self.emulators:
            if e.slug == slug:
                return e
        raise KeyError(f"no emulator for provider {slug!r}")

    @property
    def slugs(self) -> tuple[str, ...]:
        """The emulated providers (what `counts()` and `reject` name)."""
        return tuple(e.slug for e in self.emulators)

    # ------------------------------------------------------------------ lifecycle

    def app(self) -> web.Application:
        if self._app is None:
            app = web.Application(client_max_size=max(self.max_body, 1 << 20) + (1 << 20))
            r = app.router
            r.add_get("/_sandbox/records", self._ctl_records)
            r.add_post("/_sandbox/faults", self._ctl_add_faults)
            r.add_delete("/_sandbox/faults", self._ctl_clear_faults)
            r.add_post("/_sandbox/reset", self._ctl_reset)
            r.add_post("/_sandbox/credentials", self._ctl_credentials)
            for e in self.emulators:
                e.add_routes(r)
            self._app = app
        return self._app

    async def start(self, host: str = "127.0.0.1", port: int = 0, ssl_context: ssl.SSLContext | None = None) -> str:
        """Serve on host:port (0: any free port), over TLS with `ssl_context`; returns the base URL."""
        self._closing = asyncio.Event()
        self._runner = web.AppRunner(self.app(), access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port, ssl_context=ssl_context)
        await site.start()
        sock_port = port
        for address in self._runner.addresses:
            if isinstance(address, tuple) and address[0] == host:
                sock_port = address[1]
        self.url = f"{'https' if ssl_context else 'http'}://{host}:{sock_port}"
        return self.url

    async def stop(self) -> None:
        self._closing.set()  # ends hangs and latency at once
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        for _, fut in self._waiters:
            if not fut.done():
                fut.cancel()
        self._waiters.clear()

    async def __aenter__(self) -> Sandbox:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # ------------------------------------------------------------------ faults

    def fail(
        self,
        provider: str,
        status: int = 503,
        times: int | None = 1,
        *,
        retry_after: str | float | None = None,
        probability: float = 1.0,
        seed: int = 0,
        duration: float | None = None,
    ) -> Fault:
        """Answer `status` for the next `times` requests (None: until cleared or, with `duration`, for that
        many seconds from now), optionally with a probability."""
        ra = retry_after
        if isinstance(ra, int | float):
            ra = str(int(ra))
        f = Fault(provider, "status", status, times, probability, ra, None, seed, duration)
        self.add_fault(f)
        return f

    def hang(self, provider: str, times: int | None = 1, seconds: float | None = None) -> Fault:
        f = Fault(provider, "hang", 503, times, seconds=seconds)
        self.add_fault(f)
        return f

    def reset_connections(
        self, provider: str, times: int | None = 1, *, probability: float = 1.0, seed: int = 0
    ) -> Fault:
        f = Fault(provider, "reset", 503, times, probability, seed=seed)
        self.add_fault(f)
        return f

    def set_latency(self, provider: str, seconds: float) -> None:
        """Delay every request to `provider` ('*': all) by `seconds` before answering."""
        if provider not in self.names and provider != ANY:
            raise ValueError(f"unknown provider {provider!r}")
        for p in self.names if provider == ANY else (provider,):
            self._latency[p] = float(seconds)

    def reject(self, provider: str, *, visitors: Iterable[str] = (), goals: Iterable[str | int] = ()) -> None:
        """Answer 400 for every request carrying one of these visitors or goals, until cleared."""
        if provider not in self.slugs:
            raise ValueError(f"reject applies to {', '.join(self.slugs)}, got {provider!r}")
        self._reject_visitors.setdefault(provider, set()).update(visitors)
        self._reject_goals.setdefault(provider, set()).update(str(g) for g in goals)

    def clear_faults(self) -> None:
        """Remove every fault, latency, reject rule and runtime no-selection rule; profiles return to the
        ones given at construction."""
        self._clear_profiles()
        self._faults = []
        self._latency = {}
        self._reject_visitors = {}
        self._reject_goals = {}
        for e in self.emulators:
            e.clear_faults()

    def apply_spec(self, spec: Mapping[str, Any] | list[Mapping[str, Any]]) -> int:
        """Apply a JSON fault spec (one object or a list); returns how many rules were added.

        {"kind": "status", "provider": "kameleoon", "status": 503, "times": 2, "retry_after": "1",
         "probability": 1.0, "seed": 0}          # also "hang" (+ "seconds"), "reset", "json_status"
        {"kind": "status", "provider": "convert", "status": 503, "times": null, "duration": 40}  # down for 40 s
        {"kind": "latency", "provider": "convert", "seconds": 0.05}
        {"kind": "profile", "provider": "convert", "median": 0.12, "p99": 0.8, "capacity": 64,
         "over_capacity": "reject", "retry_after": "1", "error_rate": 0.002, "error_status": 503, "seed": 1}
        {"kind": "reject", "provider": "kameleoon", "visitors": ["v1"], "goals": [36151]}
        {"kind": "no_selection", "vids": ["lana-123"]}  or  {"kind": "no_selection", "all": true}
        """
        items = spec if isinstance(spec, list) else [spec]
        parsed: list[Callable[[], None]] = []
        for item in items:
            parsed.append(self._parse_spec(item))
        for apply in parsed:  # all or nothing
            apply()
        return len(parsed)

    def _parse_spec(self, item: Any) -> Callable[[], None]:
        if not isinstance(item, Mapping):
            raise SpecError("a fault spec is an object or a list of objects")
        kind = item.get("kind", "status")
        for e in self.emulators:
            own = e.parse_spec(dict(item))
            if own is not None:
                return own  # type: ignore[no-any-return]
        json_status = next((e.slug for e in self.emulators if e.json_status_faults), None)
        provider = item.get("provider", json_status if kind == "json_status" else None)
        if not isinstance(provider, str):
            raise SpecError("'provider' is required")
        if kind == "profile":
            try:
                profiles = profiles_of(item)
            except (TypeError, ValueError) as exc:
                raise SpecError(str(exc)) from None

            def apply_profiles() -> None:
                for p in profiles:
                    self.set_profile(p)

            return apply_profiles
        known = {"kind", "provider", "status", "times", "probability", "retry_after", "seconds", "seed",
                 "duration", "visitors", "goals"}
        unknown = sorted(set(item) - known)
        if unknown:
            raise SpecError(f"unknown key {unknown[0]!r}")
        try:
            if kind == "latency":
                latency = float(item.get("seconds", 0.0))
                self._check_provider(provider)
                return lambda: self.set_latency(provider, latency)
            if kind == "reject":
                visitors = _spec_str_list(item, "visitors")
                goals = _spec_str_list(item, "goals")
                if provider not in self.slugs:
                    raise SpecError(f"reject applies to {', '.join(self.slugs)}, got {provider!r}")
                return lambda: self.reject(provider, visitors=visitors, goals=goals)
            ra = item.get("retry_after")
            times = item.get("times", 1)
            seconds = item.get("seconds")
            duration = item.get("duration")
            fault = Fault(
                provider=provider,
                kind=str(kind),
                status=int(item.get("status", 500 if kind == "json_status" else 503)),
                times=None if times is None else int(times),
                probability=float(item.get("probability", 1.0)),
                retry_after=None if ra is None else str(ra),
                seconds=None if seconds is None else float(seconds),
                seed=int(item.get("seed", 0)),
                duration=None if duration is None else float(duration),
            )
        except (TypeError, ValueError) as exc:
            raise SpecError(str(exc)) from None
        return lambda: self.add_fault(fault)

    def _check_provider(self, provider: str) -> None:
        if provider not in self.names and provider != ANY:
            raise SpecError(f"unknown provider {provider!r}")

    # ------------------------------------------------------------------ queries

    def duplicates(self) -> dict[str, int]:
        """Keys accepted more than once -> how many times (same nonce; same Convert transaction, visitor and
        experiment-variation; same Conductrics account, vid, session and goal)."""
        return {k: n for k, n in self._key_counts.items() if n > 1}

    def counts(self) -> dict[str, int]:
        """Accepted conversions per provider."""
        return {p: self._counts[p] for p in self.slugs}

    def records_for(self, provider: str) -> list[Record]:
        return [r for r in self.records if r.provider == provider]

    def status_counts(self, provider: str | None = None) -> dict[int, int]:
        """HTTP statuses answered (0: no answer), over the request log."""
        out: Counter[int] = Counter()
        for (p, status), n in self._statuses.items():
            if provider is None or p == provider:
                out[status] += n
        return dict(out)

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "counts": self.counts(),
            "requests": self._seq,
            "statuses": {p: {str(s): n for s, n in self.status_counts(p).items()} for p in self.names},
            "duplicates": self.duplicates(),
        }
        for e in self.emulators:
            out.update(e.summary())
        out["profiles"] = {p: self.profile_state(p) for p in sorted(self._profiles)}
        return out

    def profile_state(self, provider: str) -> dict[str, Any]:
        """The provider's profile in force (if any), and its load: requests being served now, the most at
        once since the last reset, and how many were answered 429 for being beyond the capacity (`rejected`)."""
        active = self._profiles.get(provider)
        out: dict[str, Any] = {}
        if active is not None:
            out = {**dataclasses.asdict(active.profile), "mean": round(active.profile.mean, 6)}
        return {**out, "busy": self._busy[provider], "peak_busy": self._peak_busy[provider],
                "queued": len(self._queued.get(provider) or ()), "rejected": self._over_capacity[provider]}

    def reset(self) -> None:
        """Forget records, the request log, tokens, counters and every fault."""
        self.records.clear()
        self._key_counts.clear()
        self.requests.clear()
        self._seq = 0
        self._statuses.clear()
        self._counts.clear()
        for e in self.emulators:
            e.reset()
        self._peak_busy = Counter(self._busy)
        self._over_capacity.clear()
        self.clear_faults()

    async def wait_until(self, predicate: Callable[[Any], bool], timeout: float = 10.0) -> None:
        """Return once `predicate(sandbox)` holds, re-checked after every request; TimeoutError after `timeout`."""
        if predicate(self):
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (predicate, fut)
        self._waiters.append(entry)
        try:
            await asyncio.wait_for(fut, timeout)
        finally:
            if entry in self._waiters:
                self._waiters.remove(entry)

    async def wait_for_records(self, count: int, provider: str | None = None, timeout: float = 10.0) -> None:
        """Return once `count` conversions were accepted (for `provider`, or in all)."""
        if provider is None:
            await self.wait_until(lambda s: sum(s._counts.values()) >= count, timeout)
        else:
            await self.wait_until(lambda s: s._counts[provider] >= count, timeout)

    # ------------------------------------------------------------------ control over HTTP

    async def _ctl_records(self, request: web.Request) -> web.StreamResponse:
        q = request.query
        out = self.summary()
        if q.get("records", "true") != "false":
            out["records"] = self.records
            for e in self.emulators:
                out.update(e.records_json())
        if q.get("requests") == "true":
            out["request_log"] = self.requests
        return web.Response(body=_dumps(out), content_type="application/json")

    async def _ctl_add_faults(self, request: web.Request) -> web.StreamResponse:
        try:
            spec = _loads(await request.read())
            n = self.apply_spec(spec)
        except ValueError as exc:  # SpecError and JSON errors
            return web.Response(status=400, body=_dumps({"error": str(exc)}), content_type="application/json")
        return web.Response(body=_dumps({"added": n, "active": len(self._faults)}), content_type="application/json")

    async def _ctl_clear_faults(self, request: web.Request) -> web.StreamResponse:
        self.clear_faults()
        return web.Response(status=204)

    async def _ctl_reset(self, request: web.Request) -> web.StreamResponse:
        self.reset()
        return web.Response(status=204)

    async def _ctl_credentials(self, request: web.Request) -> web.StreamResponse:
        """{"kameleoon_clients": {"id": "secret"}, "conductrics_keys": {"account": "key"}}: see set_credentials."""
        try:
            spec = _loads(await request.read())
            known = sorted({c for e in self.emulators for c in e.credentials})
            if not isinstance(spec, dict) or set(spec) - set(known):
                raise SpecError(f"expected an object with any of {', '.join(known)}")
            for name in known:
                if name in spec and not isinstance(spec[name], dict):
                    raise SpecError(f"{name!r} must be an object")
            self.set_credentials(**spec)
        except ValueError as exc:  # SpecError and JSON errors
            return web.Response(status=400, body=_dumps({"error": str(exc)}), content_type="application/json")
        return web.Response(status=204)


SHARED_OPTIONS = ("hang_seconds", "request_log", "records", "profiles", "providers")


def option_names(providers: Iterable[str] = ()) -> tuple[str, ...]:
    """Every Sandbox option: the shared ones and each registered emulator's own."""
    return SHARED_OPTIONS + tuple(o for cls in emulator_classes(tuple(providers)) for o in cls.options)


def load_options(path: str | Path) -> dict[str, Any]:
    """Sandbox constructor options from a JSON file (keys: `option_names()`; `providers` registers more)."""
    data = json.loads(Path(path).read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object of sandbox options")
    unknown = sorted(set(data) - set(option_names(data.get("providers") or ())))
    if unknown:
        raise ValueError(f"{path}: unknown sandbox option {unknown[0]!r}")
    return data


def serve(host: str = "127.0.0.1", port: int = 8900, **options: Any) -> None:
    """Run the sandbox until SIGTERM or SIGINT; prints one line with its URL when listening."""

    async def main() -> None:
        sandbox = Sandbox(**options)
        url = await sandbox.start(host, port)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        print(f"provider sandbox listening on {url}", flush=True)
        try:
            await stop.wait()
        finally:
            await sandbox.stop()

    asyncio.run(main())
