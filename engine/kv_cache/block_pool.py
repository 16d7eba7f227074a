"""A fixed pool of KV blocks with reference counts, a prefix-hash index and an LRU free queue (pure Python).

Free blocks wait in `free_queue` in the order they were freed. A freed block keeps its hash and stays findable in
the prefix index until it is handed out again: allocation takes the least recently freed block and only then
evicts its hash. So cached prefixes are evicted in LRU order and only when memory is actually needed.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Iterable, Sequence


def hash_block(parent_hash: int | None, token_ids: Sequence[int]) -> int:
    """Prefix hash of a full block: identifies the block's tokens *and* every token before them.

    blake2b, not Python's `hash`, so that hashes are stable across processes (the router compares them) and
    collisions are negligible (128 bits) rather than merely unlikely.
    """
    h = hashlib.blake2b(digest_size=16)
    h.update((parent_hash or 0).to_bytes(16, "little"))
    h.update(array("q", token_ids).tobytes())
    return int.from_bytes(h.digest(), "little")


class BlockPool:
    """Owns block ids 0..num_blocks-1. Mutates: ref counts, the free queue and the prefix index."""

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"a block pool needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self.ref_cnt = [0] * num_blocks
        self.block_hash: list[int | None] = [None] * num_blocks
        # block id -> None; insertion order is LRU order (front = evicted first).
        self.free_queue: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.cached: dict[int, int] = {}  # prefix hash -> block id
        self.num_evictions = 0

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    def lookup(self, block_hash: int) -> int | None:
        return self.cached.get(block_hash)

    def allocate(self, n: int) -> list[int]:
        """Take n blocks (ref count 1) from the front of the free queue, evicting their cached hashes."""
        if n > len(self.free_queue):
            raise RuntimeError(f"asked for {n} blocks with {len(self.free_queue)} free")
        out = []
        for _ in range(n):
            block_id, _ = self.free_queue.popitem(last=False)
            old = self.block_hash[block_id]
            if old is not None:
                del self.cached[old]
                self.block_hash[block_id] = None
                self.num_evictions += 1
            self.ref_cnt[block_id] = 1
            out.append(block_id)
        return out

    def touch(self, block_ids: Iterable[int]) -> None:
        """Take another reference on cached blocks (a prefix hit); a free one leaves the free queue."""
        for b in block_ids:
            if self.ref_cnt[b] == 0:
                del self.free_queue[b]
            self.ref_cnt[b] += 1

    def free(self, block_ids: Iterable[int]) -> None:
        """Drop one reference each; blocks reaching zero join the back of the free queue in the given order."""
        for b in block_ids:
            if self.ref_cnt[b] <= 0:
                raise RuntimeError(f"block {b} freed more often than allocated")
            self.ref_cnt[b] -= 1
            if self.ref_cnt[b] == 0:
                self.free_queue[b] = None

    def cache(self, block_id: int, block_hash: int) -> None:
        """Register a full, computed block under its prefix hash (first writer wins for duplicates)."""
        if self.block_hash[block_id] is not None or block_hash in self.cached:
            return
        self.block_hash[block_id] = block_hash
        self.cached[block_hash] = block_id
