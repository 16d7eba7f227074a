"""What a `kvrelay bench` run does: frozen dataclasses, validated on construction; only cli.py builds them from argv."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from bench.load.lengths import LengthDist

WORKLOADS = ("random", "shared-prefix", "sharegpt")
BACKENDS = ("kvrelay", "openai")
DEFAULT_OUTPUT_LEN = 128  # generated workloads' output length when none is given


@dataclass(frozen=True)
class WorkloadConfig:
    """Which prompts are sent. random: `input_len` random token ids. shared-prefix: `num_prefixes` system prompts of
    `prefix_len` random tokens, each followed by `questions_per_prefix` different random questions of `input_len`.
    sharegpt: the first human turn of each conversation in `dataset`, as text."""

    kind: str = "random"
    input_len: LengthDist = LengthDist(128)
    output_len: LengthDist | None = None  # None: DEFAULT_OUTPUT_LEN, or each ShareGPT answer's own length
    num_prefixes: int = 0
    questions_per_prefix: int = 0
    prefix_len: int = 0
    dataset: str | None = None
    tokenizer: str | None = None  # tokenizer.json (or its directory), to count ShareGPT tokens locally
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in WORKLOADS:
            raise ValueError(f"unknown workload {self.kind!r}: choose one of {', '.join(WORKLOADS)}")
        shared = (self.num_prefixes, self.questions_per_prefix, self.prefix_len)
        if self.kind == "shared-prefix":
            if min(shared) < 1:
                raise ValueError("a shared-prefix workload needs --num-prefixes, --questions-per-prefix and "
                                 f"--prefix-len all >= 1, got {shared}")
        elif any(shared):
            raise ValueError("--num-prefixes/--questions-per-prefix/--prefix-len only apply to the shared-prefix "
                             "workload")
        if (self.kind == "sharegpt") != (self.dataset is not None):
            raise ValueError("the sharegpt workload is the one that reads --dataset PATH: give both or neither")
        if self.kind == "sharegpt" and self.tokenizer is None and self.output_len is None:
            raise ValueError("a ShareGPT workload needs --tokenizer PATH (tokenizer.json of the served model) to "
                             "count each answer's tokens, or a fixed --output-len")
        if self.seed < 0:
            raise ValueError(f"--seed must be >= 0, got {self.seed}")

    @property
    def default_num_requests(self) -> int:
        """How many requests make one pass over this workload when neither a count nor a duration is given."""
        return self.num_prefixes * self.questions_per_prefix if self.kind == "shared-prefix" else 100


@dataclass(frozen=True)
class LoadConfig:
    """How requests are sent. Open loop: arrivals at `rate` req/s (gamma gaps, `burstiness` 1 = Poisson), optionally
    capped at `concurrency` in flight. Closed loop (`rate` None): `concurrency` requests always in flight. The run
    stops after `num_requests`, or once `duration` s have passed, whichever comes first; requests in flight then
    finish and count. `warmup` requests go first and are not measured. `processes` > 1 splits all of it over that
    many worker processes (shares.py says how) and merges their records into one run."""

    rate: float | None = None
    burstiness: float = 1.0
    concurrency: int | None = None
    num_requests: int | None = None
    duration: float | None = None
    warmup: int = 0
    processes: int = 1  # client processes sending the load (the client's own CPU is the ceiling at one)

    def __post_init__(self) -> None:
        if self.rate is None and self.concurrency is None:
            raise ValueError("choose a load: --rate R (open loop, req/s) or --concurrency N (closed loop)")
        if self.rate is not None and not self.rate > 0:
            raise ValueError(f"--rate must be > 0 req/s (or inf), got {self.rate}")
        if not self.burstiness > 0 or math.isinf(self.burstiness):
            raise ValueError(f"--burstiness must be a finite number > 0 (1 = Poisson), got {self.burstiness}")
        if self.concurrency is not None and self.concurrency < 1:
            raise ValueError(f"--concurrency must be >= 1, got {self.concurrency}")
        if self.num_requests is None and self.duration is None:
            raise ValueError("give --num-requests N or --duration SECONDS (or both)")
        if self.num_requests is not None and self.num_requests < 1:
            raise ValueError(f"--num-requests must be >= 1, got {self.num_requests}")
        if self.duration is not None and not 0 < self.duration < math.inf:
            raise ValueError(f"--duration must be a finite number of seconds > 0, got {self.duration}")
        if self.rate is not None and math.isinf(self.rate) and self.num_requests is None:
            raise ValueError("--rate inf sends everything at once: it needs --num-requests, not only --duration")
        if self.warmup < 0:
            raise ValueError(f"--warmup must be >= 0, got {self.warmup}")
        if self.processes < 1:
            raise ValueError(f"--processes must be >= 1, got {self.processes}")
        for name, v in (("--concurrency", self.concurrency), ("--num-requests", self.num_requests)):
            if v is not None and v < self.processes:  # every worker needs a request in flight, or one to send
                raise ValueError(f"{name} {v} is fewer than --processes {self.processes}: use fewer processes")

    @property
    def open_loop(self) -> bool:
        return self.rate is not None


@dataclass(frozen=True)
class SamplingConfig:
    """Sampling parameters sent with every request (output length comes from the workload)."""

    ignore_eos: bool = False
    temperature: float = 0.0  # greedy by default: cheapest, and outputs reproducible

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"--temperature must be >= 0, got {self.temperature}")


@dataclass(frozen=True)
class SLO:
    """Latency bounds a request must meet to count toward goodput; None = no bound. A request meets the SLO when
    every given bound holds (a request with one output token has TPOT 0, as in vLLM)."""

    ttft_ms: float | None = None
    tpot_ms: float | None = None

    def __post_init__(self) -> None:
        for name, v in (("--slo-ttft-ms", self.ttft_ms), ("--slo-tpot-ms", self.tpot_ms)):
            if v is not None and not v > 0:
                raise ValueError(f"{name} must be > 0 ms, got {v}")

    @property
    def given(self) -> bool:
        return self.ttft_ms is not None or self.tpot_ms is not None

    def met(self, ttft_s: float, tpot_s: float | None) -> bool:
        if self.ttft_ms is not None and ttft_s * 1e3 > self.ttft_ms:
            return False
        return self.tpot_ms is None or (tpot_s or 0.0) * 1e3 <= self.tpot_ms


@dataclass(frozen=True)
class SweepConfig:
    """Rate sweep: the highest rate whose SLO attainment (good requests / requests sent) is >= `attainment`.
    Search starts at `start_rate`, doubles (or halves) until the answer is bracketed, then bisects until the bracket
    is within `tolerance` (relative) or `max_points` runs were made. Rates outside [min_rate, max_rate] are not run."""

    attainment: float = 0.9
    start_rate: float = 1.0
    tolerance: float = 0.1
    max_points: int = 12
    min_rate: float = 0.01
    max_rate: float = 10000.0

    def __post_init__(self) -> None:
        if not 0 < self.attainment <= 1:
            raise ValueError(f"--attainment must be in (0, 1], got {self.attainment}")
        if not 0 < self.min_rate <= self.start_rate <= self.max_rate < math.inf:
            raise ValueError("sweep rates must satisfy 0 < min rate <= --sweep-start-rate <= --sweep-max-rate < inf, "
                             f"got {self.min_rate}, {self.start_rate}, {self.max_rate}")
        if not 0 < self.tolerance < 1:
            raise ValueError(f"--sweep-tolerance must be in (0, 1), got {self.tolerance}")
        if self.max_points < 2:
            raise ValueError(f"--sweep-max-points must be >= 2, got {self.max_points}")


@dataclass(frozen=True)
class BenchConfig:
    """One `kvrelay bench` invocation."""

    target: str
    workload: WorkloadConfig
    load: LoadConfig
    sampling: SamplingConfig = SamplingConfig()
    slo: SLO = SLO()
    sweep: SweepConfig | None = None
    timeout: float | None = None  # per-request deadline (s); None = the server's own limits
    out: str | None = None
    plot_dir: str | None = None
    quiet: bool = False
    backend: str = "kvrelay"  # "kvrelay": the gRPC SDK at `target`; "openai": /v1/completions at `base_url`
    base_url: str | None = None  # e.g. http://localhost:8000/v1
    model: str | None = None  # the OpenAI model name (default: the server's first)
    api_key: str | None = field(default=None, repr=False)  # never written to the results

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"--backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if self.backend == "openai":
            if not self.base_url or not self.base_url.startswith(("http://", "https://")):
                raise ValueError("--backend openai needs --base-url http(s)://HOST:PORT/v1, got "
                                 f"{self.base_url!r}")
        elif not self.target or ":" not in self.target:
            raise ValueError(f"--target must be host:port, got {self.target!r}")
        if self.timeout is not None and not self.timeout > 0:
            raise ValueError(f"--timeout must be > 0 s, got {self.timeout}")
        if self.sweep is not None:
            if not self.slo.given:
                raise ValueError("--sweep searches for the highest rate meeting the SLOs: give --slo-ttft-ms and/or "
                                 "--slo-tpot-ms")

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("api_key")
        return d

    @property
    def endpoint(self) -> str:
        return (self.base_url or "") if self.backend == "openai" else self.target
