"""Send one request through the client SDK and time its stream."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from bench.load.records import RequestRecord
from bench.load.workloads import RequestSpec


def error_code(exc: BaseException) -> str:
    """KvrelayError's gRPC status name; anything else the client raised becomes CLIENT_<ExceptionType>.

    Duck-typed on a string `code` attribute so fakes in tests need not import the SDK (grpc's own errors have a
    `code()` method instead, and the SDK never lets them out)."""
    code = getattr(exc, "code", None)
    return code if isinstance(code, str) else f"CLIENT_{type(exc).__name__}"


def _tokens_in(chunk: Any) -> int:
    """Tokens a chunk brought: the SDK's chunks carry their ids, an OpenAI SSE event a count."""
    n = getattr(chunk, "num_tokens", None)
    return n if isinstance(n, int) else len(chunk.token_ids)


async def measure_request(client: Any, spec: RequestSpec, index: int, run_t0: float, sampling: dict[str, Any],
                          timeout: float | None = None, start: float | None = None) -> RequestRecord:
    """Stream `spec` on `client` (an `AsyncClient`), recording when each token-carrying chunk arrived.

    `start`: the perf_counter time the request was released (the closed loop's decision to send it), so that a
    run's duration bound and the record agree; default now. Never raises for a failed request: the failure is in
    the record's error fields. Cancellation propagates (and cancels the call, so the server frees the request)."""
    start = time.perf_counter() if start is None else start
    rec = RequestRecord(index=index, start_s=start - run_t0, prompt_len=spec.prompt_len, output_len=spec.output_len,
                        group=spec.group)
    try:
        stream = client.stream(spec.prompt, timeout=timeout, max_tokens=spec.output_len, **sampling)
    except Exception as e:  # the SDK refused the request before sending it (e.g. a bad parameter)
        rec.error_code, rec.error_details, rec.end_s = error_code(e), str(e), time.perf_counter() - start
        return rec
    try:
        async for chunk in stream:
            n = _tokens_in(chunk)
            if n:  # a chunk may carry only text held back from an earlier token: not a token arrival
                rec.chunk_times_s.append(time.perf_counter() - start)
                rec.chunk_tokens.append(n)
    except asyncio.CancelledError:
        await stream.cancel()
        raise
    except Exception as e:  # every failure is counted by its code, never hidden or fatal
        rec.error_code, rec.error_details = error_code(e), str(e)
    rec.end_s = time.perf_counter() - start
    final = stream.final
    if rec.ok and final is None:
        rec.error_code, rec.error_details = "NO_FINAL", "the stream ended without its final message"
    elif rec.ok and not rec.chunk_times_s:
        rec.error_code, rec.error_details = "NO_TOKENS", "the stream ended without a token, so it has no TTFT"
    if final is not None:
        u, t = final.usage, final.timings
        rec.request_id, rec.finish_reason = final.request_id, final.finish_reason
        rec.prompt_tokens, rec.completion_tokens = u.prompt_tokens, u.completion_tokens
        rec.cached_prompt_tokens = u.cached_prompt_tokens
        if t is not None:  # an OpenAI server has none
            rec.server_timings_ms = {"queued": t.queued_ms, "first_token": t.first_token_ms,
                                     "kv_landed": t.kv_landed_ms, "total": t.total_ms}
        if rec.chunk_tokens and u.completion_tokens > rec.output_tokens:
            # SSE events carry text, counted one token each; the usage says how many really came with them.
            rec.chunk_tokens[-1] += u.completion_tokens - rec.output_tokens
    return rec
