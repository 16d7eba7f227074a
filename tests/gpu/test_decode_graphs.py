"""The CUDA decode fast path: Triton paged attention, replayed as CUDA graphs, against the eager and portable paths
and HuggingFace. Skipped without a GPU."""

import random

import pytest
import torch

from checkpoints import hf_greedy
from engine import LLM, SamplingParams
from engine.cuda_graphs import DecodeGraphs
from engine.scheduler_output import NewRequest, SchedulerOutput, TransferChunk

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

KV = 1 << 30
GREEDY = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
LOGPROBS = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, logprobs=2)


@pytest.fixture(autouse=True)
def release_gpu_memory():
    yield
    import gc

    gc.collect()
    torch.cuda.empty_cache()


def prompts(n=6, seed=0, longest=133):
    rng = random.Random(seed)
    lens = [1, 7, 16, 17, 64, longest] + [rng.randrange(1, longest) for _ in range(n - 6)]
    return [[rng.randrange(3, 384) for _ in range(k)] for k in lens[:n]]


@pytest.fixture
def count_replays(monkeypatch):
    calls = []
    replay = DecodeGraphs.replay

    def counted(self, bucket, num_seqs):
        calls.append(bucket)
        return replay(self, bucket, num_seqs)

    monkeypatch.setattr(DecodeGraphs, "replay", counted)
    return calls


def generate(path, ps, params, monkeypatch, eager="0", kernel="1", **kw):
    monkeypatch.setenv("KVRELAY_ENFORCE_EAGER", eager)
    monkeypatch.setenv("KVRELAY_DECODE_KERNEL", kernel)
    llm = LLM(path, device="cuda", kv_cache_memory=KV, **kw)
    runner = llm.engine.executor.runner
    assert (runner.graphs is not None) == (eager == "0" and kernel == "1")
    return llm.generate(ps, params)


@pytest.mark.parametrize("variant", ["llama_gqa", "llama_mqa", "llama_mha_tied", "head_dim_32", "mistral_window"])
def test_float32_graphs_equal_eager_and_hf(checkpoint_dir, variant, monkeypatch, count_replays):
    path = checkpoint_dir(variant)
    ps = prompts(11)  # one prefill step, then 23 decode steps of 11 sequences: the 16-row graph
    graph = generate(path, ps, LOGPROBS, monkeypatch)
    assert count_replays and set(count_replays) == {16}  # every decode step was a replay of the 16-row graph
    eager = generate(path, ps, LOGPROBS, monkeypatch, eager="1")
    portable = generate(path, ps, LOGPROBS, monkeypatch, kernel="0")
    assert [o.token_ids for o in graph] == [o.token_ids for o in eager] == [o.token_ids for o in portable]
    for g, e, p in zip(graph, eager, portable):
        for a, b, c in zip(g.logprobs, e.logprobs, p.logprobs):
            assert a.logprob == pytest.approx(b.logprob, abs=1e-5) and a.logprob == pytest.approx(c.logprob, abs=1e-4)
    assert [o.token_ids for o in graph] == hf_greedy(path, ps, 24, device="cuda")


def test_graph_buckets_and_eager_fallback(llama_dir, monkeypatch, count_replays):
    # Requests finishing one step apart walk the batch down from 37 through every bucket; with max_num_seqs 5
    # the largest bucket is 5 itself.
    ps = prompts(37, seed=2)
    params = [SamplingParams(max_tokens=2 + i, temperature=0, ignore_eos=True) for i in range(len(ps))]
    ref = [o.token_ids for o in generate(llama_dir, ps, params, monkeypatch, kernel="0")]
    assert [o.token_ids for o in generate(llama_dir, ps, params, monkeypatch)] == ref
    assert {48, 32, 24, 16, 8, 4, 2, 1} <= set(count_replays)
    count_replays.clear()
    assert [o.token_ids for o in generate(llama_dir, ps, params, monkeypatch, max_num_seqs=5)] == ref
    assert set(count_replays) <= {1, 2, 4, 5} and 5 in count_replays


def common_prefix(a, b):
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def test_bfloat16_graphs(llama_dir, monkeypatch):
    ps = prompts(9, seed=3)
    f32 = generate(llama_dir, ps, LOGPROBS, monkeypatch, dtype="float32")
    graph = generate(llama_dir, ps, LOGPROBS, monkeypatch, dtype="bfloat16")
    eager = generate(llama_dir, ps, LOGPROBS, monkeypatch, dtype="bfloat16", eager="1")
    # Graph (padded rows) and eager may pick different matmul kernels, so bf16 rounding can differ and a
    # near-tie can flip: sequences must agree long, not necessarily to the end.
    agree = [common_prefix(g.token_ids, e.token_ids) for g, e in zip(graph, eager)]
    assert sum(agree) / len(agree) >= 16, agree
    with_f32 = [common_prefix(g.token_ids, f.token_ids) for g, f in zip(graph, f32)]
    assert sum(with_f32) / len(with_f32) >= 8, with_f32
    for g, f, n in zip(graph, f32, with_f32):
        assert len(g.token_ids) == 24 and not any(lp.logprob != lp.logprob for lp in g.logprobs)  # no NaN
        for a, b in zip(g.logprobs[:n], f.logprobs[:n]):  # while the tokens agree, so do their probabilities
            assert a.logprob == pytest.approx(b.logprob, abs=0.25)  # bf16 logits are good to ~3 digits


class Recorder:
    """A worker extension that records its hook calls."""

    def __init__(self):
        self.layers, self.steps = [], 0

    def begin_step(self, out):
        self.steps += 1

    def on_layer(self, i):
        self.layers.append(i)

    def end_step(self, out):
        return None

    def abort_step(self, out):
        pass


def test_per_layer_hook_runs_eagerly_only_in_transfer_steps(llama_dir, monkeypatch, count_replays):
    monkeypatch.setenv("KVRELAY_ENFORCE_EAGER", "0")
    llm = LLM(llama_dir, device="cuda", kv_cache_memory=KV)
    runner, ext = llm.engine.executor.runner, Recorder()

    def one_token(rid, slot, block, transfer=None):  # a one-token prompt: a pure-decode-shaped step
        return SchedulerOutput(request_ids=[rid], slots=[slot], starts=[0], num_tokens=[1], output_index=[0],
                               token_ids=[5], new_requests=[NewRequest(rid, slot, GREEDY, 0)],
                               new_blocks=[(slot, 0, [block])],
                               transfers={0: TransferChunk(transfer, [block], 0, True)} if transfer else {})

    (first,) = runner.execute(one_token("a", 0, 3), ext).result().token_ids
    assert ext.layers == [] and count_replays == [1]  # replayed: no per-layer calls needed
    (second,) = runner.execute(one_token("b", 1, 4, "d0"), ext).result().token_ids
    assert ext.layers == [0, 1] and count_replays == [1] and ext.steps == 2  # eager, hook after each layer
    assert first == second  # same token and position, other block: same result
    assert torch.equal(runner.kv_cache[:, :, 3, 0], runner.kv_cache[:, :, 4, 0])  # both wrote their KV
