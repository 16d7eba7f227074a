"""Routing policy (pure Python): which prefill worker runs a prompt, which decode groups may take it.

Prefill: with "cache_aware", the worker holding the longest cached prefix of the prompt, ties (and misses) broken
by load; but when that worker is `balance_abs_threshold` requests busier than the least loaded one, the least
loaded wins (a popular prefix must not pile all traffic on one worker). "least_loaded" and "round_robin" ignore
the cache. Decode: with "cache_aware", groups holding the longest prefix of the prompt first (the same balance
guard), then the most free KV blocks, then the least loaded; the other policies ignore the decode-side cache.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class WorkerView:
    """What the router knows of one worker: from its last load poll, plus the router's own in-flight count."""

    name: str
    healthy: bool = True
    draining: bool = False  # scaling down (its load says so, or it refused a call): no new work goes to it
    inflight: int = 0  # requests the router has on it now
    inflight_tokens: int = 0  # prompt tokens the router has on it now (prefill workers)
    free_blocks: int = 0
    num_blocks: int = 0
    running: int = 0
    waiting: int = 0

    @property
    def load(self) -> int:
        return self.inflight


class RoutingPolicy:
    """Mutates: the round-robin cursor only."""

    def __init__(self, name: str = "cache_aware", balance_abs_threshold: int = 16) -> None:
        self.name, self.threshold = name, balance_abs_threshold
        self._rr = 0

    def pick_prefill(self, workers: list[WorkerView], cached_blocks: dict[str, int]) -> WorkerView | None:
        """The prefill worker for a prompt; `cached_blocks[name]` = its (estimated) cached prefix, in blocks."""
        healthy = [w for w in workers if w.healthy and not w.draining]
        if not healthy:
            return None
        if self.name == "round_robin":
            self._rr += 1
            return healthy[self._rr % len(healthy)]
        least = min(healthy, key=lambda w: (w.load, w.name))
        if self.name == "least_loaded":
            return least
        best = min(healthy, key=lambda w: (-cached_blocks.get(w.name, 0), w.load, w.name))
        if best.load - least.load >= self.threshold:
            return least
        return best

    def rank_decode(self, groups: list[WorkerView], cached_blocks: dict[str, int] | None = None) -> list[WorkerView]:
        """Healthy decode groups in the order to try them: the longest cached prefix first (`cached_blocks[name]`,
        in blocks; not for a group `balance_abs_threshold` requests busier than the least loaded), then the most
        free KV blocks, then the least loaded."""
        healthy = [g for g in groups if g.healthy and not g.draining]
        if not healthy:
            return []
        least = min(g.load for g in healthy)
        cached = cached_blocks if cached_blocks is not None and self.name == "cache_aware" else {}

        def key(g: WorkerView) -> tuple:
            held = cached.get(g.name, 0) if g.load - least < self.threshold else 0
            return -held, -g.free_blocks, g.load, g.name

        return sorted(healthy, key=key)
