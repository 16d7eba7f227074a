"""Request validation (pure Python): a parsed public request becomes a `RequestSpec` the orchestrator runs, or a
ValueError whose message says what to fix (the server answers it with INVALID_ARGUMENT)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from engine.sampling_params import SamplingParams
from engine.tokenizer import Tokenizer

MAX_REQUEST_ID_LEN = 128


@dataclass(frozen=True)
class ModelLimits:
    """What a request must fit: the served model and the smallest KV pool it may land in."""

    model: str
    architecture: str
    vocab_size: int
    max_model_len: int  # prompt + generated tokens at most (already capped by the decode groups' KV pools)
    eos_token_ids: tuple[int, ...]
    max_prompt_len: int | None = None  # prompt tokens at most (a prefill worker's pool); None = max_model_len - 1


@dataclass(frozen=True)
class RequestSpec:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    arrival: float = field(default_factory=time.monotonic)


def validate(prompt: str | list[int] | None, sampling: dict[str, Any], request_id: str, limits: ModelLimits,
             tokenizer: Tokenizer | None) -> RequestSpec:
    if len(request_id) > MAX_REQUEST_ID_LEN or not request_id.isprintable():
        raise ValueError(f"request_id must be at most {MAX_REQUEST_ID_LEN} printable characters")
    params = SamplingParams(**sampling)  # its ValueErrors name the bad field
    if params.stop and tokenizer is None:
        raise ValueError("stop strings need the model's tokenizer, and this model has none: use stop_token_ids")
    bad_stop = [t for t in params.stop_token_ids if t >= limits.vocab_size]
    if bad_stop:
        raise ValueError(f"stop_token_ids {bad_stop[:5]} are outside the vocabulary [0, {limits.vocab_size})")
    if prompt is None:
        raise ValueError("the request has no prompt: set `text` or `token_ids`")
    if isinstance(prompt, str):
        if tokenizer is None:
            raise ValueError("this model has no tokenizer, so text prompts are not accepted: send token_ids")
        if not prompt:
            raise ValueError("the prompt is empty")
        ids = tokenizer.encode(prompt)
    else:
        ids = list(prompt)
        bad = [t for t in ids if t >= limits.vocab_size]
        if bad:
            raise ValueError(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {limits.vocab_size})")
    if not ids:
        raise ValueError("the prompt is empty")
    if limits.max_prompt_len is not None and len(ids) > limits.max_prompt_len:
        raise ValueError(f"the prompt has {len(ids)} tokens; at most {limits.max_prompt_len} fit a prefill worker's "
                         "KV cache in this deployment")
    if len(ids) + params.max_tokens > limits.max_model_len:
        if len(ids) >= limits.max_model_len:
            raise ValueError(f"the prompt has {len(ids)} tokens; at most {limits.max_model_len - 1} fit this "
                             f"deployment (max_model_len {limits.max_model_len})")
        raise ValueError(f"the prompt ({len(ids)} tokens) plus max_tokens ({params.max_tokens}) exceeds "
                         f"max_model_len {limits.max_model_len}: lower max_tokens to at most "
                         f"{limits.max_model_len - len(ids)} or shorten the prompt")
    return RequestSpec(request_id, ids, params)
