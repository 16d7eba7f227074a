"""What the speed benchmarks share: model shapes, their byte and FLOP counts, the device's two ceilings (copy
bandwidth, bf16 matmul rate) measured in the run, and random-weight engines and HuggingFace baselines.

Our engine loads random weights from a config.json alone (load_format="dummy"); the HF baseline gets its own
random weights of the same shape: the speed of either does not depend on the values.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import torch

SHAPES: dict[str, dict[str, Any]] = {
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    "llama-3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, tie_word_embeddings=False),  # CPU dry runs
}
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def head_dim(shape: str) -> int:
    c = SHAPES[shape]
    return c["hidden_size"] // c["num_attention_heads"]


def layer_matmul_params(shape: str) -> int:
    """Weights of one decoder layer's matmuls: q, k, v, o, gate, up, down."""
    c, d = SHAPES[shape], head_dim(shape)
    h, i = c["hidden_size"], c["intermediate_size"]
    qkv = h * (c["num_attention_heads"] + 2 * c["num_key_value_heads"]) * d
    return qkv + c["num_attention_heads"] * d * h + 3 * h * i


def decode_weight_bytes(shape: str, itemsize: int) -> int:
    """Weight bytes one decode step must read: every layer's matmuls and norms, the final norm and the LM head.
    The embedding table is not read whole (only the rows of the step's tokens), so it does not count."""
    c = SHAPES[shape]
    h, n = c["hidden_size"], c["num_hidden_layers"]
    return itemsize * (n * (layer_matmul_params(shape) + 2 * h) + h + c["vocab_size"] * h)


def kv_bytes_per_token(shape: str, itemsize: int) -> int:
    c = SHAPES[shape]
    return 2 * c["num_hidden_layers"] * c["num_key_value_heads"] * head_dim(shape) * itemsize


def prefill_flops(shape: str, prompt_len: int, batch: int) -> float:
    """Matmul FLOPs of prefilling `batch` prompts of `prompt_len` tokens: 2 per weight per token in the layers,
    causal attention (QK^T and PV over the L(L+1)/2 visible pairs, 2 * 2 * head_dim FLOPs each per head), and
    the LM head for each prompt's last token only."""
    c, d = SHAPES[shape], head_dim(shape)
    tokens = batch * prompt_len
    attn = 4 * c["num_attention_heads"] * d * (prompt_len * (prompt_len + 1) // 2) * batch
    return c["num_hidden_layers"] * (2 * layer_matmul_params(shape) * tokens + attn) \
        + 2 * c["vocab_size"] * c["hidden_size"] * batch


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def copy_bandwidth(device: str, gib: float = 2.0) -> float:
    """Large device-to-device copy: bytes read + written per second (the decode roofline's bandwidth)."""
    n = int(gib * 2**30) // 2
    a = torch.randn(n, device=device).to(torch.bfloat16)
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    sync(device)
    reps = 10
    t = time.perf_counter()
    for _ in range(reps):
        b.copy_(a)
    sync(device)
    return 2 * a.numel() * a.element_size() * reps / (time.perf_counter() - t)


def matmul_flops(device: str, n: int = 8192, dtype: torch.dtype = torch.bfloat16) -> float:
    """FLOP/s of a large square matmul on random data (the prefill roofline's rate)."""
    a, b = torch.randn(n, n, device=device).to(dtype), torch.randn(n, n, device=device).to(dtype)
    for _ in range(3):
        a @ b
    sync(device)
    reps = 10
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t)


def write_config(path: str, shape: str, dtype: str) -> str:
    """A config.json our engine can load with load_format="dummy"; returns `path`."""
    cfg = dict(SHAPES[shape], architectures=["LlamaForCausalLM"], max_position_embeddings=32768,
               rope_theta=500000.0, rms_norm_eps=1e-5, hidden_act="silu", bos_token_id=1, eos_token_id=2,
               torch_dtype=dtype)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    return path


def hf_model(shape: str, device: str, dtype: str) -> torch.nn.Module:
    """A HuggingFace Llama of `shape` with random weights, built directly in `dtype` on `device`."""
    import transformers

    cfg = transformers.LlamaConfig(**SHAPES[shape], max_position_embeddings=32768, rope_theta=500000.0,
                                   rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(DTYPES[dtype])  # never materialise an 8B model in float32 first
    try:
        with torch.device(device):
            model = transformers.LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(prev)
    return model.eval()


def free(device: str) -> None:
    import gc

    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
