"""kvrelay's inference engine: paged-KV cached inference for Llama-family models (no Ray, no gRPC).

`from engine import LLM, SamplingParams`. Torch-backed names are imported lazily so that pure-Python users
(the router reading `engine.config`, `engine.sampling_params`) do not pay for, or need, torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "LLM": "engine.llm",
    "EngineConfig": "engine.config",
    "RuntimeConfig": "engine.config",
    "LLMEngine": "engine.llm_engine",
    "Logprob": "engine.outputs",
    "RequestOutput": "engine.outputs",
    "SamplingParams": "engine.sampling_params",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'engine' has no attribute {name!r}")
