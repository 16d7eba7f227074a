"""The router's settings (frozen, validated; only entry points parse flags or files into it)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

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
    # Re-placements one request may take (prefill retries and mid-stream migrations off a lost decode group
    # together): it is placed at most 1 + this many times, then fails UNAVAILABLE with the last cause.
    migration_limit: int = 3
    # How often worker load (free blocks, queue lengths, health) is polled.
    load_poll_interval_s: float = 0.2
    # Routing of prompts to prefill workers: longest cached prefix then load ("cache_aware"), or by load alone.
    routing_policy: str = "cache_aware"
    # Cache-aware routing yields to load balance when the best-cached worker has this many more requests in
    # flight than the least loaded one (SGLang's router does the same to avoid hot spots).
    balance_abs_threshold: int = 16
    # The OpenAI-compatible HTTP API (and /health, /metrics) on this port of `host`; None = gRPC only.
    http_port: int | None = None
    # Clients of either API must send this as `Authorization: Bearer KEY`; None = no check. Never logged.
    api_key: str | None = field(default=None, repr=False)
    # PEM files: when given, both APIs serve TLS only.
    tls_cert: str | None = None
    tls_key: str | None = None
    # The model's name in the OpenAI API (`model` of requests, /v1/models); None = the model directory's name.
    served_model_name: str | None = None
    # A Jinja chat template file replacing the model's own (tokenizer_config.json or chat_template.jinja).
    chat_template: str | None = None
    # How often the router logs its one-line stats at info level; 0 = never.
    stats_log_interval_s: float = 10.0
    # Text prompts (and chat messages) longer than this many characters are refused before they are tokenized.
    # None = the most characters a prompt that fits can have: prompt tokens allowed x the longest vocabulary
    # entry (exact for tokenizers that keep every character, as the Llama family's do; set it for others).
    max_prompt_chars: int | None = None

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
        if self.migration_limit < 0:
            raise ValueError(f"migration_limit must be >= 0, got {self.migration_limit}")
        if self.prefill_inflight_tokens < 1:
            raise ValueError(f"prefill_inflight_tokens must be >= 1, got {self.prefill_inflight_tokens}")
        if self.balance_abs_threshold < 0:
            raise ValueError(f"balance_abs_threshold must be >= 0, got {self.balance_abs_threshold}")
        if self.http_port is not None and not 0 <= self.http_port < 65536:
            raise ValueError(f"http_port must be in [0, 65535], got {self.http_port}")
        if self.http_port is not None and self.http_port and self.http_port == self.port:
            raise ValueError(f"http_port and port must differ, both are {self.port}")
        if self.api_key is not None and (not self.api_key or not self.api_key.isprintable() or
                                         self.api_key != self.api_key.strip()):
            raise ValueError("api_key must be a non-empty printable string without surrounding whitespace")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("TLS needs both tls_cert and tls_key (PEM files), or neither")
        for name in ("tls_cert", "tls_key", "chat_template"):
            path = getattr(self, name)
            if path is not None and not os.path.isfile(path):
                raise ValueError(f"{name} {path!r} is not a file")
        if self.served_model_name is not None and not self.served_model_name.strip():
            raise ValueError("served_model_name must not be empty")
        if self.max_prompt_chars is not None and self.max_prompt_chars < 1:
            raise ValueError(f"max_prompt_chars must be >= 1, got {self.max_prompt_chars}")
        if self.stats_log_interval_s < 0:
            raise ValueError(f"stats_log_interval_s must be >= 0, got {self.stats_log_interval_s}")
