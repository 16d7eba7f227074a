"""The router's approximate view of each prefill worker's prefix cache (pure Python).

The router cannot see a worker's cache directly, so, like SGLang's cache-aware router, it remembers the prompt
blocks it sent to each worker: a prompt's full blocks are hashed in a chain (block i's hash covers blocks 0..i),
so a prompt matches a worker for as many leading blocks as that worker was sent before. The index is LRU and
bounded by the worker's KV capacity, so what it forgets roughly tracks what the worker evicts.
"""

from __future__ import annotations

from collections import OrderedDict


def block_hashes(token_ids: list[int], block_size: int) -> list[int]:
    """Chained hashes of the full blocks of `token_ids` (hash of ints and tuples is stable across processes)."""
    out, parent = [], 0
    for i in range(0, len(token_ids) - block_size + 1, block_size):
        parent = hash((parent, tuple(token_ids[i:i + block_size])))
        out.append(parent)
    return out


class PrefixIndex:
    """Mutates: its LRU map of block hashes. `capacity` is in blocks."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1 block, got {capacity}")
        self.capacity = capacity
        self._lru: OrderedDict[int, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._lru)

    def match(self, hashes: list[int]) -> int:
        """How many leading blocks of a prompt with these hashes this worker probably has cached."""
        n = 0
        for h in hashes:
            if h not in self._lru:
                break
            n += 1
        return n

    def insert(self, hashes: list[int]) -> None:
        """Record that a prompt with these hashes was sent here (most recent), evicting the least recent. A prompt's
        tail becomes evictable before its head, as in the worker's own cache: a prefix is only useful whole."""
        for h in reversed(hashes):
            self._lru[h] = None
            self._lru.move_to_end(h)
        while len(self._lru) > self.capacity:
            self._lru.popitem(last=False)
