"""Exact tests of the block pool: allocation order, reference counts, LRU eviction of cached prefixes."""

import pytest

from engine.kv_cache.block_pool import BlockPool, hash_block


def test_allocate_takes_blocks_in_id_order_then_lru():
    pool = BlockPool(4)
    assert pool.allocate(2) == [0, 1]
    assert pool.num_free_blocks == 2
    pool.free([1, 0])  # freed 1 first: it is the least recently freed
    assert pool.allocate(4) == [2, 3, 1, 0]
    assert pool.num_free_blocks == 0
    with pytest.raises(RuntimeError):
        pool.allocate(1)


def test_ref_counts_and_double_free():
    pool = BlockPool(3)
    [b] = pool.allocate(1)
    pool.touch([b])
    assert pool.ref_cnt[b] == 2
    pool.free([b])
    assert pool.ref_cnt[b] == 1 and b not in pool.free_queue
    pool.free([b])
    assert pool.ref_cnt[b] == 0 and b in pool.free_queue
    with pytest.raises(RuntimeError, match="freed more often"):
        pool.free([b])


def test_cached_block_survives_free_until_reallocated():
    pool = BlockPool(2)
    a, b = pool.allocate(2)
    pool.cache(a, 111)
    pool.cache(b, 222)
    pool.free([b, a])  # b first: b is evicted first
    assert pool.lookup(111) == a and pool.lookup(222) == b
    pool.touch([a])  # a prefix hit revives a from the free queue
    assert pool.num_free_blocks == 1 and pool.ref_cnt[a] == 1
    assert pool.allocate(1) == [b]  # reusing b evicts its hash
    assert pool.lookup(222) is None and pool.lookup(111) == a
    assert pool.num_evictions == 1


def test_duplicate_hash_keeps_first_block():
    pool = BlockPool(2)
    a, b = pool.allocate(2)
    pool.cache(a, 5)
    pool.cache(b, 5)
    assert pool.lookup(5) == a and pool.block_hash[b] is None


def test_hash_chain_depends_on_parent_and_tokens():
    h1 = hash_block(None, [1, 2, 3])
    assert h1 == hash_block(None, [1, 2, 3])
    assert h1 != hash_block(None, [1, 2, 4])
    assert hash_block(h1, [7]) != hash_block(None, [7])
    assert 0 <= h1 < 2**128
