"""Per-request block tables over a shared `BlockPool`, with prefix-cache lookup (pure Python)."""

from __future__ import annotations

from engine.kv_cache.block_pool import BlockPool, hash_block
from engine.sequence import Sequence


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class BlockManager:
    """Gives sequences the blocks their KV needs. Mutates the pool and each sequence's block fields.

    Usage per step: a waiting sequence gets `find_cached_prefix` once, then `allocate(seq, n, prefix)`; a running
    one gets `allocate(seq, n)` for its next n tokens. After the step, `cache_full_blocks` registers blocks that
    became full; `free` returns everything when the sequence finishes, aborts or is preempted.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        self.pool = BlockPool(num_blocks)
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.prefix_queries = 0  # prompt tokens looked up in the prefix cache
        self.prefix_hits = 0  # of those, tokens found

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    def _ensure_hashes(self, seq: Sequence, num_blocks: int) -> None:
        bs = self.block_size
        while len(seq.block_hashes) < num_blocks:
            i = len(seq.block_hashes)
            parent = seq.block_hashes[-1] if i else None
            seq.block_hashes.append(hash_block(parent, seq.token_ids[i * bs:(i + 1) * bs]))

    def find_cached_prefix(self, seq: Sequence) -> list[int]:
        """Blocks holding the longest cached prefix of `seq` (whole blocks only, read-only lookup).

        At most num_tokens - 1 tokens are taken from the cache: the last token is always computed, since its
        logits are what the next token is sampled from.
        """
        if not self.enable_prefix_caching:
            return []
        max_blocks = (seq.num_tokens - 1) // self.block_size
        self._ensure_hashes(seq, max_blocks)
        hits = []
        for h in seq.block_hashes[:max_blocks]:
            b = self.pool.lookup(h)
            if b is None:
                break
            hits.append(b)
        return hits

    def record_prefix_query(self, num_query_tokens: int, num_hit_tokens: int) -> None:
        self.prefix_queries += num_query_tokens
        self.prefix_hits += num_hit_tokens

    def can_allocate(self, seq: Sequence, num_new_tokens: int, prefix: list[int] | None = None) -> bool:
        prefix = prefix or []
        have = len(seq.block_table) + len(prefix)
        computed = seq.num_computed_tokens + len(prefix) * self.block_size
        need = max(0, cdiv(computed + num_new_tokens, self.block_size) - have)
        # Prefix hits that sit in the free queue stop being free once we take them.
        reclaimed = sum(1 for b in prefix if self.pool.ref_cnt[b] == 0)
        return need + reclaimed <= self.pool.num_free_blocks

    def allocate(self, seq: Sequence, num_new_tokens: int, prefix: list[int] | None = None) -> bool:
        """Make room for `num_new_tokens` more tokens after the computed ones (and the prefix hits).

        Returns False, changing nothing, when the pool has too few free blocks. On success a prefix's blocks are
        shared into the table and `seq.num_computed_tokens` advances past them.
        """
        if not self.can_allocate(seq, num_new_tokens, prefix):
            return False
        if prefix:
            assert not seq.block_table, "a prefix is only attached to a sequence that holds no blocks"
            self.pool.touch(prefix)
            seq.block_table.extend(prefix)
            seq.num_computed_tokens = len(prefix) * self.block_size
            seq.num_cached_blocks = len(prefix)
        need = cdiv(seq.num_computed_tokens + num_new_tokens, self.block_size) - len(seq.block_table)
        if need > 0:
            seq.block_table.extend(self.pool.allocate(need))
        return True

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Register blocks whose every token now has computed KV and a known id (not a placeholder of a step in
        flight), so later requests can share them."""
        if not self.enable_prefix_caching:
            return
        full = min(seq.num_computed_tokens, len(seq.token_ids) - seq.num_placeholders) // self.block_size
        if full <= seq.num_cached_blocks:
            return
        self._ensure_hashes(seq, full)
        for i in range(seq.num_cached_blocks, full):
            self.pool.cache(seq.block_table[i], seq.block_hashes[i])
        seq.num_cached_blocks = full

    def free(self, seq: Sequence) -> None:
        """Release the sequence's blocks. The tail goes first so it is evicted before the shared head."""
        self.pool.free(reversed(seq.block_table))
        seq.block_table = []
        seq.num_cached_blocks = 0
        seq.num_computed_tokens = 0
