"""The life of a request across the workers (ARCHITECTURE.md "Life of a request", steps 2-6).

Disaggregated: pick a prefill worker (cached prefix, then load) -> reserve KV blocks on a decode group (most free
blocks first; wait in line when none has room) -> prefill there, KV streamed layer by layer into the reserved
blocks -> the first token goes to the client and to the decode group -> decode streams the rest. Without prefill
workers the decode groups are aggregated engines: a request runs whole on one (cached prefix, then load). The
router detokenizes and applies stop strings (workers stream token ids only). Whatever ends a request (finish, stop
string, error, client cancel or deadline), the `finally`s cancel the worker calls still open, which frees its
blocks everywhere.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import AsyncIterator

from engine.tokenizer import Tokenizer
from router.admission import WaitingRoom
from router.client_stream import Chunk, ClientStream, Final, relay
from router.config import RouterConfig
from router.errors import (
    INVALID_ARGUMENT,
    UNAVAILABLE,
    RequestError,
)
from router.metrics import RouterMetrics
from router.migration import Attempts, continuation
from router.placement import Placement, Placer
from router.policy import RoutingPolicy
from router.prefix_index import block_hashes
from router.requests import RequestSpec
from router.worker_api import DecodeClient, PrefillClient, PrefillOutcome, WorkerError
from router.workers import Worker, WorkerPool

log = logging.getLogger("kvrelay.router")
# The first retry of a failed prefill waits this long, each later one twice as long (at most 2 s).
RETRY_BACKOFF_S = 0.25

__all__ = ["Chunk", "Final", "Orchestrator"]


class PrefillDraining(Exception):
    """The prefill worker refused the prompt because it is scaling down: placed again, no attempt spent."""


class Orchestrator:
    """Mutates: worker views (in-flight counts), prefix indexes, the waiting room and the metrics."""

    def __init__(self, config: RouterConfig, pool: WorkerPool, tokenizer: Tokenizer | None,
                 metrics: RouterMetrics | None = None, kv_bytes_per_token: int = 0,
                 eos_token_ids: tuple[int, ...] = ()) -> None:
        self.config, self.pool, self.tokenizer = config, pool, tokenizer
        self.eos_token_ids = eos_token_ids  # a migrated request whose last token was EOS is finished already
        self.kv_bytes_per_token = kv_bytes_per_token  # of the prompt KV a transfer moves (for the metrics)
        self.policy = RoutingPolicy(config.routing_policy, config.balance_abs_threshold)
        self.room = WaitingRoom(config.max_queued_requests)
        self.metrics = metrics or RouterMetrics()
        self._ids = itertools.count()
        first = pool.all[0].load
        self.block_size = first.block_size if first is not None else 16
        self.placer = Placer(config, pool, self.policy, self.block_size)

    # ---- one request --------------------------------------------------------------------------------------
    async def generate(self, spec: RequestSpec) -> AsyncIterator[Chunk | Final]:
        """Chunks as tokens come, then one Final. Raises RequestError (nothing more is streamed after it)."""
        rid = f"{spec.request_id}#{next(self._ids)}"  # internal id: unique even when a client id is reused
        out = ClientStream(spec, self.tokenizer)
        hashes = block_hashes(spec.prompt_ids, self.block_size)
        if not self.pool.prefill:
            chunks = self._colocated(rid, spec, hashes, out)
        elif spec.params.max_tokens == 1:
            chunks = self._prefill_only(rid, spec, hashes, out)
        else:
            chunks = self._disaggregated(rid, spec, hashes, out)
        self.metrics.admitted(len(spec.prompt_ids))
        last = 0.0  # when the previous token chunk went out
        try:
            async for c in chunks:
                if c.token_ids:  # counted as streamed, so a request that is cancelled or fails counts its tokens
                    now = time.monotonic()
                    self.metrics.streamed(len(c.token_ids), now - last if last else None)
                    last = now
                yield c
        except RequestError as e:
            self.metrics.failed(e.code)
            raise
        # A cancel (the client left, or the server stopped the request) is counted by the intake, which knows which.
        final = out.final()
        self.metrics.finished(final.finish_reason, final.prompt_tokens, final.cached_prompt_tokens,
                              final.first_token_ms / 1e3 if final.completion_tokens else None,
                              final.queued_ms / 1e3, final.total_ms / 1e3)
        yield final

    async def _prefill_only(self, rid: str, spec: RequestSpec, hashes: list[int],
                            out: ClientStream) -> AsyncIterator[Chunk]:
        """One token: nothing to decode, the prefill worker alone answers."""

        async def pick() -> Worker | None:
            return self.placer.pick_prefill(hashes, len(spec.prompt_ids))

        while True:
            p, queued_s = await self.room.acquire(pick, self.config.queue_timeout_s)
            try:
                outcome = await self._prefill(p, rid, spec, hashes, decode_group="")
                break
            except PrefillDraining:
                continue
        out.queued_ms, out.cached_tokens = queued_s * 1e3, outcome.cached_tokens
        if not out.add(outcome.first_token, outcome.logprob):
            out.finish(outcome.finish_reason)
        if (c := out.chunk()) is not None:
            yield c

    async def _disaggregated(self, rid: str, spec: RequestSpec, hashes: list[int],
                             out: ClientStream) -> AsyncIterator[Chunk]:
        """Place, prefill, stream. A decode group lost mid-stream (or before the KV landed) costs one
        re-placement: the request migrates as prompt + the tokens already streamed (router.migration), is
        prefilled again (prefix caches hold most of it), and the client's stream goes on where it was."""
        attempts = Attempts(self.config.migration_limit)
        cont = spec
        while True:
            placement, outcome, queued_s = await self._place_and_prefill(rid, cont, hashes, attempts)
            if not attempts.used:
                out.queued_ms, out.cached_tokens = queued_s * 1e3, outcome.cached_tokens
                out.decode_cached_tokens = placement.skip_blocks * self.block_size
            try:
                async for c in self._stream(placement, outcome, cont, out):
                    yield c
                return
            except RequestError as e:
                await self._lost(rid, e, out, attempts, placement.decode)
            cont = self._continuation(spec, out)
            if cont is None:
                if (c := out.chunk()) is not None:
                    yield c
                return
            hashes = block_hashes(cont.prompt_ids, self.block_size)

    async def _lost(self, rid: str, e: RequestError, out: ClientStream, attempts: Attempts, group: Worker) -> None:
        """`group` was lost while it streamed the request: re-raise `e` when the request cannot move (it had
        ended, or its attempts are spent), else count the migration and have the group checked, so a dead one is
        routed around from now on."""
        if out.reason is not None:
            raise e
        attempts.take(e)
        log.warning("request %s: %s; migrating with %d tokens streamed", rid, e.message, out.received)
        self.metrics.migrated()
        await self.pool.check(group)

    def _continuation(self, spec: RequestSpec, out: ClientStream) -> RequestSpec | None:
        """The migrated request (prompt + the tokens streamed so far), or None when the lost group had streamed
        its last token already (then `out` is finished)."""
        cont, reason = continuation(spec, list(out.state.token_ids), self.eos_token_ids)
        if reason is not None:
            out.finish(reason)
            return None
        return cont

    async def _stream(self, placement: Placement, outcome: PrefillOutcome, spec: RequestSpec,
                      out: ClientStream) -> AsyncIterator[Chunk]:
        """One placement's tokens: the prefill worker's first, then the decode group's. `spec` may be a migrated
        request's continuation: its outputs are numbered from `output_offset` in the client's stream."""
        d = placement.decode
        try:
            if out.add(outcome.first_token, outcome.logprob):  # a stop string already: nothing to decode
                if (c := out.chunk()) is not None:
                    yield c
                return
            # The first token goes to the client and to the decode group at once: a command on the group's
            # session, not a call to wait for. If the group cannot take it (the reservation timed out, say), the
            # request's stream says so (its abort, or the refusal) and the request migrates.
            placement.stream.set_first_token(outcome.first_token)
            try:
                if (c := out.chunk()) is not None:
                    yield c
                async for c in relay(placement.events, d.name, out, spec.params.output_offset):
                    yield c
                if out.landed_ms:
                    landed = spec.arrival + out.landed_ms / 1e3
                    self.metrics.transferred(landed - placement.prefill_start,
                                             len(spec.prompt_ids) * self.kv_bytes_per_token)
            except RequestError:
                if not out.landed_ms:  # the decode group gave up before the KV landed: the transfer failed
                    self.metrics.transfer_failed()
                raise
        finally:
            placement.stream.cancel()  # no-op once finished; otherwise the decode group frees the blocks now
            d.view.inflight -= 1
            self.room.notify()

    async def _colocated(self, rid: str, spec: RequestSpec, hashes: list[int],
                         out: ClientStream) -> AsyncIterator[Chunk]:
        """No prefill workers: a decode group runs the whole request (an aggregated engine). A group lost
        mid-stream costs one re-placement: the request migrates to another (or the same, restarted) group as
        prompt + the tokens already streamed."""
        attempts = Attempts(self.config.migration_limit)
        cont = spec

        async def seat() -> Worker | None:
            free = [w for w in self.pool.decode if not w.view.draining and
                    w.view.inflight < (w.load.max_num_seqs if w.load else 1)]
            cached = {w.name: w.index.match(hashes) for w in free if w.index is not None}
            view = self.policy.pick_prefill([w.view for w in free], cached)
            if view is None and not any(w.view.healthy for w in self.pool.decode) and \
                    not self.pool.coming_back(self.pool.decode):
                errors = "; ".join(w.error for w in self.pool.decode if w.error)
                raise RequestError(UNAVAILABLE, f"no healthy decode group ({errors})")
            return next((w for w in free if w.view is view), None)

        while True:
            d, queued_s = await self.room.acquire(seat, self.config.queue_timeout_s)
            assert isinstance(d.client, DecodeClient) and d.index is not None
            if not attempts.used:
                out.queued_ms = queued_s * 1e3
            d.index.insert(hashes)
            d.view.inflight += 1
            arid = rid if not attempts.used else f"{rid}.{attempts.used}"  # the old id may still be aborting
            stream = d.client.generate(arid, cont.prompt_ids, cont.params)
            try:
                async for c in relay(stream.__aiter__(), d.name, out, cont.params.output_offset):
                    yield c
                return
            except RequestError as e:
                await self._lost(rid, e, out, attempts, d)
            finally:
                stream.cancel()
                d.view.inflight -= 1
                self.room.notify()
            cont = self._continuation(spec, out)
            if cont is None:
                if (c := out.chunk()) is not None:
                    yield c
                return
            hashes = block_hashes(cont.prompt_ids, self.block_size)

    async def _place_and_prefill(self, rid: str, spec: RequestSpec, hashes: list[int],
                                 attempts: Attempts) -> tuple[Placement, PrefillOutcome, float]:
        """Reserve on a decode group and prefill into it. A prefill that fails for want of its worker (it died,
        or its transfer broke) is retried on a fresh placement, out of the request's `attempts`: the failed
        worker is polled first, so a dead one is routed around, and a live one has its KV channels to that group
        re-wired. Nothing of this attempt has reached the client yet, so a retry is invisible to it."""
        queued = 0.0
        while True:
            arid = rid if not attempts.used else f"{rid}.{attempts.used}"  # the old id may still be aborting
            placement, waited = await self.room.acquire(lambda: self.placer.reserve(arid, spec, hashes),  # noqa: B023
                                                        self.config.queue_timeout_s)
            queued += waited
            placement.prefill_start = time.monotonic()
            try:
                outcome = await self._prefill(placement.prefill, arid, spec, hashes, placement.decode.name,
                                              placement.skip_blocks)
                return placement, outcome, queued
            except BaseException as e:
                placement.stream.cancel()  # frees the reservation on the decode group
                placement.decode.view.inflight -= 1
                self.room.notify()
                if isinstance(e, PrefillDraining):  # not a failure: placed again on another worker
                    continue
                if not isinstance(e, RequestError):
                    raise
                attempts.take(e)
                log.warning("request %s: %s; retrying", rid, e.message)
                self.metrics.retried()
                # A moment before the next attempt, longer each time: a worker that just died may still look
                # healthy (a decode group's rank 0 outlives its rank 1 until a step fails or it is restarted),
                # and retrying into it at once would spend the whole budget on one loss.
                await asyncio.sleep(min(RETRY_BACKOFF_S * 2 ** (attempts.used - 1), 2.0))
                if await self.pool.check(placement.prefill):  # alive: the pair's KV channel may be what broke
                    if await self.pool.check(placement.decode):
                        self.metrics.transfer_failed()
                        await self.pool.rewire(placement.prefill, placement.decode)

    async def _prefill(self, p: Worker, rid: str, spec: RequestSpec, hashes: list[int],
                       decode_group: str, skip_blocks: int = 0) -> PrefillOutcome:
        assert isinstance(p.client, PrefillClient) and p.index is not None
        p.index.insert(hashes)
        p.view.inflight += 1
        p.view.inflight_tokens += len(spec.prompt_ids)
        try:
            return await p.client.prefill(rid, spec.prompt_ids, spec.params, decode_group, skip_blocks)
        except WorkerError as e:
            if e.code == INVALID_ARGUMENT:
                raise RequestError(INVALID_ARGUMENT, e.details) from None
            if e.draining:
                p.view.draining = True
                raise PrefillDraining(e.details) from None
            raise RequestError(UNAVAILABLE, f"prefill on {p.name} failed: {e.details}") from None
        finally:
            p.view.inflight -= 1
            p.view.inflight_tokens -= len(spec.prompt_ids)
            self.room.notify()  # its queue has room again

