"""Builds a model from a HF checkpoint directory, reading only this rank's shard of each safetensors tensor."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from safetensors import safe_open
from torch import nn

from engine.config import ModelConfig
from engine.layers.weight_utils import ShapeMismatchError
from engine.models.hf_config import CheckpointError
from engine.models.registry import MODEL_REGISTRY

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Checkpoint tensors we do not need: rotary tables are recomputed from the config.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def safetensors_files(model_dir: str) -> list[str]:
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
        missing = [n for n in names if not os.path.isfile(os.path.join(model_dir, n))]
        if missing:
            raise CheckpointError(f"{index} names shard files that do not exist: {missing}")
        return [os.path.join(model_dir, n) for n in names]
    files = sorted(f for f in os.listdir(model_dir) if f.endswith(".safetensors"))
    if not files:
        raise CheckpointError(f"{model_dir!r} holds no *.safetensors weights (pytorch .bin files are not supported)")
    return [os.path.join(model_dir, f) for f in files]


@contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(prev)


def _target(model: nn.Module, name: str) -> tuple[str, object]:
    """Map a checkpoint tensor name to (our parameter name, shard id)."""
    name = name.removeprefix("model.")
    packed = getattr(model, "packed_modules", {})
    for ckpt, (ours, shard) in packed.items():
        if f".{ckpt}." in name:
            return name.replace(f".{ckpt}.", f".{ours}."), shard
    return name, None


def _fill_dummy(model: nn.Module, seed: int = 0) -> None:
    """Random weights for benchmarks (`load_format="dummy"`): N(0, 0.02) matrices, unit norms, no I/O."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    dev_gens: dict[torch.device, torch.Generator] = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif p.device.type == "cpu":
                p.copy_((torch.randn(p.shape, generator=g) * 0.02).to(p.dtype))
            else:  # billions of values: drawn on the device in a second rather than on the host in minutes
                if p.device not in dev_gens:
                    dev_gens[p.device] = torch.Generator(device=p.device).manual_seed(seed)
                p.copy_(torch.randn(p.shape, generator=dev_gens[p.device], device=p.device) * 0.02)


def load_model(cfg: ModelConfig, device: torch.device, max_positions: int, load_format: str = "auto") -> nn.Module:
    """Instantiate the architecture on `device` in `cfg.dtype` and fill every parameter from the checkpoint
    (or, with load_format "dummy", with random values: only config.json is read)."""
    if load_format not in ("auto", "dummy"):
        raise ValueError(f"load_format must be 'auto' or 'dummy', got {load_format!r}")
    cls = MODEL_REGISTRY[cfg.architecture]
    with _default_dtype(TORCH_DTYPES[cfg.dtype]), torch.device(device):
        model = cls(cfg, max_positions)
    if load_format == "dummy":
        _fill_dummy(model)
        return model.eval()
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded: set[str] = set()
    for path in safetensors_files(cfg.model_dir):
        with safe_open(path, framework="pt", device="cpu") as f:
            for ckpt_name in f.keys():
                if ckpt_name.endswith(_IGNORED_SUFFIXES):
                    continue
                name, shard = _target(model, ckpt_name)
                if name == "lm_head.weight" and cfg.tie_word_embeddings:
                    continue  # tied: the LM head is the embedding (HF ignores a stored copy too)
                param = params.get(name)
                if param is None:
                    raise CheckpointError(f"{path}: tensor {ckpt_name!r} matches no parameter of {cfg.architecture}")
                try:
                    param.weight_loader(param, f.get_slice(ckpt_name), shard)  # type: ignore[attr-defined]
                except ShapeMismatchError as e:
                    raise CheckpointError(f"{path}: tensor {ckpt_name!r}: {e}") from None
                loaded.add(name if shard is None else f"{name}:{shard}")
    packed = getattr(model, "packed_modules", {}).values()
    expected = set()
    for name in params:
        module = name.split(".")[-2] if "." in name else ""
        shards = [shard for ours, shard in packed if ours == module]
        if shards:
            expected.update(f"{name}:{s}" for s in shards)
        else:
            expected.add(name)
    if cfg.tie_word_embeddings:
        expected.discard("lm_head.weight")
    missing = sorted(expected - loaded)
    if missing:
        raise CheckpointError(f"{cfg.model_dir}: checkpoint lacks weights for {missing[:8]}"
                              f"{' and more' if len(missing) > 8 else ''}")
    return model.eval()
