"""Where a request's work goes (ARCHITECTURE.md "Life of a request", step 2): a prefill worker with room in its
queue (cached prefix, then load), and a decode group that reserves KV blocks for the prompt (prefix held, then free
blocks, then load), tried in order. A placement counts on a group the moment it is chosen, so concurrent ones see
it; the group's answer then says how many blocks it really has left.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

from router.config import RouterConfig
from router.errors import FAILED_PRECONDITION, INVALID_ARGUMENT, RESOURCE_EXHAUSTED, UNAVAILABLE, RequestError
from router.policy import RoutingPolicy
from router.requests import RequestSpec
from router.worker_api import DecodeClient, DecodeStream, Finished, Reserved, Tokens, WorkerError
from router.workers import Worker, WorkerPool

log = logging.getLogger("kvrelay.router")
# A decode group answers a reservation in milliseconds; one that does not within this is treated as down.
RESERVE_TIMEOUT_S = 10.0


@dataclass
class Placement:
    request_id: str  # the internal id this attempt used on both workers
    prefill: Worker
    decode: Worker
    stream: DecodeStream
    events: AsyncIterator[Reserved | Tokens | Finished]
    prefill_start: float = 0.0  # time.monotonic() when the prompt went to the prefill worker
    skip_blocks: int = 0  # leading prompt blocks the decode group holds already: the prefill worker skips them


class Placer:
    """Mutates: worker views (in-flight counts, free-block estimates) and decode groups' prefix indexes."""

    def __init__(self, config: RouterConfig, pool: WorkerPool, policy: RoutingPolicy, block_size: int) -> None:
        self.config, self.pool, self.policy, self.block_size = config, pool, policy, block_size

    def pick_prefill(self, hashes: list[int], prompt_len: int) -> Worker | None:
        """A prefill worker with room in its queue (in-flight prompt tokens under the budget, so the prompts it
        holds are a few steps of work and their decode reservations do not wait long), or None when every
        healthy one is full. Raises UNAVAILABLE when none is healthy."""
        healthy = [w for w in self.pool.prefill if w.view.healthy and not w.view.draining]
        if not healthy:
            if self.pool.coming_back(self.pool.prefill):
                return None  # restarting: wait in line for it
            errors = "; ".join(w.error for w in self.pool.prefill if w.error)
            raise RequestError(UNAVAILABLE, f"no healthy prefill worker ({errors})")
        budget = self.config.prefill_inflight_tokens
        room = [w for w in healthy if w.view.inflight_tokens == 0 or w.view.inflight_tokens + prompt_len <= budget]
        cached = {w.name: w.index.match(hashes) for w in room if w.index is not None}
        view = self.policy.pick_prefill([w.view for w in room], cached)
        return next((w for w in room if w.view is view), None)

    async def reserve(self, rid: str, spec: RequestSpec, hashes: list[int]) -> Placement | None:
        """One attempt: a prefill worker, and a decode group with room for the prompt's KV; None if none has."""
        p = self.pick_prefill(hashes, len(spec.prompt_ids))
        if p is None:
            return None
        cached = {w.name: w.index.match(hashes) for w in self.pool.decode if w.index is not None}
        ranked = self.policy.rank_decode([w.view for w in self.pool.decode], cached)
        if not ranked:
            if self.pool.coming_back(self.pool.decode):
                return None  # restarting: wait in line for it
            errors = "; ".join(w.error for w in self.pool.decode if w.error)
            raise RequestError(UNAVAILABLE, f"no healthy decode group ({errors})")
        need = -(-len(spec.prompt_ids) // self.block_size)
        for view in ranked:
            d = next(w for w in self.pool.decode if w.view is view)
            assert isinstance(d.client, DecodeClient)
            # Counted the moment it is chosen, so that concurrent placements see it (a burst spreads over groups);
            # the group's answer then says how many blocks it really has left.
            d.view.inflight += 1
            d.view.free_blocks -= need
            placed, exhausted = False, False
            try:
                stream = d.client.decode(rid, spec.prompt_ids, spec.params, p.name, p.spec.tensor_parallel_size,
                                         self.config.transfer_timeout_s)
                events = stream.__aiter__()
                try:
                    first = await asyncio.wait_for(events.__anext__(), RESERVE_TIMEOUT_S)
                except asyncio.TimeoutError:
                    stream.cancel()
                    self.pool.mark_unhealthy(d, f"decode group {d.name} did not answer a reservation within "
                                                f"{RESERVE_TIMEOUT_S:.0f} s")
                    continue
                except WorkerError as e:
                    if e.draining:  # scaling down: not a failure, the next group is tried
                        d.view.draining = True
                        continue
                    if e.code == RESOURCE_EXHAUSTED:
                        exhausted = True
                        continue
                    if e.code == INVALID_ARGUMENT:
                        raise RequestError(INVALID_ARGUMENT, e.details) from None
                    if e.code == FAILED_PRECONDITION:  # alive, but not wired to this prefill worker: try another
                        log.warning("request %s: %s", rid, e.details)
                        continue
                    self.pool.mark_unhealthy(d, f"decode group {d.name}: {e.details}")
                    continue
                except StopAsyncIteration:
                    continue
                if isinstance(first, Reserved):
                    d.view.free_blocks = first.free_blocks
                    if d.index is not None:  # the group will hold the prompt's full blocks once they land
                        d.index.insert(hashes)
                    placed = True
                    return Placement(rid, p, d, stream, events, skip_blocks=first.num_cached_blocks)
                stream.cancel()
            finally:
                if not placed:
                    d.view.inflight -= 1
                    # full: no room until the next poll says otherwise; else the estimate is given back
                    d.view.free_blocks = 0 if exhausted else d.view.free_blocks + need
        return None
