"""ShareGPT-format datasets: each conversation's first human turn is a prompt (sent as text), the gpt answer that
follows it gives the output length (as in vLLM's ShareGPT dataset).

The file is a JSON list of {"conversations": [{"from": "human", "value": ...}, {"from": "gpt", "value": ...}, ...]}
("user"/"assistant" roles are accepted too). Counting an answer's tokens needs the served model's tokenizer on the
client (`--tokenizer`); a fixed `--output-len` replaces the answers' lengths instead.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bench.load import seeding
from bench.load.lengths import LengthDist
from bench.load.workloads import ModelLimits, RequestSpec, Workload

HUMAN_ROLES = ("human", "user")
GPT_ROLES = ("gpt", "assistant", "chatgpt")


@dataclass(frozen=True)
class Conversation:
    prompt: str  # the first human turn
    answer: str  # the reply that follows it


def parse_sharegpt(data: Any) -> list[Conversation]:
    """The (prompt, answer) pairs of a loaded ShareGPT JSON document, in file order; conversations without a
    non-empty human turn followed by a non-empty answer are skipped."""
    if not isinstance(data, list):
        raise ValueError("a ShareGPT file must hold a JSON list of {\"conversations\": [...]} objects")
    pairs: list[Conversation] = []
    for item in data:
        turns = item.get("conversations") if isinstance(item, dict) else None
        if not isinstance(turns, list):
            continue
        for k, turn in enumerate(turns[:-1]):
            if isinstance(turn, dict) and turn.get("from") in HUMAN_ROLES:
                reply = turns[k + 1]
                if (isinstance(reply, dict) and reply.get("from") in GPT_ROLES and turn.get("value")
                        and reply.get("value")):
                    pairs.append(Conversation(str(turn["value"]), str(reply["value"])))
                break  # only the first human turn counts
    return pairs


def load_token_counter(path: str) -> Callable[[str, bool], int]:
    """count(text, with_special_tokens) with a HuggingFace tokenizer.json (or a directory holding one)."""
    from tokenizers import Tokenizer

    file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise ValueError(f"--tokenizer {path}: no tokenizer.json there; give the served model's tokenizer.json")
    tok = Tokenizer.from_file(file)
    return lambda text, special: len(tok.encode(text, add_special_tokens=special).ids)


class ShareGPTWorkload(Workload):
    """Dataset prompts in a seeded random order; past the end of the dataset it starts over in the same order."""

    kind = "sharegpt"

    def __init__(self, pairs: list[Conversation], limits: ModelLimits, *, seed: int,
                 output_len: LengthDist | None = None, count: Callable[[str, bool], int] | None = None,
                 source: str = "") -> None:
        if not limits.has_tokenizer:
            raise ValueError("ShareGPT prompts are text and the served model has no tokenizer: serve a model with "
                             "tokenizer.json, or use the random or shared-prefix workload")
        if output_len is None and count is None:
            raise ValueError("a ShareGPT workload needs a token counter (--tokenizer) or a fixed --output-len")
        self.limits, self.seed, self.output_len, self.source = limits, seed, output_len, source
        # (prompt, prompt tokens or None, answer tokens or None), keeping what fits the model when lengths are known
        self.entries: list[tuple[str, int | None, int | None]] = []
        for c in pairs:
            p_len = count(c.prompt, True) if count else None
            a_len = count(c.answer, False) if count and output_len is None else None
            need = (p_len or 0) + (a_len if a_len is not None else (output_len.mean if output_len else 0))
            if (a_len is None or a_len >= 1) and need <= limits.max_model_len:
                self.entries.append((c.prompt, p_len, a_len))
        if not self.entries:
            raise ValueError(f"no conversation in {source or 'the dataset'} has a prompt and answer that fit the "
                             f"served model's max_model_len {limits.max_model_len}")
        self.order = seeding.rng(seed, seeding.ORDER).permutation(len(self.entries)).tolist()

    @classmethod
    def from_file(cls, path: str, limits: ModelLimits, *, seed: int, output_len: LengthDist | None = None,
                  tokenizer: str | None = None) -> ShareGPTWorkload:
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"--dataset {path}: cannot read it as JSON ({e})") from None
        count = load_token_counter(tokenizer) if tokenizer else None
        return cls(parse_sharegpt(data), limits, seed=seed, output_len=output_len, count=count, source=path)

    def request(self, index: int, *, warmup: bool = False) -> RequestSpec:
        n = len(self.order)
        # Warm-up walks the order from its end, so it does not pre-cache the first measured prompts.
        prompt, p_len, a_len = self.entries[self.order[(n - 1 - index) % n if warmup else index % n]]
        if self.output_len is not None:
            rng = seeding.rng(self.seed, seeding.WARMUP if warmup else seeding.MEASURED, index)
            out = self.output_len.sample(rng)
            out = min(out, self.limits.max_model_len - (p_len or 1))
        else:
            assert a_len is not None
            out = a_len
        return RequestSpec(prompt=prompt, output_len=out, prompt_len=p_len)

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "dataset": self.source, "conversations": len(self.entries),
                "output_len": self.output_len.describe() if self.output_len else "dataset answers"}
