"""The KV channel's wire format (version `engine.config.KV_WIRE_VERSION`), one message per tensor, in order, for
each prefill step that sends anything on a channel:

  1. header  int64[HEADER_WORDS]: MAGIC, version, transfers, layers, total blocks, heads, head_dim, block_size,
             dtype code, piece blocks
  2. table   int64[TABLE_WORDS * transfers]: per transfer (key, blocks, dst offset, final), in payload order
  3. payload per layer, in pieces of at most `piece blocks` blocks: [2 (K, V), blocks, block_size, heads, head_dim],
             the transfers' blocks back to back, split across pieces wherever they fall

A transfer's blocks land in the receiver's reserved blocks from `dst offset` on; `final` marks a request's last
chunk. Pieces bound what either side stages per message, whatever the step carries. A header with zero transfers
is a keepalive (sent between steps so an idle channel's pending receive never times out); nothing follows it.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import astuple, dataclass

import torch

from engine.config import DTYPE_BYTES, KV_WIRE_VERSION, CacheConfig, EngineConfig

MAGIC = 0x4B5652454C4159  # "KVRELAY"
HEADER_WORDS = 10
TABLE_WORDS = 4
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
# Tokens of KV per payload message: large enough for NCCL's bandwidth (an 8B model's 8192 tokens of one layer are
# 32 MiB), small enough that staging stays a fixed, small share of memory.
PIECE_TOKENS = 8192


def staging_bytes(num_kv_heads: int, head_dim: int, itemsize: int, channels: int) -> int:
    """Device memory one rank's KV transfers may stage at once, over `channels` channels: per channel two receive
    pieces and MAX_OUTSTANDING (sender) in flight plus the one being gathered, each piece [2, PIECE_TOKENS, heads,
    head_dim] of one layer."""
    from kv_transfer.sender import MAX_OUTSTANDING

    piece = 2 * PIECE_TOKENS * num_kv_heads * head_dim * itemsize
    return channels * (2 + MAX_OUTSTANDING + 1) * piece


STAGED_CHANNELS = 4  # KV channels whose staging a worker's pool leaves room for at once (more share it)


def with_staging(config: EngineConfig) -> CacheConfig:
    """A worker's cache config with its KV connector's bounded staging reserved outside the KV pool."""
    m = config.model
    return dataclasses.replace(config.cache, reserve_bytes=staging_bytes(
        m.num_kv_heads, m.head_dim, DTYPE_BYTES[m.dtype], STAGED_CHANNELS))


def transfer_key(request_id: str) -> int:
    """Stable signed 64-bit key of a request id (both sides compute it; only the key crosses the wire)."""
    return int.from_bytes(hashlib.blake2b(request_id.encode(), digest_size=8).digest(), "little", signed=True)


class WireError(RuntimeError):
    """A message that is not what this side's wire format says comes next."""


@dataclass(frozen=True)
class Header:
    transfers: int
    layers: int
    total_blocks: int
    heads: int
    head_dim: int
    block_size: int
    dtype_code: int
    piece_blocks: int

    def pack(self, device: torch.device) -> torch.Tensor:
        return torch.tensor([MAGIC, KV_WIRE_VERSION, *astuple(self)], dtype=torch.int64, device=device)

    @classmethod
    def unpack(cls, words: list[int]) -> Header:
        magic, version, *rest = words
        if magic != MAGIC or version != KV_WIRE_VERSION:
            raise WireError(f"not a KV step header of wire version {KV_WIRE_VERSION}: magic {magic:#x}, version "
                            f"{version}")
        return cls(*rest)

    def pieces(self) -> list[tuple[int, int]]:
        """[start, end) block ranges of one layer's payload messages."""
        return [(a, min(a + self.piece_blocks, self.total_blocks)) for a in range(0, self.total_blocks,
                                                                                    self.piece_blocks)]


@dataclass(frozen=True)
class Entry:
    """One transfer in a step: `blocks` blocks of request `key`, landing from index `dst_offset` of its reserved
    blocks; `final` when this chunk completes the request's prompt."""

    key: int
    blocks: int
    dst_offset: int
    final: bool


def pack_table(entries: list[Entry], device: torch.device) -> torch.Tensor:
    return torch.tensor([w for e in entries for w in (e.key, e.blocks, e.dst_offset, int(e.final))],
                        dtype=torch.int64, device=device)


def unpack_table(words: list[int]) -> list[Entry]:
    return [Entry(words[i], words[i + 1], words[i + 2], bool(words[i + 3])) for i in range(0, len(words),
                                                                                         TABLE_WORDS)]
