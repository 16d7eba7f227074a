"""Frozen configuration dataclasses shared by every kvrelay process.

Pure Python (no torch) so the router and the client side can import them. Each class validates itself in
`__post_init__`; only entry points parse flags or files into them. `ModelConfig` is read from a checkpoint
directory by `engine.models.hf_config.load_model_config`; `EngineConfig` bundles one engine's settings.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

DTYPES = ("float32", "bfloat16", "float16")
ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class RopeConfig:
    """Rotary position embedding parameters (HF `rope_theta` + `rope_scaling` / `rope_parameters`)."""

    theta: float = 10000.0
    kind: str = "default"  # "default" | "linear" | "llama3"
    factor: float = 1.0
    low_freq_factor: float = 1.0  # llama3 only
    high_freq_factor: float = 4.0  # llama3 only
    original_max_position_embeddings: int = 8192  # llama3 only

    def __post_init__(self) -> None:
        if self.kind not in ("default", "linear", "llama3"):
            raise ValueError(f"rope scaling type {self.kind!r} is not supported; supported: default, linear, llama3")
        if self.theta <= 0 or self.factor <= 0:
            raise ValueError(f"rope_theta and rope scaling factor must be positive, got {self.theta}, {self.factor}")
        if self.kind == "llama3" and self.high_freq_factor <= self.low_freq_factor:
            raise ValueError("llama3 rope scaling needs high_freq_factor > low_freq_factor")


@dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of a Llama-family checkpoint."""

    model_dir: str
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6
    rope: RopeConfig = field(default_factory=RopeConfig)
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2 has biases on q/k/v projections
    o_bias: bool = False  # Llama with attention_bias=true also has one on o_proj
    # Per-layer sliding attention window in tokens (None = full attention); length num_layers.
    sliding_windows: tuple[int | None, ...] = ()
    dtype: str = "float32"
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise ValueError(
                f"architecture {self.architecture!r} is not supported; supported: {', '.join(ARCHITECTURES)}"
            )
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype {self.dtype!r} is not supported; use one of {DTYPES}")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                     "head_dim", "max_position_embeddings"):
            if getattr(self, name) <= 0:
                raise ValueError(f"model config {name} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_heads}) must be a multiple of num_key_value_heads "
                f"({self.num_kv_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.sliding_windows and len(self.sliding_windows) != self.num_layers:
            raise ValueError("sliding_windows must give one entry per layer")

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes of K and V for one token over all layers and all KV heads (no tensor parallelism)."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * DTYPE_BYTES[self.dtype]

    def sliding_window(self, layer: int) -> int | None:
        return self.sliding_windows[layer] if self.sliding_windows else None


@dataclass(frozen=True)
class CacheConfig:
    """Paged KV memory: `block_size` tokens per block, sized by a block count or a byte budget.

    With neither given, the runner sizes the pool itself (a fraction of free GPU memory, or a CPU default).
    """

    block_size: int = 16
    num_blocks: int | None = None
    memory_bytes: int | None = None
    gpu_memory_utilization: float = 0.9
    enable_prefix_caching: bool = True
    # Device memory kept out of the pool for a worker extension's own buffers (the KV connector's bounded
    # transfer staging), when the pool is sized from free memory.
    reserve_bytes: int = 0

    def __post_init__(self) -> None:
        if self.reserve_bytes < 0:
            raise ValueError(f"reserve_bytes must be >= 0, got {self.reserve_bytes}")
        if self.block_size <= 0 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a positive power of two, got {self.block_size}")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ValueError(f"num_blocks must be at least 1, got {self.num_blocks}")
        if self.memory_bytes is not None and self.memory_bytes <= 0:
            raise ValueError(f"memory_bytes must be positive, got {self.memory_bytes}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")


@dataclass(frozen=True)
class ParallelConfig:
    """Tensor parallelism of one engine (a decode group or a prefill worker)."""

    tensor_parallel_size: int = 1

    def __post_init__(self) -> None:
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be at least 1, got {self.tensor_parallel_size}")


@dataclass(frozen=True)
class SchedulerConfig:
    """Continuous batching limits for one step.

    `max_num_batched_tokens` is the per-step token budget shared by prefill chunks and decodes; a prompt longer
    than what is left of it is prefilled in chunks when `enable_chunked_prefill` is set.
    """

    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    max_model_len: int = 4096
    enable_chunked_prefill: bool = True

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1 or self.max_num_batched_tokens < 1 or self.max_model_len < 2:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be >= 1 and max_model_len >= 2")
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            raise ValueError(
                "without chunked prefill, max_num_batched_tokens must be >= max_model_len so any prompt fits a step"
            )


@dataclass(frozen=True)
class RuntimeConfig:
    """How an engine runs its steps. Settable from `kvrelay serve` flags and config files, and copied to every
    rank; the KVRELAY_* environment variables, where set, override the fields (see docs/operations.md).

    `None` means automatic: CUDA graphs, the Triton decode kernels and the fused kernels are used on CUDA only,
    and async scheduling (step n+1 scheduled while step n runs) is on with CUDA and off on CPU, where a step
    cannot run while the host schedules, so the lookahead would only add a step of latency to every stop.
    """

    enforce_eager: bool = False  # no CUDA graphs for decode steps
    decode_kernel: bool = True  # Triton paged-attention decode on CUDA (off: the portable torch path)
    fused_ops: bool = True  # fused Triton norm / rotary / SiLU / RoPE+KV-store kernels, one-row matmuls on CUDA
    async_scheduling: bool | None = None  # None: on with CUDA, off on CPU
    # A worker's engine runs in a process of its own (worker_runtime.engine_core), apart from its gRPC service:
    # the two no longer share one GIL. Off: the engine loop is a thread of the service's process.
    engine_process: bool = True

    def resolved(self, device: str) -> RuntimeConfig:
        """This config with the KVRELAY_* overrides applied and `async_scheduling` decided for `device`."""
        values = {}
        for name, env in ENV_OVERRIDES.items():
            raw = os.environ.get(env)
            values[name] = getattr(self, name) if raw is None else _env_bool(env, raw)
        if values["async_scheduling"] is None:
            values["async_scheduling"] = device.startswith("cuda")
        return RuntimeConfig(**values)


ENV_OVERRIDES = {
    "enforce_eager": "KVRELAY_ENFORCE_EAGER",
    "decode_kernel": "KVRELAY_DECODE_KERNEL",
    "fused_ops": "KVRELAY_FUSED_OPS",
    "async_scheduling": "KVRELAY_ASYNC_SCHEDULING",
    "engine_process": "KVRELAY_ENGINE_PROCESS",
}


def _env_bool(name: str, raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"{name}={raw!r}: use 1/0 (or true/false)")


@dataclass(frozen=True)
class EngineConfig:
    model: ModelConfig
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    device: str = "cpu"
    worker_extension: str | None = None  # "module:Class" built on every rank (see engine.worker_extension)
    load_format: str = "auto"  # "dummy": random weights from config.json alone (benchmarks)
    # Workers leave text to the router (which detokenizes and applies stop strings once, for every worker), so
    # their engines stream token ids only.
    detokenize: bool = True
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    @classmethod
    def from_model_dir(cls, model_dir: str, *, dtype: str = "auto", device: str = "cpu", block_size: int = 16,
                       num_blocks: int | None = None, kv_cache_memory: int | None = None,
                       gpu_memory_utilization: float = 0.9, max_model_len: int | None = None,
                       max_num_seqs: int = 256, max_num_batched_tokens: int = 2048,
                       enable_prefix_caching: bool = True, enable_chunked_prefill: bool = True,
                       tensor_parallel_size: int = 1, worker_extension: str | None = None,
                       load_format: str = "auto", detokenize: bool = True,
                       runtime: RuntimeConfig | None = None) -> EngineConfig:
        from engine.models.hf_config import load_model_config  # reads config.json; no torch

        model = load_model_config(model_dir, dtype)
        if max_model_len is None:
            max_model_len = min(model.max_position_embeddings, 8192)
        elif max_model_len > model.max_position_embeddings:
            raise ValueError(f"max_model_len {max_model_len} exceeds the model's max_position_embeddings "
                             f"({model.max_position_embeddings})")
        if not enable_chunked_prefill:
            max_num_batched_tokens = max(max_num_batched_tokens, max_model_len)
        return cls(
            model=model,
            cache=CacheConfig(block_size=block_size, num_blocks=num_blocks, memory_bytes=kv_cache_memory,
                              gpu_memory_utilization=gpu_memory_utilization,
                              enable_prefix_caching=enable_prefix_caching),
            scheduler=SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                                      max_model_len=max_model_len, enable_chunked_prefill=enable_chunked_prefill),
            parallel=ParallelConfig(tensor_parallel_size=tensor_parallel_size),
            device=device,
            worker_extension=worker_extension,
            load_format=load_format,
            detokenize=detokenize,
            runtime=runtime or RuntimeConfig(),
        )




# Bumped whenever the KV channel's messages change shape (kv_transfer.wire); both ends must agree.
KV_WIRE_VERSION = 2


@dataclass(frozen=True)
class KVLayout:
    """What a prefill worker and a decode group must agree on before KV may travel between them: the same model
    (architecture and shape), KV dtype, block size and wire version. Compared when a pair's channels open, so a
    mismatched pair fails at start-up with a message naming both sides, not with wrong tokens."""

    model: str  # the checkpoint directory's name (paths may differ between nodes)
    architecture: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    dtype: str
    block_size: int
    wire_version: int = KV_WIRE_VERSION

    @classmethod
    def of(cls, config: EngineConfig) -> KVLayout:
        m = config.model
        return cls(os.path.basename(os.path.normpath(m.model_dir)), m.architecture, m.num_layers, m.num_kv_heads,
                   m.head_dim, m.vocab_size, m.dtype, config.cache.block_size)

    def mismatch(self, other: KVLayout, me: str, them: str) -> str | None:
        """None when KV may travel between the two; else which settings differ, naming both sides."""
        diffs = [f"{f} {getattr(self, f)!r} on {me} vs {getattr(other, f)!r} on {them}"
                 for f in self.__dataclass_fields__ if getattr(self, f) != getattr(other, f)]
        return f"KV layout mismatch between {me} and {them}: " + "; ".join(diffs) if diffs else None
