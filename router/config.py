"""The router's settings (frozen, validated; only entry points parse flags or files into it)."""

from __future__ import annotations

from dataclasses import dataclass

POLICIES = ("cache_aware", "least_loaded", "round_robin")


@dataclass(frozen=True)
class RouterConfig:
    host: str = "0.0.0.0"
    port: int = 50051
    # Requests that wait for KV room on a decode group; past this, new requests get RESOURCE_EXHAUSTED.
    max_queued_requests: int = 512
    # A queued request that found no room within this gets RESOURCE_EXHAUSTED (the client's deadline may end
    # it sooner).
    queue_timeout_s: float = 120.0
    # The KV of a prompt and its first token must reach the decode group within this after reservation.
    transfer_timeout_s: float = 60.0
    # Prompt tokens a prefill worker may hold at once (queued or computing; one prompt always fits): beyond this,
    # requests wait in the router's line instead of in the worker's queue, where their decode reservations would
    # idle and their transfer deadlines run.
    prefill_inflight_tokens: int = 16384
    # How often worker load (free blocks, queue lengths, health) is polled.
    load_poll_interval_s: float = 0.2
    # Routing of prompts to prefill workers: longest cached prefix then load ("cache_aware"), or by load alone.
    routing_policy: str = "cache_aware"
    # Cache-aware routing yields to load balance when the best-cached worker has this many more requests in
    # flight than the least loaded one (SGLang's router does the same to avoid hot spots).
    balance_abs_threshold: int = 16

    def __post_init__(self) -> None:
        if not 0 <= self.port < 65536:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.max_queued_requests < 0:
            raise ValueError(f"max_queued_requests must be >= 0, got {self.max_queued_requests}")
        for name in ("queue_timeout_s", "transfer_timeout_s", "load_poll_interval_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.routing_policy not in POLICIES:
            raise ValueError(f"routing_policy must be one of {POLICIES}, got {self.routing_policy!r}")
        if self.prefill_inflight_tokens < 1:
            raise ValueError(f"prefill_inflight_tokens must be >= 1, got {self.prefill_inflight_tokens}")
        if self.balance_abs_threshold < 0:
            raise ValueError(f"balance_abs_threshold must be >= 0, got {self.balance_abs_threshold}")
