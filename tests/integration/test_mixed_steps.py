"""Mixed steps: decode rows next to fresh prompts and prompt chunks in one step. Their decode rows attend apart
from the rest (engine.runner `_torch_metadata` parts), or, where decode graphs exist (CUDA), replay the decode
graph while the rest runs eagerly (`engine.mixed_steps`); every request's tokens are exactly those it gets alone."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine import EngineConfig, LLMEngine, SamplingParams, mixed_steps
from engine.input_batch import LENGTH, POSITION, SLOT, TOKEN
from engine.layers.attention_context import AttentionMetadata, attention_context
from engine.runner import ModelRunner

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
PROMPTS = {"a": [5, 6, 7, 8, 9, 10, 11], "b": [40, 41, 42] * 5, "c": [3 + i for i in range(70)],
           "d": [21, 22, 23, 24]}


DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU")])]


def run(llama_dir: str, staggered: bool, device: str) -> dict[str, list[int]]:
    # A 32-token budget: "c" (70 tokens) is prefilled in chunks next to the others' decodes.
    eng = LLMEngine(EngineConfig.from_model_dir(llama_dir, dtype="float32", device=device, num_blocks=64,
                                                max_model_len=256, max_num_batched_tokens=32))
    tokens: dict[str, list[int]] = {rid: [] for rid in PROMPTS}
    # Staggered: "a" first; three steps later "b", "c" and "d" at once, so one step holds a's decode next to
    # several prompts and a chunk (rows of the rest with different batch slots).
    waves = [["a"], ["b", "c", "d"]] if staggered else [list(PROMPTS)]
    steps = 0
    while waves or eng.has_unfinished_requests():
        if waves and steps % 3 == 0:
            for rid in waves.pop(0):
                eng.add_request(rid, PROMPTS[rid], GREEDY)
        for out in eng.step():
            tokens[out.request_id] += out.new_token_ids
        steps += 1
    eng.shutdown()
    return tokens


@pytest.mark.parametrize("device", DEVICES)
def test_mixed_steps_give_each_request_its_tokens_alone(llama_dir, monkeypatch, device):
    parts: list[int] = []
    original = ModelRunner._torch_metadata

    def spy(self, out, inp):
        meta = original(self, out, inp)
        parts.append(len(meta.parts) if meta.parts else 1)
        return meta

    alone = {}
    for rid, prompt in PROMPTS.items():
        eng = LLMEngine(EngineConfig.from_model_dir(llama_dir, dtype="float32", device=device, num_blocks=64,
                                                    max_model_len=256))
        eng.add_request(rid, prompt, GREEDY)
        while eng.has_unfinished_requests():
            for out in eng.step():
                alone.setdefault(rid, []).extend(out.new_token_ids)
        eng.shutdown()
    splits: list[int] = []
    run_split = mixed_steps.run_split

    def split_spy(runner, out, inp, dec):
        splits.append(len(dec))
        return run_split(runner, out, inp, dec)

    monkeypatch.setattr(ModelRunner, "_torch_metadata", spy)
    monkeypatch.setattr(mixed_steps, "run_split", split_spy)
    mixed = run(llama_dir, staggered=True, device=device)
    assert mixed == alone
    assert all(len(t) == 12 for t in mixed.values())
    if device == "cpu":
        assert parts.count(2) >= 3 and not splits, parts  # steps that attended in two parts
    else:
        assert len(splits) >= 3, splits  # steps whose decode rows replayed the decode graph


class EagerGraphs:
    """Stands in for `DecodeGraphs` on CPU (no CUDA graphs there): the same static buffers and buckets, and a
    `replay` that runs the model on the filled buffers' real rows (length > 0) with the torch path. Lets the CPU
    check the mixed-step split's index plumbing: which rows replay, their inputs, where their logits land."""

    def __init__(self, runner: ModelRunner, max_batch: int = 8) -> None:
        self.runner, self.max_batch, self.buckets = runner, max_batch, [1, 4, 8]  # 2 and 3 rows: padded
        self.packed = torch.zeros(4, max_batch, dtype=torch.int64)
        self.tables = torch.zeros(max_batch, runner.batch.tables.shape[1], dtype=torch.int64)
        self.replays: list[int] = []

    def bucket_for(self, n: int) -> int:
        return next(b for b in self.buckets if b >= n)

    def static_inputs(self, bucket: int):
        return self.packed[:, :bucket], self.tables[:bucket]

    def replay(self, bucket: int, n: int) -> torch.Tensor:
        p = self.packed[:, :bucket]
        assert (p[SLOT, n:] == -1).all() and (p[LENGTH, n:] == 0).all()  # padding rows write and read nothing
        assert (p[LENGTH, :n] == p[POSITION, :n] + 1).all()  # one new token after position's cached ones
        self.replays.append(n)
        pos = p[POSITION, :n]
        meta = AttentionMetadata(slot_mapping=p[SLOT, :n], query_start=list(range(n + 1)),
                                 seq_lens_host=p[LENGTH, :n].tolist(), seq_lens=p[LENGTH, :n],
                                 block_tables=self.tables[:n], query_positions=pos[:, None],
                                 query_pad_index=torch.arange(n), max_query_len=1, all_fresh_prefill=False)
        with attention_context(meta):
            return self.runner.model.compute_logits(self.runner.model(p[TOKEN, :n].clone(), pos.clone()))


def test_split_mixed_steps_give_the_same_tokens(llama_dir, monkeypatch):
    """The split path on CPU through `EagerGraphs`: decode rows of mixed steps (and pure-decode steps) replay
    apart from the prompts and chunks, and every request gets exactly the tokens of the unsplit engine."""
    baseline = run(llama_dir, staggered=True, device="cpu")
    made: list[EagerGraphs] = []
    original = ModelRunner.allocate_kv_cache

    def with_graphs(self, num_blocks=None):
        blocks = original(self, num_blocks)
        self.graphs, self.decode_kernel = EagerGraphs(self), True
        made.append(self.graphs)
        return blocks

    splits: list[np.ndarray] = []
    run_split = mixed_steps.run_split

    def split_spy(runner, out, inp, dec):
        splits.append(dec)
        return run_split(runner, out, inp, dec)

    monkeypatch.setattr(ModelRunner, "allocate_kv_cache", with_graphs)
    monkeypatch.setattr(mixed_steps, "run_split", split_spy)
    assert run(llama_dir, staggered=True, device="cpu") == baseline
    assert len(splits) >= 3 and made and len(made[0].replays) > len(splits)  # split steps and pure decodes
    # a's decode next to b, c, d's prompts; then two decode rows (padded to the bucket of 4) next to c's chunks
    assert [d.tolist() for d in splits] == [[0], [0, 1], [0, 1]]



def test_one_token_chunks_in_pure_decode_steps(llama_dir, monkeypatch):
    """A 4-token budget with three requests decoding leaves one token per step for a fourth prompt: its chunks are
    one token after cached ones, so those steps are "pure decode" with a row that does not sample. Through the
    graph path (the eager stand-in on CPU) every request still gets exactly its tokens without graphs."""
    prompts = {"a": [5, 6, 7], "b": [9, 10, 11, 12], "c": [40, 41], "d": [3 + i for i in range(9)]}

    def go() -> dict[str, list[int]]:
        eng = LLMEngine(EngineConfig.from_model_dir(llama_dir, dtype="float32", device="cpu", num_blocks=64,
                                                    max_model_len=256, max_num_batched_tokens=4))
        toks: dict[str, list[int]] = {rid: [] for rid in prompts}
        for rid in "abc":
            eng.add_request(rid, prompts[rid], SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True))
        steps = 0
        while eng.has_unfinished_requests() or steps < 6:
            if steps == 5:
                eng.add_request("d", prompts["d"], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
            for out in eng.step():
                toks[out.request_id] += out.new_token_ids
            steps += 1
        eng.shutdown()
        return toks

    baseline = go()
    graphs: list[EagerGraphs] = []
    original = ModelRunner.allocate_kv_cache
    non_sampling: list[int] = []

    def with_graphs(self, num_blocks=None):
        blocks = original(self, num_blocks)
        self.graphs, self.decode_kernel = EagerGraphs(self), True
        graphs.append(self.graphs)
        return blocks

    prepare = ModelRunner.execute

    def spy(self, out, extension=None):
        if out.is_pure_decode and any(i < 0 for i in out.output_index):
            non_sampling.append(len(out.output_index))
        return prepare(self, out, extension)

    monkeypatch.setattr(ModelRunner, "allocate_kv_cache", with_graphs)
    monkeypatch.setattr(ModelRunner, "execute", spy)
    got = go()
    assert non_sampling, "no pure-decode step with a one-token chunk happened"
    assert got == baseline and [len(got[r]) for r in "abcd"] == [16, 16, 16, 4]
