"""Prefill on one engine, KV streamed layer by layer over gloo to a (tensor-parallel) decode engine, decoding
continues there: tokens must equal single-process greedy `LLM` output. Failures free every block."""

import random
import time

import pytest
from kv_helpers import disaggregated_generate, engine, run_until_done, wire

from engine import LLM, SamplingParams

GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


def prompts(n=4, seed=11):
    rng = random.Random(seed)
    return [[rng.randrange(3, 384) for _ in range(k)] for k in (5, 16, 33, 70, 130)[:n]]


@pytest.fixture(scope="module")
def reference(llama_dir):
    return [o.token_ids for o in LLM(llama_dir).generate(prompts(5), GREEDY)]


@pytest.fixture(scope="module")
def prefill(llama_dir):
    eng = engine(llama_dir, num_blocks=128)
    yield eng
    eng.shutdown()


@pytest.mark.parametrize("decode_tp", [1, 2])
def test_prefill_tp1_to_decode(llama_dir, prefill, reference, decode_tp):
    decode = engine(llama_dir, tp=decode_tp, num_blocks=96)
    try:
        wire(prefill, "p0", decode, f"d{decode_tp}")
        # Several requests at once: one prefill step sends all their KV in one message per layer.
        outs = disaggregated_generate(prefill, decode, prompts(5), GREEDY, decode_name=f"d{decode_tp}")
        assert [outs[f"req{i}"].token_ids for i in range(5)] == reference
        assert all(o.finish_reason == "length" for o in outs.values())
        assert decode.num_free_blocks == 96 and prefill.num_free_blocks == 128
        # The channel stays usable for the next requests.
        again = disaggregated_generate(prefill, decode, prompts(2, seed=11), GREEDY, decode_name=f"d{decode_tp}")
        assert [again[f"req{i}"].token_ids for i in range(2)] == reference[:2]
    finally:
        decode.shutdown()


def test_prefill_tp2_to_decode_tp1_gathers_heads(llama_dir, reference):
    p = engine(llama_dir, tp=2, num_blocks=64)
    d = engine(llama_dir, num_blocks=64)
    try:
        wire(p, "p2", d, "d1")
        outs = disaggregated_generate(p, d, prompts(3), GREEDY, prefill_name="p2", decode_name="d1")
        assert [outs[f"req{i}"].token_ids for i in range(3)] == reference[:3]
    finally:
        p.shutdown()
        d.shutdown()


def test_transfer_deadline_frees_blocks(llama_dir):
    d = engine(llama_dir, num_blocks=32)
    d.call_extension("listen", "silent", 1)
    reservation = d.reserve_remote_prefill("r", prompts(1)[0] * 8, GREEDY, "silent", 1, timeout_s=0.5)
    assert reservation and d.num_free_blocks == 32 - len(reservation.block_ids)
    time.sleep(0.7)
    (out,) = d.step()
    assert out.finished and out.finish_reason == "abort" and "deadline" in out.error
    assert d.num_free_blocks == 32 and not d.has_unfinished_requests()
    d.shutdown()


def test_sender_killed_mid_transfer(llama_dir):
    p = engine(llama_dir, tp=2, num_blocks=64, extension="kv_helpers:DyingConnector")
    d = engine(llama_dir, num_blocks=64)
    try:
        wire(p, "pd", d, "dd")
        ps = prompts(2)
        for i, pr in enumerate(ps):
            assert d.reserve_remote_prefill(f"k{i}", pr, GREEDY, "pd", 2, timeout_s=60) is not None
            p.add_request(f"k{i}", pr, GREEDY, transfer={"peer": "dd"})
        with pytest.raises(Exception, match="exited|failed"):
            run_until_done(p, {"k0", "k1"})
        t0 = time.monotonic()
        outs = {}
        while len(outs) < 2 and time.monotonic() - t0 < 30:  # the broken channel fails both, well before 60 s
            outs.update({o.request_id: o for o in d.step() if o.finished})
            time.sleep(0.01)
        print(f"decode side failed the transfers after {time.monotonic() - t0:.2f} s")
        assert set(outs) == {"k0", "k1"}
        assert all(o.finish_reason == "abort" and "'pd'" in o.error and "deadline" not in o.error
                   for o in outs.values()), [o.error for o in outs.values()]
        assert d.num_free_blocks == 64 and not d.has_unfinished_requests()
        # The decode engine still serves: a local request runs fine.
        d.add_request("local", ps[0], GREEDY)
        assert run_until_done(d, {"local"})["local"].finish_reason == "length"
    finally:
        p.shutdown()
        d.shutdown()


def test_bad_expect_releases_reservation_and_keeps_ranks(llama_dir):
    d = engine(llama_dir, tp=2, num_blocks=32)
    try:
        with pytest.raises(Exception, match="cannot be split|divisible|replicated"):
            d.reserve_remote_prefill("x", prompts(1)[0], GREEDY, "p3", prefill_tp=3)  # 2 KV heads over 3 ranks
        assert d.num_free_blocks == 32 and not d.has_unfinished_requests()
        d.add_request("local", prompts(1)[0], GREEDY)  # the TP group survived the failed call
        assert run_until_done(d, {"local"})["local"].finish_reason == "length"
    finally:
        d.shutdown()


@pytest.mark.parametrize("keepalive", [True, False])
def test_idle_channel_lives_on_keepalives(llama_dir, reference, keepalive):
    """An idle pair's pending receive times out (here after 2 s) unless the sender's keepalive headers arrive."""
    p = engine(llama_dir, num_blocks=32, extension="kv_helpers:ShortIdleConnector")
    d = engine(llama_dir, tp=2, num_blocks=32, extension="kv_helpers:ShortIdleConnector")
    try:
        wire(p, "pk", d, "dk")
        t0 = time.monotonic()
        while time.monotonic() - t0 < 3.0:  # idle for longer than the receivers' timeout
            if keepalive:
                p.keepalive()
            time.sleep(0.5)
        if keepalive:
            outs = disaggregated_generate(p, d, prompts(2), GREEDY, prefill_name="pk", decode_name="dk")
            assert [outs[f"req{i}"].token_ids for i in range(2)] == reference[:2]
        else:
            with pytest.raises(AssertionError, match="abort"):  # the transfer fails, not the prefill engine
                disaggregated_generate(p, d, prompts(1), GREEDY, prefill_name="pk", decode_name="dk")
            run_until_done(d, set(), max_steps=1)
            wire(p, "pk", d, "dk")  # re-wiring the pair replaces its dead channels
            outs = disaggregated_generate(p, d, prompts(2), GREEDY, prefill_name="pk", decode_name="dk")
            assert [outs[f"req{i}"].token_ids for i in range(2)] == reference[:2]
        assert d.num_free_blocks == 32 and p.num_free_blocks == 32
    finally:
        p.shutdown()
        d.shutdown()


@pytest.mark.parametrize("decode_tp", [1, 2])
def test_decode_group_shares_its_prefix_and_receives_only_missing_blocks(llama_dir, decode_tp):
    rng = random.Random(5)
    shared = [rng.randrange(3, 384) for _ in range(64)]  # 4 full blocks of 16
    a, b = shared + [rng.randrange(3, 384) for _ in range(10)], shared + [rng.randrange(3, 384) for _ in range(9)]
    ref = [o.token_ids for o in LLM(llama_dir).generate([a, b], GREEDY)]
    p, d = engine(llama_dir, num_blocks=64), engine(llama_dir, tp=decode_tp, num_blocks=64)
    try:
        wire(p, "p0", d, "d0")
        assert disaggregated_generate(p, d, [a], GREEDY)["req0"].token_ids == ref[0]
        before = p.call_extension("stats")[0]["bytes_sent"]
        received = [s["bytes_received"] for s in d.call_extension("stats")]
        r = d.reserve_remote_prefill("b", b, GREEDY, "p0", 1)
        assert r.num_cached_blocks == 4 and len(r.block_ids) == 5  # 73 tokens: 4 shared blocks + 1 sent
        p.add_request("b", b, GREEDY, transfer={"peer": "d0", "skip_blocks": r.num_cached_blocks})
        first = run_until_done(p, {"b"})["b"]
        d.set_first_token("b", first.token_ids[0])
        out = run_until_done(d, {"b"})["b"]
        assert out.token_ids == ref[1]
        block_bytes = p.executor.runner.kv_block_bytes  # one block, every layer, K and V, all KV heads
        assert p.call_extension("stats")[0]["bytes_sent"] - before == block_bytes
        got = [s["bytes_received"] - r0 for s, r0 in zip(d.call_extension("stats"), received)]
        assert sum(got) == block_bytes and len(set(got)) == 1  # each decode rank receives only its heads
        assert d.num_free_blocks == 64 and p.num_free_blocks == 64
    finally:
        p.shutdown()
        d.shutdown()


def test_decode_side_preemption_of_remote_requests_recomputes_exactly(llama_dir):
    """A decode pool too small for every remote request's growth: the newest are preempted and recomputed by the
    decode engine itself (prompt + tokens so far); tokens still equal LLM's, and every block comes back."""
    rng = random.Random(9)
    ps = [[rng.randrange(3, 384) for _ in range(40)] for _ in range(4)]
    long = SamplingParams(max_tokens=60, temperature=0, ignore_eos=True)
    ref = [o.token_ids for o in LLM(llama_dir).generate(ps, long)]
    p, d = engine(llama_dir, num_blocks=64), engine(llama_dir, block_size=16, num_blocks=20)
    try:
        wire(p, "p0", d, "d0")
        outs = disaggregated_generate(p, d, ps, long)
        assert [outs[f"req{i}"].token_ids for i in range(4)] == ref
        assert d.scheduler.num_preemptions > 0  # 4 x 100 tokens = 28 blocks > 20
        assert d.num_free_blocks == 20 and p.num_free_blocks == 64
    finally:
        p.shutdown()
        d.shutdown()


def test_mismatched_pair_fails_at_start_up_naming_both_sides(llama_dir):
    """A prefill worker and a decode group with different block sizes: the router refuses to wire them (before any
    channel opens), and a prefill worker refuses a Connect that carries another layout."""
    import asyncio

    import grpc

    from decode_workers.group import DecodeLeader
    from engine import EngineConfig
    from engine.config import KVLayout
    from prefill_workers.worker import PrefillWorker
    from protos import codec
    from protos import worker_pb2 as wpb
    from protos import worker_pb2_grpc as wpb_grpc
    from protos.guards import secret_metadata
    from router.config import RouterConfig
    from router.server import RouterServer
    from router.workers import KVLayoutMismatch, WorkerSpec

    secret = "handshake-test"
    p = PrefillWorker("p0", EngineConfig.from_model_dir(llama_dir, num_blocks=32, block_size=16), secret=secret)
    d_cfg = EngineConfig.from_model_dir(llama_dir, num_blocks=32, block_size=8)
    d = DecodeLeader("d0", d_cfg, secret=secret)
    try:
        router = RouterServer(RouterConfig(host="127.0.0.1", port=0, stats_log_interval_s=0), d_cfg.model,
                              [WorkerSpec("p0", p.address)], [WorkerSpec("d0", d.address)], secret=secret)
        with pytest.raises(KVLayoutMismatch, match=r"KV layout mismatch between prefill worker p0 and decode group "
                                                   r"d0: block_size 16 on prefill worker p0 vs 8 on decode group d0"):
            asyncio.run(router.start(64, 30))
        asyncio.run(router.stop())
        with grpc.insecure_channel(p.address) as ch:
            layout = codec.layout_message(vars(KVLayout.of(d_cfg)).copy())
            with pytest.raises(grpc.RpcError) as e:
                wpb_grpc.PrefillWorkerStub(ch).Connect(wpb.ConnectRequest(
                    decode_group="d0", decode_tensor_parallel_size=1, decode_layout=layout,
                    channels=[wpb.ChannelAddress(decode_rank=0, prefill_rank=0, host="127.0.0.1", port=1)]),
                    metadata=secret_metadata(secret), timeout=10)
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert e.value.details() == ("KV layout mismatch between prefill worker p0 and decode group d0: block_size "
                                     "16 on prefill worker p0 vs 8 on decode group d0")
    finally:
        p.stop()
        d.stop()


@pytest.mark.parametrize("budget, blocks_sent", [(32, 9), (24, 12)])
def test_chunked_prefill_streams_every_chunk(llama_dir, budget, blocks_sent):
    """A 130-token prompt prefilled in chunks of `budget` tokens: each chunk's blocks travel as soon as it is
    computed (before the last chunk runs), a block a chunk leaves partial is sent again complete with the next
    (24-token chunks: 9 blocks + 3 resends), and the decode group admits the request after the final chunk."""
    prompt = prompts(5)[4]  # 130 tokens: 9 blocks of 16
    ref = LLM(llama_dir).generate(prompt, GREEDY)[0].token_ids
    p = engine(llama_dir, num_blocks=64, max_num_batched_tokens=budget)
    d = engine(llama_dir, num_blocks=64)
    try:
        wire(p, "p0", d, "d0")
        r = d.reserve_remote_prefill("c", prompt, GREEDY, "p0", 1)
        p.add_request("c", prompt, GREEDY, transfer={"peer": "d0"})
        block = p.executor.runner.kv_block_bytes
        assert p.step() == []  # the first chunk: computed and sent, the prompt not done
        assert p.call_extension("stats")[0]["bytes_sent"] == 2 * block
        assert d.step() == [] and d.scheduler.remote  # nothing admitted before the final chunk lands
        first = run_until_done(p, {"c"})["c"]
        assert p.call_extension("stats")[0]["bytes_sent"] == blocks_sent * block
        d.set_first_token("c", first.token_ids[0])
        assert run_until_done(d, {"c"})["c"].token_ids == ref
        assert len(r.block_ids) == 9 and d.num_free_blocks == 64 and p.num_free_blocks == 64
    finally:
        p.shutdown()
        d.shutdown()


def test_receive_staging_is_bounded_by_two_pieces(llama_dir, monkeypatch):
    """Pieces of 2 blocks (PIECE_TOKENS 32): a 130-token prompt's 9 blocks travel in 5 pieces per layer, the
    receiver stages two pieces at most, and the tokens are LLM's."""
    import kv_transfer.sender

    monkeypatch.setattr(kv_transfer.sender, "PIECE_TOKENS", 32)
    prompt = prompts(5)[4]
    ref = LLM(llama_dir).generate(prompt, GREEDY)[0].token_ids
    p, d = engine(llama_dir, num_blocks=64), engine(llama_dir, num_blocks=64)
    try:
        wire(p, "p0", d, "d0")
        assert disaggregated_generate(p, d, [prompt], GREEDY)["req0"].token_ids == ref
        # Two buffers of one piece each: 2 (K, V) x 2 blocks x one layer's block of this rank's KV.
        layer_block = p.executor.runner.kv_block_bytes // p.config.model.num_layers // 2
        assert d.call_extension("stats")[0]["max_staging_bytes"] == 2 * 2 * 2 * layer_block
    finally:
        p.shutdown()
        d.shutdown()


def test_reservations_between_steps_register_in_one_call(llama_dir, reference):
    """As a serving loop runs it (defer_expects): three reservations, then one registration call on the decode
    group's two ranks, not one broadcast each; the transfers then land and decode as usual."""
    p, d = engine(llama_dir, num_blocks=64), engine(llama_dir, tp=2, num_blocks=64)
    try:
        wire(p, "p0", d, "d0")
        calls: list[str] = []
        call = d.executor.call_extension
        d.executor.call_extension = lambda method, *a: (calls.append(method), call(method, *a))[1]
        d.defer_expects = True
        ps = prompts(3)
        for i, pr in enumerate(ps):
            assert d.reserve_remote_prefill(f"b{i}", pr, GREEDY, "p0", 1) is not None
        assert calls == [] and d.flush_expects() == {} and calls == ["expect_many"]
        for i, pr in enumerate(ps):
            p.add_request(f"b{i}", pr, GREEDY, transfer={"peer": "d0"})
        firsts = run_until_done(p, {f"b{i}" for i in range(3)})
        for rid, o in firsts.items():
            d.set_first_token(rid, o.token_ids[0])
        outs = run_until_done(d, set(firsts))
        assert [outs[f"b{i}"].token_ids for i in range(3)] == reference[:3]
        assert d.num_free_blocks == 64
    finally:
        p.shutdown()
        d.shutdown()
