"""Field checks of the internal API's requests, shared by the worker services. The router sends only valid
requests; these guard the workers against anything else that reaches their port (a bug, a fuzzer, a caller that
has the secret but not the protocol). Each check raises ValueError with what to fix (the service answers
INVALID_ARGUMENT) and runs before anything reaches the engine loop, so a bad request costs the engine nothing."""

from __future__ import annotations

import math
from typing import Any

from protos import codec

MAX_ID_CHARS = 256  # request ids and worker names
MAX_TENSOR_PARALLEL = 64  # ranks of a worker; more is not a deployment kvrelay makes
MAX_TRANSFER_TIMEOUT_S = 3600.0
DEFAULT_TRANSFER_TIMEOUT_S = 30.0


def identifier(value: str, field: str) -> str:
    """A request id or worker name: non-empty, printable, at most MAX_ID_CHARS characters."""
    if not value:
        raise ValueError(f"{field} is empty: give the {field.replace('_', ' ')}")
    if len(value) > MAX_ID_CHARS or not value.isprintable():
        raise ValueError(f"{field} must be at most {MAX_ID_CHARS} printable characters, got {len(value)} "
                         f"characters{'' if value.isprintable() else ' with unprintable ones'}")
    return value


def tensor_parallel_size(n: int, field: str) -> int:
    if not 1 <= n <= MAX_TENSOR_PARALLEL:
        raise ValueError(f"{field} must be in [1, {MAX_TENSOR_PARALLEL}], got {n}")
    return n


def prompt(ids: Any, vocab_size: int, max_model_len: int) -> list[int]:
    """The prompt's token ids: non-empty, shorter than max_model_len, inside the vocabulary. The length is
    checked first, so an oversized message is refused without a pass over it."""
    if not len(ids):
        raise ValueError("prompt_token_ids is empty: send the tokenized prompt")
    if len(ids) >= max_model_len:
        raise ValueError(f"prompt_token_ids has {len(ids)} tokens; at most {max_model_len - 1} fit "
                         f"max_model_len {max_model_len}")
    out = list(ids)
    bad = [t for t in out if t >= vocab_size]
    if bad:
        raise ValueError(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {vocab_size})")
    return out


def sampling(msg: Any, vocab_size: int) -> dict[str, Any]:
    """`engine.SamplingParams` keyword arguments (which validate the rest), with the vocabulary-bound fields
    checked here: the engine alone does not know they came from outside."""
    kw = codec.sampling_kwargs(msg)
    bad = [t for t in kw["stop_token_ids"] if t >= vocab_size]
    if bad:
        raise ValueError(f"stop_token_ids {bad[:5]} are outside the vocabulary [0, {vocab_size})")
    if kw["top_k"] > vocab_size:
        raise ValueError(f"top_k must be at most the vocabulary size {vocab_size} (0 disables it), got {kw['top_k']}")
    return kw


def transfer_timeout(seconds: float) -> float:
    """0 (unset) means the default; otherwise a finite number of seconds in (0, MAX_TRANSFER_TIMEOUT_S]."""
    if seconds == 0:
        return DEFAULT_TRANSFER_TIMEOUT_S
    if not (math.isfinite(seconds) and 0 < seconds <= MAX_TRANSFER_TIMEOUT_S):
        raise ValueError(f"transfer_timeout_s must be in (0, {MAX_TRANSFER_TIMEOUT_S:.0f}] seconds (0 = default "
                         f"{DEFAULT_TRANSFER_TIMEOUT_S:.0f}), got {seconds}")
    return seconds


def channel_addresses(channels: Any, decode_tp: int, prefill_tp: int) -> list[dict[int, tuple[str, int]]]:
    """`ConnectRequest.channels` as addresses[decode rank][prefill rank] = (host, port); every rank in range,
    every pair at most once, hosts non-empty and ports in [1, 65535]."""
    addresses: list[dict[int, tuple[str, int]]] = [{} for _ in range(decode_tp)]
    for c in channels:
        if c.decode_rank >= decode_tp:
            raise ValueError(f"channel for decode rank {c.decode_rank} of a group of {decode_tp} ranks")
        if c.prefill_rank >= prefill_tp:
            raise ValueError(f"channel for prefill rank {c.prefill_rank} of a worker of {prefill_tp} ranks")
        if c.prefill_rank in addresses[c.decode_rank]:
            raise ValueError(f"two channels for (decode rank {c.decode_rank}, prefill rank {c.prefill_rank})")
        if not c.host or len(c.host) > 255 or not c.host.isprintable():
            raise ValueError(f"channel host must be a host name or address, got {c.host[:64]!r}")
        if not 1 <= c.port <= 65535:
            raise ValueError(f"channel port must be in [1, 65535], got {c.port}")
        addresses[c.decode_rank][c.prefill_rank] = (c.host, c.port)
    return addresses
