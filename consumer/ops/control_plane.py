"""The control plane as one resource: the control store and the control API, started and stopped together."""

from __future__ import annotations

from types import TracebackType

from consumer.config import Config
from consumer.logs import Redactor
from consumer.ops.control_api import ControlApi, Controlled
from consumer.ops.control_store import ControlStore, OnChange


class ControlPlane:
    """`async with ControlPlane(cfg, controlled, on_change) as cp:` — for an Application's AsyncExitStack.

    Entering reads the control topic to its end (creating it if missing) and reports every standing
    pause through `on_change` before it returns, so enter it once the dispatchers exist and before the
    pipelines deliver anything; then the API listens on `[control] host:port` (`cp.port` is the port
    it got). Exiting stops the API first (no new writes), then the store. Errors: ControlTopicError
    (the topic), ControlListenError (a ConfigError naming control.host or control.port).
    """

    def __init__(self, cfg: Config, controlled: Controlled, on_change: OnChange, *,
                 store: ControlStore | None = None) -> None:
        self.cfg = cfg
        self.store = store or ControlStore.for_config(cfg, on_change)
        self.api = ControlApi(self.store, controlled, cfg.kafka.group_id, cfg.control.token,
                              scrub=Redactor(cfg.secrets()).scrub)
        self.port = 0

    async def __aenter__(self) -> ControlPlane:
        await self.store.start()
        try:
            self.port = await self.api.start(self.cfg.control.host, self.cfg.control.port)
        except BaseException:
            await self.store.close()
            raise
        return self

    async def __aexit__(self, t: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        try:
            await self.api.stop()
        finally:
            await self.store.close()
