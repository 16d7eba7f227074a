"""Reading (a shard of) a checkpoint tensor without loading the whole of it."""

from __future__ import annotations

from typing import Any

import torch


class ShapeMismatchError(ValueError):
    """A checkpoint tensor whose shape does not fit the parameter it loads into."""


def source_shape(src: Any) -> tuple[int, ...]:
    """Shape of a torch tensor or of a lazy safetensors slice."""
    return tuple(src.shape) if isinstance(src, torch.Tensor) else tuple(src.get_shape())


def read_shard(src: Any, dim: int, start: int, size: int) -> torch.Tensor:
    """Rows/columns [start, start+size) of `src` along `dim`; a safetensors slice reads only those bytes."""
    if isinstance(src, torch.Tensor):
        return src.narrow(dim, start, size)
    index = [slice(None)] * len(src.get_shape())
    index[dim] = slice(start, start + size)
    return src[tuple(index)]


def read_all(src: Any) -> torch.Tensor:
    return src if isinstance(src, torch.Tensor) else src[:]


def expect_shape(src: Any, shape: tuple[int, ...], what: str) -> None:
    got = source_shape(src)
    if got != tuple(shape):
        raise ShapeMismatchError(f"{what}: checkpoint has shape {list(got)}, the model config implies {list(shape)}")


def copy_into(param: torch.Tensor, value: torch.Tensor) -> None:
    with torch.no_grad():
        param.copy_(value.to(dtype=param.dtype, device=param.device))
