"""The life of a request across the workers (ARCHITECTURE.md "Life of a request", steps 2-6).

pick a prefill worker (cached prefix, then load) -> reserve KV blocks on a decode group (most free blocks first;
wait in line when none has room) -> prefill there, KV streamed layer by layer to the reserved blocks -> the first
token goes to the client and to the decode group -> decode streams the rest. The router detokenizes and applies
stop strings (workers stream token ids only). Whatever ends the request (finish, stop string, error, client
cancel or deadline), the `finally` cancels the worker calls still open, which frees the blocks on both sides.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from engine.output_processor import OutputState
from engine.outputs import Logprob
from engine.tokenizer import Tokenizer
from router.admission import WaitingRoom
from router.config import RouterConfig
from router.errors import INVALID_ARGUMENT, RESOURCE_EXHAUSTED, UNAVAILABLE, RequestError
from router.metrics import RouterMetrics
from router.policy import RoutingPolicy
from router.prefix_index import block_hashes
from router.requests import RequestSpec
from router.worker_api import (
    DecodeClient,
    DecodeStream,
    Finished,
    PrefillClient,
    PrefillOutcome,
    Reserved,
    Tokens,
    WorkerError,
)
from router.workers import Worker, WorkerPool

log = logging.getLogger("kvrelay.router")
PREFILL_ATTEMPTS = 2


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


@dataclass
class _Placement:
    request_id: str  # the internal id this attempt used on both workers
    prefill: Worker
    decode: Worker
    stream: DecodeStream
    events: AsyncIterator[Reserved | Tokens | Finished]


class Orchestrator:
    """Mutates: worker views (in-flight counts), prefix indexes, the waiting room and the metrics."""

    def __init__(self, config: RouterConfig, pool: WorkerPool, tokenizer: Tokenizer | None) -> None:
        self.config, self.pool, self.tokenizer = config, pool, tokenizer
        self.policy = RoutingPolicy(config.routing_policy, config.balance_abs_threshold)
        self.room = WaitingRoom(config.max_queued_requests)
        self.metrics = RouterMetrics()
        self._ids = itertools.count()
        self.block_size = pool.prefill[0].load.block_size if pool.prefill[0].load else 16

    # ---- placement ----------------------------------------------------------------------------------------
    def _pick_prefill(self, hashes: list[int]) -> Worker:
        cached = {w.name: w.index.match(hashes) for w in self.pool.prefill if w.index is not None}
        view = self.policy.pick_prefill([w.view for w in self.pool.prefill], cached)
        if view is None:
            errors = "; ".join(w.error for w in self.pool.prefill if w.error)
            raise RequestError(UNAVAILABLE, f"no healthy prefill worker ({errors})")
        return next(w for w in self.pool.prefill if w.view is view)

    async def _reserve(self, rid: str, spec: RequestSpec, hashes: list[int]) -> _Placement | None:
        """One attempt: a prefill worker, and a decode group with room for the prompt's KV; None if none has."""
        p = self._pick_prefill(hashes)
        ranked = self.policy.rank_decode([w.view for w in self.pool.decode])
        if not ranked:
            errors = "; ".join(w.error for w in self.pool.decode if w.error)
            raise RequestError(UNAVAILABLE, f"no healthy decode group ({errors})")
        for view in ranked:
            d = next(w for w in self.pool.decode if w.view is view)
            assert isinstance(d.client, DecodeClient)
            stream = d.client.decode(rid, spec.prompt_ids, spec.params, p.name, p.spec.tensor_parallel_size,
                                     self.config.transfer_timeout_s)
            events = stream.__aiter__()
            try:
                first = await events.__anext__()
            except WorkerError as e:
                if e.code == RESOURCE_EXHAUSTED:
                    d.view.free_blocks = 0  # until the next poll says otherwise
                    continue
                if e.code == INVALID_ARGUMENT:
                    raise RequestError(INVALID_ARGUMENT, e.details) from None
                self.pool.mark_unhealthy(d, f"decode group {d.name}: {e.details}")
                continue
            except StopAsyncIteration:
                continue
            if isinstance(first, Reserved):
                d.view.free_blocks = first.free_blocks
                return _Placement(rid, p, d, stream, events)
            stream.cancel()
        return None

    # ---- one request --------------------------------------------------------------------------------------
    async def generate(self, spec: RequestSpec) -> AsyncIterator[Chunk | Final]:
        """Chunks as tokens come, then one Final. Raises RequestError (nothing more is streamed after it)."""
        try:
            async for item in self._generate(spec):
                yield item
        except RequestError as e:
            self.metrics.failed(e.code)
            raise

    async def _generate(self, spec: RequestSpec) -> AsyncIterator[Chunk | Final]:
        rid = f"{spec.request_id}#{next(self._ids)}"  # internal id: unique even when a client id is reused
        state = OutputState(spec.prompt_ids, spec.params, self.tokenizer)
        hashes = block_hashes(spec.prompt_ids, self.block_size)
        lp_sent = 0

        def chunk(finished: bool) -> Chunk | None:
            nonlocal lp_sent
            tokens, text = state.take(finished)
            if not tokens and not text:
                return None
            lps = state.logprobs[lp_sent:lp_sent + len(tokens)] if state.logprobs is not None else []
            lp_sent += len(lps)
            return Chunk(tokens, text, lps)

        def add(token: int, lp: tuple[float, list[tuple[int, float]]] | None) -> bool:
            return state.add(token, Logprob(token, lp[0], lp[1]) if lp is not None else None)

        if spec.params.max_tokens == 1:  # nothing to decode: the prefill worker alone answers
            p = self._pick_prefill(hashes)
            outcome = await self._prefill(p, rid, spec, hashes, decode_group="")
            ttft = _ms(spec.arrival)
            stopped = add(outcome.first_token, outcome.logprob) | state.flush()
            if (c := chunk(True)) is not None:
                yield c
            yield self._final(spec, state, "stop" if stopped else outcome.finish_reason, outcome.cached_tokens,
                              0.0, ttft, 0.0)
            return

        placement, outcome, queued_s = await self._place_and_prefill(rid, spec, hashes)
        rid, d = placement.request_id, placement.decode
        try:
            ttft, landed = _ms(spec.arrival), 0.0
            if add(outcome.first_token, outcome.logprob):  # a stop string already: no decoding at all
                if (c := chunk(True)) is not None:
                    yield c
                yield self._final(spec, state, "stop", outcome.cached_tokens, queued_s * 1e3, ttft, 0.0)
                return
            assert isinstance(d.client, DecodeClient)
            try:
                await d.client.set_first_token(rid, outcome.first_token)
            except WorkerError as e:
                raise RequestError(UNAVAILABLE, f"decode group {d.name} lost the request: {e.details}") from None
            if (c := chunk(False)) is not None:
                yield c
            received, reason = 1, None
            async for ev in _worker_events(placement.events, d.name):
                if isinstance(ev, Tokens):
                    landed = landed or _ms(spec.arrival)
                    for i, tok in enumerate(ev.token_ids):
                        if ev.start_index + i < received:
                            continue  # the first token, already streamed from the prefill worker
                        received += 1
                        if add(tok, ev.logprobs[i] if ev.logprobs else None):
                            reason = "stop"
                            break
                    if reason is not None:
                        break
                    if (c := chunk(False)) is not None:
                        yield c
                elif isinstance(ev, Finished):
                    if ev.finish_reason == "abort":
                        raise RequestError(UNAVAILABLE, f"decode group {d.name} aborted the request: "
                                           f"{ev.error or 'no reason given'}")
                    reason = "stop" if state.flush() else ev.finish_reason
                    break
            if reason is None:
                raise RequestError(UNAVAILABLE, f"decode group {d.name} ended the stream without finishing")
            if (c := chunk(True)) is not None:
                yield c
            yield self._final(spec, state, reason, outcome.cached_tokens, queued_s * 1e3, ttft, landed)
        finally:
            placement.stream.cancel()  # no-op once finished; otherwise the decode group frees the blocks now
            d.view.inflight -= 1
            self.room.notify()

    async def _place_and_prefill(self, rid: str, spec: RequestSpec,
                                 hashes: list[int]) -> tuple[_Placement, PrefillOutcome, float]:
        """Reserve on a decode group and prefill into it. A prefill that fails for want of its worker (it died,
        or its transfer broke) is retried once on a fresh placement, the failed worker checked first so a dead
        one is routed around: nothing has reached the client yet, so a retry is invisible to it."""
        queued = 0.0
        for attempt in range(PREFILL_ATTEMPTS):
            arid = rid if attempt == 0 else f"{rid}.retry{attempt}"  # the old id may still be aborting
            placement, waited = await self.room.acquire(lambda: self._reserve(arid, spec, hashes),  # noqa: B023
                                                        self.config.queue_timeout_s)
            queued += waited
            placement.decode.view.inflight += 1
            try:
                outcome = await self._prefill(placement.prefill, arid, spec, hashes, placement.decode.name)
                return placement, outcome, queued
            except BaseException as e:
                placement.stream.cancel()  # frees the reservation on the decode group
                placement.decode.view.inflight -= 1
                self.room.notify()
                if not (isinstance(e, RequestError) and e.code == UNAVAILABLE) or attempt == PREFILL_ATTEMPTS - 1:
                    raise
                await self.pool.check(placement.prefill)
                log.warning("request %s: %s; retrying", rid, e.message)
        raise AssertionError("unreachable")

    async def _prefill(self, p: Worker, rid: str, spec: RequestSpec, hashes: list[int],
                       decode_group: str) -> PrefillOutcome:
        assert isinstance(p.client, PrefillClient) and p.index is not None
        p.index.insert(hashes)
        p.view.inflight += 1
        try:
            return await p.client.prefill(rid, spec.prompt_ids, spec.params, decode_group)
        except WorkerError as e:
            if e.code == INVALID_ARGUMENT:
                raise RequestError(INVALID_ARGUMENT, e.details) from None
            raise RequestError(UNAVAILABLE, f"prefill on {p.name} failed: {e.details}") from None
        finally:
            p.view.inflight -= 1

    def _final(self, spec: RequestSpec, state: OutputState, reason: str, cached: int, queued_ms: float,
               ttft_ms: float, landed_ms: float) -> Final:
        total = _ms(spec.arrival)
        n = len(state.token_ids)
        self.metrics.finished(reason, len(spec.prompt_ids), cached, n, ttft_ms)
        return Final(spec.request_id, reason, len(spec.prompt_ids), n, cached, queued_ms, ttft_ms, landed_ms, total)


async def _worker_events(events: AsyncIterator, name: str) -> AsyncIterator:
    """The decode stream's events, with a worker failure turned into the client's UNAVAILABLE."""
    try:
        async for ev in events:
            yield ev
    except WorkerError as e:
        raise RequestError(UNAVAILABLE, f"decode group {name} failed: {e.details}") from None


def _ms(since: float) -> float:
    return (time.monotonic() - since) * 1e3
