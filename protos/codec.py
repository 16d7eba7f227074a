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
# A step or engine call running longer than this means the worker is stuck (no real step takes minutes).
STUCK_S = 300.0
_OPTIONAL = ("max_tokens", "temperature", "top_k", "top_p", "seed", "logprobs", "skip_special_tokens")


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


def load_message(name: str, loop: Any) -> wpb.WorkerLoad:
    """A worker's load from its engine loop's latest stats (`engine.engine_loop.EngineLoop`, duck-typed): no call
    into the loop, so polling never waits behind a step."""
    s, cfg = loop.stats, loop.engine.config
    error = one_line(loop.error) if loop.error else ""
    stuck = loop.stuck_for()
    if not error and stuck > STUCK_S:
        error = f"its engine has been inside one step or call for {stuck:.0f} s (a rank hung?)"
    return wpb.WorkerLoad(name=name, num_blocks=s.num_blocks, free_blocks=s.free_blocks,
                          block_size=cfg.cache.block_size, running=s.running, waiting=s.waiting + s.remote,
                          prefix_cache_hit_rate=s.prefix_cache_hit_rate, healthy=not error, error=error,
                          max_num_seqs=cfg.scheduler.max_num_seqs, num_preemptions=_preemptions(loop.engine),
                          kv_layout=layout_message(_layout_of(cfg)))


def _layout_of(cfg: Any) -> dict[str, Any]:
    from engine.config import KVLayout  # workers only (this module stays importable without the engine)

    return vars(KVLayout.of(cfg)).copy()


def layout_message(layout: dict[str, Any]) -> wpb.KVLayout:
    """A KV layout (the fields of engine.config.KVLayout, as a dict) as its message."""
    return wpb.KVLayout(**layout)


def layout_fields(msg: wpb.KVLayout) -> dict[str, Any]:
    """The fields of engine.config.KVLayout from its message."""
    return {f.name: getattr(msg, f.name) for f in msg.DESCRIPTOR.fields}


def _preemptions(engine: Any) -> int:
    """The scheduler's running count (an int read from another thread: atomic in CPython); 0 for an engine
    without one."""
    return int(getattr(getattr(engine, "scheduler", None), "num_preemptions", 0) or 0)
