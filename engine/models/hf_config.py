"""Reads a HuggingFace `config.json` into our frozen `ModelConfig` (no torch)."""

from __future__ import annotations

import json
import os
from typing import Any

from engine.config import ARCHITECTURES, DTYPES, ModelConfig, RopeConfig


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be loaded; the message says what is wrong and where."""


def _rope_config(cfg: dict[str, Any]) -> RopeConfig:
    # transformers >= 5 writes `rope_parameters` (theta inside); released checkpoints use rope_theta + rope_scaling.
    params = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    theta = float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    kind = params.get("rope_type", params.get("type", "default")) or "default"
    if kind == "default":
        return RopeConfig(theta=theta)
    if kind == "linear":
        return RopeConfig(theta=theta, kind="linear", factor=float(params["factor"]))
    if kind == "llama3":
        return RopeConfig(
            theta=theta,
            kind="llama3",
            factor=float(params["factor"]),
            low_freq_factor=float(params["low_freq_factor"]),
            high_freq_factor=float(params["high_freq_factor"]),
            original_max_position_embeddings=int(params["original_max_position_embeddings"]),
        )
    raise CheckpointError(f"rope scaling type {kind!r} is not supported (supported: default, linear, llama3)")


def _sliding_windows(cfg: dict[str, Any], arch: str, num_layers: int) -> tuple[int | None, ...]:
    window = cfg.get("sliding_window")
    if not window:
        return ()
    if arch == "Qwen2ForCausalLM":
        if not cfg.get("use_sliding_window", False):
            return ()
        layer_types = cfg.get("layer_types")
        if layer_types:
            return tuple(window if t == "sliding_attention" else None for t in layer_types)
        first_full = cfg.get("max_window_layers", num_layers)
        return tuple(window if i >= first_full else None for i in range(num_layers))
    return (int(window),) * num_layers


def _as_tuple(x: Any) -> tuple[int, ...]:
    if x is None:
        return ()
    return tuple(int(i) for i in (x if isinstance(x, list) else [x]))


def load_model_config(model_dir: str, dtype: str = "auto") -> ModelConfig:
    """Parse `model_dir/config.json`. `dtype="auto"` takes the checkpoint's dtype (float32 if unspecified)."""
    path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(path):
        raise CheckpointError(f"{model_dir!r} is not a HuggingFace model directory: {path} does not exist")
    with open(path) as f:
        cfg = json.load(f)
    archs = cfg.get("architectures") or []
    arch = next((a for a in archs if a in ARCHITECTURES), None)
    if arch is None:
        raise CheckpointError(
            f"{path}: architectures {archs} not supported; kvrelay serves {', '.join(ARCHITECTURES)}"
        )
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise CheckpointError(f"{path}: hidden_act {act!r} not supported (only silu)")
    if cfg.get("mlp_bias"):
        raise CheckpointError(f"{path}: mlp_bias=true is not supported")
    if dtype == "auto":
        dtype = cfg.get("dtype") or cfg.get("torch_dtype") or "float32"
    if dtype not in DTYPES:
        raise CheckpointError(f"dtype {dtype!r} not supported; use one of {', '.join(DTYPES)} or 'auto'")
    num_heads = int(cfg["num_attention_heads"])
    num_layers = int(cfg["num_hidden_layers"])
    gen_eos: tuple[int, ...] = ()
    gen_path = os.path.join(model_dir, "generation_config.json")
    if os.path.isfile(gen_path):
        with open(gen_path) as f:
            gen_eos = _as_tuple(json.load(f).get("eos_token_id"))
    try:
        return ModelConfig(
            model_dir=model_dir,
            architecture=arch,
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=int(cfg["hidden_size"]),
            intermediate_size=int(cfg["intermediate_size"]),
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or num_heads),
            head_dim=int(cfg.get("head_dim") or cfg["hidden_size"] // num_heads),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope=_rope_config(cfg),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=arch == "Qwen2ForCausalLM" or bool(cfg.get("attention_bias", False)),
            o_bias=arch != "Qwen2ForCausalLM" and bool(cfg.get("attention_bias", False)),
            sliding_windows=_sliding_windows(cfg, arch, num_layers),
            dtype=dtype,
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=tuple(dict.fromkeys(_as_tuple(cfg.get("eos_token_id")) + gen_eos)),
        )
    except KeyError as e:
        raise CheckpointError(f"{path}: missing required field {e.args[0]!r}") from None
