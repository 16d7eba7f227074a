"""Per-request sampling parameters (pure Python; the router validates requests with this same class)."""

from __future__ import annotations

import math
from dataclasses import dataclass

MAX_LOGPROBS = 20
# Temperatures below this sample as greedy: dividing logits by a tiny temperature overflows them to inf/nan.
GREEDY_EPS = 1e-5


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token and when to stop.

    temperature 0 (or below GREEDY_EPS) is greedy; top_k 0 (or -1) and top_p 1.0 disable those filters. A `seed`
    makes the request's samples reproducible whatever else shares its batch. `stop` strings end generation and are
    cut from the text;
    `stop_token_ids` (and the model's EOS unless `ignore_eos`) end it too. `logprobs=n` returns, for each generated
    token, its log-probability and the top-n alternatives under the model's unmodified distribution.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None
    skip_special_tokens: bool = True
    # Outputs this request already produced elsewhere (a request migrated from a failed decode group continues
    # with prompt + those tokens): seeded sampling noise continues at this output index, so the stream is the
    # one an unfailed run draws. Set by the router for workers, never by clients.
    output_offset: int = 0

    def __post_init__(self) -> None:
        # Accept lists from callers but store tuples (frozen and hashable).
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        else:
            object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature)
                and self.temperature >= 0.0):
            raise ValueError(f"temperature must be a finite number >= 0 (0 means greedy), got {self.temperature!r}")
        if not isinstance(self.top_k, int) or self.top_k < -1:
            raise ValueError(f"top_k must be an integer >= 0 (0 or -1 disables it), got {self.top_k!r}")
        if not (isinstance(self.top_p, (int, float)) and 0.0 < self.top_p <= 1.0):  # rejects NaN too
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or self.seed < 0):
            raise ValueError(f"seed must be a non-negative integer, got {self.seed!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop must be non-empty strings, got {self.stop!r}")
        if any(t < 0 for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids must be non-negative, got {self.stop_token_ids!r}")
        if not isinstance(self.output_offset, int) or self.output_offset < 0:
            raise ValueError(f"output_offset must be a non-negative integer, got {self.output_offset!r}")
        if self.logprobs is not None and not (isinstance(self.logprobs, int) and 0 <= self.logprobs <= MAX_LOGPROBS):
            raise ValueError(f"logprobs must be an integer in [0, {MAX_LOGPROBS}], got {self.logprobs!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_EPS

    @property
    def effective_top_k(self) -> int:
        """0 when top-k filtering is off."""
        return max(self.top_k, 0)
