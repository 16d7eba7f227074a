"""What a worker's gRPC service needs of its engine: `EngineHandle`. Two things provide it: the engine loop on a
thread of the service's own process (`engine.engine_loop.EngineLoop`), and a client of an engine core running in
a process of its own (`worker_runtime.engine_core`). Services name engine operations (`OPERATIONS`) rather than
pass functions, so the same calls work across the process boundary."""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable
from typing import Any, Protocol

from engine.config import EngineConfig
from engine.engine_loop import EngineStats
from engine.outputs import RequestOutput


class EngineHandle(Protocol):
    error: str | None  # why the engine is dead (then every call fails with EngineDead); None while it runs
    stats: EngineStats  # the latest published after a step, read without a call into the engine

    @property
    def config(self) -> EngineConfig: ...

    def call(self, op: str, *args: Any) -> concurrent.futures.Future: ...

    async def acall(self, op: str, *args: Any) -> Any: ...

    async def astart(self, request_id: str, sink: Callable[[RequestOutput], None], op: str, *args: Any) -> Any: ...

    def unsubscribe(self, request_id: str) -> None: ...

    def deliver_on(self, aio_loop: asyncio.AbstractEventLoop) -> None: ...

    def stuck_for(self) -> float: ...

    def stop(self, timeout_s: float = 30.0) -> None: ...
