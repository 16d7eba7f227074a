"""One request's output as its client sees it (pure Python, no gRPC): tokens in, chunks out. Text and stop
strings come from `engine.output_processor.OutputState`; this adds where the request stands (tokens received,
finish reason, usage, timings) and `relay`, which follows a decode group's event stream into it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from engine.output_processor import OutputState
from engine.outputs import Logprob
from engine.tokenizer import Tokenizer
from router.errors import UNAVAILABLE, RequestError
from router.requests import RequestSpec
from router.worker_api import Finished, Tokens, WorkerError

LogprobFields = tuple[float, list[tuple[int, float]]]


@dataclass
class Chunk:
    token_ids: list[int]
    text: str
    logprobs: list[Logprob]


@dataclass
class Final:
    request_id: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    cached_prompt_tokens: int
    queued_ms: float
    first_token_ms: float
    kv_landed_ms: float
    total_ms: float
    decode_cached_prompt_tokens: int = 0  # prompt tokens whose KV the decode group held already (not transferred)


class ClientStream:
    """Mutates: its output state and progress. `reason` is set once the request is finished."""

    def __init__(self, spec: RequestSpec, tokenizer: Tokenizer | None) -> None:
        self.spec = spec
        self.state = OutputState(spec.prompt_ids, spec.params, tokenizer)
        self.received = 0  # completion tokens accounted so far
        self.reason: str | None = None
        self.cached_tokens = 0
        self.decode_cached_tokens = 0  # prompt tokens the decode group held already (disaggregated requests)
        self.queued_ms = self.first_token_ms = self.landed_ms = 0.0
        self._lp_sent = 0

    def ms(self) -> float:
        """Milliseconds since the router received the request."""
        return (time.monotonic() - self.spec.arrival) * 1e3

    def add(self, token: int, lp: LogprobFields | None) -> bool:
        """Account the next completion token; True when it completed a stop string (the request is over)."""
        self.received += 1
        if not self.first_token_ms:
            self.first_token_ms = self.ms()
        if self.state.add(token, Logprob(token, lp[0], lp[1]) if lp is not None else None):
            self.reason = "stop"
            return True
        return False

    def finish(self, reason: str) -> None:
        """The worker ended the request: release held-back text (which may complete a stop string)."""
        self.reason = "stop" if self.state.flush() else reason

    def chunk(self) -> Chunk | None:
        """What to stream now (everything, once finished); None when there is nothing new."""
        tokens, text = self.state.take(self.reason is not None)
        if not tokens and not text:
            return None
        lps = self.state.logprobs[self._lp_sent:self._lp_sent + len(tokens)] if self.state.logprobs is not None \
            else []
        self._lp_sent += len(lps)
        return Chunk(tokens, text, lps)

    def final(self) -> Final:
        assert self.reason is not None
        return Final(self.spec.request_id, self.reason, len(self.spec.prompt_ids), len(self.state.token_ids),
                     self.cached_tokens, self.queued_ms, self.first_token_ms, self.landed_ms, self.ms(),
                     self.decode_cached_tokens)


async def relay(events: AsyncIterator[Tokens | Finished], group: str, out: ClientStream,
                offset: int = 0) -> AsyncIterator[Chunk]:
    """Follow a decode group's events into `out` until the request is finished (by the group, or by a stop
    string here: the caller then cancels the call). Tokens `out` already has (the first one, from the prefill
    worker) are skipped. A failed or aborted stream is the client's UNAVAILABLE. `offset`: the group's output 0
    is the client's output `offset` (a migrated request continues after the tokens it had streamed).

    Reading runs ahead of the client: a task feeds `out` while the previous chunk is being written, and the next
    chunk carries everything that came meanwhile. Under load (a slow client, a busy loop) a chunk carries several
    tokens and the client costs one write per chunk, not per token; when idle, each token goes out as it comes."""
    ready = asyncio.Event()
    reader = asyncio.ensure_future(_read(events, group, out, ready, offset))
    try:
        while True:
            await ready.wait()
            ready.clear()
            while (c := out.chunk()) is not None:  # what came while a chunk was written goes out next
                yield c
            if out.reason is not None:
                return
            if reader.done():
                reader.result()  # raises why the stream ended
                raise RequestError(UNAVAILABLE, f"decode group {group} ended the stream without finishing the "
                                   "request")
    finally:
        reader.cancel()
        if reader.done() and not reader.cancelled():
            reader.exception()  # retrieved: a failure after the client left is no one's to report


async def _read(events: AsyncIterator[Tokens | Finished], group: str, out: ClientStream,
                ready: asyncio.Event, offset: int) -> None:
    """Account each event into `out` and wake the writer; ends when the request is finished or the stream
    ends (the writer then sees why)."""
    try:
        async for ev in events:
            if isinstance(ev, Tokens):
                out.landed_ms = out.landed_ms or out.ms()
                lp_off = len(ev.token_ids) - len(ev.logprobs)  # logprobs cover the last tokens (not the first)
                for i, tok in enumerate(ev.token_ids):
                    lp = ev.logprobs[i - lp_off] if ev.logprobs and i >= lp_off else None
                    if offset + ev.start_index + i >= out.received and out.add(tok, lp):
                        break
            elif isinstance(ev, Finished):
                if ev.finish_reason == "abort":
                    raise RequestError(UNAVAILABLE, f"decode group {group} aborted the request: "
                                       f"{ev.error or 'no reason given'}")
                out.cached_tokens = out.cached_tokens or ev.cached_prompt_tokens
                out.finish(ev.finish_reason)
            ready.set()
            if out.reason is not None:
                return
    except WorkerError as e:
        raise RequestError(UNAVAILABLE, f"decode group {group} failed: {e.details}") from None
    finally:
        ready.set()
