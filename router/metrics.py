"""The router's counters (pure Python): what it served, how, and how fast; logged and returned by `snapshot`."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass
class RouterMetrics:
    """Mutates: its counters. Totals since start."""

    requests: Counter = field(default_factory=Counter)  # by outcome: a finish reason, or an error status name
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0
    completion_tokens: int = 0
    ttft_ms_sum: float = 0.0
    first_tokens: int = 0

    def finished(self, reason: str, prompt: int, cached: int, completion: int, ttft_ms: float | None) -> None:
        self.requests[reason] += 1
        self.prompt_tokens += prompt
        self.cached_prompt_tokens += cached
        self.completion_tokens += completion
        if ttft_ms is not None:
            self.ttft_ms_sum += ttft_ms
            self.first_tokens += 1

    def failed(self, status: str) -> None:
        self.requests[status] += 1

    def snapshot(self) -> dict:
        return {
            "requests": dict(self.requests),
            "prompt_tokens": self.prompt_tokens,
            "cached_prompt_tokens": self.cached_prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "prefix_cache_hit_rate": self.cached_prompt_tokens / self.prompt_tokens if self.prompt_tokens else 0.0,
            "mean_ttft_ms": self.ttft_ms_sum / self.first_tokens if self.first_tokens else 0.0,
        }
