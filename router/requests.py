"""Request validation (pure Python): a parsed public request becomes a `RequestSpec` the orchestrator runs, or a
`FieldError` whose message says what to fix and whose `param` names the field (the server answers it with
INVALID_ARGUMENT; the HTTP front also reports the field as OpenAI's `param`)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field, fields
from typing import Any

from engine.sampling_params import SamplingParams
from engine.tokenizer import Tokenizer

MAX_REQUEST_ID_LEN = 128


class FieldError(ValueError):
    """A request refused for one field: `param` is its name as `validate` takes it ("prompt", "request_id", or a
    SamplingParams field), None when no single field is to blame. The message is the client's, unchanged."""

    def __init__(self, message: str, param: str | None) -> None:
        super().__init__(message)
        self.param = param


def _bad_sampling_field(sampling: dict[str, Any]) -> str | None:
    """The field SamplingParams refused. Each of its checks looks at one field, in field order, so the first
    field that fails on its own is the one its message is about (found by trying, not by reading the message)."""
    for f in fields(SamplingParams):
        if f.name in sampling:
            try:
                SamplingParams(**{f.name: sampling[f.name]})
            except (ValueError, TypeError):
                return f.name
    return None


@dataclass(frozen=True)
class ModelLimits:
    """What a request must fit: the served model and the smallest KV pool it may land in."""

    model: str
    architecture: str
    vocab_size: int
    max_model_len: int  # prompt + generated tokens at most (already capped by the decode groups' KV pools)
    eos_token_ids: tuple[int, ...]
    max_prompt_len: int | None = None  # prompt tokens at most (a prefill worker's pool); None = max_model_len - 1
    max_prompt_chars: int | None = None  # characters of a text prompt at most, checked before tokenizing; None: any

    def check_text_size(self, chars: int, what: str = "the text prompt", param: str = "prompt") -> None:
        """Refuse text over `max_prompt_chars` before any tokenizing: a length check costs nothing, while
        tokenizing megabytes takes seconds, for a prompt whose tokens could never fit."""
        if self.max_prompt_chars is not None and chars > self.max_prompt_chars:
            raise FieldError(f"{what} has {chars} characters; at most {self.max_prompt_chars} are accepted "
                             f"(max_prompt_chars): shorten it", param)


@dataclass(frozen=True)
class RequestSpec:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    arrival: float = field(default_factory=time.monotonic)


def validate(prompt: str | list[int] | None, sampling: dict[str, Any], request_id: str, limits: ModelLimits,
             tokenizer: Tokenizer | None) -> RequestSpec:
    if len(request_id) > MAX_REQUEST_ID_LEN or not request_id.isprintable():
        raise FieldError(f"request_id must be at most {MAX_REQUEST_ID_LEN} printable characters", "request_id")
    try:
        params = SamplingParams(**sampling)  # its messages name the bad field
    except (ValueError, TypeError) as e:
        raise FieldError(str(e), _bad_sampling_field(sampling)) from None
    if params.stop and tokenizer is None:
        raise FieldError("stop strings need the model's tokenizer, and this model has none: use stop_token_ids",
                         "stop")
    bad_stop = [t for t in params.stop_token_ids if t >= limits.vocab_size]
    if bad_stop:
        raise FieldError(f"stop_token_ids {bad_stop[:5]} are outside the vocabulary [0, {limits.vocab_size})",
                         "stop_token_ids")
    if prompt is None:
        raise FieldError("the request has no prompt: set `text` or `token_ids`", "prompt")
    if isinstance(prompt, str):
        if tokenizer is None:
            raise FieldError("this model has no tokenizer, so text prompts are not accepted: send token_ids",
                             "prompt")
        if not prompt:
            raise FieldError("the prompt is empty", "prompt")
        limits.check_text_size(len(prompt))
        ids = tokenizer.encode(prompt)
    else:
        ids = list(prompt)
        # max() first: one C call, where a Python scan would hand the GIL around (admit runs long prompts on a
        # thread next to the event loop).
        if ids and max(ids) >= limits.vocab_size:
            bad = [t for t in ids if t >= limits.vocab_size]
            raise FieldError(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {limits.vocab_size})",
                             "prompt")
    if not ids:
        raise FieldError("the prompt is empty", "prompt")
    if limits.max_prompt_len is not None and len(ids) > limits.max_prompt_len:
        raise FieldError(f"the prompt has {len(ids)} tokens; at most {limits.max_prompt_len} fit a prefill "
                         "worker's KV cache in this deployment", "prompt")
    if len(ids) + params.max_tokens > limits.max_model_len:
        if len(ids) >= limits.max_model_len:
            raise FieldError(f"the prompt has {len(ids)} tokens; at most {limits.max_model_len - 1} fit this "
                             f"deployment (max_model_len {limits.max_model_len})", "prompt")
        raise FieldError(f"the prompt ({len(ids)} tokens) plus max_tokens ({params.max_tokens}) exceeds "
                         f"max_model_len {limits.max_model_len}: lower max_tokens to at most "
                         f"{limits.max_model_len - len(ids)} or shorten the prompt", "max_tokens")
    return RequestSpec(request_id, ids, params)
