"""What the client saw of one request: raw timestamps and counts, from which every latency metric is derived.

Definitions (as vLLM's benchmark_serving): TTFT is the time from sending the request to the first chunk carrying
tokens; end-to-end latency ends at the last chunk carrying tokens; TPOT = (e2e - TTFT) / (output tokens - 1);
inter-token latencies are the gaps between consecutive token-carrying chunks. A chunk with k tokens is k tokens
arriving at once: it adds k to the output count but one gap to the ITLs (we do not spread the gap over its tokens,
as SGLang does), so the ITLs of a request sum to e2e - TTFT exactly.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class RequestRecord:
    index: int  # the workload index
    start_s: float  # when it was sent, seconds after the run started
    prompt_len: int | None  # prompt tokens as sent, when known on the client
    output_len: int  # max_tokens asked for
    group: int | None = None  # shared-prefix group
    chunk_times_s: list[float] = field(default_factory=list)  # each token-carrying chunk's arrival, s after start_s
    chunk_tokens: list[int] = field(default_factory=list)  # tokens in each of those chunks
    end_s: float = 0.0  # when the stream ended (final message or error), s after start_s
    error_code: str | None = None  # gRPC status name (KvrelayError.code), or CLIENT_<exception> / NO_TOKENS
    error_details: str | None = None
    request_id: str | None = None
    finish_reason: str | None = None
    prompt_tokens: int | None = None  # the server's usage figures, from the final message
    completion_tokens: int | None = None
    cached_prompt_tokens: int | None = None
    server_timings_ms: dict[str, float] | None = None  # queued, first token, KV landed, total (server side)

    @property
    def ok(self) -> bool:
        return self.error_code is None

    @property
    def output_tokens(self) -> int:
        return sum(self.chunk_tokens)

    @property
    def ttft_s(self) -> float | None:
        return self.chunk_times_s[0] if self.chunk_times_s else None

    @property
    def e2e_s(self) -> float | None:
        return self.chunk_times_s[-1] if self.chunk_times_s else None

    @property
    def itl_s(self) -> list[float]:
        t = self.chunk_times_s
        return [b - a for a, b in zip(t, t[1:])]

    @property
    def tpot_s(self) -> float | None:
        """Mean time per output token after the first; None with fewer than 2 tokens."""
        n = self.output_tokens
        if n < 2 or not self.chunk_times_s:
            return None
        return (self.chunk_times_s[-1] - self.chunk_times_s[0]) / (n - 1)

    def to_json(self) -> dict[str, Any]:
        """The raw fields plus the derived latencies in ms (null where undefined)."""
        d = asdict(self)

        def ms(v: float | None) -> float | None:
            return None if v is None else v * 1e3

        d.update(ok=self.ok, output_tokens=self.output_tokens, ttft_ms=ms(self.ttft_s), tpot_ms=ms(self.tpot_s),
                 e2e_ms=ms(self.e2e_s), itl_ms=[v * 1e3 for v in self.itl_s])
        return d
