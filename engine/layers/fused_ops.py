"""Whether a layer may use the fused Triton kernels of `triton_fused` (and, for one-row matmuls, `triton_linear`) for
a tensor: on CUDA, unless the runner turned them off (`RuntimeConfig.fused_ops`, which KVRELAY_FUSED_OPS=0
overrides). Keeps triton out of CPU processes: it is imported on first use."""

from __future__ import annotations

import os
from types import ModuleType

import torch

ENABLED = os.environ.get("KVRELAY_FUSED_OPS", "1").strip().lower() not in ("0", "false", "no")


def set_enabled(enabled: bool) -> None:
    """Process-wide: a process runs one model (the runner sets it from its RuntimeConfig before loading)."""
    global ENABLED
    ENABLED = enabled


def fused_kernels(x: torch.Tensor) -> ModuleType | None:
    """The `triton_fused` module when `x` lives on CUDA and fusion is enabled, else None (use the torch code)."""
    if not (ENABLED and x.is_cuda):
        return None
    from engine.layers import triton_fused

    return triton_fused


def one_row_kernels(x: torch.Tensor) -> ModuleType | None:
    """The `triton_linear` module when `x` ([tokens, features]) is one row on CUDA with fusion enabled (a batch-1
    decode step), else None (use cuBLAS)."""
    if not (ENABLED and x.is_cuda and x.dim() == 2 and x.shape[0] == 1):
        return None
    from engine.layers import triton_linear

    return triton_linear
