"""Workloads of `kvrelay bench`: length distributions, random prompts, shared prefixes, ShareGPT files."""

import json
from collections import Counter

import numpy as np
import pytest

from bench.load.config import WorkloadConfig
from bench.load.lengths import LengthDist
from bench.load.sharegpt import ShareGPTWorkload, parse_sharegpt
from bench.load.workloads import (
    ModelLimits,
    RandomWorkload,
    SharedPrefixWorkload,
    build_workload,
    fit_lengths,
)

LIMITS = ModelLimits(vocab_size=1000, max_model_len=4096)


def samples(d: LengthDist, n: int = 5000) -> np.ndarray:
    rng = np.random.default_rng(0)
    return np.array([d.sample(rng) for _ in range(n)])


def test_fixed_length():
    assert set(samples(LengthDist(128), 100).tolist()) == {128}
    assert LengthDist(128).kind == "fixed" and LengthDist(128).high == 128


def test_uniform_range_covers_exactly_its_bounds():
    d = LengthDist(100, range_ratio=0.25)
    s = samples(d)
    assert (d.low, d.high) == (75, 125)
    assert s.min() == 75 and s.max() == 125
    assert s.mean() == pytest.approx(100, abs=1.0)


def test_normal_length_is_rounded_and_at_least_one():
    s = samples(LengthDist(50, std=10))
    assert s.dtype.kind == "i"
    assert s.mean() == pytest.approx(50, abs=0.5) and s.std() == pytest.approx(10, rel=0.05)
    assert samples(LengthDist(2, std=50)).min() == 1


@pytest.mark.parametrize("kwargs,match", [
    (dict(mean=0), ">= 1 token"), (dict(mean=8, range_ratio=1.0), r"\[0, 1\)"), (dict(mean=8, std=-1), ">= 0"),
    (dict(mean=8, range_ratio=0.5, std=2), "not both")])
def test_length_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LengthDist(**kwargs)


def test_random_workload_lengths_vocab_and_reproducibility():
    w = RandomWorkload(LengthDist(64, range_ratio=0.5), LengthDist(16), LIMITS, seed=3)
    reqs = [w.request(i) for i in range(200)]
    assert all(len(r.prompt) == r.prompt_len and 32 <= r.prompt_len <= 96 for r in reqs)
    assert all(0 <= t < 1000 for r in reqs for t in r.prompt)
    assert {r.output_len for r in reqs} == {16}
    again = RandomWorkload(LengthDist(64, range_ratio=0.5), LengthDist(16), LIMITS, seed=3)
    assert [again.request(i) for i in (199, 0, 57)] == [reqs[199], reqs[0], reqs[57]]  # any order, same requests
    assert RandomWorkload(LengthDist(64), LengthDist(16), LIMITS, seed=4).request(0).prompt != reqs[0].prompt
    assert w.request(0, warmup=True).prompt != reqs[0].prompt  # warm-up requests are their own sequence


def test_lengths_past_max_model_len_are_clipped_prompt_first():
    assert fit_lengths(100, 20, 64) == (44, 20)
    assert fit_lengths(100, 80, 64) == (1, 63)
    assert fit_lengths(10, 20, 64, fixed_prompt=40) == (4, 20)
    w = RandomWorkload(LengthDist(40, std=30), LengthDist(20), ModelLimits(1000, 64), seed=0)
    assert all(w.request(i).prompt_len + w.request(i).output_len <= 64 for i in range(300))


def test_workload_that_cannot_fit_says_so():
    with pytest.raises(ValueError, match="max_model_len 64"):
        RandomWorkload(LengthDist(60), LengthDist(10), ModelLimits(1000, 64), seed=0)


def test_shared_prefix_requests_share_their_group_prefix():
    w = SharedPrefixWorkload(num_prefixes=4, questions_per_prefix=5, prefix_len=32, question_len=LengthDist(8),
                             output_len=LengthDist(4), limits=LIMITS, seed=1)
    reqs = [w.request(i) for i in range(20)]
    assert Counter(r.group for r in reqs) == {0: 5, 1: 5, 2: 5, 3: 5}  # N x M: M questions per prefix
    for r in reqs:
        assert r.prompt[:32] == w.prefixes[r.group] and r.prompt_len == len(r.prompt) == 40
    assert len({tuple(p) for p in w.prefixes}) == 4  # distinct system prompts
    same = [r for r in reqs if r.group == reqs[0].group]
    assert len({tuple(r.prompt[32:]) for r in same}) == 5  # ... each with different questions
    for rnd in range(5):  # every round of N requests visits every group once
        assert sorted(r.group for r in reqs[4 * rnd:4 * rnd + 4]) == [0, 1, 2, 3]
    assert [w.request(i, warmup=True).group for i in range(6)] == [0, 1, 2, 3, 0, 1]
    assert w.request(0, warmup=True).prompt[:32] == w.prefixes[0]


def test_build_workload_picks_the_kind_and_default_counts():
    cfg = WorkloadConfig(kind="shared-prefix", num_prefixes=3, questions_per_prefix=7, prefix_len=16,
                         input_len=LengthDist(8))
    w = build_workload(cfg, LIMITS)
    assert isinstance(w, SharedPrefixWorkload) and cfg.default_num_requests == 21
    assert w.request(0).output_len == 128  # the default output length
    assert isinstance(build_workload(WorkloadConfig(), LIMITS), RandomWorkload)


@pytest.mark.parametrize("kwargs,match", [
    (dict(kind="zipf"), "unknown workload"),
    (dict(kind="shared-prefix", num_prefixes=2), "--questions-per-prefix"),
    (dict(num_prefixes=2), "only apply to the shared-prefix"),
    (dict(kind="sharegpt"), "--dataset"),
    (dict(kind="sharegpt", dataset="x.json"), "--tokenizer"),
])
def test_workload_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        WorkloadConfig(**kwargs)


SHAREGPT = [
    {"id": "a", "conversations": [{"from": "human", "value": "What is a KV cache?"},
                                  {"from": "gpt", "value": "It stores keys and values of past tokens."},
                                  {"from": "human", "value": "second question, ignored"},
                                  {"from": "gpt", "value": "ignored"}]},
    {"id": "b", "conversations": [{"from": "system", "value": "be brief"}, {"from": "user", "value": "Hi there"},
                                  {"from": "assistant", "value": "Hello"}]},
    {"id": "c", "conversations": [{"from": "human", "value": "no answer"}]},
    {"id": "d", "conversations": [{"from": "gpt", "value": "answer first"}, {"from": "human", "value": "q"}]},
    {"id": "e", "conversations": [{"from": "human", "value": ""}, {"from": "gpt", "value": "empty prompt"}]},
    {"id": "f"},
]


def word_count(text: str, special: bool) -> int:  # a stand-in tokenizer: one token per word, +1 BOS
    return len(text.split()) + (1 if special else 0)


def test_sharegpt_parsing_keeps_first_human_turn_and_its_answer():
    pairs = parse_sharegpt(SHAREGPT)
    assert [(c.prompt, c.answer) for c in pairs] == [
        ("What is a KV cache?", "It stores keys and values of past tokens."), ("Hi there", "Hello")]
    with pytest.raises(ValueError, match="JSON list"):
        parse_sharegpt({"conversations": []})


def test_sharegpt_workload_from_file(tmp_path):
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(SHAREGPT))
    w = ShareGPTWorkload(parse_sharegpt(json.loads(path.read_text())), LIMITS, seed=0, count=word_count,
                         source=str(path))
    reqs = {w.request(i).prompt: w.request(i) for i in range(2)}
    assert set(reqs) == {"What is a KV cache?", "Hi there"}  # one pass visits each conversation once
    assert reqs["What is a KV cache?"].output_len == 8 and reqs["What is a KV cache?"].prompt_len == 6
    assert reqs["Hi there"].output_len == 1 and reqs["Hi there"].prompt_len == 3
    assert w.request(2) == w.request(0)  # then it starts over
    fixed = ShareGPTWorkload.from_file(str(path), LIMITS, seed=0, output_len=LengthDist(5))
    assert {fixed.request(i).output_len for i in range(4)} == {5} and fixed.request(0).prompt_len is None


def test_sharegpt_drops_what_does_not_fit_and_needs_a_tokenizer_on_the_server(tmp_path):
    pairs = parse_sharegpt(SHAREGPT)
    w = ShareGPTWorkload(pairs, ModelLimits(1000, 8), seed=0, count=word_count)  # 6 + 8 > 8: first one dropped
    assert [e[0] for e in w.entries] == ["Hi there"]
    with pytest.raises(ValueError, match="no tokenizer"):
        ShareGPTWorkload(pairs, ModelLimits(1000, 4096, has_tokenizer=False), seed=0, count=word_count)
    with pytest.raises(ValueError, match="no conversation"):
        ShareGPTWorkload(pairs, ModelLimits(1000, 2), seed=0, count=word_count)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="cannot read it as JSON"):
        ShareGPTWorkload.from_file(str(bad), LIMITS, seed=0, output_len=LengthDist(4))


def test_sharegpt_token_counts_with_a_real_tokenizer(tmp_path):
    import os

    tok = os.path.join(os.path.dirname(__file__), "..", "..", "deploy", "default_model")
    if not os.path.isfile(os.path.join(tok, "tokenizer.json")):
        pytest.skip("the embedded default model is not in this checkout")
    path = tmp_path / "s.json"
    path.write_text(json.dumps(SHAREGPT))
    cfg = WorkloadConfig(kind="sharegpt", dataset=str(path), tokenizer=tok)
    w = build_workload(cfg, LIMITS)
    from tokenizers import Tokenizer

    t = Tokenizer.from_file(os.path.join(tok, "tokenizer.json"))
    r = next(w.request(i) for i in range(2) if w.request(i).prompt == "Hi there")
    assert r.output_len == len(t.encode("Hello", add_special_tokens=False).ids)
    assert r.prompt_len == len(t.encode("Hi there").ids)
