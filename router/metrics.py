"""The router's Prometheus metrics, named after vLLM's under a `kvrelay:` prefix (docs/operations.md lists them),
plus running totals for the periodic stats log line and `snapshot`. Every metric carries a `model_name` label, the
served model's name, as vLLM's do.

Each router owns its registry, so several routers in one process (tests) never share counters. Token counters move
as work happens, so rates are smooth and cancelled or failed requests' tokens count: prompt tokens when the
orchestrator takes a request, generation tokens (and inter-token latencies) per streamed chunk. Per-request
outcomes, latencies and prefix-cache counts are observed when a request ends; per-worker gauges and the preemption
counter are fed by the worker pool's load poll."""

from __future__ import annotations

import time
from collections import Counter as PyCounter
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Latency buckets (s): vLLM's TTFT buckets, which also cover queue, e2e and transfer times on CPU and GPU alike.
LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                   20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4,
               0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
BYTES_BUCKETS = tuple(float(1 << k) for k in range(10, 36, 2))  # 1 KiB .. 32 GiB
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class RouterMetrics:
    """Mutates: its Prometheus metrics and totals (since start)."""

    def __init__(self, model_name: str = "unnamed") -> None:
        """`model_name`: the served model's name (the router passes it; the default is for tools and tests)."""
        self.model_name = model_name
        r = self.registry = CollectorRegistry()
        model = ["model_name"]

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Any:
            return Histogram(name, doc, model, buckets=buckets, registry=r).labels(model_name)

        def counter(name: str, doc: str) -> Any:
            return Counter(name, doc, model, registry=r).labels(model_name)

        self.ttft = histogram("kvrelay:time_to_first_token_seconds", "Time from the router receiving a request to "
                              "its first token", LATENCY_BUCKETS)
        self.itl = histogram("kvrelay:inter_token_latency_seconds", "Time between a request's consecutive tokens "
                             "as the router streams them (a chunk of k tokens after a gap g counts k gaps of g/k)",
                             ITL_BUCKETS)
        self.e2e = histogram("kvrelay:e2e_request_latency_seconds", "Time from the router receiving a request to "
                             "its end", LATENCY_BUCKETS)
        self.queue = histogram("kvrelay:request_queue_time_seconds", "Time a request waited in the router's line "
                               "for KV room or a prefill slot", LATENCY_BUCKETS)
        self.transfer_time = histogram("kvrelay:kv_transfer_time_seconds", "From sending a prompt to its prefill "
                                       "worker until the decode group has its whole KV (prefill and the layer-by-"
                                       "layer transfer overlap)", LATENCY_BUCKETS)
        self.transfer_bytes = histogram("kvrelay:kv_transfer_bytes", "KV bytes of a request's prompt sent to its "
                                        "decode group (blocks the group already held are not sent: an upper "
                                        "bound)", BYTES_BUCKETS)
        self.success = Counter("kvrelay:request_success", "Requests finished, by finish reason",
                               [*model, "finished_reason"], registry=r)
        self.errors = Counter("kvrelay:request_errors", "Requests failed or refused, by status",
                              [*model, "status"], registry=r)
        self.prompt_tokens = counter("kvrelay:prompt_tokens", "Prompt tokens of the requests the router took "
                                     "(counted when taken, however they end)")
        self.generation_tokens = counter("kvrelay:generation_tokens", "Generated tokens streamed to clients "
                                         "(counted per chunk, however the request ends)")
        self.cache_queries = counter("kvrelay:prefix_cache_queries", "Prompt tokens looked up in a prefix cache "
                                     "(finished requests)")
        self.cache_hits = counter("kvrelay:prefix_cache_hits", "Prompt tokens served from a prefix cache "
                                  "(finished requests)")
        self.transfer_failures = counter("kvrelay:kv_transfer_failures", "KV transfers that failed (the request "
                                         "was retried or failed)")
        self.preemptions = counter("kvrelay:num_preemptions", "Requests the workers' schedulers preempted")
        self.retries = counter("kvrelay:request_retries", "Prefills retried on a fresh placement")
        self.migrations = counter("kvrelay:request_migrations", "Requests moved, mid-stream, off a lost decode group "
                                  "(prompt + streamed tokens placed again)")
        self.running = Gauge("kvrelay:num_requests_running", "Requests a worker is computing",
                             [*model, "worker"], registry=r)
        self.waiting = Gauge("kvrelay:num_requests_waiting", "Requests queued on a worker (decode: reserved, "
                             "awaiting their KV)", [*model, "worker"], registry=r)
        self.kv_usage = Gauge("kvrelay:kv_cache_usage_perc", "Share of a worker's KV blocks in use (1 = full)",
                              [*model, "worker"], registry=r)
        self.requests: PyCounter[str] = PyCounter()  # by outcome: a finish reason, or an error status name
        self.totals = PyCounter()  # prompt, completion, queried and cached tokens; ttft_s sum and count
        self._preempted: dict[str, int] = {}  # worker -> its count at the last poll
        self._last_log = (time.monotonic(), PyCounter())

    # ---- requests -----------------------------------------------------------------------------------------
    def admitted(self, prompt: int) -> None:
        """The orchestrator took a request with `prompt` tokens."""
        self.prompt_tokens.inc(prompt)
        self.totals.update(prompt=prompt)

    def streamed(self, tokens: int, gap_s: float | None) -> None:
        """A chunk of `tokens` generated tokens went to the client `gap_s` after the request's previous chunk (None
        for its first, whose wait is the TTFT). The gap is spread evenly over the chunk's tokens, k observations of
        g/k, so the histogram is per token as vLLM's is: a chunk carries several tokens when outputs coalesced."""
        self.generation_tokens.inc(tokens)
        self.totals.update(completion=tokens)
        if gap_s is not None and tokens:
            per_token = gap_s / tokens
            for _ in range(tokens):
                self.itl.observe(per_token)

    def finished(self, reason: str, prompt: int, cached: int, ttft_s: float | None, queue_s: float,
                 e2e_s: float) -> None:
        self.requests[reason] += 1
        self.success.labels(self.model_name, reason).inc()
        self.cache_queries.inc(prompt)
        self.cache_hits.inc(cached)
        self.totals.update(queried=prompt, cached=cached)
        if ttft_s is not None:
            self.ttft.observe(ttft_s)
            self.totals.update(ttft_s=ttft_s, first_tokens=1)
        self.queue.observe(queue_s)
        self.e2e.observe(e2e_s)

    def failed(self, status: str) -> None:
        self.requests[status] += 1
        self.errors.labels(self.model_name, status).inc()

    def transferred(self, seconds: float, nbytes: int) -> None:
        self.transfer_time.observe(seconds)
        self.transfer_bytes.observe(nbytes)

    def transfer_failed(self) -> None:
        self.transfer_failures.inc()

    def retried(self) -> None:
        self.retries.inc()

    def migrated(self) -> None:
        self.migrations.inc()

    # ---- workers (the load poll) --------------------------------------------------------------------------
    def worker_load(self, name: str, running: int, waiting: int, num_blocks: int, free_blocks: int,
                    preemptions: int) -> None:
        self.running.labels(self.model_name, name).set(running)
        self.waiting.labels(self.model_name, name).set(waiting)
        self.kv_usage.labels(self.model_name, name).set(1.0 - free_blocks / num_blocks if num_blocks else 0.0)
        last = self._preempted.get(name)
        # A restarted worker counts from 0 again: count what it reports anew, never a negative step.
        step = preemptions - last if last is not None and preemptions >= last else preemptions
        if step:
            self.preemptions.inc(step)
        self._preempted[name] = preemptions

    # ---- reading ------------------------------------------------------------------------------------------
    def exposition(self) -> bytes:
        """The Prometheus text format of every metric (served on /metrics)."""
        return generate_latest(self.registry)

    def snapshot(self) -> dict[str, Any]:
        t = self.totals
        return {
            "requests": dict(self.requests),
            "prompt_tokens": t["prompt"], "cached_prompt_tokens": t["cached"], "completion_tokens": t["completion"],
            "prefix_cache_hit_rate": t["cached"] / t["queried"] if t["queried"] else 0.0,
            "mean_ttft_ms": 1e3 * t["ttft_s"] / t["first_tokens"] if t["first_tokens"] else 0.0,
        }

    def stats_line(self, running: int, waiting: int, queued: int) -> str:
        """One line for the periodic info log: throughput since the previous line, load now, totals."""
        now = time.monotonic()
        then, before = self._last_log
        dt = max(now - then, 1e-9)
        t = self.totals
        self._last_log = (now, PyCounter(t))
        ok = sum(n for k, n in self.requests.items() if k in ("stop", "length"))
        failed = sum(self.requests.values()) - ok
        return (f"stats: prompt {(t['prompt'] - before['prompt']) / dt:.1f} tok/s, generation "
                f"{(t['completion'] - before['completion']) / dt:.1f} tok/s; {running} running, {waiting} waiting "
                f"on workers, {queued} in the router's line; prefix cache hit "
                f"{100 * t['cached'] / t['queried'] if t['queried'] else 0.0:.1f}%; {ok} finished, {failed} failed")
