"""A progress bar on stderr while requests complete (no dependency: one line redrawn in place on a terminal; on a
pipe or a CI log, a plain line at every tenth of the run)."""

from __future__ import annotations

import sys
import time
from typing import Protocol, TextIO

from bench.load.records import RequestRecord

_WIDTH = 30
_REDRAW_S = 0.1  # terminal redraw limit: a fast run completes thousands of requests per second


class ProgressSink(Protocol):
    """What the runner tells of each finished request: a Progress, or a worker process's shared counters."""

    def update(self, rec: RequestRecord) -> None: ...

    def close(self) -> None: ...


class Progress:
    """Counts finished requests of a run of `total` requests and/or `duration` seconds."""

    def __init__(self, label: str, total: int | None, duration: float | None, *, enabled: bool = True,
                 out: TextIO | None = None) -> None:
        self.label, self.total, self.duration, self.enabled = label, total, duration, enabled
        self.out = out or sys.stderr
        self.tty = self.out.isatty()
        self.done = self.errors = 0
        self.t0 = time.perf_counter()
        self._last_draw = 0.0
        self._last_tenth = -1

    def fraction(self) -> float:
        parts = []
        if self.total:
            parts.append(self.done / self.total)
        if self.duration:
            parts.append((time.perf_counter() - self.t0) / self.duration)
        return min(1.0, max(parts)) if parts else 0.0  # the run ends at whichever limit comes first

    def update(self, rec: RequestRecord) -> None:
        self.set(self.done + 1, self.errors + (not rec.ok))

    def set(self, done: int, errors: int) -> None:
        """The counts so far (of worker processes, which count for a parent's bar); redraws as `update` does."""
        changed = done != self.done
        self.done, self.errors = done, errors
        if not self.enabled or not changed:
            return
        now = time.perf_counter()
        if self.tty:
            if now - self._last_draw >= _REDRAW_S or self.done == self.total:
                self._last_draw = now
                self.out.write("\r" + self.line())
                self.out.flush()
        else:
            tenth = int(self.fraction() * 10)
            if tenth > self._last_tenth:
                self._last_tenth = tenth
                self.out.write(self.line() + "\n")
                self.out.flush()

    def line(self) -> str:
        elapsed = time.perf_counter() - self.t0
        filled = int(self.fraction() * _WIDTH)
        count = f"{self.done}/{self.total}" if self.total else f"{self.done}"
        rate = self.done / elapsed if elapsed > 0 else 0.0
        return (f"{self.label} [{'#' * filled}{'.' * (_WIDTH - filled)}] {count} req  {rate:.2f} req/s  "
                f"errors {self.errors}  {elapsed:.1f}s")

    def close(self) -> None:
        if self.enabled and self.tty:
            self.out.write("\r" + self.line() + "\n")
            self.out.flush()
