"""`ServeConfig`: everything `kvrelay serve` needs, as one frozen dataclass. Built from a YAML/JSON config file
and/or command-line flags by `deploy.cli` (flags win); validated here with messages that say what to fix."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any

from deploy import DEFAULT_MODEL_DIR
from engine.config import RuntimeConfig
from router.config import POLICIES, RouterConfig


@dataclass(frozen=True)
class ServeConfig:
    model: str = DEFAULT_MODEL_DIR  # a local HuggingFace-format directory
    prefill_workers: int = 1  # 0: no disaggregation, each decode group runs whole requests (aggregated)
    decode_groups: int = 1
    decode_tp: int = 1  # ranks (GPUs) per decode group
    host: str = "0.0.0.0"  # where the router listens
    port: int = 50051
    address: str | None = None  # an existing Ray cluster to join ("auto" or host:port); None = start one locally
    device: str = "auto"  # "cuda" when the cluster has GPUs for every rank, else "cpu"
    dtype: str = "auto"
    load_format: str = "auto"  # "dummy": random weights from config.json alone (benchmarks of a model's shape)
    block_size: int = 16
    max_model_len: int | None = None
    gpu_memory_utilization: float = 0.9
    prefill_num_blocks: int | None = None  # KV pool per prefill worker (default: sized from memory)
    decode_num_blocks: int | None = None  # KV pool per decode group
    max_num_seqs: int = 256  # requests a decode group runs at once
    max_num_batched_tokens: int = 2048  # prefill tokens per step (longer prompts are chunked)
    enable_prefix_caching: bool = True
    max_queued_requests: int = 512
    queue_timeout_s: float = 120.0
    transfer_timeout_s: float = 60.0
    # A lost worker (prefill actor, or a decode group as a whole) is restarted at most this many times, then
    # given up (logged); 0 = never restarted.
    max_restarts: int = 3
    migration_limit: int = 3  # re-placements per request (prefill retries and decode migrations together)
    routing_policy: str = "cache_aware"
    startup_timeout_s: float = 600.0
    log_level: str = "warning"
    # How engines step (engine.config.RuntimeConfig), the same on every actor; KVRELAY_* env vars override.
    enforce_eager: bool = False  # no CUDA graphs
    async_scheduling: str = "auto"  # auto (on with CUDA) | on | off
    decode_kernel: bool = True  # Triton paged-attention decode on CUDA
    fused_ops: bool = True  # fused Triton norm/rotary/SiLU on CUDA
    engine_process: bool = True  # each worker's engine in a process of its own (off: a thread of the service's)
    # The public API's front door beyond gRPC (issue 10): OpenAI-compatible HTTP, API key, TLS, chat.
    http_port: int | None = None  # None: gRPC only
    api_key: str | None = field(default=None, repr=False)  # or api_key_file, or $KVRELAY_API_KEY (deploy.cli)
    api_key_file: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    served_model_name: str | None = None
    chat_template: str | None = None
    max_prompt_chars: int | None = None  # text prompts over this are refused untokenized; None = derived bound

    def __post_init__(self) -> None:
        if not os.path.isfile(os.path.join(self.model, "config.json")):
            raise ValueError(f"model {self.model!r} is not a HuggingFace model directory (no config.json there)")
        if self.max_restarts < 0:
            raise ValueError(f"max-restarts must be >= 0, got {self.max_restarts}")
        if self.prefill_workers < 0:
            raise ValueError(f"prefill-workers must be >= 0 (0 = aggregated serving), got {self.prefill_workers}")
        for name in ("decode_groups", "decode_tp"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda, got {self.device!r}")
        if self.load_format not in ("auto", "dummy"):
            raise ValueError(f"load-format must be auto or dummy, got {self.load_format!r}")
        if self.routing_policy not in POLICIES:
            raise ValueError(f"routing-policy must be one of {POLICIES}, got {self.routing_policy!r}")
        if self.async_scheduling not in ("auto", "on", "off"):
            raise ValueError(f"async-scheduling must be auto, on or off, got {self.async_scheduling!r}")
        if self.log_level.lower() not in ("debug", "info", "warning", "error"):
            raise ValueError(f"log-level must be debug, info, warning or error, got {self.log_level!r}")
        if self.api_key is not None and self.api_key_file is not None:
            raise ValueError("give api-key or api-key-file, not both")
        self.router_config()  # validates the router's share

    def runtime_config(self) -> RuntimeConfig:
        mode = {"auto": None, "on": True, "off": False}[self.async_scheduling]
        return RuntimeConfig(enforce_eager=self.enforce_eager, decode_kernel=self.decode_kernel,
                             fused_ops=self.fused_ops, async_scheduling=mode, engine_process=self.engine_process)

    def router_config(self) -> RouterConfig:
        return RouterConfig(host=self.host, port=self.port, max_queued_requests=self.max_queued_requests,
                            queue_timeout_s=self.queue_timeout_s, transfer_timeout_s=self.transfer_timeout_s,
                            migration_limit=self.migration_limit, routing_policy=self.routing_policy,
                            http_port=self.http_port, api_key=self._api_key(),
                            tls_cert=self.tls_cert, tls_key=self.tls_key, served_model_name=self.served_model_name,
                            chat_template=self.chat_template, max_prompt_chars=self.max_prompt_chars)

    def _api_key(self) -> str | None:
        if self.api_key_file is None:
            return self.api_key
        try:
            with open(self.api_key_file) as f:
                return f.read().strip()
        except OSError as e:
            raise ValueError(f"api-key-file {self.api_key_file!r} cannot be read: {e.strerror}") from None

    @classmethod
    def from_file(cls, path: str) -> dict[str, Any]:
        """Read a YAML or JSON config file into keyword arguments (keys as the flags, '-' or '_')."""
        with open(path) as f:
            text = f.read()
        if path.endswith(".json"):
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping of settings, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {str(k).replace("-", "_"): v for k, v in data.items()}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise ValueError(f"{path}: unknown setting(s) {unknown}; known: {sorted(known)}")
        return kwargs
