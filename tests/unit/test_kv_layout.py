"""Exact tests of the KV head layout and of prefill->decode transfer plans."""

import pytest

from kv_transfer.layout import HeadSlice, kv_heads_of_rank, make_transfer_plan


def test_heads_split_and_replicated():
    assert [kv_heads_of_rank(8, 2, r) for r in range(2)] == [range(0, 4), range(4, 8)]
    assert [kv_heads_of_rank(2, 4, r) for r in range(4)] == [range(0, 1), range(0, 1), range(1, 2), range(1, 2)]
    assert [kv_heads_of_rank(1, 2, r) for r in range(2)] == [range(0, 1), range(0, 1)]
    with pytest.raises(ValueError):
        kv_heads_of_rank(6, 4, 0)


def test_tp1_to_tp2():
    plan = make_transfer_plan(8, 1, 2)
    assert plan.slices == ((HeadSlice(0, 0, 0, 4),), (HeadSlice(0, 4, 0, 4),))
    assert plan.sends_of(0) == {0: [HeadSlice(0, 0, 0, 4)], 1: [HeadSlice(0, 4, 0, 4)]}
    assert plan.sources(1) == [0]


def test_tp2_to_tp1_gathers_from_both():
    plan = make_transfer_plan(8, 2, 1)
    assert plan.slices == ((HeadSlice(0, 0, 0, 4), HeadSlice(1, 0, 4, 4)),)
    assert plan.sources(0) == [0, 1]


def test_tp2_to_tp4_and_tp4_to_tp2():
    assert make_transfer_plan(8, 2, 4).slices == (
        (HeadSlice(0, 0, 0, 2),), (HeadSlice(0, 2, 0, 2),), (HeadSlice(1, 0, 0, 2),), (HeadSlice(1, 2, 0, 2),))
    assert make_transfer_plan(8, 4, 2).slices == (
        (HeadSlice(0, 0, 0, 2), HeadSlice(1, 0, 2, 2)), (HeadSlice(2, 0, 0, 2), HeadSlice(3, 0, 2, 2)))


def test_replicated_heads_spread_over_senders():
    # 2 KV heads; prefill TP 4 replicates each twice; decode TP 2 holds one head per rank.
    plan = make_transfer_plan(2, 4, 2)
    assert plan.slices == ((HeadSlice(0, 0, 0, 1),), (HeadSlice(3, 0, 0, 1),))
    # MQA to TP 2: both decode ranks need head 0, prefill TP 1 sends it to both.
    assert make_transfer_plan(1, 1, 2).slices == ((HeadSlice(0, 0, 0, 1),), (HeadSlice(0, 0, 0, 1),))


def test_kv_layout_handshake_names_both_sides_and_every_difference():
    from engine.config import KVLayout

    a = KVLayout("llama-8b", "LlamaForCausalLM", 32, 8, 128, 128256, "bfloat16", 16)
    assert a.mismatch(a, "prefill worker p0", "decode group d0") is None
    b = KVLayout("llama-8b", "LlamaForCausalLM", 32, 8, 128, 128256, "float16", 32)
    assert a.mismatch(b, "prefill worker p0", "decode group d0") == (
        "KV layout mismatch between prefill worker p0 and decode group d0: dtype 'bfloat16' on prefill worker p0 "
        "vs 'float16' on decode group d0; block_size 16 on prefill worker p0 vs 32 on decode group d0")
    import dataclasses

    newer = dataclasses.replace(a, wire_version=a.wire_version + 1)
    assert a.mismatch(newer, "x", "y") == (f"KV layout mismatch between x and y: wire_version {a.wire_version} on x "
                                           f"vs {a.wire_version + 1} on y")


def test_transfer_staging_is_reserved_outside_the_pool():
    from engine.config import EngineConfig
    from kv_transfer.wire import PIECE_TOKENS, STAGED_CHANNELS, with_staging

    cfg = EngineConfig.from_model_dir("deploy/default_model")  # 2 KV heads of 48, bfloat16
    piece = 2 * PIECE_TOKENS * 2 * 48 * 2  # K and V of one layer's 8192 tokens
    # per channel: two receive pieces, four sends in flight and the one being gathered
    assert with_staging(cfg).reserve_bytes == STAGED_CHANNELS * 7 * piece == 88080384
