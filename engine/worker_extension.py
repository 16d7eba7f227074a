"""Per-rank extensions: code outside the engine (KV transfer) that runs inside every rank next to the runner.

Named in `EngineConfig.worker_extension` as "module:Class"; each rank builds `Class(RankContext)` once its KV
cache exists. The runner calls `begin_step(out)`, `on_layer(i)` after layer i wrote its KV, and
`end_step(out)` (whose value reaches the driver, one per rank, as `StepResult.ext_events`), or `abort_step(out)`
when the forward raised. Other methods are
called on every rank by name through `LLMEngine.call_extension`. The engine itself imports no extension.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

import torch

from engine.config import CacheConfig, ModelConfig


@dataclass
class RankContext:
    rank: int
    tp_size: int
    device: torch.device
    kv_cache: torch.Tensor  # [2, layers, num_blocks, block_size, local kv heads, head_dim]
    model_config: ModelConfig
    cache_config: CacheConfig


def load_extension(spec: str, ctx: RankContext) -> Any:
    module, _, name = spec.partition(":")
    if not name:
        raise ValueError(f"worker_extension must be 'module:Class', got {spec!r}")
    return getattr(importlib.import_module(module), name)(ctx)
