"""The router's waiting room: a bounded FIFO line of requests that no decode group has KV room for yet.

A request first tries to get room at once, unless others are already waiting (first come, first served). Only
the head of the line retries, whenever room may have freed (`notify`, e.g. a request finished) or every poll
interval. A full line is RESOURCE_EXHAUSTED at once; a waiter is RESOURCE_EXHAUSTED only when nothing freed room
for the timeout (no `notify` since it joined, or since the last one): while running requests still finish, the
line waits rather than fails. Bounded memory, never a crash.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TypeVar

from router.errors import RESOURCE_EXHAUSTED, RequestError

T = TypeVar("T")


class WaitingRoom:
    """Mutates: its line of waiters."""

    def __init__(self, max_waiting: int, poll_s: float = 0.05) -> None:
        self.max_waiting, self.poll_s = max_waiting, poll_s
        self._line: deque[asyncio.Event] = deque()
        self._last_freed = time.monotonic()  # the last notify: progress that may make room

    @property
    def waiting(self) -> int:
        return len(self._line)

    def notify(self) -> None:
        """Room may have freed: the head of the line tries again now, and every waiter's timeout starts over."""
        self._last_freed = time.monotonic()
        if self._line:
            self._line[0].set()

    async def acquire(self, attempt: Callable[[], Awaitable[T | None]], timeout_s: float) -> tuple[T, float]:
        """`attempt()` returns what it got, or None when there is no room now. Returns (what it got, seconds
        spent waiting in line); raises RequestError(RESOURCE_EXHAUSTED) when the line is full or time runs out."""
        if not self._line:
            got = await attempt()
            if got is not None:
                return got, 0.0
        if len(self._line) >= self.max_waiting:
            raise RequestError(RESOURCE_EXHAUSTED, f"the server is at capacity: {len(self._line)} requests are "
                               "already waiting for KV cache room; retry later")
        me = asyncio.Event()
        self._line.append(me)
        start = time.monotonic()
        try:
            while True:
                while self._line[0] is not me:
                    await me.wait()
                    me.clear()
                got = await attempt()
                if got is not None:
                    return got, time.monotonic() - start
                remaining = max(start, self._last_freed) + timeout_s - time.monotonic()
                if remaining <= 0:
                    raise RequestError(RESOURCE_EXHAUSTED, f"no KV cache room freed up within {timeout_s:.0f} s; "
                                       "retry later or send fewer concurrent requests")
                try:
                    await asyncio.wait_for(me.wait(), min(self.poll_s, remaining))
                except asyncio.TimeoutError:
                    pass
                me.clear()
        finally:
            self._line.remove(me)
            if self._line:
                self._line[0].set()
