"""Paged KV memory bookkeeping (pure Python): the block pool and per-request block tables."""

from engine.kv_cache.block_manager import BlockManager
from engine.kv_cache.block_pool import BlockPool, hash_block

__all__ = ["BlockManager", "BlockPool", "hash_block"]
