"""Exact tests of block tables and prefix-cache sharing."""

from engine.kv_cache.block_manager import BlockManager
from engine.sampling_params import SamplingParams
from engine.sequence import Sequence


def seq(rid: str, n: int, start: int = 0) -> Sequence:
    return Sequence(rid, list(range(start, start + n)), SamplingParams())


def compute(bm: BlockManager, s: Sequence, n: int) -> None:
    """What a step does: allocate n more tokens, 'compute' them, register full blocks."""
    assert bm.allocate(s, n)
    s.num_computed_tokens += n
    bm.cache_full_blocks(s)


def test_allocate_exact_block_ids_and_growth():
    bm = BlockManager(num_blocks=8, block_size=4)
    a = seq("a", 10)
    compute(bm, a, 10)
    assert a.block_table == [0, 1, 2]
    assert a.num_cached_blocks == 2  # blocks 0 and 1 are full
    a.append_token(99)
    a.append_token(98)
    compute(bm, a, 1)  # 11 tokens: still 3 blocks
    assert a.block_table == [0, 1, 2]
    compute(bm, a, 1)  # 12 tokens: block 2 full now
    assert a.num_cached_blocks == 3
    a.append_token(97)
    compute(bm, a, 1)  # 13th token opens block 3
    assert a.block_table == [0, 1, 2, 3]
    assert bm.num_free_blocks == 4


def test_prefix_hit_shares_blocks_and_caps_at_last_token():
    bm = BlockManager(num_blocks=8, block_size=4)
    a = seq("a", 12)
    compute(bm, a, 12)
    b = seq("b", 12)  # same 12 tokens: 3 full blocks, but the last token must be recomputed
    prefix = bm.find_cached_prefix(b)
    assert prefix == [0, 1]
    assert bm.allocate(b, 12 - 8, prefix)
    assert b.block_table == [0, 1, 3] and b.num_computed_tokens == 8
    assert bm.pool.ref_cnt[:4] == [2, 2, 1, 1]
    c = seq("c", 9)  # its 9 tokens are a prefix of a: two full blocks hit, the 9th token is computed
    assert bm.find_cached_prefix(c) == [0, 1]
    d = Sequence("d", [0, 1, 2, 3, 50, 51, 52, 53, 54], SamplingParams())
    assert bm.find_cached_prefix(d) == [0]


def test_free_returns_tail_first_and_cached_blocks_stay_findable():
    bm = BlockManager(num_blocks=4, block_size=4)
    a = seq("a", 9)
    compute(bm, a, 9)
    bm.free(a)
    assert list(bm.pool.free_queue) == [3, 2, 1, 0]
    assert a.block_table == [] and a.num_computed_tokens == 0
    b = seq("b", 9)
    assert bm.find_cached_prefix(b) == [0, 1]


def test_allocation_failure_changes_nothing_and_counts_reclaimed_prefix_blocks():
    bm = BlockManager(num_blocks=3, block_size=4)
    a = seq("a", 8)
    compute(bm, a, 8)
    bm.free(a)  # blocks 0, 1 cached but free; 3 free in all
    b = seq("b", 12)
    prefix = bm.find_cached_prefix(b)
    assert prefix == [0, 1]
    # 2 cached blocks are reclaimed from the free queue and 1 new block is needed: exactly 3.
    assert bm.can_allocate(b, 4, prefix)
    c = seq("c", 13, start=100)
    assert not bm.allocate(c, 13)  # needs 4 blocks
    assert c.block_table == [] and bm.num_free_blocks == 3
    assert bm.allocate(b, 4, prefix) and b.block_table == [0, 1, 2]
    assert bm.num_free_blocks == 0


def test_prefix_caching_disabled():
    bm = BlockManager(num_blocks=4, block_size=4, enable_prefix_caching=False)
    a = seq("a", 8)
    compute(bm, a, 8)
    assert bm.pool.cached == {}
    assert bm.find_cached_prefix(seq("b", 8)) == []
