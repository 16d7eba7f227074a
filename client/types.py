"""What the client SDK returns: plain dataclasses (no protobuf leaks past `client.convert`)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TokenLogprob:
    logprob: float  # log p(token) under the model's unmodified distribution
    top: list[tuple[int, float]] = field(default_factory=list)  # (token id, logprob), most likely first


@dataclass
class Chunk:
    """Tokens decoded since the previous chunk, and the text they complete."""

    token_ids: list[int]
    text: str
    logprobs: list[TokenLogprob] = field(default_factory=list)  # one per token, when logprobs was asked for

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_prompt_tokens: int  # prompt tokens served from the prefill side's prefix cache
    decode_cached_prompt_tokens: int = 0  # prompt tokens whose KV the decode group held already (not transferred)


@dataclass
class Timings:
    """Server-side, in milliseconds from the router receiving the request."""

    queued_ms: float
    first_token_ms: float
    kv_landed_ms: float
    total_ms: float


@dataclass
class Final:
    request_id: str
    finish_reason: str  # "stop" | "length" | "abort"
    usage: Usage
    timings: Timings


@dataclass
class Completion:
    request_id: str
    text: str
    token_ids: list[int]
    finish_reason: str
    usage: Usage
    timings: Timings
    logprobs: list[TokenLogprob] | None = None

    @classmethod
    def from_stream(cls, chunks: list[Chunk], final: Final) -> Completion:
        lps = [lp for c in chunks for lp in c.logprobs]
        return cls(request_id=final.request_id, text="".join(c.text for c in chunks),
                   token_ids=[t for c in chunks for t in c.token_ids], finish_reason=final.finish_reason,
                   usage=final.usage, timings=final.timings, logprobs=lps or None)


@dataclass
class ModelInfo:
    model: str
    architecture: str
    vocab_size: int
    max_model_len: int
    has_tokenizer: bool
    prefill_workers: int
    decode_groups: int
    decode_tensor_parallel_size: int
