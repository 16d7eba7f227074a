"""Decode-side bookkeeping of prompts prefilled elsewhere (pure Python): reservations, landing, deadlines.

A reserved request becomes decodable when (a) every tensor-parallel rank reported its KV landed and (b) its first
token (sampled by the prefill worker) is known. A rank's failure, or the deadline passing first, fails it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class _Pending:
    deadline: float
    landed_ranks: int = 0
    first_token: int | None = None


class RemotePrefills:
    def __init__(self, tp_size: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.tp_size = tp_size
        self.clock = clock  # seconds; tests pass their own
        self.pending: dict[str, _Pending] = {}

    def add(self, request_id: str, timeout_s: float) -> None:
        self.pending[request_id] = _Pending(deadline=self.clock() + timeout_s)

    def set_first_token(self, request_id: str, token: int) -> None:
        p = self.pending.get(request_id)
        if p is None:
            raise KeyError(f"no remote prefill pending for request {request_id!r}")
        p.first_token = token

    def apply(self, rank_events: list[dict]) -> tuple[list[tuple[str, int]], dict[str, str]]:
        """Fold one poll of every rank. Returns (ready [(request id, first token)], failed {id: error})."""
        failed: dict[str, str] = {}
        for ev in rank_events:
            for rid in ev.get("landed", []):
                if rid in self.pending:
                    self.pending[rid].landed_ranks += 1
            for rid, err in ev.get("failed", {}).items():
                if rid in self.pending:
                    failed.setdefault(rid, err)
        for rid in failed:
            del self.pending[rid]
        ready = [(rid, p.first_token) for rid, p in self.pending.items()
                 if p.landed_ranks >= self.tp_size and p.first_token is not None]
        for rid, _ in ready:
            del self.pending[rid]
        # Whatever is not ready by its deadline fails: KV still missing, or the first token never came.
        now = self.clock()
        for rid, p in list(self.pending.items()):
            if p.deadline < now:
                failed[rid] = ("KV transfer did not complete within its deadline" if p.landed_ranks < self.tp_size
                               else "the prefill worker's first token did not arrive within the deadline")
                del self.pending[rid]
        return ready, failed

    def discard(self, request_id: str) -> bool:
        return self.pending.pop(request_id, None) is not None
