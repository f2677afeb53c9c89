"""The service: owns the lifecycle of what the provider pipelines share, and runs one pipeline per provider.

Start-up, in order (each step's undo is pushed on one AsyncExitStack, so a failure at any step closes
what was opened before it, in reverse):
 1. the transport (HTTP connections) and the token cache;
 2. the dead-letter writer;
 3. the metrics and health server;
 4. the group protocol (asked of the broker) and, with a group per provider, the upgrade: provider groups
    without offsets of their own start from the shared group's (consumer/groups.py);
 5. one Pipeline per provider (consumer/pipeline.py), each a member of its own consumer group;
 6. the control plane (consumer/ops/): the pauses kept in the control topic, and its HTTP API.
Then every pipeline's poll loop runs until a stop (SIGTERM, SIGINT, `stop()`) or a fatal error in any of
them, and shutdown drains all pipelines at once, commits what is done, leaves the groups and closes the
rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import threading
import time
from collections.abc import Callable

from consumer import groups
from consumer.config import Config
from consumer.decoding import make_event_decoder
from consumer.delivery import AmbiguousProject, ProjectStatus, UnknownProject
from consumer.dlq import DeadLetterWriter, producer_config
from consumer.metrics import HealthServer, Metrics, Tally
from consumer.model import Provider
from consumer.ops.control_plane import ControlPlane
from consumer.ops.control_store import ControlStoreError
from consumer.pipeline import EXIT_DLQ, EXIT_KAFKA_AUTH, Hooks, Pipeline, Shared, kafka_refused
from consumer.providers.base import ProviderModule
from consumer.providers.registry import modules
from consumer.refunds import OrderLedger
from consumer.source import choose_group_protocol
from consumer.transport import TokenCache, Transport

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_FATAL = 1
__all__ = ["EXIT_DLQ", "EXIT_FATAL", "EXIT_KAFKA_AUTH", "EXIT_OK", "Application", "Hooks", "tune_gc"]


def tune_gc(threshold: int) -> tuple[int, int, int] | None:
    """Collect less often from now on; returns the settings to restore (None: `threshold` 0, left alone).

    Events in flight live for a linger plus a round trip, long enough to survive Python's young
    collections (every 700 allocations by default) and be scanned again and again in the older
    generations: measured 10% of the service's CPU. The hot path makes almost no reference cycles,
    so a larger threshold costs little memory. Objects that exist already (modules, config, clients)
    are frozen out of every collection.
    """
    if threshold == 0:
        return None
    previous = gc.get_threshold()
    gc.collect()
    gc.freeze()
    gc.set_threshold(threshold, 20, 100)
    return previous


def lanes(cfg: Config, all_modules: dict[Provider, ProviderModule]) -> list[tuple[str, str, dict[Provider,
                                                                                            ProviderModule]]]:
    """(name, consumer group, provider modules) of each pipeline the configuration asks for, in a stable order.

    With isolation "provider" each configured provider gets a pipeline and a group of its own; with "shared"
    one pipeline in `group_id` serves them all.
    """
    if cfg.kafka.isolation == "shared" or not all_modules:
        return [("all", groups.group_of(cfg.kafka, None), dict(all_modules))]
    return [(p.slug, groups.group_of(cfg.kafka, p.slug), {p: m})
            for p, m in sorted(all_modules.items(), key=lambda pm: pm[0].slug)]


class Application:
    def __init__(
        self,
        config: Config,
        *,
        metrics: Metrics | None = None,
        clock_ms: Callable[[], int] = lambda: int(time.time() * 1000),
        stop_when: Callable[[Application], bool] | None = None,
        install_signals: bool = True,
        hooks: Hooks | None = None,
        ledger: OrderLedger | None = None,
    ) -> None:
        self.config = config
        self.ledger = ledger  # what order adjustments are planned from; required by [adjustments] enabled
        self.metrics = metrics or Metrics()
        self.tally = Tally()
        self.clock_ms = clock_ms
        self.stop_when = stop_when
        self.install_signals = install_signals
        self.hooks = hooks
        self.fatal: str | None = None
        self.fatal_exit = EXIT_DLQ  # the exit code when `fatal` is set
        self.pipelines: list[Pipeline] = []
        self.dlq: DeadLetterWriter | None = None
        self.health: HealthServer | None = None
        self.control_port: int | None = None  # where the control API listens, once it does
        self._halt = asyncio.Event()
        self._stopping = False
        self._ready = False  # what offline_conversions_ready says, kept by the service itself

    # ------------------------------------------------------------------ what tests and tools look at

    @property
    def consumed(self) -> int:
        """Messages every pipeline has read at least (each reads the whole topic in its own group)."""
        return min((p.consumed for p in self.pipelines), default=0)

    @property
    def live(self) -> int:
        """Events in flight in all pipelines together."""
        return sum(p.live for p in self.pipelines)

    def pipeline(self, name: str) -> Pipeline:
        """The pipeline of one provider (its slug), or "all" for the shared one."""
        for p in self.pipelines:
            if p.name == name:
                return p
        raise KeyError(f"no pipeline {name!r}; there are {[p.name for p in self.pipelines]}")

    # ------------------------------------------------------------------ the control plane's view (Controlled)

    def statuses(self) -> list[ProjectStatus]:
        """Every provider project of every pipeline, as its dispatcher reports it."""
        return [s for p in self.pipelines for s in p.dispatcher.statuses()]

    def lag(self) -> dict[str, int]:
        """Per provider, this member's lag in that provider's group (its partitions' share)."""
        out: dict[str, int] = {}
        for p in self.pipelines:
            for provider in p.providers:
                out[provider.slug] = out.get(provider.slug, 0) + sum(p.source.lag.values())
        return out

    def _on_control(self, provider: str, project: str, paused: bool, reason: str | None) -> None:
        """A pause or resume from the control topic (this member's API or another member's): applied here."""
        for p in self.pipelines:
            if not any(pr.slug == provider for pr in p.providers):
                continue
            try:
                if paused:
                    p.dispatcher.pause(project, reason or "paused by an operator", provider)
                else:
                    p.dispatcher.resume(project, provider)
            except (UnknownProject, AmbiguousProject):
                # A record for a project this member's configuration does not have: nothing to apply.
                log.info("control record for a project not configured here", extra={
                    "provider": provider, "project": project})
            return

    # ------------------------------------------------------------------ lifecycle

    def stop(self) -> None:
        """Ask for a graceful stop (SIGTERM, SIGINT, or a test)."""
        self._stopping = True
        self._halt.set()
        self._set_ready(False)

    @property
    def stopping(self) -> bool:
        return self._stopping

    def _fail(self, reason: str, exit_code: int) -> None:
        """A fatal error in some pipeline: the first one is kept, and every pipeline stops."""
        if self.fatal is None:
            self.fatal = reason
            self.fatal_exit = exit_code
            log.error(reason)
        self._halt.set()
        self._set_ready(False)

    def readiness(self) -> tuple[bool, dict[str, object]]:
        detail: dict[str, object] = {
            "groups": {p.group: p.detail() for p in self.pipelines},
            "assigned": sum(len(p.source.assigned) for p in self.pipelines),
            "broker": bool(self.pipelines) and all(p.source.broker_up for p in self.pipelines),
            "dlq": bool(self.dlq and self.dlq.failed is None),
            "stopping": self.stopping,
        }
        ok = self._is_ready()
        self._set_ready(ok)
        return ok, detail

    def _is_ready(self) -> bool:
        """Every pipeline assigned and its broker reachable, the DLQ writable, and not stopping."""
        dlq = self.dlq
        return (bool(self.pipelines) and all(p.ready() for p in self.pipelines) and dlq is not None
                and dlq.failed is None and not self._stopping and self.fatal is None)

    def _set_ready(self, ok: bool) -> None:
        # The gauge follows assignment, revocation, broker and DLQ state as the loops see them change;
        # nobody has to call /readyz for it to be right (extra --workers processes are never probed).
        if ok is not self._ready:
            self._ready = ok
            self.metrics.ready.set(1 if ok else 0)

    @staticmethod
    def producer_config(cfg: Config) -> dict[str, str | int | float | bool]:
        """The DLQ producer's librdkafka settings (consumer.dlq.producer_config)."""
        return producer_config(cfg)

    async def run(self) -> int:
        cfg = self.config
        loop = asyncio.get_running_loop()
        if self.install_signals and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.stop)
        async with contextlib.AsyncExitStack() as stack:
            # 1. Connections to the providers.
            transport = Transport.for_config(cfg)
            stack.push_async_callback(transport.close)
            # Each token request carries its provider's user agent (TokenSpec.user_agent), counted under its slug.
            tokens = TokenCache(transport, on_grant=lambda p, r: self.metrics.token_grants.labels(p, r).inc())
            if cfg.adjustments.enabled and (self.ledger is None or cfg.adjustments.topic):
                # Refused, not ignored: adjustments read and never applied would be lost silently.
                self._fail("[adjustments] enabled needs the ledger (consumer/refunds.py OrderLedger) and, for now, "
                           "adjustments on [kafka] topic (a topic of their own is not read yet)", EXIT_FATAL)
                return self.fatal_exit
            decoder = make_event_decoder(cfg.decoding, cfg.adjustments)
            stack.push_async_callback(decoder.close)
            # 2. The dead-letter writer.
            self.dlq = dlq = DeadLetterWriter(cfg.kafka.dlq_topic, self.producer_config(cfg), cfg.pipeline.dlq_timeout)
            dlq.start()
            stack.callback(dlq.close, 5.0)
            # 3. Metrics and health.
            self.health = health = HealthServer(self.metrics, self.readiness)
            await health.start(cfg.metrics.host, cfg.metrics.port)
            stack.push_async_callback(health.stop)
            stack.callback(self._set_ready, False)
            stack.callback(self.tally.flush)
            # 4. The group protocol, and the provider groups' first offsets.
            protocol = await loop.run_in_executor(None, choose_group_protocol, cfg.kafka)
            log.info("group protocol", extra={"protocol": protocol.protocol, "reason": protocol.reason})
            plan = lanes(cfg, modules(cfg))
            if cfg.kafka.isolation == "provider":
                wanted = [group for _, group, _ in plan]
                seeded = None
                while seeded is None:
                    try:
                        seeded = await loop.run_in_executor(None, groups.seed, cfg.kafka, wanted)
                    except groups.SeedAuthError as exc:
                        self._fail(kafka_refused(str(exc)), EXIT_KAFKA_AUTH)
                        return self.fatal_exit
                    except groups.SeedError as exc:
                        # Joining without the old group's offsets could re-send everything: wait for the broker
                        # (unready, as with a broker down later), until it answers or the service is stopped.
                        log.warning("kafka: cannot read the consumer groups' offsets yet, retrying in 5 s: %s", exc)
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(self._halt.wait(), 5.0)
                        if self._halt.is_set():
                            return self.fatal_exit if self.fatal is not None else EXIT_OK
                if seeded:
                    log.info("upgraded to a consumer group per provider", extra={"seeded": groups.describe(seeded)})
            # 5. A pipeline per provider.
            shared = Shared(cfg, self.metrics, self.tally, decoder, dlq, transport, tokens, self.clock_ms,
                            self._halt, self._fail, self.hooks, self.ledger)
            should_stop = self._should_stop if self.stop_when is not None else None
            self.pipelines = [
                Pipeline(shared, name=name, group=group, modules=mods, designated=i == 0, protocol=protocol,
                         should_stop=should_stop)
                for i, (name, group, mods) in enumerate(plan)
            ]
            # 6. The control plane: standing pauses (written by any member, kept in the control topic) are
            # applied before anything is delivered; then its API listens.
            if cfg.control.enabled:
                try:
                    control = await stack.enter_async_context(ControlPlane(cfg, self, self._on_control))
                except ControlStoreError as exc:
                    self._fail(f"the control topic cannot be used: {exc}", EXIT_FATAL)
                    return self.fatal_exit
                self.control_port = control.port
            log.info("started", extra={"topic": cfg.kafka.topic, "groups": [p.group for p in self.pipelines],
                                       "metrics_port": health.port, "control_port": self.control_port})
            gc_settings = tune_gc(cfg.pipeline.gc_threshold)
            if gc_settings is not None:
                stack.callback(gc.unfreeze)
                stack.callback(gc.set_threshold, *gc_settings)
            try:
                await self._run_pipelines()
            finally:
                await self._shutdown()
        if self.fatal is not None:
            log.error("stopped: %s", self.fatal)
            return self.fatal_exit
        log.info("stopped", extra={"consumed": self.consumed})
        return EXIT_OK

    def _should_stop(self) -> bool:
        assert self.stop_when is not None
        if self.stop_when(self):
            self._halt.set()
            return True
        return False

    async def _run_pipelines(self) -> None:
        """Every pipeline's loop; the first to end for any reason ends them all."""
        tasks = [asyncio.create_task(p.run(), name=f"pipeline {p.name}") for p in self.pipelines]
        readiness = asyncio.create_task(self._watch_readiness())
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            self._halt.set()
            await asyncio.gather(*tasks, return_exceptions=True)
            for task in done:
                if (exc := task.exception()) is not None:
                    raise exc
        finally:
            readiness.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await readiness

    async def _watch_readiness(self) -> None:
        # The loops run concurrently: readiness is the state of all of them, looked at on a short interval.
        while not self._halt.is_set():
            self._set_ready(self._is_ready())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._halt.wait(), 0.05)

    async def _shutdown(self) -> None:
        pipe = self.config.pipeline
        self._set_ready(False)
        deadline = pipe.shutdown_deadline if self.fatal is None else min(pipe.shutdown_deadline, pipe.dlq_timeout)
        await asyncio.gather(*(p.drain(deadline) for p in self.pipelines))
        for p in self.pipelines:
            p.leave()
        await asyncio.gather(*(p.close() for p in self.pipelines))
