"""Several admitted requests run at once as one HTTP request's choices (n > 1, or a batch of prompts): one task
each, their chunks merged in arrival order, tagged with the choice index. Closing cancels every choice still
running, which frees its blocks on every worker. When one choice fails, the others are stopped at once: the server
stopped them, so the intake does not count them as cancelled by the client."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from router.client_stream import Chunk, Final
from router.errors import RequestError
from router.intake import Intake
from router.requests import RequestSpec

_DONE = object()


class Fanout:
    """Mutates: its queue and buffer; starts one task per choice on construction (on the running loop)."""

    def __init__(self, intake: Intake, specs: list[RequestSpec]) -> None:
        self._queue: asyncio.Queue[tuple[int, object]] = asyncio.Queue()
        self._buffer: list[tuple[int, Chunk | Final]] = []
        self._running = len(specs)
        self._intake, self._specs = intake, specs
        self._tasks = [asyncio.create_task(self._pump(intake, i, s)) for i, s in enumerate(specs)]

    async def _pump(self, intake: Intake, index: int, spec: RequestSpec) -> None:
        try:
            async with contextlib.aclosing(intake.run(spec)) as items:
                async for item in items:
                    self._queue.put_nowait((index, item))
        except RequestError as e:
            self._queue.put_nowait((index, e))
        self._queue.put_nowait((index, _DONE))

    async def _next(self) -> tuple[int, Chunk | Final] | None:
        """The next item of any choice; None once every choice is done. Raises a choice's RequestError."""
        while self._running:
            index, item = await self._queue.get()
            if isinstance(item, RequestError):
                self._stop_siblings()
                raise item
            if item is _DONE:
                self._running -= 1
                continue
            assert isinstance(item, (Chunk, Final))
            return index, item
        return None

    async def prime(self) -> None:
        """Wait until every choice has produced its first output (it was admitted and placed, and its prefill
        ran), so that overload or a missing worker still gets its own HTTP status before a stream begins."""
        started: set[int] = set()
        while len(started) < len(self._tasks):
            got = await self._next()
            if got is None:
                return
            self._buffer.append(got)
            started.add(got[0])

    async def items(self) -> AsyncIterator[tuple[int, Chunk | Final]]:
        """(choice index, chunk or final) in arrival order: what `prime` buffered, then the rest."""
        buffered, self._buffer = self._buffer, []
        for got in buffered:
            yield got
        while (got := await self._next()) is not None:
            yield got

    def _stop_siblings(self) -> None:
        """A choice failed, so the whole response has: stop the others now, as the server's doing."""
        for spec, t in zip(self._specs, self._tasks):
            if not t.done():
                self._intake.halt(spec)
                t.cancel()

    async def aclose(self) -> None:
        """Cancel what still runs. The cancels are what free the blocks; waiting for them is only tidiness, and
        is cut short if this task is itself being cancelled (a client that went away)."""
        for t in self._tasks:
            t.cancel()
        try:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.gather(*self._tasks, return_exceptions=True)
        finally:
            for s in self._specs:  # a choice cancelled before it started never ran intake.run's own release
                self._intake.release(s)
