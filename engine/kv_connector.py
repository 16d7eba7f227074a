"""The scheduler side of the KV connector (pure Python): on a decode engine, the reservations for prompts prefilled
elsewhere (sharing the prefix this pool's cache holds) and when each becomes decodable; on a prefill engine, what
each step sends (`TransferChunk`s). The worker side (kv_transfer: channels, sender, receiver, wire format) carries
it out on every rank and reports back in `TransferEvents`.

A reserved request becomes decodable when (a) every tensor-parallel rank reported its KV landed and (b) its first
token (sampled by the prefill worker) is known. A rank's failure, or the deadline passing first, fails it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from engine.kv_cache.block_manager import BlockManager, cdiv
from engine.scheduler_output import SchedulerOutput, TransferChunk, TransferEvents
from engine.sequence import Sequence


@dataclass(frozen=True)
class RemoteReservation:
    """Blocks reserved for a prompt prefilled elsewhere: `block_ids` covers the whole prompt; its first
    `num_cached_blocks` already hold the prompt's KV here (shared from the prefix cache) and are not sent."""

    block_ids: list[int]
    num_cached_blocks: int
    free_blocks: int = 0  # the engine's free blocks once this reservation was made

    @property
    def missing_blocks(self) -> list[int]:
        """Where the prefill worker's KV goes: the blocks after the shared prefix."""
        return self.block_ids[self.num_cached_blocks:]


@dataclass
class _Pending:
    deadline: float
    landed_ranks: int = 0
    first_token: int | None = None


class SchedulerConnector:
    """Mutates: its reservations and readiness state, reserved sequences' blocks (through the block manager) and
    prefill-only sequences' `transfer_sent`."""

    def __init__(self, block_size: int, tp_size: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.block_size, self.tp_size = block_size, tp_size
        self.clock = clock  # seconds; tests pass their own
        self.reserved: dict[str, Sequence] = {}  # prompt KV reserved here, being computed by a prefill worker
        self.pending: dict[str, _Pending] = {}  # the same requests' readiness (registered once every rank expects)

    # ---- decode side --------------------------------------------------------------------------------------
    def reserve(self, seq: Sequence, blocks: BlockManager, running: int, local_waiting: bool) -> \
            RemoteReservation | None:
        """Reserve blocks for `seq`'s prompt, sharing the longest prefix `blocks`' cache holds (exactly as a local
        prefix hit); None when there is no room now. Local work waiting (new or preempted) goes first, and the
        `running` requests keep a block each to grow into: reservations must not starve them or force
        preemptions on the next step."""
        prefix = blocks.find_cached_prefix(seq)
        n = seq.num_prompt_tokens - len(prefix) * self.block_size
        taken = cdiv(n, self.block_size) + sum(1 for b in prefix if blocks.pool.ref_cnt[b] == 0)
        if local_waiting or taken + running > blocks.num_free_blocks:
            return None
        if not blocks.allocate(seq, n, prefix):
            return None
        seq.admitted = True
        seq.num_cached_tokens = len(prefix) * self.block_size
        blocks.record_prefix_query(seq.num_prompt_tokens, seq.num_cached_tokens)
        self.reserved[seq.request_id] = seq
        return RemoteReservation(list(seq.block_table), len(prefix))

    def await_transfer(self, request_id: str, timeout_s: float) -> None:
        """Every rank now expects the request's KV: it must land, with its first token, within `timeout_s`."""
        self.pending[request_id] = _Pending(deadline=self.clock() + timeout_s)

    def set_first_token(self, request_id: str, token: int) -> None:
        p = self.pending.get(request_id)
        if p is None:
            raise KeyError(f"no remote prefill pending for request {request_id!r}")
        p.first_token = token

    def fold(self, rank_events: list[TransferEvents]) -> tuple[list[tuple[str, int]], dict[str, str]]:
        """Fold one report of every rank. Returns (ready [(request id, first token)], failed {id: error}); checks
        the deadlines too, so call it even with no events."""
        failed: dict[str, str] = {}
        for ev in rank_events:
            for rid in ev.landed:
                if rid in self.pending:
                    self.pending[rid].landed_ranks += 1
            for rid, err in ev.recv_failed.items():
                if rid in self.pending:
                    failed.setdefault(rid, err)
        for rid in failed:
            del self.pending[rid]
        ready = [(rid, p.first_token) for rid, p in self.pending.items()
                 if p.landed_ranks >= self.tp_size and p.first_token is not None]
        for rid, _ in ready:
            del self.pending[rid]
        # Whatever is not ready by its deadline fails: KV still missing, or the first token never came.
        now = self.clock()
        for rid, p in list(self.pending.items()):
            if p.deadline < now:
                failed[rid] = ("KV transfer did not complete within its deadline" if p.landed_ranks < self.tp_size
                               else "the prefill worker's first token did not arrive within the deadline")
                del self.pending[rid]
        return ready, failed

    def take(self, request_id: str) -> Sequence:
        """The reserved sequence, now landed (or ended): no longer a reservation."""
        return self.reserved.pop(request_id)

    def discard(self, request_id: str) -> bool:
        """Forget a request's readiness (aborted); True when it was still awaited."""
        return self.pending.pop(request_id, None) is not None

    # ---- prefill side -------------------------------------------------------------------------------------
    def plan_chunk(self, out: SchedulerOutput, seq: Sequence, end: int) -> None:
        """What the row just added to `out` sends: the blocks its chunk (prompt tokens up to `end`) completes or
        starts, from the first one the decode group does not have yet, layer by layer as the chunk computes. A
        partial last block is sent again with the next chunk, complete."""
        spec = seq.transfer
        assert spec is not None
        final = end >= seq.num_prompt_tokens
        first, last = seq.transfer_sent, cdiv(end, self.block_size)
        if last > first:
            out.transfers[len(out.request_ids) - 1] = TransferChunk(
                spec.peer, seq.block_table[first:last], first - spec.skip_blocks, final)
        seq.transfer_sent = last if final else end // self.block_size
