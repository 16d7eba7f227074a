"""From request records to the run's metrics: latency statistics, throughput, goodput, hit rate, errors.

Latency statistics use successful requests only; failed requests are counted by error code and count against SLO
attainment. Throughputs divide by the run's duration (first send to last end), as vLLM's benchmark_serving does.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from bench.load.config import SLO
from bench.load.records import RequestRecord
from bench.load.stats import Summary, summarize


@dataclass(frozen=True)
class Metrics:
    requested: int  # measured requests sent
    completed: int  # ... that succeeded
    failed: int
    errors: dict[str, int]  # failed requests by error code
    duration_s: float
    request_throughput: float  # completed requests / s
    output_throughput: float  # output tokens / s
    total_token_throughput: float  # (prompt + output tokens) / s
    good_requests: int  # completed requests that met every SLO given
    goodput: float  # good requests / s
    slo_attainment: float  # good requests / requests sent (failures count as misses)
    total_prompt_tokens: int  # from the server's usage of completed requests
    total_output_tokens: int  # tokens received by the client
    cached_prompt_tokens: int
    prefix_cache_hit_rate: float | None  # cached / prompt tokens; None without prompt tokens
    ttft_ms: Summary | None
    tpot_ms: Summary | None
    itl_ms: Summary | None
    e2e_ms: Summary | None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)  # the Summary fields become nested dicts


def compute_metrics(records: Sequence[RequestRecord], duration_s: float, slo: SLO | None = None) -> Metrics:
    slo = slo or SLO()
    if duration_s <= 0:
        raise ValueError(f"a run's duration must be > 0 s, got {duration_s}")
    ok = [r for r in records if r.ok]
    errors = Counter(r.error_code for r in records if not r.ok)
    good = sum(slo.met(r.ttft_s or 0.0, r.tpot_s) for r in ok)
    prompt = sum(r.prompt_tokens or 0 for r in ok)
    cached = sum(r.cached_prompt_tokens or 0 for r in ok)
    output = sum(r.output_tokens for r in ok)
    return Metrics(
        requested=len(records), completed=len(ok), failed=len(records) - len(ok),
        errors=dict(sorted(errors.items())), duration_s=duration_s,
        request_throughput=len(ok) / duration_s, output_throughput=output / duration_s,
        total_token_throughput=(prompt + output) / duration_s,
        good_requests=good, goodput=good / duration_s, slo_attainment=good / len(records) if records else 0.0,
        total_prompt_tokens=prompt, total_output_tokens=output, cached_prompt_tokens=cached,
        prefix_cache_hit_rate=cached / prompt if prompt else None,
        ttft_ms=summarize([r.ttft_s for r in ok if r.ttft_s is not None], 1e3),
        tpot_ms=summarize([r.tpot_s for r in ok if r.tpot_s is not None], 1e3),
        itl_ms=summarize([g for r in ok for g in r.itl_s], 1e3),
        e2e_ms=summarize([r.e2e_s for r in ok if r.e2e_s is not None], 1e3),
    )


def timeline(records: Sequence[RequestRecord], duration_s: float, bin_s: float | None = None) -> dict[str, Any]:
    """Throughput over time: output tokens and completed (and failed) requests per second in consecutive bins from
    the run's start (tokens counted when their chunk arrived, requests when they ended). Default bins: about 1 s,
    at least 20 and at most 120 of them, all of equal width so no partial last bin understates a rate."""
    if bin_s is None:
        bin_s = duration_s / min(120, max(20, math.ceil(duration_s)))
    n = max(1, math.ceil(duration_s / bin_s - 1e-9))
    tokens, done, failed = [0] * n, [0] * n, [0] * n

    def slot(t: float) -> int:
        return min(n - 1, max(0, int(t / bin_s)))

    for r in records:
        if r.ok:
            for t, k in zip(r.chunk_times_s, r.chunk_tokens):
                tokens[slot(r.start_s + t)] += k
        (done if r.ok else failed)[slot(r.start_s + r.end_s)] += 1
    return {"bin_s": bin_s, "t_s": [i * bin_s for i in range(n)],
            "output_tokens_per_s": [k / bin_s for k in tokens], "completed_per_s": [c / bin_s for c in done],
            "failed_per_s": [c / bin_s for c in failed]}
