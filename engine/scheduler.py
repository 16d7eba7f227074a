"""Continuous batching policy (pure Python).

Each step shares one token budget between running requests (decodes, or the next chunk of a long prompt) and
waiting ones (new prompts, or preempted requests being recomputed). Running requests go first, oldest first; when
the pool cannot give a running request its next block, the newest running request is preempted (its blocks freed,
recomputed later) until it can. New requests are admitted first-come first-served while blocks and budget last,
and not at all in a step that had to preempt. The `SchedulerOutput` is the only thing the runner sees.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from engine.config import CacheConfig, SchedulerConfig
from engine.kv_cache.block_manager import BlockManager, cdiv
from engine.sampling_params import SamplingParams
from engine.sequence import Sequence, SequenceStatus


@dataclass(frozen=True)
class ScheduledSeq:
    """One request's work in a step: compute tokens [start, start + len(token_ids)) of it (picklable)."""

    request_id: str
    token_ids: list[int]  # the new tokens whose KV this step computes
    start: int  # position of token_ids[0] == tokens already in the cache
    block_table: list[int]  # covers positions [0, start + len(token_ids))
    sample: bool  # the chunk ends at the sequence's last token: sample the next one
    params: SamplingParams
    num_output_tokens: int  # outputs so far (index of the token to sample; seeds derive from it)
    transfer: dict | None = None  # set in the step that completes a prompt whose KV is sent elsewhere


@dataclass
class SchedulerOutput:
    seqs: list[ScheduledSeq] = field(default_factory=list)
    preempted: list[str] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(len(s.token_ids) for s in self.seqs)

    @property
    def is_empty(self) -> bool:
        return not self.seqs


class Scheduler:
    """Mutates: the waiting and running queues, sequences' state, and the block manager."""

    def __init__(
        self, config: SchedulerConfig, cache: CacheConfig, num_blocks: int, eos_token_ids: Iterable[int] = ()
    ) -> None:
        self.config = config
        self.eos_token_ids = frozenset(eos_token_ids)
        self.block_size = cache.block_size
        self.blocks = BlockManager(num_blocks, cache.block_size, cache.enable_prefix_caching)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.seqs: dict[str, Sequence] = {}
        self.remote: dict[str, Sequence] = {}  # prompt KV reserved here, being computed by a prefill worker
        self.num_preemptions = 0

    # ---- intake -------------------------------------------------------------------------------------------
    @property
    def max_seq_len(self) -> int:
        """Longest total length a request may reach: the model limit and the whole pool bound it."""
        return min(self.config.max_model_len, self.blocks.pool.num_blocks * self.block_size)

    def add(self, seq: Sequence) -> None:
        if seq.request_id in self.seqs:
            raise ValueError(f"request id {seq.request_id!r} is already in use")
        limit = self.max_seq_len
        if seq.num_prompt_tokens >= limit:
            raise ValueError(
                f"request {seq.request_id!r}: prompt has {seq.num_prompt_tokens} tokens; at most {limit - 1} fit "
                f"(max_model_len {self.config.max_model_len}, KV pool {self.blocks.pool.num_blocks} blocks of "
                f"{self.block_size})"
            )
        self.seqs[seq.request_id] = seq
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self.remote)

    # ---- remote prefill (decode side) ---------------------------------------------------------------------
    def reserve_remote(self, seq: Sequence) -> list[int] | None:
        """Reserve blocks for a prompt another worker will prefill; None when blocks or seats are short now."""
        if seq.request_id in self.seqs:
            raise ValueError(f"request id {seq.request_id!r} is already in use")
        if seq.num_prompt_tokens >= self.max_seq_len:
            raise ValueError(f"request {seq.request_id!r}: prompt has {seq.num_prompt_tokens} tokens; at most "
                             f"{self.max_seq_len - 1} fit")
        if len(self.running) + len(self.remote) >= self.config.max_num_seqs:
            return None
        # Local work waiting (new or preempted) goes first, and running requests keep a block each to grow into:
        # remote reservations must not starve them or force preemptions on the next step.
        if self.waiting or cdiv(seq.num_prompt_tokens, self.block_size) + len(self.running) > \
                self.blocks.num_free_blocks:
            return None
        if not self.blocks.allocate(seq, seq.num_prompt_tokens):
            return None
        seq.admitted = True
        self.seqs[seq.request_id] = seq
        self.remote[seq.request_id] = seq
        return list(seq.block_table)

    def admit_remote(self, request_id: str, first_token: int) -> Sequence:
        """The prompt's KV has landed and its first token is known: decode it from the next step."""
        seq = self.remote.pop(request_id)
        seq.num_computed_tokens = seq.num_prompt_tokens
        self.blocks.cache_full_blocks(seq)
        seq.append_token(first_token)
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)
        reason = self._token_stop(seq, first_token)
        if reason is not None:
            self.finish(request_id, reason)
        return seq

    # ---- one step -----------------------------------------------------------------------------------------
    def _scheduled(self, seq: Sequence, n: int) -> ScheduledSeq:
        start = seq.num_computed_tokens
        return ScheduledSeq(
            request_id=seq.request_id,
            token_ids=seq.token_ids[start:start + n],
            start=start,
            block_table=list(seq.block_table[:cdiv(start + n, self.block_size)]),
            sample=start + n == seq.num_tokens,
            params=seq.params,
            num_output_tokens=seq.num_output_tokens,
            transfer=seq.transfer if start + n == seq.num_tokens and seq.num_output_tokens == 0 else None,
        )

    def _preempt(self, seq: Sequence) -> None:
        self.blocks.free(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            while not self.blocks.allocate(seq, n):
                victim = self.running.pop()
                self._preempt(victim)
                out.preempted.append(victim.request_id)
                if victim is seq:
                    break
            else:
                out.seqs.append(self._scheduled(seq, n))
                budget -= n
                i += 1
        if out.preempted:
            return out
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
            out.seqs.append(self._scheduled(seq, n))
            budget -= n
        return out

    def update(self, out: SchedulerOutput, sampled: dict[str, int]) -> list[Sequence]:
        """Apply a finished step: advance computed tokens, append sampled tokens, finish what hit a token limit.

        Returns the sequences that got a new token (finished ones included, with `finish_reason` set).
        """
        changed = []
        for s in out.seqs:
            seq = self.seqs.get(s.request_id)
            if seq is None or seq.is_finished:  # aborted while the step ran
                continue
            seq.num_computed_tokens = s.start + len(s.token_ids)
            self.blocks.cache_full_blocks(seq)
            if s.request_id not in sampled:
                continue
            token = sampled[s.request_id]
            seq.append_token(token)
            changed.append(seq)
            reason = self._token_stop(seq, token)
            if reason is not None:
                self.finish(seq.request_id, reason)
        return changed

    def _token_stop(self, seq: Sequence, token: int) -> str | None:
        p = seq.params
        if token in p.stop_token_ids or (not p.ignore_eos and token in self.eos_token_ids):
            return "stop"
        if seq.num_output_tokens >= p.max_tokens or seq.num_tokens >= self.max_seq_len:
            return "length"
        return None

    def finish(self, request_id: str, reason: str) -> Sequence | None:
        """End a request (stop, length or abort) and free its blocks. Unknown or finished ids are ignored."""
        seq = self.seqs.pop(request_id, None)
        if seq is None:
            return None
        if self.remote.pop(request_id, None) is not None:
            pass
        elif seq.status == SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        return seq
