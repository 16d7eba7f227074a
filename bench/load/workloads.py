"""What each request asks for: generated workloads (random, shared-prefix) and the factory for every workload.

Request i of a workload is a pure function of (seed, i, warm-up or not) — see seeding.py — so a run is reproducible
whatever the load pattern, and a sweep can give each point fresh requests by offsetting the index.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

from bench.load import seeding
from bench.load.config import DEFAULT_OUTPUT_LEN, WorkloadConfig
from bench.load.lengths import LengthDist


@dataclass(frozen=True)
class RequestSpec:
    """One request to send."""

    prompt: str | list[int]  # token ids of the served model, or text the server tokenizes
    output_len: int  # max_tokens; exact with ignore_eos
    prompt_len: int | None  # prompt tokens when known on the client (always for token ids)
    group: int | None = None  # the shared-prefix group (system prompt) it belongs to


@dataclass(frozen=True)
class ModelLimits:
    """What a workload needs to know about the served model (from `model_info()`)."""

    vocab_size: int
    max_model_len: int
    has_tokenizer: bool = True

    def __post_init__(self) -> None:
        if self.vocab_size < 1 or self.max_model_len < 2:
            raise ValueError(f"the served model reports vocab_size={self.vocab_size}, "
                             f"max_model_len={self.max_model_len}: cannot generate requests for it")


class Workload(ABC):
    """A source of requests, indexed from 0; warm-up requests are a separate sequence of their own."""

    kind: str

    @abstractmethod
    def request(self, index: int, *, warmup: bool = False) -> RequestSpec:
        """The index-th request (index >= 0). Deterministic; mutates nothing."""

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """The workload's resolved parameters, for the results JSON."""


def fit_lengths(prompt_len: int, output_len: int, max_model_len: int, fixed_prompt: int = 0) -> tuple[int, int]:
    """Clip a drawn (prompt, output) pair so prompt + output <= max_model_len, cutting the prompt's variable part
    first (a distribution's tail may pass the limit; the records keep the lengths actually sent)."""
    output_len = min(output_len, max_model_len - fixed_prompt - 1)
    return max(1, min(prompt_len, max_model_len - fixed_prompt - output_len)), output_len


def _check_fits(what: str, prompt_mean: int, output_mean: int, max_model_len: int) -> None:
    if prompt_mean + output_mean > max_model_len:
        raise ValueError(f"{what} ({prompt_mean} prompt + {output_mean} output tokens on average) does not fit the "
                         f"served model's max_model_len {max_model_len}: ask for shorter lengths")


class RandomWorkload(Workload):
    """Prompts of random token ids drawn uniformly from the vocabulary (as vLLM's random dataset)."""

    kind = "random"

    def __init__(self, input_len: LengthDist, output_len: LengthDist, limits: ModelLimits, seed: int) -> None:
        _check_fits("the random workload", input_len.mean, output_len.mean, limits.max_model_len)
        self.input_len, self.output_len, self.limits, self.seed = input_len, output_len, limits, seed

    def request(self, index: int, *, warmup: bool = False) -> RequestSpec:
        rng = seeding.rng(self.seed, seeding.WARMUP if warmup else seeding.MEASURED, index)
        n_in, n_out = fit_lengths(self.input_len.sample(rng), self.output_len.sample(rng), self.limits.max_model_len)
        ids = rng.integers(0, self.limits.vocab_size, size=n_in).tolist()
        return RequestSpec(prompt=ids, output_len=n_out, prompt_len=n_in)

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "input_len": self.input_len.describe(), "output_len": self.output_len.describe()}


class SharedPrefixWorkload(Workload):
    """`num_prefixes` system prompts x `questions_per_prefix` questions: the traffic a prefix cache exists for.

    Every request is one group's system prompt (the same `prefix_len` token ids for the whole group) followed by a
    fresh random question. Requests visit the groups in rounds: each round of `num_prefixes` requests uses every
    group once, in a seeded shuffled order, so N*M requests give each group exactly M questions.
    """

    kind = "shared-prefix"

    def __init__(self, num_prefixes: int, questions_per_prefix: int, prefix_len: int, question_len: LengthDist,
                 output_len: LengthDist, limits: ModelLimits, seed: int) -> None:
        _check_fits("the shared-prefix workload", prefix_len + question_len.mean, output_len.mean,
                    limits.max_model_len)
        self.num_prefixes, self.questions_per_prefix, self.prefix_len = num_prefixes, questions_per_prefix, prefix_len
        self.question_len, self.output_len, self.limits, self.seed = question_len, output_len, limits, seed
        self.prefixes: list[list[int]] = [
            seeding.rng(seed, seeding.PREFIX, g).integers(0, limits.vocab_size, size=prefix_len).tolist()
            for g in range(num_prefixes)]

    def group_of(self, index: int, *, warmup: bool = False) -> int:
        if warmup:  # warm-up visits every group in turn, as a server in steady state would have cached them all
            return index % self.num_prefixes
        order = seeding.rng(self.seed, seeding.ORDER, index // self.num_prefixes).permutation(self.num_prefixes)
        return int(order[index % self.num_prefixes])

    def request(self, index: int, *, warmup: bool = False) -> RequestSpec:
        group = self.group_of(index, warmup=warmup)
        rng = seeding.rng(self.seed, seeding.WARMUP if warmup else seeding.MEASURED, index)
        n_q, n_out = fit_lengths(self.question_len.sample(rng), self.output_len.sample(rng),
                                 self.limits.max_model_len, fixed_prompt=self.prefix_len)
        question = rng.integers(0, self.limits.vocab_size, size=n_q).tolist()
        return RequestSpec(prompt=self.prefixes[group] + question, output_len=n_out,
                           prompt_len=self.prefix_len + n_q, group=group)

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "num_prefixes": self.num_prefixes,
                "questions_per_prefix": self.questions_per_prefix, "prefix_len": self.prefix_len,
                "question_len": self.question_len.describe(), "output_len": self.output_len.describe()}


def build_workload(cfg: WorkloadConfig, limits: ModelLimits) -> Workload:
    """The workload `cfg` names, sized for the served model."""
    output_len = cfg.output_len or LengthDist(DEFAULT_OUTPUT_LEN)
    if cfg.kind == "random":
        return RandomWorkload(cfg.input_len, output_len, limits, cfg.seed)
    if cfg.kind == "shared-prefix":
        return SharedPrefixWorkload(cfg.num_prefixes, cfg.questions_per_prefix, cfg.prefix_len, cfg.input_len,
                                    output_len, limits, cfg.seed)
    # Imported here, not at the top: sharegpt builds on this module's types.
    from bench.load.sharegpt import ShareGPTWorkload

    assert cfg.dataset is not None  # WorkloadConfig guarantees it for "sharegpt"
    return ShareGPTWorkload.from_file(cfg.dataset, limits, seed=cfg.seed, output_len=cfg.output_len,
                                      tokenizer=cfg.tokenizer)
