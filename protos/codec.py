"""Field-level conversions shared by the boundary modules (router, workers): sampling parameters and logprobs
between protobuf messages and plain Python values. Kept free of engine imports (it returns keyword arguments)."""

from __future__ import annotations

from typing import Any

from protos import generation_pb2 as pb
from protos import worker_pb2 as wpb

# (name, default) of every SamplingParams field; the defaults are the engine's (engine.sampling_params).
SAMPLING_DEFAULTS: dict[str, Any] = dict(max_tokens=16, temperature=1.0, top_k=0, top_p=1.0, seed=None, stop=(),
                                         stop_token_ids=(), ignore_eos=False, logprobs=None,
                                         skip_special_tokens=True)
_OPTIONAL = ("max_tokens", "temperature", "top_k", "top_p", "seed", "logprobs", "skip_special_tokens")

# How a draining worker's UNAVAILABLE refusal ends ("prefill worker p0 is draining"): the router tells a worker
# scaling down from a failed one by it, so the refusal neither counts as a failure nor marks the worker unhealthy.
DRAINING = "is draining"


def sampling_kwargs(msg: pb.SamplingParams) -> dict[str, Any]:
    """Keyword arguments for `engine.SamplingParams`: unset optional fields take the defaults."""
    kw = {name: getattr(msg, name) if msg.HasField(name) else SAMPLING_DEFAULTS[name] for name in _OPTIONAL}
    kw.update(stop=tuple(msg.stop), stop_token_ids=tuple(msg.stop_token_ids), ignore_eos=msg.ignore_eos)
    return kw


def sampling_message(params: Any, drop_stop: bool = False) -> pb.SamplingParams:
    """A message with every field of `params` (an `engine.SamplingParams`) set explicitly."""
    msg = pb.SamplingParams(max_tokens=params.max_tokens, temperature=params.temperature, top_k=params.top_k,
                            top_p=params.top_p, stop_token_ids=params.stop_token_ids, ignore_eos=params.ignore_eos,
                            skip_special_tokens=params.skip_special_tokens)
    if not drop_stop:
        msg.stop.extend(params.stop)
    if params.seed is not None:
        msg.seed = params.seed
    if params.logprobs is not None:
        msg.logprobs = params.logprobs
    return msg


def logprob_message(logprob: float, top: list[tuple[int, float]]) -> pb.TokenLogprob:
    return pb.TokenLogprob(logprob=logprob, top_token_ids=[t for t, _ in top], top_logprobs=[p for _, p in top])


def logprob_fields(msg: pb.TokenLogprob) -> tuple[float, list[tuple[int, float]]]:
    return msg.logprob, list(zip(msg.top_token_ids, msg.top_logprobs))


def one_line(error: object, limit: int = 300) -> str:
    """An error as one line for a peer or a client: tracebacks belong in the log only. Of a traceback, the words
    before it and its last line (the exception) are kept; whitespace collapses; long text is cut at `limit`."""
    text = str(error)
    head, sep, tb = text.partition("Traceback (most recent call last):")
    if sep:
        last = next((ln for ln in reversed(tb.splitlines()) if ln.strip()), "")
        text = f"{head.strip()} {last.strip()}"
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def load_message(fields: dict[str, Any]) -> wpb.WorkerLoad:
    """A worker's load (worker_runtime.health.load_fields) as its message."""
    return wpb.WorkerLoad(**{**fields, "kv_layout": layout_message(fields["kv_layout"])})


def layout_message(layout: dict[str, Any]) -> wpb.KVLayout:
    """A KV layout (the fields of engine.config.KVLayout, as a dict) as its message."""
    return wpb.KVLayout(**layout)


def layout_fields(msg: wpb.KVLayout) -> dict[str, Any]:
    """The fields of engine.config.KVLayout from its message."""
    return {f.name: getattr(msg, f.name) for f in msg.DESCRIPTOR.fields}
