"""Continuous batching policy (pure Python).

Each step shares one token budget between running requests (decodes, or the next chunk of a long prompt) and
waiting ones (new prompts, or preempted requests being recomputed). Running requests go first, oldest first; when
the pool cannot give a running request its next block, the newest running request is preempted (its blocks freed,
recomputed later) until it can. New requests are admitted first-come first-served while blocks and budget last,
and not at all in a step that had to preempt. The `SchedulerOutput` (a diff against the runner's persistent batch)
is the only thing the runner sees.

Scheduling a row commits it at once: the request's computed tokens advance and a sampled token becomes a
placeholder, so the next step can be scheduled before this one is collected (async scheduling). `update` then
resolves the placeholders in step order. A request that finishes while a step computing it is still in flight
keeps its blocks and its batch slot until that step is collected, so no in-flight step writes into blocks that
someone else owns. Preemption frees blocks at once, so the engine collects every step in flight before a step
that may preempt (see `may_preempt`). Work per step is O(rows scheduled), never O(blocks held).
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Iterable

from engine.config import CacheConfig, SchedulerConfig
from engine.kv_cache.block_manager import BlockManager, cdiv
from engine.kv_connector import RemoteReservation, SchedulerConnector
from engine.scheduler_output import NewRequest, SchedulerOutput
from engine.sequence import PLACEHOLDER, Sequence, SequenceStatus

# A persistent batch has twice the seats: requests that finished while a step computing them is in flight keep
# their slot until it is collected, while new requests already take seats.
SLOTS_PER_SEAT = 2


class Scheduler:
    """Mutates: the waiting and running queues, sequences' state, the block manager and the slot free list."""

    def __init__(
        self, config: SchedulerConfig, cache: CacheConfig, num_blocks: int, eos_token_ids: Iterable[int] = (),
        tp_size: int = 1,
    ) -> None:
        self.config = config
        self.eos_token_ids = frozenset(eos_token_ids)
        self.block_size = cache.block_size
        self.blocks = BlockManager(num_blocks, cache.block_size, cache.enable_prefix_caching)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.seqs: dict[str, Sequence] = {}
        self.kv = SchedulerConnector(cache.block_size, tp_size)  # reservations, readiness, what steps send
        self.num_preemptions = 0
        self.num_slots = config.max_num_seqs * SLOTS_PER_SEAT
        self._free_slots = list(range(self.num_slots - 1, -1, -1))  # pop() hands out slot 0 first
        self._inflight: deque[tuple[SchedulerOutput, list[Sequence]]] = deque()
        self._rng = random.Random()
        self._max_seq_len = min(config.max_model_len, num_blocks * cache.block_size)
        self._last_pure_decode = False

    # ---- intake -------------------------------------------------------------------------------------------
    @property
    def max_seq_len(self) -> int:
        """Longest total length a request may reach: the model limit and the whole pool bound it."""
        return self._max_seq_len

    def _check_new(self, seq: Sequence) -> None:
        if seq.request_id in self.seqs:
            raise ValueError(f"request id {seq.request_id!r} is already in use")
        limit = self.max_seq_len
        if seq.num_prompt_tokens >= limit:
            raise ValueError(
                f"request {seq.request_id!r}: prompt has {seq.num_prompt_tokens} tokens; at most {limit - 1} fit "
                f"(max_model_len {self.config.max_model_len}, KV pool {self.blocks.pool.num_blocks} blocks of "
                f"{self.block_size})"
            )
        seq.noise_seed = seq.params.seed if seq.params.seed is not None else self._rng.getrandbits(62)

    def add(self, seq: Sequence) -> None:
        self._check_new(seq)
        self.seqs[seq.request_id] = seq
        self.waiting.append(seq)

    @property
    def remote(self) -> dict[str, Sequence]:
        """Requests whose prompt KV is reserved here, being computed by a prefill worker."""
        return self.kv.reserved

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self.remote or self._inflight)

    @property
    def num_inflight_steps(self) -> int:
        return len(self._inflight)

    # ---- remote prefill (decode side) ---------------------------------------------------------------------
    def reserve_remote(self, seq: Sequence) -> RemoteReservation | None:
        """Reserve blocks for a prompt another worker will prefill, sharing the prefix this pool's cache holds;
        None when blocks or seats are short now (see SchedulerConnector.reserve)."""
        self._check_new(seq)
        if len(self.running) + len(self.remote) >= self.config.max_num_seqs:
            return None
        reservation = self.kv.reserve(seq, self.blocks, len(self.running), bool(self.waiting))
        if reservation is not None:
            self.seqs[seq.request_id] = seq
        return reservation

    def admit_remote(self, request_id: str, first_token: int) -> Sequence:
        """The prompt's KV has landed and its first token is known: decode it from the next step."""
        seq = self.kv.take(request_id)
        seq.num_computed_tokens = seq.num_prompt_tokens
        self.blocks.cache_full_blocks(seq)
        seq.append_token(first_token)
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)
        reason = self._token_stop(seq, first_token, 0)
        if reason is not None:
            self.finish(request_id, reason)
        return seq

    # ---- one step -----------------------------------------------------------------------------------------
    def may_preempt(self) -> bool:
        """Whether the next `schedule` could have to preempt: running rows need at most one block each, plus, while
        any running request is still mid-prompt (the last step had a chunk), one per block of budget. O(1),
        conservative; the engine drains steps in flight first when it says so."""
        need = len(self.running)
        if not self._last_pure_decode:
            need += cdiv(self.config.max_num_batched_tokens, self.block_size)
        return self.blocks.num_free_blocks < need

    def _can_step(self, seq: Sequence) -> bool:
        """Whether a running request has work to schedule now. With steps in flight, a request whose sampled
        tokens already reach its limits, or whose prompt is complete and goes elsewhere, waits for collection."""
        if seq.num_placeholders == 0:
            return True
        n = len(seq.token_ids)
        outputs = n - seq.num_prompt_tokens
        if seq.transfer is not None and outputs > 0:
            return False
        return outputs < seq.params.max_tokens and n < self._max_seq_len

    def _commit(self, out: SchedulerOutput, seq: Sequence, n: int) -> None:
        """Add a row computing tokens [computed, computed + n) of `seq` and advance the sequence past them."""
        if seq.slot < 0:
            seq.slot = self._free_slots.pop()
            seq.num_sent_blocks = 0
            out.new_requests.append(NewRequest(seq.request_id, seq.slot, seq.params, seq.noise_seed))
        table = seq.block_table
        if seq.num_sent_blocks < len(table):
            out.new_blocks.append((seq.slot, seq.num_sent_blocks, table[seq.num_sent_blocks:]))
            seq.num_sent_blocks = len(table)
        start = seq.num_computed_tokens
        end = start + n
        tokens = seq.token_ids
        sample = end == len(tokens)
        out.request_ids.append(seq.request_id)
        out.slots.append(seq.slot)
        out.starts.append(start)
        out.num_tokens.append(n)
        if n == 1:
            out.token_ids.append(tokens[start])
        else:
            out.token_ids.extend(tokens[start:end])
        seq.num_computed_tokens = end
        seq.inflight += 1
        if seq.transfer is not None and start < seq.num_prompt_tokens:
            self.kv.plan_chunk(out, seq, end)
        if sample:
            index = end - seq.num_prompt_tokens + seq.params.output_offset  # a migrated request continues
            out.output_index.append(index)
            tokens.append(PLACEHOLDER)
            seq.num_placeholders += 1
        else:
            out.output_index.append(-1)

    def _preempt(self, seq: Sequence) -> None:
        if self._inflight:
            raise RuntimeError("preemption with steps in flight: collect them first (see may_preempt)")
        self._release(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        rows: list[Sequence] = []
        budget = self.config.max_num_batched_tokens
        i = 0
        bs = self.block_size
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            if seq.num_placeholders and not self._can_step(seq):
                i += 1
                continue
            n = len(seq.token_ids) - seq.num_computed_tokens
            if n > budget:
                n = budget
            # The common case, a decode whose token fits its last block, needs no allocation.
            while seq.num_computed_tokens + n > len(seq.block_table) * bs and not self.blocks.allocate(seq, n):
                victim = self.running.pop()
                self._preempt(victim)
                out.preempted.append(victim.request_id)
                if victim is seq:
                    break
            else:
                self._commit(out, seq, n)
                rows.append(seq)
                budget -= n
                i += 1
        if not out.preempted:
            while self.waiting and budget > 0 and len(self.running) + len(self.remote) < self.config.max_num_seqs:
                seq = self.waiting[0]
                prefix = self.blocks.find_cached_prefix(seq)
                n = seq.num_tokens - len(prefix) * self.block_size
                if n > budget:
                    if not self.config.enable_chunked_prefill:
                        break
                    n = budget
                if not self.blocks.allocate(seq, n, prefix):
                    break
                self.waiting.popleft()
                if not seq.admitted:  # count prefix hits once per request, not again after a preemption
                    seq.admitted = True
                    seq.num_cached_tokens = seq.num_computed_tokens
                    self.blocks.record_prefix_query(seq.num_prompt_tokens, seq.num_cached_tokens)
                seq.status = SequenceStatus.RUNNING
                self.running.append(seq)
                self._commit(out, seq, n)
                rows.append(seq)
                budget -= n
        if rows:
            self._inflight.append((out, rows))
        # Only prefill chunks grow by more than a block a step; a step of decodes alone is followed by decodes and
        # new admissions (which never preempt), and by requests landed from elsewhere (decodes too).
        self._last_pure_decode = len(out.token_ids) == len(out.request_ids)
        return out

    def update(self, out: SchedulerOutput, sampled: list[int]) -> list[Sequence]:
        """Collect the oldest step in flight: `sampled` holds the tokens of its sampling rows (output_index >= 0),
        in row order. Resolves placeholders, finishes what hit EOS, a stop id or a length limit, and hands back the
        blocks and slots of requests that finished while the step ran.

        Returns the sequences that got a new token (finished ones included, with `finish_reason` set).
        """
        step, rows = self._inflight.popleft()
        if step is not out:
            raise RuntimeError("steps must be collected in the order they were scheduled")
        changed = []
        k = 0
        finished = SequenceStatus.FINISHED
        cache = self.blocks.cache_full_blocks
        for seq, index in zip(rows, out.output_index):
            seq.inflight -= 1
            if index >= 0:
                token = sampled[k]
                k += 1
            if seq.status is finished:  # aborted or stopped while the step ran
                if seq.release_pending and seq.inflight == 0:
                    self._release(seq)
                continue
            if index < 0:
                cache(seq)
                continue
            seq.resolve(token)
            cache(seq)
            changed.append(seq)
            reason = self._token_stop(seq, token, index - seq.params.output_offset)  # this engine's output
            if reason is not None:
                self.finish(seq.request_id, reason)
        return changed

    def _token_stop(self, seq: Sequence, token: int, index: int) -> str | None:
        """Why the request ends at its output `index` being `token`, if it does."""
        p = seq.params
        if token in p.stop_token_ids or (not p.ignore_eos and token in self.eos_token_ids):
            return "stop"
        if index + 1 >= p.max_tokens or seq.num_prompt_tokens + index + 1 >= self._max_seq_len:
            return "length"
        return None

    def _release(self, seq: Sequence) -> None:
        """Give back the sequence's blocks and its batch slot."""
        self.blocks.free(seq)
        if seq.slot >= 0:
            self._free_slots.append(seq.slot)
            seq.slot = -1
        seq.num_sent_blocks = 0
        seq.release_pending = False

    def finish(self, request_id: str, reason: str) -> Sequence | None:
        """End a request (stop, length or abort) and free its blocks, or, while a step computing it is in flight,
        once that step is collected. Unknown or finished ids are ignored."""
        seq = self.seqs.pop(request_id, None)
        if seq is None:
            return None
        if self.kv.reserved.pop(request_id, None) is not None:
            pass
        elif seq.status == SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        if seq.inflight > 0:
            seq.release_pending = True
        else:
            self._release(seq)
        return seq
